/*
 * The controller's scheduler (sched.h): per-engine FIFOs of MultiEngine
 * requests, per-client FIFOs of tasks served round robin, in-flight rings,
 * look-ahead, depend refusals. No I/O. Loop thread only.
 */
#include <stdlib.h>
#include <string.h>

#include "ipmpi/errors.h"
#include "sched.h"

/* The service-time average moves by 1/4 of each new sample: a few short
 * tasks after long ones turn look-ahead back on quickly. */
#define EWMA_SHIFT 2

/* Sets up engines [from, to): empty queues, in-flight rings of cap. */
static int engines_init(ipmpi_sched_t *s, int from, int to)
{
    /* One request, or 1 + depth tasks, are in flight at most. */
    uint32_t cap = 1;
    while (cap < s->depth + 1)
        cap <<= 1;
    for (int i = from; i < to; i++) {
        ipmpi_sengine_t *e = &s->eng[i];
        ipmpi_equeue_init(&e->q);
        e->q.total = &s->nreq_queued;
        ipmpi_ql_init(&e->open);
        e->fly_cap = cap;
        e->fly = calloc(cap, sizeof *e->fly);
        if (!e->fly) {
            for (int j = from; j < i; j++) {
                free(s->eng[j].fly);
                s->eng[j].fly = NULL;
            }
            return IPMPI_ENOMEM;
        }
    }
    return 0;
}

int ipmpi_sched_init(ipmpi_sched_t *s, int nengines, uint32_t depth)
{
    return ipmpi_sched_init_cap(s, nengines, nengines, depth);
}

int ipmpi_sched_init_cap(ipmpi_sched_t *s, int nengines, int capacity, uint32_t depth)
{
    memset(s, 0, sizeof *s);
    if (nengines < 0 || capacity < nengines || depth > IPMPI_SCHED_DEPTH_MAX)
        return IPMPI_EINVAL;
    ipmpi_ql_init(&s->ring);
    ipmpi_ql_init(&s->parked);
    ipmpi_ql_init(&s->open);
    ipmpi_ql_init(&s->running);
    s->depth = depth;
    s->nengines = nengines;
    s->capacity = capacity;
    if (capacity == 0)
        return 0;
    s->eng = calloc((size_t)capacity, sizeof *s->eng);
    /* The live set and a gang's pending set, one allocation. */
    size_t words = ipmpi_bits_words((uint32_t)capacity);
    s->live = calloc(2 * words, sizeof *s->live);
    if (!s->eng || !s->live || engines_init(s, 0, nengines) != 0) {
        free(s->eng);
        free(s->live);
        s->eng = NULL;
        s->live = NULL;
        return IPMPI_ENOMEM;
    }
    s->gang.pending = s->live + words;
    return 0;
}

int ipmpi_sched_add_engines(ipmpi_sched_t *s, int n)
{
    if (n < 0 || n > s->capacity - s->nengines)
        return IPMPI_EINVAL;
    int rc = engines_init(s, s->nengines, s->nengines + n);
    if (rc == 0)
        s->nengines += n;
    return rc;
}

void ipmpi_sched_fini(ipmpi_sched_t *s)
{
    for (int i = 0; i < s->nengines; i++) {
        ipmpi_equeue_fini(&s->eng[i].q);
        free(s->eng[i].fly);
    }
    free(s->eng);
    free(s->live);
    s->eng = NULL;
    s->live = NULL;
    s->gang.pending = NULL;
    s->gang.left = 0;
    s->nengines = 0;
    /* Requests still running outlive the list: detached, their free does
     * not touch it. */
    while (!ipmpi_ql_empty(&s->running)) {
        IPMPI_CONTAINER_OF(s->running.next, ipmpi_req_t, running)->nfly = 0;
        ipmpi_ql_remove(s->running.next);
    }
}

static void unpark_all(ipmpi_sched_t *s);

/* ---- the list of engines with room for a task ---- */

static int en_id(const ipmpi_sched_t *s, const ipmpi_sengine_t *e) { return (int)(e - s->eng); }

static uint32_t task_room(const ipmpi_sched_t *s, const ipmpi_sengine_t *e)
{
    if (!e->live || ipmpi_sched_gang_pending(s, en_id(s, e))) /* a request in flight */
        return 0;
    /* A request waits: let the tasks in flight drain so it can go. */
    if (ipmpi_equeue_len(&e->q) > 0 && (e->last_task || e->fly_len > 0))
        return 0;
    if (e->fly_len > e->fly_tasks) /* a request in flight */
        return 0;
    uint32_t most = e->task_ns < IPMPI_SCHED_LOOKAHEAD_MAX_NS ? 1 + s->depth : 1;
    return e->fly_tasks < most ? most - e->fly_tasks : 0;
}

/* Keeps e in s->open exactly while it has room for a task: engines with
 * nothing in flight at the front, the others at the back. */
static void update_open(ipmpi_sched_t *s, ipmpi_sengine_t *e)
{
    if (ipmpi_ql_linked(&e->open))
        ipmpi_ql_remove(&e->open);
    if (ipmpi_sched_gang_pending(s, en_id(s, e)))
        s->gang.open_stale = 1; /* back in when it answered */
    if (task_room(s, e) == 0)
        return;
    if (e->fly_len == 0)
        ipmpi_ql_push_front(&s->open, &e->open);
    else
        ipmpi_ql_push_back(&s->open, &e->open);
}

int ipmpi_sched_open_engine(const ipmpi_sched_t *s)
{
    if (ipmpi_ql_empty(&s->open))
        return -1;
    const ipmpi_sengine_t *e = IPMPI_CONTAINER_OF(s->open.next, ipmpi_sengine_t, open);
    return (int)(e - s->eng);
}

/* ---- engines ---- */

void ipmpi_sched_engine_ready(ipmpi_sched_t *s, int e)
{
    if (e < 0 || e >= s->nengines || s->eng[e].live)
        return;
    s->eng[e].live = 1;
    ipmpi_bit_set(s->live, (uint32_t)e);
    s->nlive++;
    update_open(s, &s->eng[e]);
    /* An engine that has refused nothing yet may take a parked task. */
    unpark_all(s);
}

void ipmpi_sched_engine_dead(ipmpi_sched_t *s, int e)
{
    if (e < 0 || e >= s->nengines || !s->eng[e].live)
        return;
    s->eng[e].live = 0;
    ipmpi_bit_clear(s->live, (uint32_t)e);
    s->nlive--;
    update_open(s, &s->eng[e]);
    /* Parked tasks stay parked: every engine still live refused them. */
}

/* ---- clients and tasks ---- */

ipmpi_sched_client_t *ipmpi_sched_client_new(uint64_t session)
{
    ipmpi_sched_client_t *cl = calloc(1, sizeof *cl);
    if (!cl)
        return NULL;
    cl->session = session;
    cl->refs = 1;
    ipmpi_ql_init(&cl->tasks);
    ipmpi_ql_init(&cl->ring);
    return cl;
}

void ipmpi_sched_client_unref(ipmpi_sched_client_t *cl)
{
    if (cl && --cl->refs == 0)
        free(cl);
}

void ipmpi_stask_init(ipmpi_stask_t *t, uint64_t id)
{
    memset(t, 0, sizeof *t);
    t->id = id;
    t->avoid = -1;
    ipmpi_ql_init(&t->link);
}

void ipmpi_stask_fini(ipmpi_stask_t *t)
{
    free(t->refusals);
    t->refusals = NULL;
    t->nrefusals = t->refcap = 0;
    ipmpi_sched_client_unref(t->client);
    t->client = NULL;
}

int ipmpi_sched_queue_req(ipmpi_sched_t *s, int e, ipmpi_req_t *r)
{
    if (e < 0 || e >= s->nengines)
        return IPMPI_EINVAL;
    int rc = ipmpi_equeue_push(&s->eng[e].q, r);
    if (rc == 0)
        update_open(s, &s->eng[e]);
    return rc;
}

static void enqueue(ipmpi_sched_t *s, ipmpi_stask_t *t, int front)
{
    ipmpi_sched_client_t *cl = t->client;
    if (front)
        ipmpi_ql_push_front(&cl->tasks, &t->link);
    else
        ipmpi_ql_push_back(&cl->tasks, &t->link);
    if (cl->nqueued++ == 0)
        ipmpi_ql_push_back(&s->ring, &cl->ring);
    t->queued = 1;
    s->nqueued++;
}

/* Takes a queued (not parked) t out of its client's queue. */
static void dequeue(ipmpi_sched_t *s, ipmpi_stask_t *t)
{
    ipmpi_ql_remove(&t->link);
    if (--t->client->nqueued == 0)
        ipmpi_ql_remove(&t->client->ring);
    t->queued = 0;
    s->nqueued--;
}

void ipmpi_sched_submit(ipmpi_sched_t *s, ipmpi_sched_client_t *cl, ipmpi_stask_t *t)
{
    if (!t->client) {
        t->client = cl;
        cl->refs++;
    }
    enqueue(s, t, 0);
}

int ipmpi_sched_cancel(ipmpi_sched_t *s, ipmpi_stask_t *t)
{
    if (!t->queued)
        return IPMPI_ENOENT;
    if (t->parked) {
        ipmpi_ql_remove(&t->link);
        t->parked = 0;
        t->queued = 0;
        s->nparked--;
        return 0;
    }
    dequeue(s, t);
    return 0;
}

/* ---- refusals ---- */

int ipmpi_sched_refuses(const ipmpi_sched_t *s, int e, const ipmpi_stask_t *t)
{
    for (uint32_t i = 0; i < t->nrefusals; i++)
        if (t->refusals[i].engine == e)
            return t->refusals[i].gen == s->eng[e].gen;
    return 0;
}

static int refused_by_all(const ipmpi_sched_t *s, const ipmpi_stask_t *t)
{
    int n = 0;
    for (uint32_t i = 0; i < t->nrefusals; i++) {
        const ipmpi_srefusal_t *r = &t->refusals[i];
        if (s->eng[r->engine].live && s->eng[r->engine].gen == r->gen)
            n++;
    }
    return n >= s->nlive;
}

static void park(ipmpi_sched_t *s, ipmpi_stask_t *t)
{
    ipmpi_ql_push_back(&s->parked, &t->link);
    t->parked = 1;
    t->queued = 1;
    s->nparked++;
}

int ipmpi_sched_refused(ipmpi_sched_t *s, int e, ipmpi_stask_t *t)
{
    uint32_t i;
    for (i = 0; i < t->nrefusals && t->refusals[i].engine != e; i++)
        ;
    if (i == t->nrefusals) {
        if (t->nrefusals == t->refcap) {
            uint32_t ncap = t->refcap ? 2 * t->refcap : 4;
            ipmpi_srefusal_t *n = realloc(t->refusals, ncap * sizeof *n);
            if (!n) {
                /* Without the record the task would come straight back
                 * here: park it until a change or a spin instead. */
                park(s, t);
                return IPMPI_ENOMEM;
            }
            t->refusals = n;
            t->refcap = ncap;
        }
        t->refusals[t->nrefusals++].engine = e;
    }
    t->refusals[i].gen = s->eng[e].gen;
    if (refused_by_all(s, t))
        park(s, t);
    else
        enqueue(s, t, 1);
    return 0;
}

/* Parked tasks go back to the front of their clients' queues, in the
 * order they were parked. */
static void unpark_all(ipmpi_sched_t *s)
{
    while (!ipmpi_ql_empty(&s->parked)) {
        ipmpi_stask_t *t = IPMPI_CONTAINER_OF(s->parked.prev, ipmpi_stask_t, link);
        ipmpi_ql_remove(&t->link);
        t->parked = 0;
        s->nparked--;
        enqueue(s, t, 1);
    }
}

void ipmpi_sched_props_changed(ipmpi_sched_t *s, int e)
{
    if (e < 0 || e >= s->nengines)
        return;
    s->eng[e].gen++;
    unpark_all(s);
}

uint32_t ipmpi_sched_spin(ipmpi_sched_t *s)
{
    /* A new generation everywhere voids every refusal at once. */
    for (int i = 0; i < s->nengines; i++)
        s->eng[i].gen++;
    unpark_all(s);
    return s->nqueued;
}

/* ---- handing out ---- */

/* Every write of last_task goes here: s->nlast_task counts the set ones,
 * so a gang's answers need not look at each engine when none is. */
static void set_last_task(ipmpi_sched_t *s, ipmpi_sengine_t *en, int v)
{
    if (en->last_task != v)
        s->nlast_task += v ? 1u : (uint32_t)-1;
    en->last_task = v;
}

static int fly_push(ipmpi_sched_t *s, ipmpi_sengine_t *e, const ipmpi_sitem_t *it)
{
    if (e->fly_len == e->fly_cap)
        return -1; /* cannot happen: room is checked first */
    e->fly[(e->fly_head + e->fly_len) & (e->fly_cap - 1)] = *it;
    e->fly_len++;
    if (it->type == IPMPI_SITEM_TASK) {
        e->fly_tasks++;
        s->nfly_tasks++;
    } else if (it->u.req->nfly++ == 0) {
        ipmpi_ql_push_back(&s->running, &it->u.req->running);
    }
    return 0;
}

/* May engine e run t now? A retry avoids the engine it failed on while
 * some other live engine may take it (one that has not refused it). */
static int accepts(const ipmpi_sched_t *s, int e, const ipmpi_stask_t *t)
{
    if (t->nrefusals && ipmpi_sched_refuses(s, e, t))
        return 0;
    if (t->avoid != e || s->nlive <= 1)
        return 1;
    int others_refusing = 0;
    for (uint32_t i = 0; i < t->nrefusals; i++) {
        const ipmpi_srefusal_t *r = &t->refusals[i];
        if (r->engine != e && s->eng[r->engine].live && s->eng[r->engine].gen == r->gen)
            others_refusing++;
    }
    return others_refusing >= s->nlive - 1;
}

/* The next task for engine e, taken out of the queues, or NULL. Clients
 * are served round robin: the one served moves to the back of the ring. */
static ipmpi_stask_t *pick_task(ipmpi_sched_t *s, int e)
{
    ipmpi_qlink_t *c = s->ring.next;
    while (c != &s->ring) {
        ipmpi_sched_client_t *cl = IPMPI_CONTAINER_OF(c, ipmpi_sched_client_t, ring);
        ipmpi_qlink_t *next = c->next;
        if (!cl->held) {
            uint32_t seen = 0;
            for (ipmpi_qlink_t *q = cl->tasks.next; q != &cl->tasks && seen < IPMPI_SCHED_SCAN_MAX;
                 q = q->next, seen++) {
                ipmpi_stask_t *t = IPMPI_CONTAINER_OF(q, ipmpi_stask_t, link);
                if (!accepts(s, e, t)) {
                    /* Refused by every engine still live (one that had
                     * not refused died): park it, nothing rescans it. */
                    if (t->nrefusals && refused_by_all(s, t)) {
                        q = q->prev;
                        dequeue(s, t);
                        park(s, t);
                        if (cl->nqueued == 0)
                            break;
                    }
                    continue;
                }
                dequeue(s, t);
                if (cl->nqueued > 0) { /* to the back of the ring */
                    ipmpi_ql_remove(&cl->ring);
                    ipmpi_ql_push_back(&s->ring, &cl->ring);
                }
                return t;
            }
        }
        c = next;
    }
    return NULL;
}

/* Puts *it in flight on en and returns it in *out: 1. */
static int hand_out(ipmpi_sched_t *s, ipmpi_sengine_t *en, const ipmpi_sitem_t *it, ipmpi_sitem_t *out)
{
    fly_push(s, en, it);
    set_last_task(s, en, it->type == IPMPI_SITEM_TASK);
    *out = *it;
    update_open(s, en);
    return 1;
}

/* Hands en its oldest request: 1, or 2 when hold says that request's
 * client must wait (nothing changed then). */
static int give_req(ipmpi_sched_t *s, ipmpi_sengine_t *en, uint64_t now, int (*hold)(void *ctx, uint64_t session),
                    void *ctx, ipmpi_sitem_t *out)
{
    if (hold && hold(ctx, ipmpi_equeue_at(&en->q, 0)->session))
        return 2;
    ipmpi_sitem_t it = {.type = IPMPI_SITEM_REQ, .sent_ns = now};
    it.u.req = ipmpi_equeue_pop(&en->q);
    return hand_out(s, en, &it, out);
}

int ipmpi_sched_next(ipmpi_sched_t *s, int e, uint64_t now, int (*hold)(void *ctx, uint64_t session), void *ctx,
                     ipmpi_sitem_t *out)
{
    if (e < 0 || e >= s->nengines || !s->eng[e].live)
        return 0;
    ipmpi_sengine_t *en = &s->eng[e];
    int rc = 0;
    int req_ready = ipmpi_equeue_len(&en->q) > 0 && ipmpi_sched_nfly(s, e) == 0;
    /* A request goes when nothing is in flight and, if tasks wait too,
     * when it is the requests' turn (a task went last). */
    if (req_ready && (en->last_task || s->nqueued == 0) && (rc = give_req(s, en, now, hold, ctx, out)) == 1)
        return 1;
    if (s->nqueued > 0 && task_room(s, en) > 0) {
        ipmpi_stask_t *t = pick_task(s, e);
        if (t) {
            ipmpi_sitem_t it = {.type = IPMPI_SITEM_TASK, .sent_ns = now};
            it.u.task = t;
            return hand_out(s, en, &it, out);
        }
    }
    /* Tasks' turn but none fits this engine: the request need not wait. */
    if (rc == 0 && req_ready && !en->last_task)
        return give_req(s, en, now, hold, ctx, out);
    update_open(s, en);
    return rc;
}

int ipmpi_sched_start_req(ipmpi_sched_t *s, int e, ipmpi_req_t *r, uint64_t now)
{
    return ipmpi_sched_start_reqs(s, &e, 1, r, now) == 1 ? 0 : IPMPI_EAGAIN;
}

int ipmpi_sched_start_reqs(ipmpi_sched_t *s, const int *ids, int n, ipmpi_req_t *r, uint64_t now)
{
    ipmpi_sitem_t it = {.type = IPMPI_SITEM_REQ, .sent_ns = now};
    it.u.req = r;
    int started = 0;
    for (int i = 0; i < n; i++) {
        if (!ipmpi_sched_idle(s, ids[i]))
            continue;
        /* hand_out for an idle engine, without its general cases (a
         * broadcast puts hundreds in flight at once): the ring is empty,
         * and with a request in flight the engine has no room for a task;
         * r joins the running list once, below. */
        ipmpi_sengine_t *en = &s->eng[ids[i]];
        en->fly[en->fly_head] = it;
        en->fly_len = 1;
        set_last_task(s, en, 0);
        if (ipmpi_ql_linked(&en->open))
            ipmpi_ql_remove(&en->open);
        started++;
    }
    if (started && r->nfly == 0)
        ipmpi_ql_push_back(&s->running, &r->running);
    r->nfly += (uint32_t)started;
    return started;
}

/* Request r was answered on n engines that held it. */
static void req_left(ipmpi_req_t *r, uint32_t n)
{
    r->nfly -= n;
    if (r->nfly == 0)
        ipmpi_ql_remove(&r->running);
}

/* Engine en answered its oldest item (a request: req) now: what follows
 * for the engine itself. */
static void engine_answered(ipmpi_sched_t *s, ipmpi_sengine_t *en, int req, uint64_t now)
{
    /* No more requests wait: tasks may use the engine fully. */
    if (req && ipmpi_equeue_len(&en->q) == 0)
        set_last_task(s, en, 0);
    en->last_reply_ns = now;
    update_open(s, en);
}

/* Takes en's oldest in-flight item (it has one) into *out, answered now. */
static void fly_pop(ipmpi_sched_t *s, ipmpi_sengine_t *en, uint64_t now, ipmpi_sitem_t *out)
{
    *out = en->fly[en->fly_head];
    en->fly_head = (en->fly_head + 1) & (en->fly_cap - 1);
    en->fly_len--;
    if (out->type == IPMPI_SITEM_TASK) {
        en->fly_tasks--;
        s->nfly_tasks--;
        /* A task that waited ahead on the engine started when the one
         * before it was answered, not when it was sent. */
        uint64_t start = out->sent_ns > en->last_reply_ns ? out->sent_ns : en->last_reply_ns;
        uint64_t took = now > start ? now - start : 0;
        if (en->task_ns == 0)
            en->task_ns = took;
        else
            en->task_ns = en->task_ns - (en->task_ns >> EWMA_SHIFT) + (took >> EWMA_SHIFT);
    } else {
        req_left(out->u.req, 1);
    }
    engine_answered(s, en, out->type == IPMPI_SITEM_REQ, now);
}

/* A gang member's answer, taken alone (its bit is pending). */
static void gang_pop(ipmpi_sched_t *s, ipmpi_sengine_t *en, uint64_t now, ipmpi_sitem_t *out)
{
    *out = s->gang.item;
    ipmpi_bit_clear(s->gang.pending, (uint32_t)en_id(s, en));
    s->gang.left--;
    req_left(out->u.req, 1);
    engine_answered(s, en, 1, now);
}

uint32_t ipmpi_sched_start_gang(ipmpi_sched_t *s, ipmpi_req_t *r, uint64_t now)
{
    if (!ipmpi_sched_quiet(s) || s->nqueued > 0 || s->nlive == 0 || s->gang.left > 0)
        return 0;
    /* Quiet: every live engine is idle, so every one of them takes r. Their
     * open links stay as they are (task_room reads the gang). */
    memcpy(s->gang.pending, s->live, ipmpi_bits_words((uint32_t)s->nengines) * sizeof *s->live);
    s->gang.left = (uint32_t)s->nlive;
    s->gang.open_stale = 0;
    s->gang.item = (ipmpi_sitem_t){.type = IPMPI_SITEM_REQ, .u.req = r, .sent_ns = now};
    if (r->nfly == 0)
        ipmpi_ql_push_back(&s->running, &r->running);
    r->nfly += s->gang.left;
    return s->gang.left;
}

int ipmpi_sched_gang_take(ipmpi_sched_t *s, uint32_t lo, uint32_t n)
{
    if (s->gang.left == 0 || n == 0 || lo >= (uint32_t)s->nengines || n > (uint32_t)s->nengines - lo ||
        !ipmpi_bits_all(s->gang.pending, lo, n))
        return 0;
    ipmpi_bits_put(s->gang.pending, lo, n, 0);
    return 1;
}

void ipmpi_sched_gang_untake(ipmpi_sched_t *s, uint32_t lo, uint32_t n)
{
    ipmpi_bits_put(s->gang.pending, lo, n, 1);
}

void ipmpi_sched_gang_settle(ipmpi_sched_t *s, uint32_t lo, uint32_t n, uint64_t now)
{
    if (n == 0 || n > s->gang.left)
        return; /* not taken: cannot happen */
    s->gang.left -= n;
    req_left(s->gang.item.u.req, n);
    /* What fly_pop does per engine is needed only when a task or a queued
     * request left something to redo; else the members are as before the
     * gang: idle, in the open list, last_task clear. (last_reply_ns stays:
     * it matters only for a task queued ahead, which a member had none of.) */
    if (s->gang.open_stale || s->nlast_task > 0 || s->nreq_queued > 0)
        for (uint32_t i = lo; i < lo + n; i++)
            engine_answered(s, &s->eng[i], 1, now);
}

uint32_t ipmpi_sched_done_reqs(ipmpi_sched_t *s, const uint32_t *ids, uint32_t n, ipmpi_req_t *r, uint64_t now)
{
    uint32_t done = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (ids[i] >= (uint32_t)s->nengines)
            continue;
        const ipmpi_sitem_t *head = ipmpi_sched_inflight(s, (int)ids[i]);
        ipmpi_sitem_t it;
        if (head && head->type == IPMPI_SITEM_REQ && head->u.req == r)
            done += (uint32_t)ipmpi_sched_done(s, (int)ids[i], now, &it);
    }
    return done;
}

int ipmpi_sched_done(ipmpi_sched_t *s, int e, uint64_t now, ipmpi_sitem_t *out)
{
    if (e < 0 || e >= s->nengines)
        return 0;
    if (ipmpi_sched_gang_pending(s, e))
        gang_pop(s, &s->eng[e], now, out);
    else if (s->eng[e].fly_len > 0)
        fly_pop(s, &s->eng[e], now, out);
    else
        return 0;
    return 1;
}
