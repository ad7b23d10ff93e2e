/*
 * The controller's loop state, shared by its files: controller.c (start-up,
 * event loop, shutdown) and requests.c (what each frame from a client or an
 * engine does). One ipmpi_ctl_t exists per controller and is passed to
 * everything; only the loop thread touches it.
 */
#ifndef IPMPI_CTL_H
#define IPMPI_CTL_H

#include <stdint.h>

#include <mpi.h>
#include <openssl/ssl.h>

#include "equeue.h"
#include "furlfile.h"
#include "mpilink.h"
#include "runtime.h"
#include "session.h"
#include "shm.h"
#include "watch.h"

typedef struct ipmpi_engine_slot {
    int id, rank;
    int ready;
    int dead;
    char why[128];        /* PMIx state (or reason) of its death */
    char *props;          /* READY JSON, NUL-terminated */
    ipmpi_equeue_t q;     /* requests waiting for this engine */
    ipmpi_req_t *running; /* sent, reply not yet in */
    int held;             /* head request waits: its client is not reading (requests.c) */
} ipmpi_engine_slot_t;

typedef struct ipmpi_ctl {
    const ipmpi_opts_t *o;
    const ipmpi_job_t *job;
    MPI_Comm comm;

    int nengines;
    ipmpi_engine_slot_t *eng;
    int nlive;     /* engines not dead */
    int nbusy;     /* engines with a request running */
    int nheld;     /* engines whose next request is held back (ipmpi_ctl_release_held) */
    int any_died;  /* some rank died or was killed: no MPI_Finalize */
    uint32_t *mark; /* per engine, for duplicate checks in target lists */
    uint32_t markgen;
    int *targets;   /* scratch: resolved target ids (nengines) */

    ipmpi_reqtab_t reqs;
    uint64_t next_req;

    ipmpi_mpilink_t link;
    ipmpi_ctl_watch_t watch;

    ipmpi_security_t sec;
    SSL_CTX *ssl;
    int lfd;
    char host[IPMPI_FURL_HOST_MAX + 1];
    int port;

    /* Sessions by slot; a session id is (generation << 32) | slot, so a
     * reply for a closed session finds nothing. */
    ipmpi_session_t **sess;
    uint32_t *sgen;
    uint32_t scap;
    uint32_t nsess;

    int stopping; /* SHUTDOWN received or shutdown under way */
    char host_id[IPMPI_HOST_ID_MAX]; /* ipmpi_host_id(), "" if unknown: HELLO tells clients */
} ipmpi_ctl_t;

/* requests.c */

/* A complete frame from a client session; takes ownership of parts. */
void ipmpi_ctl_client_frame(void *arg, ipmpi_session_t *s, const ipmpi_hdr_t *h, ipmpi_parts_t *parts);
/* mpilink's alloc hook: the payload an engine's frame is received into
 * (own memfds for the large parts of a reply whose client allows them). */
ipmpi_parts_t *ipmpi_ctl_engine_alloc(void *arg, int rank, const ipmpi_hdr_t *h, const uint64_t *lens);
/* A complete frame from an engine rank; takes ownership of parts. */
void ipmpi_ctl_engine_frame(void *arg, int rank, const ipmpi_hdr_t *h, ipmpi_parts_t *parts);
/* The death watch found rank dead (state: its PMIx state). */
void ipmpi_ctl_rank_dead(void *arg, int rank, const char *state);
/* Marks engine e dead: fails its running and queued requests with EDEAD. */
void ipmpi_ctl_engine_died(ipmpi_ctl_t *c, ipmpi_engine_slot_t *e, const char *why);
/*
 * Dispatch holds an engine's next request while that request's client has
 * more than IPMPI_OUT_HOLD_BYTES of replies it has not read, so a client
 * that never reads cannot make the controller buffer without bound. This
 * resumes held engines whose client caught up or went away, and closes a
 * client that has made no read progress for IPMPI_OUT_STALL_NS while over
 * the limit (other clients' requests queue behind its held ones). Loop
 * thread; cheap when nothing is held.
 */
#define IPMPI_OUT_HOLD_BYTES ((uint64_t)128 << 20)
#define IPMPI_OUT_STALL_NS (30ull * 1000000000ull)
void ipmpi_ctl_release_held(ipmpi_ctl_t *c, uint64_t now);
/* Fails every running and queued request with ESHUTDOWN. */
void ipmpi_ctl_fail_all(ipmpi_ctl_t *c);
/* The session with this id, or NULL when it is gone. */
ipmpi_session_t *ipmpi_ctl_session(const ipmpi_ctl_t *c, uint64_t id);

#endif
