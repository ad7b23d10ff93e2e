/*
 * The task store and the TASK_* kinds (tasks.h, doc/protocol.md section
 * 6): submission checks, results kept within the memory budget, blocked
 * TASK_RESULT and TASK_BARRIER requests, retries, recovery stages, abort.
 * Where a task runs is the scheduler's business (sched.h); sending it and
 * handing its reply here is dispatch.c's. Loop thread only.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codec.h"
#include "ctl.h"
#include "ipmpi/errors.h"
#include "json.h"
#include "log.h"

/* One blocked TASK_RESULT (one link) or TASK_BARRIER (one link per task). */
typedef struct twait {
    uint64_t session, client_req;
    int kind;            /* IPMPI_K_TASK_RESULT or IPMPI_K_TASK_BARRIER */
    uint32_t remaining;  /* tasks not finished yet */
    uint32_t n;
    struct twait_link {
        ipmpi_qlink_t q; /* in the task's waiters */
        struct twait *w;
        ipmpi_task_t *t;
    } links[];
} twait_t;

/* The table of tasks by id is an ipmpi_idtab_t (equeue.h): a task's first
 * member is its ipmpi_stask_t, whose first member is the id. */
_Static_assert(offsetof(ipmpi_task_t, s) == 0 && offsetof(ipmpi_stask_t, id) == 0,
               "a task must begin with its id (ipmpi_idtab_t)");

/* ---- task records ---- */

static void task_free_stages(ipmpi_tasks_t *ts, ipmpi_task_t *t)
{
    for (uint32_t i = 0; t->stage && i < t->nstages; i++) {
        if (t->stage[i]) {
            ipmpi_rstore_count(&ts->st, -(int64_t)ipmpi_parts_bytes(t->stage[i]));
            ipmpi_parts_unref(t->stage[i]);
        }
    }
    free(t->stage);
    free(t->retries);
    t->stage = NULL;
    t->retries = NULL;
}

/* Frees a task that is in no queue, no waiter list and not in flight. */
static void task_free(ipmpi_tasks_t *ts, ipmpi_task_t *t)
{
    task_free_stages(ts, t);
    ipmpi_rstore_del(&ts->st, &t->done);
    ipmpi_parts_unref(t->result);
    ipmpi_stask_fini(&t->s);
    free(t);
}

/* Removes finished task t from the store (clear or eviction). */
static void task_drop(ipmpi_tasks_t *ts, ipmpi_task_t *t, int evicted)
{
    if (t->status == 0)
        ts->nsucceeded--;
    else
        ts->nfailed--;
    ipmpi_idtab_del(&ts->tab, t->s.id);
    if (evicted)
        ipmpi_idset_add(&ts->st.evicted, t->s.id);
    task_free(ts, t);
}

/* Evicts finished results (rstore.h's order: delivered ones first, oldest
 * first) until `need` more bytes fit in the budget (or nothing is left to
 * evict). `keep` is never evicted. Returns 1 when they fit. */
static int make_room(ipmpi_tasks_t *ts, uint64_t need, const ipmpi_task_t *keep)
{
    ipmpi_rentry_t *e;
    while ((e = ipmpi_rstore_victim(&ts->st, need, keep ? &keep->done : NULL))) {
        ipmpi_task_t *t = IPMPI_CONTAINER_OF(e, ipmpi_task_t, done);
        ipmpi_log(IPMPI_LOG_INFO, "task %llu: result evicted (task memory budget)", (unsigned long long)t->s.id);
        task_drop(ts, t, 1);
    }
    return ipmpi_rstore_fits(&ts->st, need);
}

int ipmpi_ctl_tasks_init(ipmpi_ctl_t *c)
{
    ipmpi_tasks_t *ts = &c->tasks;
    memset(ts, 0, sizeof *ts);
    /* Delivered results have no bound of their own here: a task's
     * result is kept until clear(), as IPython 0.10's were. */
    ipmpi_rstore_init(&ts->st, c->o->task_memory, c->o->task_memory);
    return 0;
}

void ipmpi_ctl_tasks_fini(ipmpi_ctl_t *c)
{
    ipmpi_tasks_t *ts = &c->tasks;
    for (uint32_t i = 0; i < ts->tab.cap; i++) {
        ipmpi_task_t *t = ts->tab.slots[i];
        if (!t)
            continue;
        /* Waiters of unfinished tasks: free each wait once, at its last link. */
        while (!ipmpi_ql_empty(&t->waiters)) {
            struct twait_link *lk = IPMPI_CONTAINER_OF(t->waiters.next, struct twait_link, q);
            ipmpi_ql_remove(&lk->q);
            if (--lk->w->remaining == 0)
                free(lk->w);
        }
        if (t->s.queued)
            ipmpi_sched_cancel(&c->sched, &t->s);
        task_free(ts, t);
    }
    ipmpi_idtab_fini(&ts->tab);
    ipmpi_rstore_fini(&ts->st);
    memset(ts, 0, sizeof *ts);
    for (uint32_t i = 0; i < c->nheld_tc; i++)
        ipmpi_sched_client_unref(c->held_tc[i]);
    free(c->held_tc);
    c->held_tc = NULL;
    c->nheld_tc = c->held_tc_cap = 0;
}

/* ---- replies ---- */

/* Sends t's result to session s as the reply to (kind, req). */
static void send_result(ipmpi_ctl_t *c, ipmpi_session_t *s, ipmpi_task_t *t, uint8_t kind, uint64_t req)
{
    ipmpi_hdr_t h = {.kind = kind, .flags = IPMPI_F_REPLY, .req_id = req, .target = t->engine,
                     .status = t->status, .total = 1, .aux = t->s.id};
    if (ipmpi_ctl_send_reply(s, &h, t->result, 0) != 0) {
        ipmpi_session_send_error(s, kind, req, IPMPI_TARGET_CONTROLLER, 1, IPMPI_ENOMEM,
                                 "controller out of memory for the task's result");
        return;
    }
    ipmpi_rstore_delivered(&c->tasks.st, &t->done);
}

static void barrier_done(ipmpi_ctl_t *c, twait_t *w)
{
    ipmpi_session_t *s = ipmpi_ctl_session(c, w->session);
    if (s) {
        jbuf_t b = {0};
        jb_printf(&b, "{\"done\": %u}", w->n);
        ipmpi_hdr_t req = {.kind = IPMPI_K_TASK_BARRIER, .req_id = w->client_req};
        ipmpi_ctl_send_json(s, &req, &b);
    }
}

/*
 * t is finished: status and result (owned, may be NULL for an empty
 * result) are its outcome. Tells the submitter and every waiter.
 */
static void task_finish(ipmpi_ctl_t *c, ipmpi_task_t *t, int status, int32_t engine, ipmpi_parts_t *result)
{
    ipmpi_tasks_t *ts = &c->tasks;
    if (t->state == IPMPI_TASK_SCHEDULED)
        ts->nsched--;
    else if (t->state == IPMPI_TASK_PENDING)
        ts->npending--;
    t->state = IPMPI_TASK_DONE;
    t->status = status;
    t->engine = engine;
    task_free_stages(ts, t);
    if (!result)
        result = ipmpi_parts_new(0, NULL);
    t->result = result;
    if (status == 0)
        ts->nsucceeded++;
    else
        ts->nfailed++;
    ipmpi_rstore_add(&ts->st, &t->done, result ? ipmpi_parts_bytes(result) : 0);
    ipmpi_session_t *s = ipmpi_ctl_session(c, t->session);
    if (s && t->result) {
        send_result(c, s, t, IPMPI_K_TASK_SUBMIT, t->client_req);
        /* A client that does not read its results gets no more tasks run
         * until it does; the other clients' tasks go on. */
        if (s->out_bytes > IPMPI_OUT_HOLD_BYTES(c) && t->s.client && !t->s.client->held)
            ipmpi_ctl_hold_task_client(c, t->s.client);
    }
    while (!ipmpi_ql_empty(&t->waiters)) {
        struct twait_link *lk = IPMPI_CONTAINER_OF(t->waiters.next, struct twait_link, q);
        ipmpi_ql_remove(&lk->q);
        twait_t *w = lk->w;
        if (w->kind == IPMPI_K_TASK_RESULT) {
            ipmpi_session_t *ws = ipmpi_ctl_session(c, w->session);
            if (ws && t->result)
                send_result(c, ws, t, IPMPI_K_TASK_RESULT, w->client_req);
        }
        if (--w->remaining == 0) {
            if (w->kind == IPMPI_K_TASK_BARRIER)
                barrier_done(c, w);
            free(w);
        }
    }
    /* Over budget now: older results make room (never this one). */
    make_room(ts, 0, t);
}

/* A message result of the controller's own (aborted, died, shut down). */
static void task_finish_msg(ipmpi_ctl_t *c, ipmpi_task_t *t, int status, int32_t engine, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
static void task_finish_msg(ipmpi_ctl_t *c, ipmpi_task_t *t, int status, int32_t engine, const char *fmt, ...)
{
    char msg[300];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    task_finish(c, t, status, engine, ipmpi_parts_from(msg, strlen(msg)));
}

/* ---- engines ---- */

int ipmpi_ctl_task_send(ipmpi_ctl_t *c, ipmpi_engine_slot_t *e, ipmpi_task_t *t)
{
    t->disp = ++c->next_req;
    t->engine = e->id;
    if (t->state == IPMPI_TASK_SCHEDULED) {
        c->tasks.nsched--;
        c->tasks.npending++;
    }
    t->state = IPMPI_TASK_PENDING;
    ipmpi_hdr_t h = {.kind = IPMPI_K_TASK_SUBMIT, .req_id = t->disp, .target = e->id, .aux = t->s.id};
    return ipmpi_mpilink_send(&c->link, e->rank, &h, t->stage[t->cur]);
}

/* t failed an attempt on engine e (or could not reach it): next retry,
 * next stage, or the end. result is the failure (owned; may be NULL). */
static void task_failed(ipmpi_ctl_t *c, ipmpi_task_t *t, int32_t engine, int status, ipmpi_parts_t *result)
{
    if (t->abort_req) {
        ipmpi_parts_unref(result);
        task_finish_msg(c, t, IPMPI_EABORTED, engine, "task %llu was aborted", (unsigned long long)t->s.id);
        return;
    }
    int again = 0;
    if (t->left > 0) {
        t->left--;
        again = 1;
        ipmpi_log(IPMPI_LOG_INFO, "task %llu failed on engine %d: retrying, %u retries left",
                  (unsigned long long)t->s.id, engine, t->left);
    } else if (t->cur + 1 < t->nstages) {
        /* The failed stage's payload is done with. */
        ipmpi_rstore_count(&c->tasks.st, -(int64_t)ipmpi_parts_bytes(t->stage[t->cur]));
        ipmpi_parts_unref(t->stage[t->cur]);
        t->stage[t->cur] = NULL;
        t->cur++;
        t->left = t->retries[t->cur];
        again = 1;
        ipmpi_log(IPMPI_LOG_INFO, "task %llu failed on engine %d: running its recovery task",
                  (unsigned long long)t->s.id, engine);
    }
    if (!again) {
        task_finish(c, t, status, engine, result);
        return;
    }
    ipmpi_parts_unref(result);
    if (t->state == IPMPI_TASK_PENDING) {
        c->tasks.npending--;
        c->tasks.nsched++;
    }
    t->state = IPMPI_TASK_SCHEDULED;
    t->s.avoid = engine;
    ipmpi_sched_submit(&c->sched, t->s.client, &t->s);
}

void ipmpi_ctl_task_reply(ipmpi_ctl_t *c, ipmpi_engine_slot_t *e, ipmpi_task_t *t, const ipmpi_hdr_t *h,
                          ipmpi_parts_t *parts)
{
    if (h->status == IPMPI_EREJECT && !t->abort_req) {
        ipmpi_parts_unref(parts);
        c->tasks.npending--;
        c->tasks.nsched++;
        t->state = IPMPI_TASK_SCHEDULED;
        ipmpi_sched_refused(&c->sched, e->id, &t->s);
        return;
    }
    if (t->abort_req) {
        ipmpi_parts_unref(parts);
        task_finish_msg(c, t, IPMPI_EABORTED, e->id, "task %llu was aborted while it ran; its result was discarded",
                        (unsigned long long)t->s.id);
        return;
    }
    if (h->status == 0)
        task_finish(c, t, 0, e->id, parts);
    else
        task_failed(c, t, e->id, h->status, parts);
}

void ipmpi_ctl_task_lost(ipmpi_ctl_t *c, ipmpi_task_t *t, int32_t engine, int status, const char *msg)
{
    if (status == IPMPI_ESHUTDOWN) {
        task_finish_msg(c, t, status, engine, "%s", msg);
        return;
    }
    task_failed(c, t, engine, status, ipmpi_parts_from(msg, strlen(msg)));
}

void ipmpi_ctl_tasks_fail_all(ipmpi_ctl_t *c, int status, const char *msg)
{
    ipmpi_tasks_t *ts = &c->tasks;
    if (ts->nsched == 0)
        return;
    /* Collected first: finishing may evict, which moves table entries. */
    ipmpi_task_t **list = malloc((size_t)ts->nsched * sizeof *list);
    uint32_t n = 0;
    for (uint32_t i = 0; list && i < ts->tab.cap && n < ts->nsched; i++) {
        ipmpi_task_t *t = ts->tab.slots[i];
        if (t && t->state == IPMPI_TASK_SCHEDULED)
            list[n++] = t;
    }
    for (uint32_t i = 0; i < n; i++) {
        ipmpi_sched_cancel(&c->sched, &list[i]->s);
        task_finish_msg(c, list[i], status, IPMPI_TARGET_CONTROLLER, "%s", msg);
    }
    free(list);
}

void ipmpi_ctl_tasks_session_closed(ipmpi_ctl_t *c, ipmpi_session_t *s)
{
    (void)c;
    ipmpi_sched_client_unref(s->tclient);
    s->tclient = NULL;
}

/* ---- client requests ---- */

static int read_u64s(const ipmpi_parts_t *p, uint64_t **ids, uint32_t *n)
{
    if (p->n < 1 || p->lens[0] == 0 || p->lens[0] % 8 != 0 || p->lens[0] / 8 > UINT32_MAX)
        return IPMPI_EPROTO;
    *n = (uint32_t)(p->lens[0] / 8);
    *ids = malloc(*n * sizeof **ids);
    if (!*ids)
        return IPMPI_ENOMEM;
    for (uint32_t i = 0; i < *n; i++)
        (*ids)[i] = ipmpi_get_u64(p->bufs[0] + 8 * i);
    return 0;
}

/*
 * Task ids name their controller: the high 32 bits are a tag taken from the
 * controller's random instance (bits 32..62, bit 32 set so it is never 0),
 * the low 32 bits count the ids handed out. An id of another controller (or
 * of this one's earlier life) is then told from an unknown one, instead of
 * naming some other task here (protocol.md section 6).
 */
static uint64_t task_tag(const ipmpi_ctl_t *c)
{
    return ((c->instance >> 32) & 0x7fffffffu) | 1u;
}

static int foreign_id(const ipmpi_ctl_t *c, uint64_t id)
{
    return id >> 32 != task_tag(c);
}

static int reserved_by(const ipmpi_session_t *s, uint64_t id)
{
    for (unsigned i = 0; i < IPMPI_TASK_RES_SLOTS; i++)
        if (s->tres_count[i] && id >= s->tres_first[i] && id - s->tres_first[i] < s->tres_count[i])
            return 1;
    return 0;
}

static void do_reserve(ipmpi_ctl_t *c, ipmpi_session_t *s, const ipmpi_hdr_t *h, const ipmpi_parts_t *p)
{
    if (p->n != 1 || p->lens[0] != 4) {
        ipmpi_ctl_reply_err(s, h, IPMPI_EPROTO, "TASK_RESERVE: part 0 must be a u32 count");
        return;
    }
    uint32_t n = ipmpi_get_u32(p->bufs[0]);
    if (n == 0 || n > IPMPI_TASK_RESERVE_MAX) {
        ipmpi_ctl_reply_err(s, h, IPMPI_EINVAL, "TASK_RESERVE: count must be 1..%u, not %u", IPMPI_TASK_RESERVE_MAX, n);
        return;
    }
    if (c->tasks.next_id + n > ((uint64_t)1 << 32)) {
        ipmpi_ctl_reply_err(s, h, IPMPI_E2BIG, "TASK_RESERVE: this controller has handed out all of its 2^32 task ids");
        return;
    }
    unsigned k = s->tres_next++ % IPMPI_TASK_RES_SLOTS;
    s->tres_first[k] = task_tag(c) << 32 | c->tasks.next_id;
    s->tres_count[k] = n;
    c->tasks.next_id += n;
    jbuf_t b = {0};
    jb_printf(&b, "{\"first\": %llu, \"count\": %u}", (unsigned long long)s->tres_first[k], n);
    ipmpi_ctl_send_json(s, h, &b);
}

/*
 * TASK_SUBMIT: checks the descriptor, splits the payload into its stages
 * and queues the task. Takes p.
 */
static void do_submit(ipmpi_ctl_t *c, ipmpi_session_t *s, const ipmpi_hdr_t *h, ipmpi_parts_t *p)
{
    ipmpi_tasks_t *ts = &c->tasks;
    ipmpi_task_t *t = NULL;
    ipmpi_taskdesc_t desc;
    int drc = p->n >= 1 ? ipmpi_taskdesc_decode(p->bufs[0], p->lens[0], p->n, &desc) : IPMPI_EPROTO;
    if (drc != 0) {
        ipmpi_ctl_reply_err(s, h, drc,
                            "TASK_SUBMIT: part 0 must be the descriptor (u64 id, u32 stages 1..%u, u32 0, then "
                            "u32 parts >= 1 and u32 retries <= %u per stage) and the stages' parts must follow it",
                            IPMPI_TASK_STAGES_MAX, IPMPI_TASK_RETRIES_MAX);
        goto drop;
    }
    uint64_t id = desc.id;
    uint32_t nst = desc.nstages;
    if (!reserved_by(s, id)) {
        ipmpi_ctl_reply_err(s, h, IPMPI_EINVAL, "TASK_SUBMIT: task id %llu was not reserved by this client (TASK_RESERVE)",
                            (unsigned long long)id);
        goto drop;
    }
    if (ipmpi_idtab_get(&ts->tab, id) || ipmpi_idset_has(&ts->st.evicted, id)) {
        ipmpi_ctl_reply_err(s, h, IPMPI_EINVAL, "TASK_SUBMIT: task id %llu is already in use", (unsigned long long)id);
        goto drop;
    }
    uint64_t bytes = ipmpi_parts_bytes(p) - p->lens[0];
    if (!make_room(ts, bytes, NULL)) {
        ipmpi_ctl_reply_err(s, h, IPMPI_E2BIG,
                            "task %llu refused: the controller's task memory (--task-memory %llu MiB) is full of queued "
                            "tasks and unfetched results; collect or clear() some",
                            (unsigned long long)id, (unsigned long long)(ts->st.budget >> 20));
        goto drop;
    }
    if (!s->tclient && !(s->tclient = ipmpi_sched_client_new(s->id))) {
        ipmpi_ctl_reply_err(s, h, IPMPI_ENOMEM, "controller out of memory");
        goto drop;
    }
    t = calloc(1, sizeof *t);
    if (!t)
        goto oom;
    ipmpi_stask_init(&t->s, id);
    ipmpi_rentry_init(&t->done);
    ipmpi_ql_init(&t->waiters);
    t->session = s->id;
    t->client_req = h->req_id;
    t->nstages = nst;
    t->engine = IPMPI_TARGET_CONTROLLER;
    t->stage = calloc(nst, sizeof *t->stage);
    t->retries = calloc(nst, sizeof *t->retries);
    if (!t->stage || !t->retries)
        goto oom;
    uint32_t first = 1;
    for (uint32_t i = 0; i < nst; i++) {
        t->retries[i] = desc.retries[i];
        t->stage[i] = ipmpi_parts_take(p, first, desc.nparts[i]);
        if (!t->stage[i])
            goto oom;
        first += desc.nparts[i];
    }
    if (ipmpi_idtab_put(&ts->tab, t) != 0)
        goto oom;
    ipmpi_rstore_count(&ts->st, (int64_t)bytes);
    t->left = t->retries[0];
    t->state = IPMPI_TASK_SCHEDULED;
    ts->nsched++;
    ipmpi_parts_unref(p);
    if (c->sched.nlive == 0) {
        task_finish_msg(c, t, IPMPI_EDEAD, IPMPI_TARGET_CONTROLLER, "task %llu cannot run: no engine is alive",
                        (unsigned long long)id);
        return;
    }
    ipmpi_sched_submit(&c->sched, s->tclient, &t->s);
    ipmpi_ctl_kick(c);
    return;

oom:
    if (t) {
        for (uint32_t i = 0; t->stage && i < nst; i++)
            ipmpi_parts_unref(t->stage[i]);
        free(t->stage);
        free(t->retries);
        ipmpi_stask_fini(&t->s);
        free(t);
    }
    ipmpi_ctl_reply_err(s, h, IPMPI_ENOMEM, "controller out of memory for the task");
drop:
    ipmpi_parts_unref(p);
}

/* "no task 7 ..." for an id that is not in the table. */
static void reply_missing(ipmpi_ctl_t *c, ipmpi_session_t *s, const ipmpi_hdr_t *h, uint64_t id)
{
    if (foreign_id(c, id))
        ipmpi_ctl_reply_err(s, h, IPMPI_ENOENT,
                            "task id %llu belongs to another controller (this controller's task ids are %llu and up)",
                            (unsigned long long)id, (unsigned long long)(task_tag(c) << 32));
    else if (ipmpi_idset_has(&c->tasks.st.evicted, id))
        ipmpi_ctl_reply_err(s, h, IPMPI_EEVICTED,
                            "task %llu's result was evicted: the controller's task memory (--task-memory) needed room",
                            (unsigned long long)id);
    else
        ipmpi_ctl_reply_err(s, h, IPMPI_ENOENT, "task ID not registered: %llu (never submitted, or cleared)",
                            (unsigned long long)id);
}

static twait_t *wait_new(const ipmpi_session_t *s, const ipmpi_hdr_t *h, uint32_t n)
{
    twait_t *w = calloc(1, sizeof *w + (size_t)n * sizeof w->links[0]);
    if (w) {
        w->session = s->id;
        w->client_req = h->req_id;
        w->kind = h->kind;
        w->n = n;
    }
    return w;
}

static void wait_on(twait_t *w, uint32_t i, ipmpi_task_t *t)
{
    w->links[i].w = w;
    w->links[i].t = t;
    ipmpi_ql_push_back(&t->waiters, &w->links[i].q);
    w->remaining++;
}

static void do_result(ipmpi_ctl_t *c, ipmpi_session_t *s, const ipmpi_hdr_t *h, const ipmpi_parts_t *p)
{
    if (p->n != 1 || p->lens[0] != 9) {
        ipmpi_ctl_reply_err(s, h, IPMPI_EPROTO, "TASK_RESULT: part 0 must be a u64 task id and a u8 block flag");
        return;
    }
    uint64_t id = ipmpi_get_u64(p->bufs[0]);
    int block = p->bufs[0][8] != 0;
    ipmpi_task_t *t = ipmpi_idtab_get(&c->tasks.tab, id);
    if (!t) {
        reply_missing(c, s, h, id);
        return;
    }
    if (t->state == IPMPI_TASK_DONE) {
        send_result(c, s, t, IPMPI_K_TASK_RESULT, h->req_id);
        return;
    }
    if (!block) {
        ipmpi_ctl_reply_err(s, h, IPMPI_EAGAIN, "task %llu is not finished", (unsigned long long)id);
        return;
    }
    twait_t *w = wait_new(s, h, 1);
    if (!w) {
        ipmpi_ctl_reply_err(s, h, IPMPI_ENOMEM, "controller out of memory");
        return;
    }
    wait_on(w, 0, t);
}

static void do_barrier(ipmpi_ctl_t *c, ipmpi_session_t *s, const ipmpi_hdr_t *h, const ipmpi_parts_t *p)
{
    uint64_t *ids = NULL;
    uint32_t n = 0;
    int rc = read_u64s(p, &ids, &n);
    if (rc != 0) {
        ipmpi_ctl_reply_err(s, h, rc, "TASK_BARRIER: part 0 must be one or more u64 task ids");
        return;
    }
    jbuf_t bad = {0};
    uint32_t nbad = 0, nforeign = 0;
    for (uint32_t i = 0; i < n; i++)
        if (!ipmpi_idtab_get(&c->tasks.tab, ids[i])) {
            if (nbad < 20)
                jb_printf(&bad, "%s%llu", nbad ? ", " : "", (unsigned long long)ids[i]);
            nbad++;
            nforeign += foreign_id(c, ids[i]);
        }
    if (nbad) {
        ipmpi_ctl_reply_err(s, h, IPMPI_ENOENT, "barrier: task ID%s not registered (or evicted): %s%s%s",
                            nbad > 1 ? "s" : "", bad.s ? bad.s : "", nbad > 20 ? ", ..." : "",
                            nforeign ? " (some belong to another controller)" : "");
        goto free_ids;
    }
    twait_t *w = wait_new(s, h, n);
    if (!w) {
        ipmpi_ctl_reply_err(s, h, IPMPI_ENOMEM, "controller out of memory");
        goto free_ids;
    }
    uint32_t k = 0;
    for (uint32_t i = 0; i < n; i++) {
        ipmpi_task_t *t = ipmpi_idtab_get(&c->tasks.tab, ids[i]);
        if (t->state != IPMPI_TASK_DONE)
            wait_on(w, k++, t);
    }
    if (w->remaining == 0) {
        barrier_done(c, w);
        free(w);
    }
free_ids:
    free(bad.s);
    free(ids);
}

static void do_abort(ipmpi_ctl_t *c, ipmpi_session_t *s, const ipmpi_hdr_t *h, const ipmpi_parts_t *p)
{
    if (p->n != 1 || p->lens[0] != 8) {
        ipmpi_ctl_reply_err(s, h, IPMPI_EPROTO, "TASK_ABORT: part 0 must be a u64 task id");
        return;
    }
    uint64_t id = ipmpi_get_u64(p->bufs[0]);
    ipmpi_task_t *t = ipmpi_idtab_get(&c->tasks.tab, id);
    if (!t) {
        reply_missing(c, s, h, id);
        return;
    }
    if (t->state == IPMPI_TASK_DONE || t->abort_req) {
        ipmpi_ctl_reply_err(s, h, IPMPI_EINVAL, "Task Already %s: %llu",
                            t->abort_req || t->status == IPMPI_EABORTED ? "Aborted" : "Completed",
                            (unsigned long long)id);
        return;
    }
    jbuf_t b = {0};
    jb_printf(&b, "{\"aborted\": %llu, \"state\": \"%s\"}", (unsigned long long)id,
              t->state == IPMPI_TASK_SCHEDULED ? "scheduled" : "pending");
    ipmpi_ctl_send_json(s, h, &b);
    if (t->state == IPMPI_TASK_SCHEDULED) {
        ipmpi_sched_cancel(&c->sched, &t->s);
        task_finish_msg(c, t, IPMPI_EABORTED, IPMPI_TARGET_CONTROLLER, "task %llu was aborted before it ran",
                        (unsigned long long)id);
    } else {
        t->abort_req = 1;
    }
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* "name": [ids of the tasks in state (and, when done, succeeded == ok)], ascending. */
static void list_ids(ipmpi_ctl_t *c, jbuf_t *b, const char *name, int state, int ok)
{
    uint64_t *ids = malloc((size_t)(c->tasks.tab.len ? c->tasks.tab.len : 1) * sizeof *ids);
    uint32_t n = 0;
    if (!ids) {
        b->oom = 1;
        return;
    }
    for (uint32_t i = 0; i < c->tasks.tab.cap; i++) {
        const ipmpi_task_t *t = c->tasks.tab.slots[i];
        if (t && t->state == state && (state != IPMPI_TASK_DONE || (t->status == 0) == ok))
            ids[n++] = t->s.id;
    }
    qsort(ids, n, sizeof *ids, cmp_u64);
    jb_printf(b, "\"%s\": [", name);
    for (uint32_t i = 0; i < n; i++)
        jb_printf(b, i ? ", %llu" : "%llu", (unsigned long long)ids[i]);
    jb_printf(b, "]");
    free(ids);
}

static void do_status(ipmpi_ctl_t *c, ipmpi_session_t *s, const ipmpi_hdr_t *h, const ipmpi_parts_t *p)
{
    int verbose = p->n >= 1 && p->lens[0] >= 1 && p->bufs[0][0] != 0;
    jbuf_t b = {0};
    const ipmpi_tasks_t *ts = &c->tasks;
    if (verbose) {
        jb_printf(&b, "{");
        list_ids(c, &b, "scheduled", IPMPI_TASK_SCHEDULED, 0);
        jb_printf(&b, ", ");
        list_ids(c, &b, "pending", IPMPI_TASK_PENDING, 0);
        jb_printf(&b, ", ");
        list_ids(c, &b, "succeeded", IPMPI_TASK_DONE, 1);
        jb_printf(&b, ", ");
        list_ids(c, &b, "failed", IPMPI_TASK_DONE, 0);
        jb_printf(&b, "}");
    } else {
        jb_printf(&b, "{\"scheduled\": %u, \"pending\": %u, \"succeeded\": %u, \"failed\": %u}", ts->nsched,
                  ts->npending, ts->nsucceeded, ts->nfailed);
    }
    ipmpi_ctl_send_json(s, h, &b);
}

static void do_clear(ipmpi_ctl_t *c, ipmpi_session_t *s, const ipmpi_hdr_t *h, const ipmpi_parts_t *p)
{
    ipmpi_tasks_t *ts = &c->tasks;
    uint32_t cleared = 0;
    jbuf_t b = {0};
    if (p->n == 0) {
        ipmpi_rentry_t *e;
        for (; (e = ipmpi_rstore_first(&ts->st)); cleared++)
            task_drop(ts, IPMPI_CONTAINER_OF(e, ipmpi_task_t, done), 0);
        jb_printf(&b, "{\"cleared\": %u, \"unknown\": []}", cleared);
        ipmpi_ctl_send_json(s, h, &b);
        return;
    }
    uint64_t *ids = NULL;
    uint32_t n = 0;
    int rc = read_u64s(p, &ids, &n);
    if (rc != 0) {
        ipmpi_ctl_reply_err(s, h, rc, "TASK_CLEAR: part 0 must be one or more u64 task ids, or absent");
        return;
    }
    jbuf_t unk = {0};
    int first = 1;
    for (uint32_t i = 0; i < n; i++) {
        ipmpi_task_t *t = ipmpi_idtab_get(&ts->tab, ids[i]);
        if (t && t->state == IPMPI_TASK_DONE) {
            task_drop(ts, t, 0);
            cleared++;
        } else {
            jb_printf(&unk, first ? "%llu" : ", %llu", (unsigned long long)ids[i]);
            first = 0;
        }
    }
    jb_printf(&b, "{\"cleared\": %u, \"unknown\": [%s]}", cleared, unk.s ? unk.s : "");
    ipmpi_ctl_send_json(s, h, &b);
    free(unk.s);
    free(ids);
}

void ipmpi_ctl_task_frame(ipmpi_ctl_t *c, ipmpi_session_t *s, const ipmpi_hdr_t *h, ipmpi_parts_t *p)
{
    switch (h->kind) {
    case IPMPI_K_TASK_SUBMIT:
        do_submit(c, s, h, p);
        return; /* took p */
    case IPMPI_K_TASK_RESERVE:
        do_reserve(c, s, h, p);
        break;
    case IPMPI_K_TASK_RESULT:
        do_result(c, s, h, p);
        break;
    case IPMPI_K_TASK_BARRIER:
        do_barrier(c, s, h, p);
        break;
    case IPMPI_K_TASK_ABORT:
        do_abort(c, s, h, p);
        break;
    case IPMPI_K_TASK_STATUS:
        do_status(c, s, h, p);
        break;
    case IPMPI_K_TASK_CLEAR:
        do_clear(c, s, h, p);
        break;
    case IPMPI_K_TASK_SPIN: {
        uint32_t n = ipmpi_sched_spin(&c->sched);
        jbuf_t b = {0};
        jb_printf(&b, "{\"scheduled\": %u}", n);
        ipmpi_ctl_send_json(s, h, &b);
        ipmpi_ctl_kick(c);
        break;
    }
    default:
        ipmpi_ctl_reply_err(s, h, IPMPI_EKIND, "unknown task kind %u", h->kind);
    }
    ipmpi_parts_unref(p);
}
