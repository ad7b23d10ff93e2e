/*
 * The engine's private interface: the pieces of an engine (ranks 1..N)
 * that engine.c puts together. bind.c pins the process with hwloc,
 * pyhost.c starts the embedded CPython, link.c moves frames over MPI,
 * watch.c notices a dead controller. Everything here runs on the engine's
 * main thread (the only thread that calls MPI: MPI_THREAD_FUNNELED).
 */
#ifndef IPMPI_ENGINE_H
#define IPMPI_ENGINE_H

#include <stdatomic.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>

#include <mpi.h>

#include "codec.h"
#include "runtime.h"

/* ---- bind.c ---- */

/* Where an engine runs (bind.c): what READY reports. */
typedef struct ipmpi_eng_place {
    char *cpuset;       /* the binding as an hwloc list string ("3", "0-1"); caller frees */
    char *numa;         /* NUMA nodes it touches, logical indexes ("0", "0,1"); caller frees */
    int cores;          /* cores in the binding (at least 1) */
    int bound;          /* 1 if ipmpi_eng_bind bound the process */
    int oversubscribed; /* more local ranks than cores on this node */
    int local_size;     /* ranks on this node, as used for the placement */
} ipmpi_eng_place_t;

/*
 * Applies the --bind policy (auto | core | numa | none; see bind.c for the
 * spread over packages and NUMA nodes) for local rank local_rank of
 * local_size on this node, and describes the result in *pl. A failed bind
 * is logged and the engine goes on unbound. Returns 0, IPMPI_ENOMEM, or
 * IPMPI_EIO when hwloc cannot describe the machine (*pl then holds no
 * strings and cores 1).
 */
int ipmpi_eng_bind(const char *mode, int local_rank, int local_size, ipmpi_eng_place_t *pl);

/* ---- pyhost.c (caller holds the GIL after ipmpi_eng_py_start) ---- */

/*
 * Starts the embedded interpreter: executable and program name set to
 * IPMPI_PYTHON, environment honoured (PYTHONPATH), IPMPI_PYTHONDIR added to
 * sys.path, fatal signals back to their default action and faulthandler
 * enabled so a crash leaves a traceback in the log. Returns 0 with the GIL
 * held by the calling thread, or IPMPI_EPYTHON (already logged).
 */
int ipmpi_eng_py_start(void);

/* Logs what, then the pending Python exception with its traceback (to
 * fd 2, the engine's log), and clears it. GIL held. */
void ipmpi_eng_py_log_error(const char *what);

/* Flushes sys.stdout, sys.stderr and C stdio, ignoring errors, so nothing
 * is lost when the process ends with _exit. GIL held. */
void ipmpi_eng_py_flush(void);

/* ---- wake.c: wake-ups of an engine on a node without the controller ---- */

#define IPMPI_ENG_IKEY_LEN 32

typedef struct ipmpi_eng_wake {
    int fd;         /* UDP socket, -1 when none */
    uint16_t port;  /* its port, told to the controller with READY */
    uint64_t key;   /* random; a datagram must hold it to count */
    int proven;     /* a datagram with the key came: the controller reaches us */
    int32_t eid;    /* this engine's id, named in its rings */
    /* Where the controller's datagrams with the key came from: this
     * engine rings the controller's bell there (len 0: not known yet). */
    struct sockaddr_storage ctl_addr;
    socklen_t ctl_len;
    /* The controller's INTERRUPT and KILL datagrams (wake.c): their
     * HMAC key (told with READY, never sent again), the count of the
     * last one taken (older ones are replays), and the last INTERRUPT
     * taken: its request id, then its count (written in that order). */
    uint8_t ikey[IPMPI_ENG_IKEY_LEN];
    uint64_t last_seq;
    _Atomic uint64_t intr_req, intr_seq;
    /* The watcher thread (ipmpi_eng_wake_watch_start): reads the socket
     * while a request runs; on_intr is called after it took an INTERRUPT. */
    void (*on_intr)(void);
    int running, watching;
} ipmpi_eng_wake_t;

/* Opens the socket (any address, a free port) and draws the key. Returns 0
 * or IPMPI_EIO (logged; the engine then polls with back-off). */
int ipmpi_eng_wake_open(ipmpi_eng_wake_t *w);

/*
 * Sleeps in poll() on the socket for at most timeout_ns (at most
 * unproven_ns until a datagram with the key proved that the controller
 * reaches this socket: a controller that cannot resolve this host or is
 * firewalled off costs back-off polling, not 2 s answers), after a last
 * pending(arg) (is a frame there?) made once every older datagram was
 * read. Returns 1 when a frame is there or a datagram with the key came,
 * 0 on timeout.
 */
int ipmpi_eng_wake_sleep(ipmpi_eng_wake_t *w, uint64_t timeout_ns, uint64_t unproven_ns, int (*pending)(void *arg),
                         void *arg);

/*
 * Interrupts of an engine on another node (the controller cannot signal
 * it): the controller sends a datagram of the wake key, the kind
 * (IPMPI_WAKE_INTERRUPT or IPMPI_WAKE_KILL, doorbell.h), the request id and a count,
 * with an HMAC-SHA256 of the last three under ikey (READY's "intr" part),
 * so that someone who sees the wake key on the network can still only
 * wake the engine. While a request runs, a thread of the engine watches
 * the socket (the main thread runs Python); idle, the main thread's
 * ipmpi_eng_wake_sleep reads them. An INTERRUPT is kept in intr_req and
 * intr_seq and on_intr() is called (the engine raises KeyboardInterrupt
 * if it names the current request, as for the doorbell's); a KILL ends
 * the process at once (SIGKILL, as the controller's for an engine of its
 * own node).
 */
/* Starts the watcher thread. Returns 0 or IPMPI_EIO (logged: interrupts
 * then reach this engine only between requests). */
int ipmpi_eng_wake_watch_start(ipmpi_eng_wake_t *w, void (*on_intr)(void));
/* A request starts (running 1) or ended (0); when this returns with 0,
 * the thread no longer reads the socket. */
void ipmpi_eng_wake_watch(ipmpi_eng_wake_t *w, int running);

/* 1 if an INTERRUPT datagram (not the doorbell's) named req_id (engine.c). */
int ipmpi_eng_far_interrupt_for(uint64_t req_id);

/* Rings the controller's bell from another node (ctl/wake.c): one
 * datagram of the key and the engine id to where the controller's
 * datagrams came from; nothing before one came. */
void ipmpi_eng_wake_ring(const ipmpi_eng_wake_t *w);

/* Frames to rank 0 are followed by a ring of w (NULL: none); set once
 * before the first send, by engines off the controller's node. */
void ipmpi_eng_link_set_wake(const ipmpi_eng_wake_t *w);

/* ---- pymod.c: the built-in module _ipmpi_engine (see there) ---- */

struct ipmpi_doorbell;

/* Registers _ipmpi_engine; call before ipmpi_eng_py_start. Returns 0 or
 * IPMPI_ENOMEM. */
int ipmpi_eng_pymod_register(void);

/* What the module sends through: the engine's communicator and id, its
 * doorbell (NULL: none) and the send's controller-gone question. */
void ipmpi_eng_pymod_bind(MPI_Comm comm, int eid, const struct ipmpi_doorbell *bell, int (*gone)(void *arg),
                          void *gone_arg);

/* The request that runs now (its header), or NULL when none. */
void ipmpi_eng_pymod_request(const ipmpi_hdr_t *h);

/* ---- link.c (no Python; may run with the GIL released) ---- */

/*
 * Sends one frame to rank dest: the header plus length table as one
 * IPMPI_TAG_HDR message, then each part as IPMPI_TAG_PART chunks of at
 * most IPMPI_MPI_CHUNK bytes (one empty message for an empty part). bufs
 * and lens have h->nparts entries; borrowed for the call. A send to a
 * rank that died would never complete, so each message is sent
 * non-blocking and, while it does not complete, gone(arg) (may be NULL)
 * is asked about once a second: nonzero ends the send with
 * IPMPI_ECLOSED. Returns 0, IPMPI_EINVAL (too many parts), IPMPI_ENOMEM,
 * IPMPI_EMPI or IPMPI_ECLOSED.
 */
/* Frames to rank 0 of the job's own communicator are announced on
 * bell (doorbell.h, the controller's bell); NULL (joined engines): none.
 * Set once before the first send. */
void ipmpi_eng_link_set_bell(struct ipmpi_doorbell *bell);
int ipmpi_eng_link_send(MPI_Comm comm, int dest, const ipmpi_hdr_t *h, const uint64_t *lens,
                    const void *const *bufs, int (*gone)(void *arg), void *arg);

/*
 * Called while the next message of a part has not arrived (the controller
 * may be forwarding it as it comes from the client). first is 1 on the
 * first call since a message arrived. Spins or sleeps as the engine's
 * policy says; returns 0 to go on waiting, or a negative code to give up.
 */
typedef int (*ipmpi_eng_link_wait_cb)(void *arg, int first);

/*
 * Receives one part of len bytes from rank src straight into buf (len
 * bytes, borrowed), as messages of any size up to IPMPI_MPI_CHUNK, counting
 * bytes (one empty message for an empty part). With buf NULL the part is
 * received into a scratch buffer and dropped, to keep the stream in step
 * when memory for the part could not be had. Returns 0; IPMPI_EABORTED when
 * an empty message came inside a non-empty part (the controller ended the
 * frame early: no more of it follows); the wait callback's code;
 * IPMPI_EPROTO (a message larger than the rest of the part), IPMPI_ENOMEM
 * or IPMPI_EMPI.
 */
int ipmpi_eng_link_recv_part(MPI_Comm comm, int src, void *buf, uint64_t len, ipmpi_eng_link_wait_cb wait,
                             void *warg);

/* ---- tree.c: broadcast trees (IPMPI_F_TREE requests) ---- */

/* 1 when rank (of this engine's communicator) is gone; rank 0 is the
 * controller. Asked about once a second by every tree wait. */
typedef int (*ipmpi_eng_rank_gone_cb)(void *arg, int rank);

/* Deaths of this job's ranks from the PMIx process table, asked at most
 * once a second; dead[] has size entries (allocated by the owner). */
typedef struct ipmpi_eng_deaths {
    const char *nspace;
    int have_pmix;
    int size;
    uint8_t *dead;
    uint64_t next;
} ipmpi_eng_deaths_t;
int ipmpi_eng_rank_dead(ipmpi_eng_deaths_t *d, int rank, uint64_t now);

/* Receives the subtree (IPMPI_TAG_TREE) that follows a tree request from
 * src; *ranks is malloc'd. IPMPI_EDEAD if src died first. */
int ipmpi_eng_tree_recv(MPI_Comm comm, int src, int32_t **ranks, uint32_t *n, ipmpi_eng_rank_gone_cb gone,
                        void *arg);
/* Sends request h (its parts in bufs) to each child of ranks[0..n) with
 * its subtree, rings its doorbell, and waits until all went (sends to a
 * child that died are left). */
int ipmpi_eng_tree_forward(MPI_Comm comm, const ipmpi_hdr_t *h, const uint64_t *lens, char *const *bufs,
                           const int32_t *ranks, uint32_t n, const struct ipmpi_doorbell *bell,
                           ipmpi_eng_rank_gone_cb gone, void *arg);
/* Room for need bytes in *buf (capacity *cap, doubling from 4 KiB);
 * 0 or IPMPI_ENOMEM (then *buf is unchanged). */
int ipmpi_eng_tree_reserve(uint8_t **buf, size_t *cap, size_t need);
/* Appends each child's gathered replies to *buf (length *len, capacity
 * *cap); a child that died is skipped. While it waits for a child of
 * this node it rings the child's doorbell on bell again now and then: a
 * ring lost to MPI's late delivery would leave it asleep. */
int ipmpi_eng_tree_gather(MPI_Comm comm, const struct ipmpi_doorbell *bell, const int32_t *ranks, uint32_t n,
                          uint8_t **buf, size_t *len,
                          size_t *cap, ipmpi_eng_rank_gone_cb gone, void *arg);
/* buf as one IPMPI_TAG_GATHER message to the parent engine; IPMPI_EDEAD
 * if it died first (the caller then sends to the controller). */
int ipmpi_eng_tree_send_up(MPI_Comm comm, int parent, const uint8_t *buf, size_t len,
                           ipmpi_eng_rank_gone_cb gone, void *arg);

/* ---- join.c (ipmpi_eng_join: runtime.h) ---- */

/* 1 when the liveness connection fd ended (the controller is gone). */
int ipmpi_eng_join_gone(int fd);

/* ---- watch.c ---- */

typedef struct ipmpi_eng_watch {
    const ipmpi_job_t *job; /* borrowed for the engine's life */
    pid_t ppid;             /* parent at start: a change means the launcher died */
    int pmix_state;         /* 0 untried, 1 queries answer, -1 queries do not work here */
    uint64_t last_check;    /* ipmpi_now_ns() of the last check */
} ipmpi_eng_watch_t;

void ipmpi_eng_watch_init(ipmpi_eng_watch_t *w, const ipmpi_job_t *job, uint64_t now);

/*
 * Returns 1 if the controller (rank 0) is known to be gone: the PMIx
 * process table says it terminated, the PMIx server stopped answering after
 * it had answered, or this process was re-parented (its launcher died).
 * Returns 0 otherwise, also when nothing can be learned (no PMIx, or a
 * launcher like srun that does not answer process-table queries).
 */
int ipmpi_eng_watch_controller_gone(ipmpi_eng_watch_t *w, uint64_t now);

#endif
