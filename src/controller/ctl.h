/*
 * The controller's loop state, shared by its files: controller.c (start-up,
 * event loop, shutdown) and requests.c (what each frame from a client or an
 * engine does). One ipmpi_ctl_t exists per controller and is passed to
 * everything; only the loop thread touches it.
 */
#ifndef IPMPI_CTL_H
#define IPMPI_CTL_H

#include <poll.h>
#include <stdint.h>
#include <sys/socket.h>

#include <mpi.h>
#include <openssl/ssl.h>

#include "cpusec.h"
#include "equeue.h"
#include "furlfile.h"
#include "json.h"
#include "mpilink.h"
#include "results.h"
#include "runtime.h"
#include "session.h"
#include "sched.h"
#include "shm.h"
#include "tasks.h"
#include "watch.h"

typedef struct ipmpi_engine_slot {
    /* What a request to all engines reads of each (requests.c, tree.c,
     * dispatch.c) comes first, in one cache line: at hundreds of engines
     * the loop walks every slot several times per request, after the
     * engines' processes have taken the cores (and the caches). */
    int id, rank;
    int ready;
    int dead;
    int held;             /* head request waits: its client is not reading (dispatch.c) */
    int rings;            /* a ring came from it (wake.c): the loop may sleep on the bell while it works */
    int join_first;       /* of a job that joined later (join.c): its engines' first id */
    int near;             /* on the controller's node: its doorbell is in reach (doorbell.h), set once */
    int wake_fd;          /* on another node: where its wake-up datagrams go (wake.c); -1: none */
    int tree_root;        /* a root of the all-engine tree (tree.c): rung again while a gang waits */
    uint64_t wake_due;
    uint64_t host_key;    /* nonzero, one per host of wake_addr (wake.c): trees group engines by it (tree.c) */
    uint64_t gather_mark; /* the gathered frame its reply was last seen in (tree.c: no engine twice) */
    uint64_t wake_key, wake_gap;
    char *props;          /* READY JSON, NUL-terminated */
    char why[128];        /* PMIx state (or reason) of its death */
    struct sockaddr_storage wake_addr;
    socklen_t wake_len;
    /* Of a job that joined later: the TCP connection whose end says the
     * engine is gone (-1: none yet). */
    int live_fd;
    /* The key of its INTERRUPT and KILL datagrams (READY's "intr" part,
     * admin.c), when intr_ok; they go where its wake-ups go. */
    uint8_t intr_key[32];
    int intr_ok;
} ipmpi_engine_slot_t;

typedef struct ipmpi_ctl {
    const ipmpi_opts_t *o;
    const ipmpi_job_t *job;
    MPI_Comm comm;

    int nengines;
    int cap_engines; /* slots allocated: more engines may join up to it (join.c) */
    ipmpi_engine_slot_t *eng;
    int nlive;     /* engines not dead */
    int nbusy;     /* engines with a request running */
    int nbusy_far; /* of them, on another node or joined: they ring the bell by datagram (wake.c) */
    /* Engines on another node or joined that have not rung yet (wake.c;
     * one that died stays counted): while none, the bell's count need not
     * look for a busy one of them (dispatch.c). */
    int nmute_far;
    uint64_t bell_sleeps, bell_rings, far_rings; /* counted for the log at the end */
    /* Gathered frames of trees seen (also numbers them: gather_mark), and
     * of them those forwarded to the client whole (tree.c). */
    uint64_t gathered, gathered_whole;
    /* Requests to every engine sent as a gang (tree.c, sched.h), and the
     * gathered frames settled as runs of engines rather than one by one. */
    uint64_t gangs, gang_frames;
    /* The broadcast tree of every live engine (tree.c), built for the
     * engines as they were at engines_gen (all_gen): ready and deaths
     * bump engines_gen, and the next request to all builds it again. NULL:
     * none (not built, or some live engine cannot take part in a tree). */
    struct ipmpi_ctl_alltree *all;
    uint64_t engines_gen, all_gen;
    uint32_t *gang_runs; /* scratch: (first, count) of each run a gathered frame settles (tree.c) */
    /* How long a tree's subtree takes, from the controller's send to its
     * root until that root's gathered frame came (moving average, tree.c):
     * the first ring-again of a root, and the loop's longest sleep on its
     * bell, wait about that long rather than a fixed few ms, which at
     * hundreds of engines woke the loop several times per request for
     * nothing. 0 until the first tree came back. */
    uint64_t tree_ns;
    /* Frames this node's engines announced on the bell that MPI has not
     * delivered yet (controller.c, announced_on_the_way): the announced count
     * last seen ahead, and since when. They are on their way, so the loop
     * polls for them at once for a while instead of backing off. */
    uint64_t ann_ahead, ann_since;
    ipmpi_cpusec_t cpu; /* --cpu-sections (cpusec.h) */
    int nheld;     /* engines whose next request is held back (ipmpi_ctl_release_held) */
    /* Task clients whose tasks are held back: their sessions have too many
     * unread results (tasks.c holds, ipmpi_ctl_release_held releases; one
     * reference each). */
    ipmpi_sched_client_t **held_tc;
    uint32_t nheld_tc, held_tc_cap;
    int any_died;  /* some rank died or was killed: no MPI_Finalize */
    uint32_t *mark; /* per engine, for duplicate checks in target lists */
    uint32_t markgen;
    int *targets;   /* scratch: resolved target ids (nengines) */
    int *tree_ids;  /* scratch: the engines of a broadcast tree (requests.c) */
    uint32_t *gather_ids; /* scratch: the engines a gathered frame answers for (tree.c) */
    /* Scratch of a tree's send (tree.c), room for every engine: 4 KiB
     * malloc'd per request at 256 engines is a large-bin request, for
     * which glibc consolidated its fast bins each time (perf: 1.4% of the
     * controller's CPU per request). */
    struct ipmpi_tree_keyed *tree_keys;
    uint32_t *tree_slices; /* 2 * (engines + 1): the top's slices, start then len */
    uint64_t rering_at; /* next ipmpi_ctl_rering */
    int wake_fd4, wake_fd6; /* UDP sockets for wake-ups (wake.c), -1 until needed */

    ipmpi_reqtab_t reqs;
    uint64_t next_req;     /* dispatch ids of requests and task attempts */
    uint64_t intr_seq;     /* INTERRUPT and KILL datagrams sent (admin.c) */
    ipmpi_sched_t sched;   /* what each engine runs next: queues, in flight */
    ipmpi_tasks_t tasks;   /* the task store (tasks.c) */
    ipmpi_results_t results; /* kept results of MultiEngine requests (results.c) */
    uint64_t instance;     /* random, names this controller in request ids */
    uint32_t next_sno;     /* session numbers handed out at HELLO */

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
    uint32_t sfree;  /* no free slot below this one */

    /* Connections before HELLO (controller.c): their per-address counts
     * and rate-limited refusal logs, and the list of them, oldest first,
     * which give way when an address or the table has too many. */
    ipmpi_gate_t *gate;
    ipmpi_session_t *pend_head, *pend_tail;
    uint32_t hs_rot;          /* where the next turn's handshakes start */
    uint64_t accept_resume;   /* out of fds: no accept before this (ns) */

    struct ipmpi_join *join; /* engines joining later (join.c); NULL: not accepted */

    int stopping; /* SHUTDOWN received or shutdown under way */
    char host_id[IPMPI_HOST_ID_MAX]; /* ipmpi_host_id(), "" if unknown: HELLO tells clients */
} ipmpi_ctl_t;

/* ---- the controller's files: requests.c (routing), admin.c (kinds the
 * controller answers), dispatch.c (engines), stream.c (cut-through),
 * tasks.c (the task store) ---- */

static inline int ipmpi_ctl_is_engine_kind(unsigned k)
{
    return (ipmpi_kind_who(k) & IPMPI_KW_ENGINE) != 0;
}

/* A complete frame from a client session; takes ownership of parts. */
void ipmpi_ctl_client_frame(void *arg, ipmpi_session_t *s, const ipmpi_hdr_t *h, ipmpi_parts_t *parts);
/* mpilink's alloc hook: the payload an engine's frame is received into
 * (own memfds for the large parts of a reply whose client allows them). */
ipmpi_parts_t *ipmpi_ctl_engine_alloc(void *arg, int rank, const ipmpi_hdr_t *h, const uint64_t *lens);
/* A complete frame from an engine rank; takes ownership of parts. */
void ipmpi_ctl_engine_frame(void *arg, int rank, const ipmpi_hdr_t *h, ipmpi_parts_t *parts);
/* The death watch found rank dead (state: its PMIx state). */
void ipmpi_ctl_rank_dead(void *arg, int rank, const char *state);

/*
 * Engines joining later (join.c): with --accept-joins FILE the controller
 * opens an MPI port, writes it to FILE and accepts, on a thread of its
 * own, jobs started with `ipmpi --join FILE`; their engines get the next
 * ids. join_start returns 0 (also when joins are off) or an error.
 * join_fds adds the loop's descriptors to pfd (at most cap; returns how
 * many), join_events handles what they reported; join_stop closes the
 * port (the thread stays blocked until the process exits).
 */
int ipmpi_ctl_join_start(ipmpi_ctl_t *c);

/*
 * Broadcast trees (tree.c): tree_kind says whether requests of a kind may
 * travel as a tree, tree_engine whether engine e can take part now (idle,
 * on this node, of this job); tree_send starts r in flight on engines ids
 * and sends it as a tree; tree_orphans sends it again to the engines below
 * a relay that died (call before its death settles); tree_gathered takes
 * an IPMPI_F_GATHER frame apart (takes parts).
 */
int ipmpi_ctl_tree_kind(unsigned kind);
/* A request of kind from session s to n engines may travel as a tree:
 * trees are on, n reaches --tree-min, the kind may, and the client is not
 * held (submit's test, and the gang's below). */
int ipmpi_ctl_tree_may(ipmpi_ctl_t *c, const ipmpi_session_t *s, unsigned kind, int n);
/* A request of h's kind to all engines may go as one gang:
 * nothing else runs, every live engine can take part in a tree, and the
 * all-engine tree is built (here, when the engines changed). 1 or 0. */
int ipmpi_ctl_tree_all_ready(ipmpi_ctl_t *c, const ipmpi_session_t *s, const ipmpi_hdr_t *h);
/* Sends r to every live engine as a gang with the all-engine tree (after
 * tree_all_ready said 1; r->pending = the live engines). */
void ipmpi_ctl_tree_send_all(ipmpi_ctl_t *c, ipmpi_req_t *r);
/* The engine id of root k of gang request r's tree (the engines the
 * controller sent it to), or -1 past the last: the ring-again pass's
 * engines while only the gang is in flight (dispatch.c). */
int ipmpi_ctl_tree_gang_root(const ipmpi_req_t *r, uint32_t k);
/* Frees the all-engine tree (the controller's end). */
void ipmpi_ctl_tree_all_free(ipmpi_ctl_t *c);
/* 1 when session has so many unread replies that its next request waits
 * (dispatch.c; the scheduler's hold test). */
int ipmpi_ctl_must_hold(ipmpi_ctl_t *c, uint64_t session);
int ipmpi_ctl_tree_engine(const ipmpi_ctl_t *c, const ipmpi_engine_slot_t *e);
void ipmpi_ctl_tree_send(ipmpi_ctl_t *c, ipmpi_req_t *r, const int *ids, int n);
void ipmpi_ctl_tree_orphans(ipmpi_ctl_t *c, const ipmpi_engine_slot_t *e);
void ipmpi_ctl_tree_gathered(ipmpi_ctl_t *c, int rank, ipmpi_parts_t *parts);
/* Calls fn for each engine's reply in gathered part 0 of g (checked when
 * it arrived), with a copy of its parts that fn borrows. Returns 0, or
 * the first non-zero return of fn (or IPMPI_ENOMEM) after which it stops. */
int ipmpi_ctl_gathered_each(const ipmpi_parts_t *g, int (*fn)(void *arg, const ipmpi_hdr_t *h, ipmpi_parts_t *p),
                            void *arg);
uint32_t ipmpi_ctl_join_nfds(const ipmpi_ctl_t *c);
uint32_t ipmpi_ctl_join_fds(ipmpi_ctl_t *c, struct pollfd *pfd, uint32_t cap);
void ipmpi_ctl_join_events(ipmpi_ctl_t *c, const struct pollfd *pfd, uint32_t n);
void ipmpi_ctl_join_stop(ipmpi_ctl_t *c);
/* Engine e (of a joined job, else nothing) is gone: when its whole job
 * is, the link stops probing that job's communicator. */
void ipmpi_ctl_join_engine_gone(ipmpi_ctl_t *c, const ipmpi_engine_slot_t *e);
/* Marks engine e dead: fails its running and queued requests with EDEAD. */
void ipmpi_ctl_engine_died(ipmpi_ctl_t *c, ipmpi_engine_slot_t *e, const char *why);
/*
 * Dispatch holds an engine's next request while that request's client has
 * more than --client-unread-bytes of replies it has not read, so a client
 * that never reads cannot make the controller buffer without bound. This
 * resumes held engines whose client caught up or went away, and closes a
 * client that has made no read progress for IPMPI_OUT_STALL_NS while over
 * the limit (other clients' requests queue behind its held ones). Loop
 * thread; cheap when nothing is held.
 */
#define IPMPI_OUT_HOLD_BYTES(c) ((c)->o->client_unread_bytes)
/* Streamed output (IPMPI_F_MORE replies) is dropped, not queued, for a
 * client with more than this unread. */
#define IPMPI_OUT_STREAM_BYTES ((uint64_t)16 << 20)
#define IPMPI_OUT_STALL_NS (30ull * 1000000000ull)
void ipmpi_ctl_release_held(ipmpi_ctl_t *c, uint64_t now);

/* Work sent to engine e (d = 1) or settled (d = -1): counts nbusy and
 * nbusy_far. */
void ipmpi_ctl_busy(ipmpi_ctl_t *c, const ipmpi_engine_slot_t *e, int d);
/* How many frames from engines of this node the loop may sleep for before
 * it has something to do (the controller's bell, doorbell.h); 0: it may
 * not sleep on the bell now (work on engines that cannot ring it, sends
 * or receives under way, clients held). */
uint64_t ipmpi_ctl_bell_count(ipmpi_ctl_t *c);

/* Looks, at most every IPMPI_RERING_NS, for engines with work in flight
 * whose wake-up is due again (ipmpi_ctl_wake_again, see dispatch.c);
 * called each busy loop turn. */
#define IPMPI_RERING_NS (2000000ull)
void ipmpi_ctl_rering(ipmpi_ctl_t *c, uint64_t now);

/* ---- wake.c: engines on other nodes sleep on a UDP socket ---- */

/* READY's second part "wake PORT KEY HOST": where e's wake-ups go. */
void ipmpi_ctl_wake_register(ipmpi_ctl_t *c, ipmpi_engine_slot_t *e, const char *text, size_t len);
/* A frame was posted to rank: send its wake-up (mpilink's wake hook). */
void ipmpi_ctl_wake(ipmpi_ctl_t *c, int rank);
/* e's work is still unanswered: ring its doorbell (this node) or send its
 * datagram (another node) again when its back-off is due. */
void ipmpi_ctl_wake_again(ipmpi_ctl_t *c, ipmpi_engine_slot_t *e, uint64_t now);
/* e was just posted work it will answer only after about gap_ns: its first
 * wake-up again comes then (at most 1 s), not after the usual 2 ms (a gap
 * below that changes nothing). */
void ipmpi_ctl_wake_later(ipmpi_ctl_t *c, ipmpi_engine_slot_t *e, uint64_t gap_ns);
void ipmpi_ctl_wake_fini(ipmpi_ctl_t *c);
/* Reads the rings of engines on other nodes waiting on the wake-up
 * sockets (engine/wake.c); returns how many were valid. */
uint64_t ipmpi_ctl_wake_rings(ipmpi_ctl_t *c);
/* requests.c: replies. send_json sends b (and frees its text) as the
 * JSON reply to req, or an ENOMEM error if building it ran out of
 * memory; reply_err sends an error reply with a formatted message. */
void ipmpi_ctl_send_json(ipmpi_session_t *s, const ipmpi_hdr_t *req, jbuf_t *b);
void ipmpi_ctl_reply_err(ipmpi_session_t *s, const ipmpi_hdr_t *req, int status, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* "engine 2 died (rank 3): why" into buf. */
void ipmpi_ctl_dead_msg(const ipmpi_engine_slot_t *e, char *buf, size_t cap);

/* admin.c: the kinds the controller answers. n targets are in c->targets. */
void ipmpi_ctl_do_hello(ipmpi_ctl_t *c, ipmpi_session_t *s, const ipmpi_hdr_t *h, const ipmpi_parts_t *p);
void ipmpi_ctl_do_get_ids(ipmpi_ctl_t *c, ipmpi_session_t *s, const ipmpi_hdr_t *h);
void ipmpi_ctl_do_queue_status(ipmpi_ctl_t *c, ipmpi_session_t *s, const ipmpi_hdr_t *h, int n);
void ipmpi_ctl_do_clear_queue(ipmpi_ctl_t *c, ipmpi_session_t *s, const ipmpi_hdr_t *h, int n);
void ipmpi_ctl_do_properties(ipmpi_ctl_t *c, ipmpi_session_t *s, const ipmpi_hdr_t *h, int n);
void ipmpi_ctl_do_release(ipmpi_session_t *s, const ipmpi_parts_t *p);
void ipmpi_ctl_do_interrupt(ipmpi_ctl_t *c, ipmpi_session_t *s, const ipmpi_hdr_t *h, const ipmpi_parts_t *p, int n);
/*
 * Sends signal sig to engine e's process if the controller may: the
 * engine is a sibling process (same launcher on this node, hence the same
 * pid namespace: /proc/PID/stat's ppid is ours). Returns 0, or
 * IPMPI_ENOENT when it cannot be signalled from here.
 */
int ipmpi_ctl_signal_engine(const ipmpi_engine_slot_t *e, int sig);
/* The process id engine e gave in its READY, unchecked (0: none). */
long ipmpi_ctl_engine_pid(const ipmpi_engine_slot_t *e);
/* READY's third part "intr HEX": the key of e's INTERRUPT datagrams. */
void ipmpi_ctl_intr_register(ipmpi_engine_slot_t *e, const char *text, size_t len);
/* Sends e (on another node or joined: no signal reaches it) an INTERRUPT
 * (kind IPMPI_WAKE_INTERRUPT: of request req_id) or KILL datagram
 * (src/engine/wake.c). Returns 0, or IPMPI_ENOENT when e has no such
 * socket or key, IPMPI_EIO when it could not be sent. */
int ipmpi_ctl_far_signal(ipmpi_ctl_t *c, const ipmpi_engine_slot_t *e, uint32_t kind, uint64_t req_id);
void ipmpi_ctl_do_shm_probe(ipmpi_session_t *s, const ipmpi_hdr_t *h, const ipmpi_parts_t *p);

/* dispatch.c */
/* Sends a reply to s; parts in own memfds or (vm) large parts go by
 * shared memory when the session may borrow more. Returns 0 or a code. */
int ipmpi_ctl_send_reply(ipmpi_session_t *s, const ipmpi_hdr_t *h, ipmpi_parts_t *parts, int vm);
/* Hands engine e what the scheduler picks for it, as long as it picks. */
void ipmpi_ctl_dispatch(ipmpi_ctl_t *c, ipmpi_engine_slot_t *e);
/* Hands queued tasks to engines with room, one per engine per round. */
void ipmpi_ctl_kick(ipmpi_ctl_t *c);
/* One target of r is settled without the engine: error reply, reference dropped. */
void ipmpi_ctl_req_fail_one(ipmpi_ctl_t *c, ipmpi_req_t *r, int engine, int status, const char *msg);
/* Engine e's final reply (header flags hflags) is in: the scheduler takes
 * its in-flight item off (into *it), e is no longer busy, and its
 * properties changed if the reply says so. The caller settles *it. */
void ipmpi_ctl_reply_in(ipmpi_ctl_t *c, ipmpi_engine_slot_t *e, uint16_t hflags, uint64_t now, ipmpi_sitem_t *it);
/* r's last reply is in (pending 0): it leaves the table and is freed. */
void ipmpi_ctl_req_release(ipmpi_ctl_t *c, ipmpi_req_t *r);

/* stream.c */
/* The session's offer of a frame to cut through (set as s->stream_begin). */
ipmpi_session_stream_t *ipmpi_ctl_stream_begin(void *arg, ipmpi_session_t *s, const ipmpi_hdr_t *h,
                                               ipmpi_parts_t *parts);
/* Starts copying a request's parts out of the client's memory
 * (doc/protocol.md section 5), a step per loop turn, cutting through when
 * it can; the session reads no further frame meanwhile, and the request
 * is routed (ipmpi_ctl_route) once copied. Returns 1 (p is then the job's
 * business: the caller drops its own reference) or -1 (answered). */
int ipmpi_ctl_copy_vm(ipmpi_ctl_t *c, ipmpi_session_t *s, const ipmpi_hdr_t *h, ipmpi_parts_t *p,
                      const ipmpi_shmref_t *vm, uint32_t nvm);
/* One step of every session's copy job; returns how many ran (the loop
 * does not sleep while some do). */
int ipmpi_ctl_vmjobs_step(ipmpi_ctl_t *c);
/* s goes away: its copy job is abandoned. */
void ipmpi_ctl_vmjob_drop(ipmpi_session_t *s);
/* requests.c: what a complete client frame does once its parts are all
 * in the controller's memory; takes p. */
void ipmpi_ctl_route(ipmpi_ctl_t *c, ipmpi_session_t *s, const ipmpi_hdr_t *h, ipmpi_parts_t *p);
/* 1 while r's payload is still being forwarded as it arrives. */
int ipmpi_ctl_stream_active(const ipmpi_req_t *r);
/* Aborts r's unfinished stream (the engine answers EABORTED). */
void ipmpi_ctl_stream_abort(ipmpi_req_t *r, const char *why);
/* Another request was queued for r's engine: r's stream is withdrawn. */
void ipmpi_ctl_stream_withdraw(ipmpi_req_t *r);
/* r is settled without its stream's engine; drop_op: its sends are gone. */
void ipmpi_ctl_stream_detach(ipmpi_req_t *r, int drop_op);

/* tasks.c */
int ipmpi_ctl_tasks_init(ipmpi_ctl_t *c);
void ipmpi_ctl_tasks_fini(ipmpi_ctl_t *c);
/* A TASK_* frame from a tc session; takes p. */
void ipmpi_ctl_task_frame(ipmpi_ctl_t *c, ipmpi_session_t *s, const ipmpi_hdr_t *h, ipmpi_parts_t *p);
/* Sends task t's current stage to e (t is in flight there). Returns 0 or a code. */
int ipmpi_ctl_task_send(ipmpi_ctl_t *c, ipmpi_engine_slot_t *e, ipmpi_task_t *t);
/* e answered t (taken out of flight); takes parts. */
void ipmpi_ctl_task_reply(ipmpi_ctl_t *c, ipmpi_engine_slot_t *e, ipmpi_task_t *t, const ipmpi_hdr_t *h,
                          ipmpi_parts_t *parts);
/* t's attempt on engine was lost (death, send failure, shutdown). */
void ipmpi_ctl_task_lost(ipmpi_ctl_t *c, ipmpi_task_t *t, int32_t engine, int status, const char *msg);
/* Finishes every scheduled task with status and msg (shutdown, no engines left). */
void ipmpi_ctl_tasks_fail_all(ipmpi_ctl_t *c, int status, const char *msg);
/* s goes away: its scheduler record loses the session's reference. */
void ipmpi_ctl_tasks_session_closed(ipmpi_ctl_t *c, ipmpi_session_t *s);

/* results.c */
int ipmpi_ctl_results_init(ipmpi_ctl_t *c);
void ipmpi_ctl_results_fini(ipmpi_ctl_t *c);
/* r (an engine request of mec session s) gets a kept result under its id. */
void ipmpi_ctl_result_open(ipmpi_ctl_t *c, const ipmpi_session_t *s, ipmpi_req_t *r);
/* One final reply of r for target (parts borrowed; NULL: none): kept and
 * sent to whoever fetches r meanwhile. owner_got: r's own session got it. */
void ipmpi_ctl_result_reply(ipmpi_ctl_t *c, ipmpi_req_t *r, int32_t target, int32_t status, ipmpi_parts_t *parts,
                            int owner_got);
/* The final replies of count engines to r, as one IPMPI_F_GATHER part
 * (parts borrowed), which r's own session got: kept whole, and sent to
 * whoever fetches r meanwhile (whole, or one frame per engine to a fetch
 * without IPMPI_F_GATHER_OK). */
void ipmpi_ctl_result_gathered(ipmpi_ctl_t *c, ipmpi_req_t *r, ipmpi_parts_t *parts, uint32_t count);
/* RESULT_FETCH or RESULT_CLEAR from a mec session; p borrowed. */
void ipmpi_ctl_result_frame(ipmpi_ctl_t *c, ipmpi_session_t *s, const ipmpi_hdr_t *h, const ipmpi_parts_t *p);

/* Holds cl's tasks back (its session has more than --client-unread-bytes of
 * unread replies) until ipmpi_ctl_release_held sees it read them. */
void ipmpi_ctl_hold_task_client(ipmpi_ctl_t *c, ipmpi_sched_client_t *cl);

/* Fails every running and queued request with ESHUTDOWN. */
void ipmpi_ctl_fail_all(ipmpi_ctl_t *c);
/* The session with this id, or NULL when it is gone. */
ipmpi_session_t *ipmpi_ctl_session(const ipmpi_ctl_t *c, uint64_t id);

#endif
