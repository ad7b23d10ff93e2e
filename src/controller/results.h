/*
 * The results of MultiEngine requests, kept in the controller so that a
 * client that lost its link (or a new client with the same furl) can
 * fetch them (doc/protocol.md section 7). Every engine request a mec
 * session sends gets a record keyed by its user-visible id, the session
 * number HELLO reported and the client's req_id; each final reply of the
 * request is kept there (a reference to the reply's parts: no copy) and
 * forwarded to every session that fetches the id while it runs.
 *
 * Memory (--result-memory, rstore.h): replies of requests still running
 * are counted; finished records are entries, evicted in rstore's order:
 * delivered ones first (those whose submitter got every reply, or that
 * were fetched), bounded by a share of the budget of their own, then the
 * others (their client went away), oldest first. A running request whose
 * replies alone would exceed the budget keeps no replies: it goes on, and
 * its id reads as evicted.
 *
 * Thread safety: none; the controller's loop thread only.
 */
#ifndef IPMPI_CTL_RESULTS_H
#define IPMPI_CTL_RESULTS_H

#include <stdint.h>

#include "equeue.h"
#include "rstore.h"

/* Sessions that may wait on one running request (a fetch each). */
#define IPMPI_RESULT_SUBS_MAX 64u
/* Delivered results keep at most budget / this. */
#define IPMPI_RESULT_DELIVERED_SHARE 64u

typedef struct ipmpi_rreply {
    int32_t target, status;
    ipmpi_parts_t *parts; /* owned reference; NULL for none */
    /* Engines' replies it holds: 1, or several as one IPMPI_F_GATHER part
     * (target IPMPI_TARGET_ALL: each inner frame names its engine). */
    uint32_t count;
} ipmpi_rreply_t;

typedef struct ipmpi_result {
    uint64_t key;           /* first (ipmpi_idtab_t): session number << 32 | client req_id */
    ipmpi_rentry_t e;       /* in the store once finished */
    uint8_t kind;
    int dropped;            /* too large: its replies are not kept (the id reads as evicted) */
    int missed;             /* some reply did not reach the submitter */
    uint32_t total, nrep;   /* nrep entries of reps used */
    uint32_t ngot;          /* engines' replies in (a gathered entry holds several) */
    uint64_t bytes;         /* counted for the replies kept so far */
    ipmpi_rreply_t *reps;   /* room for repcap entries (grown as replies come: a tree's
                             * replies to N engines are a few gathered entries), nrep filled */
    uint32_t repcap;
    ipmpi_req_t *req;       /* while running (r->res points back); NULL once finished */
    struct ipmpi_rsub {
        uint64_t session, client_req;
        uint16_t flags;     /* the fetch's IPMPI_F_SHM_OK, IPMPI_F_VM_OK, IPMPI_F_GATHER_OK */
    } *subs;
    uint32_t nsubs;
} ipmpi_result_t;

typedef struct ipmpi_results {
    ipmpi_idtab_t tab;      /* records by key */
    ipmpi_rstore_t st;
} ipmpi_results_t;

#endif
