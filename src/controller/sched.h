/*
 * The controller's scheduler: what each engine runs next. No I/O, no
 * clock of its own (callers pass `now`), CMocka-tested
 * (tests/unit/test_sched.c).
 *
 * Two policies share the engines (doc/protocol.md sections 2 and 6):
 *
 * - MultiEngine requests (ipmpi_req_t) wait in a FIFO per target engine
 *   and go to an engine only when it has nothing in flight, so requests
 *   to one engine run in the order they were sent and clear_queue can
 *   still take back all that waits.
 * - Tasks (ipmpi_stask_t, embedded in the controller's task records) wait
 *   in one FIFO per client; clients are served round robin, one task per
 *   turn. A task goes to any engine that has room: an engine may hold
 *   1 + depth tasks in flight (the rest wait ahead in its MPI queue, so it
 *   never idles for a round trip), but only while its tasks are short
 *   (LOOKAHEAD_MAX_NS): for long tasks look-ahead gains nothing and would
 *   make a task wait behind a long one while another engine idles.
 *
 * When both kinds wait for one engine they alternate: after a task, the
 * engine takes no new task while a MultiEngine request waits, so that
 * request runs as soon as the tasks in flight are done; after the request
 * one task goes again. Neither kind starves the other.
 *
 * depend: an engine may refuse a task (IPMPI_EREJECT). The refusal is
 * remembered with the engine's properties generation; the task is not
 * offered to that engine again until its properties change
 * (ipmpi_sched_props_changed) or ipmpi_sched_spin. A task that every live
 * engine refuses is parked: nothing looks at it until a change, so there
 * is no busy loop.
 *
 * Ownership: the scheduler borrows requests and tasks; it owns the client
 * records (reference-counted: one reference per task that names the
 * client plus one held by the controller's session while it lives).
 *
 * Thread safety: none; the controller's loop thread only.
 */
#ifndef IPMPI_CTL_SCHED_H
#define IPMPI_CTL_SCHED_H

#include <stddef.h>
#include <stdint.h>

#include "bitset.h"
#include "equeue.h"

/* Look-ahead only while an engine's recent tasks take less than this. */
#define IPMPI_SCHED_LOOKAHEAD_MAX_NS 2000000ull
/* Tasks of one client looked at per turn for one that the engine accepts
 * (depend refusals, avoided engines); beyond, the turn passes on. */
#define IPMPI_SCHED_SCAN_MAX 64u
/* Largest look-ahead depth (--task-depth). */
#define IPMPI_SCHED_DEPTH_MAX 64u

/* One client that submits tasks. */
typedef struct ipmpi_sched_client {
    uint64_t session;    /* the controller's session id (the session may be gone) */
    unsigned refs;
    int held;            /* set by the controller: its tasks wait (client not reading) */
    uint32_t nqueued;    /* tasks in .tasks */
    ipmpi_qlink_t tasks; /* scheduled tasks, oldest first */
    ipmpi_qlink_t ring;  /* in the scheduler's round-robin ring while nqueued > 0 */
} ipmpi_sched_client_t;

typedef struct ipmpi_srefusal {
    int32_t engine;
    uint32_t gen; /* that engine's properties generation when it refused */
} ipmpi_srefusal_t;

/* The scheduler's part of a task; the controller embeds it. */
typedef struct ipmpi_stask {
    uint64_t id;
    ipmpi_sched_client_t *client; /* one reference held while set */
    ipmpi_qlink_t link;           /* in its client's queue, or in the parked list */
    int parked;
    int queued;                   /* in a client's queue or parked */
    int32_t avoid;                /* engine of the last failed attempt, or -1 */
    uint32_t nrefusals, refcap;
    ipmpi_srefusal_t *refusals;   /* owned; at most one entry per engine */
} ipmpi_stask_t;

enum { IPMPI_SITEM_REQ = 1, IPMPI_SITEM_TASK = 2 };

/* Something sent to an engine, waiting for its reply. */
typedef struct ipmpi_sitem {
    int type;          /* IPMPI_SITEM_REQ or IPMPI_SITEM_TASK */
    union {
        ipmpi_req_t *req;
        ipmpi_stask_t *task;
    } u;
    uint64_t sent_ns;  /* when it was handed out (the `now` of ipmpi_sched_next) */
} ipmpi_sitem_t;

typedef struct ipmpi_sengine {
    ipmpi_equeue_t q;       /* MultiEngine requests waiting for this engine */
    ipmpi_sitem_t *fly;     /* in flight, oldest first: power-of-two ring */
    uint32_t fly_cap, fly_head, fly_len;
    uint32_t fly_tasks;     /* tasks among them */
    uint32_t gen;           /* properties generation */
    int live;               /* ready and not dead */
    int last_task;          /* the last item handed out was a task */
    uint64_t task_ns;       /* moving average of its task service times */
    uint64_t last_reply_ns; /* when it last answered (a queued-ahead task starts then) */
    ipmpi_qlink_t open;     /* in the scheduler's list of engines with room for a task */
} ipmpi_sengine_t;

/*
 * A request to every live engine, started while nothing else ran
 * (ipmpi_sched_start_gang): one item for all of them instead of one per
 * engine, so that a broadcast tree's gathered replies, which come as runs
 * of engines (IPMPI_F_SAME), settle in word operations per run
 * (ipmpi_sched_gang_take, ipmpi_sched_gang_settle) and the send touches
 * no engine's slot. A member is in flight while its bit is pending; every
 * per-engine call (inflight, idle, done, done_reqs, next) sees the gang
 * as that engine's oldest in-flight item, so the paths that settle one
 * engine at a time (a death, a retry, a reply sent alone) need not know
 * it. Answered members are free at once, as after any request: a gang is
 * no barrier.
 */
typedef struct ipmpi_sgang {
    ipmpi_sitem_t item; /* the request (u.req) and when it went */
    uint64_t *pending;  /* members that have not answered: capacity bits */
    uint32_t left;      /* their number; 0: no gang */
    /* A pending member's link in the open list was dropped (or kept
     * stale): members that answer need update_open one by one. */
    int open_stale;
} ipmpi_sgang_t;

typedef struct ipmpi_sched {
    int nengines;
    int capacity;           /* engines eng[] has room for (joins add up to it) */
    ipmpi_sengine_t *eng;
    int nlive;
    uint32_t depth;         /* tasks that may wait ahead on a busy engine */
    ipmpi_qlink_t ring;     /* clients with queued tasks, next to serve first */
    ipmpi_qlink_t parked;   /* tasks every live engine refused */
    ipmpi_qlink_t open;     /* live engines that could take a task now */
    uint32_t nqueued;       /* tasks in clients' queues */
    uint32_t nparked;
    uint32_t nreq_queued;   /* requests in the engines' queues (their equeue_t.total) */
    uint32_t nfly_tasks;    /* tasks in flight on all engines */
    /* Requests in flight on at least one engine (ipmpi_req_t.running),
     * oldest first: what the controller's bell waits for, read without
     * walking the engines. The scheduler must not be copied (the queues
     * point at nreq_queued, the requests at this list). */
    ipmpi_qlink_t running;
    uint64_t *live;         /* live engines as bits (capacity bits): a gang's members */
    uint32_t nlast_task;    /* engines whose last_task is set (a gang's answers need not look at each) */
    ipmpi_sgang_t gang;
} ipmpi_sched_t;

/*
 * Sets up a scheduler for nengines engines (none live yet) with look-ahead
 * depth (0..IPMPI_SCHED_DEPTH_MAX). Returns 0, IPMPI_EINVAL or IPMPI_ENOMEM
 * (nothing to free then).
 */
int ipmpi_sched_init(ipmpi_sched_t *s, int nengines, uint32_t depth);
/* The same with room for capacity engines: ipmpi_sched_add_engines adds
 * n more (not yet live; ids continue) without moving the others. Returns
 * 0, IPMPI_EINVAL (no room) or IPMPI_ENOMEM. */
int ipmpi_sched_init_cap(ipmpi_sched_t *s, int nengines, int capacity, uint32_t depth);
int ipmpi_sched_add_engines(ipmpi_sched_t *s, int n);
/* Frees what the scheduler owns. Requests and tasks still queued or in
 * flight are the caller's to settle first (their links are not touched). */
void ipmpi_sched_fini(ipmpi_sched_t *s);

/* Engine e became ready: it may be given work; parked tasks are queued
 * again (it has refused none of them). */
void ipmpi_sched_engine_ready(ipmpi_sched_t *s, int e);
/*
 * Engine e died: it is given nothing more. Its queued requests and
 * in-flight items stay where they are for the caller to take back with
 * ipmpi_equeue_pop(&s->eng[e].q) and ipmpi_sched_done(). Parked tasks
 * stay parked (every engine still live refused them).
 */
void ipmpi_sched_engine_dead(ipmpi_sched_t *s, int e);

/* A new client record for session; refs = 1 (the session's). NULL on ENOMEM. */
ipmpi_sched_client_t *ipmpi_sched_client_new(uint64_t session);
/* Drops one reference; frees the record at zero. */
void ipmpi_sched_client_unref(ipmpi_sched_client_t *cl);

/* Sets up t (id, no client, not queued, avoid -1). */
void ipmpi_stask_init(ipmpi_stask_t *t, uint64_t id);
/* Frees what t owns and drops its client reference. t must not be queued. */
void ipmpi_stask_fini(ipmpi_stask_t *t);

/*
 * Queues a request for engine e (behind the others for e). Returns 0 or
 * IPMPI_ENOMEM (nothing queued).
 */
int ipmpi_sched_queue_req(ipmpi_sched_t *s, int e, ipmpi_req_t *r);
/*
 * Queues task t at the back of cl's queue (cl gains a reference through
 * t when t had no client). A retried task keeps its refusals and its
 * avoided engine (set t->avoid before).
 */
void ipmpi_sched_submit(ipmpi_sched_t *s, ipmpi_sched_client_t *cl, ipmpi_stask_t *t);
/*
 * Takes task t out of the queues before it ran (abort). Returns 0, or
 * IPMPI_ENOENT when t is not queued (in flight or finished).
 */
int ipmpi_sched_cancel(ipmpi_sched_t *s, ipmpi_stask_t *t);

/*
 * What engine e should run next, decided now: returns 1 and the item in
 * *out (recorded as in flight, its sent_ns = now); 0 when it should get
 * nothing now; 2 when the only candidate is a request whose client is
 * over its unread-reply limit: hold(ctx, session) said so (the caller
 * asks again later). hold may be NULL. Dead or not-ready engines get 0.
 */
int ipmpi_sched_next(ipmpi_sched_t *s, int e, uint64_t now, int (*hold)(void *ctx, uint64_t session), void *ctx,
                     ipmpi_sitem_t *out);
/*
 * Puts request r in flight on engine e directly (cut-through), which
 * must be live with nothing in flight and nothing queued. Returns 0, or
 * IPMPI_EAGAIN (nothing changed).
 */
int ipmpi_sched_start_req(ipmpi_sched_t *s, int e, ipmpi_req_t *r, uint64_t now);
/*
 * The same for every engine of ids[0..n) at once (a broadcast tree's,
 * whose engines tree.c picked idle): each idle one gets r in flight, one
 * that is not is left as it is. Returns how many got it.
 */
int ipmpi_sched_start_reqs(ipmpi_sched_t *s, const int *ids, int n, ipmpi_req_t *r, uint64_t now);
/* 1 while engine e is a member of the gang that has not answered it. */
static inline int ipmpi_sched_gang_pending(const ipmpi_sched_t *s, int e)
{
    return s->gang.left > 0 && ipmpi_bit_get(s->gang.pending, (uint32_t)e);
}
/* Items in flight on engine e (a pending gang counts as one). */
static inline uint32_t ipmpi_sched_nfly(const ipmpi_sched_t *s, int e)
{
    return s->eng[e].fly_len + (uint32_t)ipmpi_sched_gang_pending(s, e);
}
/*
 * Puts r in flight on every live engine as one gang, when nothing is in
 * flight or queued anywhere and no task waits (ipmpi_sched_quiet and no
 * queued task): returns the number of members (s->nlive), or 0 and
 * nothing changed. Word operations only: no engine's slot is read.
 */
uint32_t ipmpi_sched_start_gang(ipmpi_sched_t *s, ipmpi_req_t *r, uint64_t now);
/*
 * Gathered replies for engines [lo, lo + n) of the gang: when every one
 * is pending, takes them out of the pending set and returns 1; else 0
 * and nothing changed. Only the bits move: ipmpi_sched_gang_untake puts
 * them back (the replies could not be delivered whole), and
 * ipmpi_sched_gang_settle completes what ipmpi_sched_done does for each
 * (counts, the running list, the end of the gang; the engines' open
 * links and last_task one by one only when a task or a request made them
 * stale). Take, then untake or settle, before anything else runs.
 */
int ipmpi_sched_gang_take(ipmpi_sched_t *s, uint32_t lo, uint32_t n);
void ipmpi_sched_gang_untake(ipmpi_sched_t *s, uint32_t lo, uint32_t n);
void ipmpi_sched_gang_settle(ipmpi_sched_t *s, uint32_t lo, uint32_t n, uint64_t now);

/* 1 when engine e is live, has nothing in flight and nothing queued.
 * Inline, as ipmpi_sched_inflight: a request to all engines asks both of
 * each engine. */
static inline int ipmpi_sched_idle(const ipmpi_sched_t *s, int e)
{
    return e >= 0 && e < s->nengines && s->eng[e].live && s->eng[e].fly_len == 0 &&
           ipmpi_equeue_len(&s->eng[e].q) == 0 && !ipmpi_sched_gang_pending(s, e);
}
/*
 * A live engine with room for a task (nothing in flight preferred), or
 * -1. Room is not acceptance: every queued task may refuse or avoid that
 * engine, or belong to a held client, and ipmpi_sched_next then hands it
 * nothing while it stays offered. A caller that dispatches to open
 * engines must therefore bound its loop (the controller's kick tries each
 * engine at most once without progress) and walk s->open for the others.
 */
int ipmpi_sched_open_engine(const ipmpi_sched_t *s);
/* 1 when some task is queued (not parked), else 0. */
static inline int ipmpi_sched_has_tasks(const ipmpi_sched_t *s) { return s->nqueued > 0; }

/* 1 when no engine has anything in flight or queued: every live engine
 * is idle, which a request to all engines then need not ask each one. */
static inline int ipmpi_sched_quiet(const ipmpi_sched_t *s)
{
    return ipmpi_ql_empty(&s->running) && s->nreq_queued == 0 && s->nfly_tasks == 0;
}
/* The oldest in-flight item of e, or NULL (the reply matches it). */
static inline const ipmpi_sitem_t *ipmpi_sched_inflight(const ipmpi_sched_t *s, int e)
{
    if (e < 0 || e >= s->nengines)
        return NULL;
    /* A pending gang is the oldest: nothing goes to a member before it answered. */
    if (ipmpi_sched_gang_pending(s, e))
        return &s->gang.item;
    if (s->eng[e].fly_len == 0)
        return NULL;
    return &s->eng[e].fly[s->eng[e].fly_head];
}
/*
 * Engine e answered its oldest in-flight item: removes it into *out and
 * returns 1 (0 when nothing is in flight). now feeds e's task service
 * time, which decides its look-ahead.
 */
int ipmpi_sched_done(ipmpi_sched_t *s, int e, uint64_t now, ipmpi_sitem_t *out);

/*
 * Engines ids[0..n) answered request r (a broadcast tree's gathered
 * replies): takes r out of flight on each of them whose oldest item it is,
 * as ipmpi_sched_done would one by one; the others are left as they are.
 * Returns how many it took r from.
 */
uint32_t ipmpi_sched_done_reqs(ipmpi_sched_t *s, const uint32_t *ids, uint32_t n, ipmpi_req_t *r, uint64_t now);

/*
 * Engine e refused task t (depend): t was in flight there and has been
 * taken out with ipmpi_sched_done. t goes back to the front of its
 * client's queue, or is parked when every live engine has refused it at
 * its current properties generation. Returns 0 or IPMPI_ENOMEM (the
 * refusal is then not remembered, and t is parked so as not to loop).
 */
int ipmpi_sched_refused(ipmpi_sched_t *s, int e, ipmpi_stask_t *t);
/* Engine e's properties changed: its refusals no longer count; parked tasks are queued again. */
void ipmpi_sched_props_changed(ipmpi_sched_t *s, int e);
/* Forgets every refusal; parked tasks are queued again. Returns how many tasks are queued. */
uint32_t ipmpi_sched_spin(ipmpi_sched_t *s);
/* 1 when engine e has refused t at e's current properties generation. */
int ipmpi_sched_refuses(const ipmpi_sched_t *s, int e, const ipmpi_stask_t *t);

#endif
