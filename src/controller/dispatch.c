/*
 * Engines' side of the controller: handing each engine what the scheduler
 * (sched.h) picks, engine replies forwarded to their clients, held
 * requests of clients that do not read, engine deaths and shutdown.
 * Loop thread only.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backoff.h"
#include "ctl.h"
#include "doorbell.h"
#include "ipmpi/errors.h"
#include "json.h"
#include "log.h"
#include "shm.h"
#include "shmbuf.h"
#include "tls.h"

void ipmpi_ctl_req_release(ipmpi_ctl_t *c, ipmpi_req_t *r)
{
    ipmpi_ctl_stream_detach(r, 0);
    ipmpi_reqtab_del(&c->reqs, r->id);
    ipmpi_req_free(r);
}

/* One target of r is settled without a reply from the engine: send the
 * client an error reply for that engine and drop the engine's reference. */
void ipmpi_ctl_req_fail_one(ipmpi_ctl_t *c, ipmpi_req_t *r, int engine, int status, const char *msg)
{
    ipmpi_session_t *s = r->quiet ? NULL : ipmpi_ctl_session(c, r->session);
    if (s)
        ipmpi_session_send_error(s, r->kind, r->client_req, engine, r->total, status, msg);
    if (r->res) {
        ipmpi_parts_t *p = ipmpi_parts_from(msg, strlen(msg));
        ipmpi_ctl_result_reply(c, r, engine, status, p, s != NULL);
        ipmpi_parts_unref(p);
    }
    if (--r->pending == 0)
        ipmpi_ctl_req_release(c, r);
}

int ipmpi_ctl_must_hold(ipmpi_ctl_t *c, uint64_t session)
{
    const ipmpi_session_t *s = ipmpi_ctl_session(c, session);
    return s && s->state == IPMPI_SESS_OPEN && s->out_bytes > IPMPI_OUT_HOLD_BYTES(c);
}

/* ipmpi_sched_next's hold callback. */
static int must_hold(void *arg, uint64_t session)
{
    return ipmpi_ctl_must_hold(arg, session);
}

static void set_held(ipmpi_ctl_t *c, ipmpi_engine_slot_t *e, int held)
{
    if (e->held == held)
        return;
    e->held = held;
    c->nheld += held ? 1 : -1;
}

/* An in-flight item that could not be sent: settled as lost. */
static void item_lost(ipmpi_ctl_t *c, ipmpi_engine_slot_t *e, const ipmpi_sitem_t *it, int status, const char *msg)
{
    if (it->type == IPMPI_SITEM_REQ)
        ipmpi_ctl_req_fail_one(c, it->u.req, e->id, status, msg);
    else
        ipmpi_ctl_task_lost(c, IPMPI_CONTAINER_OF(it->u.task, ipmpi_task_t, s), e->id, status, msg);
}

/*
 * Hands engine e one item the scheduler picks. Returns 1 if something
 * went out (or failed to and was settled), 0 if there was nothing.
 */
static int dispatch_one(ipmpi_ctl_t *c, ipmpi_engine_slot_t *e)
{
    if (e->dead)
        return 0;
    ipmpi_sitem_t it;
    int rc = ipmpi_sched_next(&c->sched, e->id, ipmpi_now_ns(), must_hold, c, &it);
    set_held(c, e, rc == 2);
    if (rc != 1)
        return 0;
    if (it.type == IPMPI_SITEM_REQ) {
        ipmpi_hdr_t h = {.kind = it.u.req->kind, .flags = it.u.req->eng_flags, .req_id = it.u.req->id,
                         .target = e->id};
        rc = ipmpi_mpilink_send(&c->link, e->rank, &h, it.u.req->payload);
    } else {
        rc = ipmpi_ctl_task_send(c, e, IPMPI_CONTAINER_OF(it.u.task, ipmpi_task_t, s));
    }
    ipmpi_ctl_busy(c, e, 1);
    if (rc != 0) {
        /* The item is the newest in flight; nothing was posted for it. */
        char msg[160];
        snprintf(msg, sizeof msg, "controller could not send to engine %d: %s", e->id, ipmpi_strerror(rc));
        ipmpi_log(IPMPI_LOG_ERROR, "%s", msg);
        ipmpi_ctl_engine_died(c, e, msg);
    }
    return 1;
}

void ipmpi_ctl_dispatch(ipmpi_ctl_t *c, ipmpi_engine_slot_t *e)
{
    /* Nothing waits for it (the common case after each of a broadcast's
     * replies): the scheduler would hand it nothing. A held engine is
     * looked at again: its hold must be lifted. */
    if (!e->held && ipmpi_equeue_len(&c->sched.eng[e->id].q) == 0 && !ipmpi_sched_has_tasks(&c->sched))
        return;
    while (dispatch_one(c, e))
        ;
}

void ipmpi_ctl_kick(ipmpi_ctl_t *c)
{
    /* Engines with room come from the scheduler's open list, idle ones
     * first; one that takes nothing (its queued tasks refuse or avoid it)
     * is marked for this kick, so each engine is tried at most once
     * without progress. */
    if (++c->markgen == 0) {
        memset(c->mark, 0, (size_t)c->nengines * sizeof *c->mark);
        c->markgen = 1;
    }
    while (ipmpi_sched_has_tasks(&c->sched)) {
        int id = -1;
        for (ipmpi_qlink_t *q = c->sched.open.next; q != &c->sched.open; q = q->next) {
            int k = (int)(IPMPI_CONTAINER_OF(q, ipmpi_sengine_t, open) - c->sched.eng);
            if (c->mark[k] != c->markgen) {
                id = k;
                break;
            }
        }
        if (id < 0)
            return;
        if (!dispatch_one(c, &c->eng[id]))
            c->mark[id] = c->markgen;
    }
}

void ipmpi_ctl_hold_task_client(ipmpi_ctl_t *c, ipmpi_sched_client_t *cl)
{
    if (cl->held)
        return;
    if (c->nheld_tc == c->held_tc_cap) {
        uint32_t ncap = c->held_tc_cap ? 2 * c->held_tc_cap : 8;
        ipmpi_sched_client_t **n = realloc(c->held_tc, ncap * sizeof *n);
        if (!n)
            return; /* not held: its results queue up, within the task budget */
        c->held_tc = n;
        c->held_tc_cap = ncap;
    }
    cl->refs++;
    cl->held = 1;
    c->held_tc[c->nheld_tc++] = cl;
    ipmpi_log(IPMPI_LOG_INFO, "tasks of a client are held: it has not read %llu MiB of results",
              (unsigned long long)(IPMPI_OUT_HOLD_BYTES(c) >> 20));
}

/* Releases held task clients that read their results (or are gone), and
 * closes one that read nothing for IPMPI_OUT_STALL_NS while over. */
static void release_held_tasks(ipmpi_ctl_t *c, uint64_t now)
{
    int released = 0;
    for (uint32_t i = 0; i < c->nheld_tc;) {
        ipmpi_sched_client_t *cl = c->held_tc[i];
        ipmpi_session_t *s = ipmpi_ctl_session(c, cl->session);
        int over = s && s->state == IPMPI_SESS_OPEN && s->out_bytes > IPMPI_OUT_HOLD_BYTES(c);
        if (over && now - s->t_out_progress > IPMPI_OUT_STALL_NS) {
            ipmpi_log(IPMPI_LOG_WARN, "client %s has read none of its task results for %llu s; closing it",
                      s->peer, (unsigned long long)(IPMPI_OUT_STALL_NS / 1000000000ull));
            ipmpi_session_close_after_flush(s, now);
            over = 0; /* its tasks run on: their results stay in the controller */
        }
        if (over) {
            i++;
            continue;
        }
        cl->held = 0;
        ipmpi_sched_client_unref(cl);
        c->held_tc[i] = c->held_tc[--c->nheld_tc];
        released = 1;
    }
    if (released)
        ipmpi_ctl_kick(c);
}

void ipmpi_ctl_release_held(ipmpi_ctl_t *c, uint64_t now)
{
    if (c->nheld_tc)
        release_held_tasks(c, now);
    if (c->nheld == 0)
        return;
    for (int i = 0; i < c->nengines; i++) {
        ipmpi_engine_slot_t *e = &c->eng[i];
        if (!e->held)
            continue;
        ipmpi_equeue_t *q = &c->sched.eng[i].q;
        ipmpi_req_t *head = ipmpi_equeue_len(q) ? ipmpi_equeue_at(q, 0) : NULL;
        ipmpi_session_t *s = head ? ipmpi_ctl_session(c, head->session) : NULL;
        if (s && s->out_bytes > IPMPI_OUT_HOLD_BYTES(c) && s->state == IPMPI_SESS_OPEN &&
            now - s->t_out_progress > IPMPI_OUT_STALL_NS) {
            ipmpi_log(IPMPI_LOG_WARN,
                      "client %s has read none of its %llu MiB of replies for %llu s; closing it",
                      s->peer, (unsigned long long)(s->out_bytes >> 20),
                      (unsigned long long)(IPMPI_OUT_STALL_NS / 1000000000ull));
            ipmpi_session_close_after_flush(s, now);
        }
        if (!head || !must_hold(c, head->session)) {
            set_held(c, e, 0);
            ipmpi_ctl_dispatch(c, e);
        }
    }
}

/*
 * A ring can come before the frame it announces is where the engine looks:
 * MPI may complete a small send by copying it aside and put it into the
 * engine's shared-memory queue only in a later progress call (its queue or
 * the sender's fragments full), after the engine's last look before it
 * fell asleep; the engine then sleeps until its 2 s watch. So every
 * engine with work in flight is rung again while its work is unanswered,
 * 2, 4, 8 ... ms after the work was sent (wake.c's back-off; looked for
 * every IPMPI_RERING_NS): a fence and a load each when awake, a wake-up
 * when one was lost or the engine waits its turn in a tree. Not at a
 * fixed period: engines deep in a tree sleep until their parent rings
 * them, and ringing every one of them every 2 ms cost the controller a
 * futex call per engine and period, the largest part of its CPU time per
 * request to many engines.
 */
/* Rings engine i again when its work is unanswered and due; *next gets
 * the earliest due. */
static void rering_one(ipmpi_ctl_t *c, int i, uint64_t now, uint64_t *next)
{
    ipmpi_engine_slot_t *e = &c->eng[i];
    /* UINT64_MAX: not to be rung again (a tree's engines below its
     * roots), whatever it runs. */
    if (e->dead || e->wake_due == UINT64_MAX || !ipmpi_sched_inflight(&c->sched, i))
        return;
    ipmpi_ctl_wake_again(c, e, now);
    if (e->wake_due < *next)
        *next = e->wake_due;
}

void ipmpi_ctl_rering(ipmpi_ctl_t *c, uint64_t now)
{
    if (now < c->rering_at)
        return;
    uint64_t next = UINT64_MAX;
    const ipmpi_req_t *g = c->sched.gang.left > 0 ? c->sched.gang.item.u.req : NULL;
    if (g && g->tree_open > 0 && c->sched.nfly_tasks == 0 && c->sched.running.next == &g->running &&
        c->sched.running.prev == &g->running) {
        /* Nothing but a gang in flight, its subtrees whole: only its roots
         * are rung again, not every engine looked at. */
        int id;
        for (uint32_t k = 0; (id = ipmpi_ctl_tree_gang_root(g, k)) >= 0; k++)
            rering_one(c, id, now, &next);
    } else {
        for (int i = 0; i < c->nengines; i++) {
            /* A gang's engines below its roots are rung by their parents
             * while its subtrees are whole (tree.c; their wake_due is left
             * as it was, not set per engine). */
            if (!c->eng[i].tree_root && ipmpi_sched_gang_pending(&c->sched, i) && g->tree_open > 0)
                continue;
            rering_one(c, i, now, &next);
        }
    }
    /* The next look: when the first of them is due, and the loop's sleep
     * on its bell ends then too (controller.c). */
    c->rering_at = next > now + IPMPI_RERING_NS ? next : now + IPMPI_RERING_NS;
}

void ipmpi_ctl_busy(ipmpi_ctl_t *c, const ipmpi_engine_slot_t *e, int d)
{
    c->nbusy += d;
    if (!e->near)
        c->nbusy_far += d;
}

/*
 * The loop may sleep until k more frames came from this node's engines
 * when nothing else can need it before: the smallest number of replies a
 * request in flight still waits for (each engine holds one item; for a
 * tree, its subtrees' gathered frames still to come). Anything else in
 * the way (a task, a tree whose relay died, a request queued behind a
 * running one, a held client, sends or receives under way) makes it 1 or
 * 0, which only costs wake-ups. It reads the requests in flight (the
 * scheduler's list), not the engines: one request to every engine is one
 * look, whatever their number.
 */
uint64_t ipmpi_ctl_bell_count(ipmpi_ctl_t *c)
{
    if (c->job->bell->ctl_fd < 0 || c->nheld || c->nheld_tc || ipmpi_mpilink_sends(&c->link) > 0 ||
        c->link.recv_head || c->sched.nqueued > 0)
        return 0;
    /* Engines of other nodes ring by datagram after every frame (wake.c),
     * once they showed they can: the count is for this node's only. */
    for (int i = 0; c->nbusy_far > 0 && c->nmute_far > 0 && i < c->nengines; i++)
        if (ipmpi_sched_nfly(&c->sched, i) > 0 && !c->eng[i].near && !c->eng[i].rings)
            return 0;
    if (c->sched.nfly_tasks > 0 || c->sched.nreq_queued > 0)
        return 1;
    uint64_t k = UINT64_MAX;
    const ipmpi_qlink_t *run = &c->sched.running;
    for (const ipmpi_qlink_t *q = run->next; q != run && k > 1; q = q->next) {
        const ipmpi_req_t *r = IPMPI_CONTAINER_OF(q, ipmpi_req_t, running);
        if (r->stream || (r->tree && !r->tree_open))
            k = 1;
        else if (r->tree && r->tree_open < k)
            /* One gathered frame per subtree (replies sent directly only
             * add frames, which wake the loop sooner). */
            k = r->tree_open;
        else if (!r->tree && r->pending < k)
            k = r->pending;
    }
    return k == UINT64_MAX || k == 0 ? 1 : k;
}

/* Takes back everything of engine e: in flight and queued, settled with
 * status and msg (tasks retry elsewhere when they may). */
static void settle_engine(ipmpi_ctl_t *c, ipmpi_engine_slot_t *e, int status, const char *msg)
{
    ipmpi_sitem_t it;
    while (ipmpi_sched_done(&c->sched, e->id, ipmpi_now_ns(), &it)) {
        ipmpi_ctl_busy(c, e, -1);
        item_lost(c, e, &it, status, msg);
    }
    ipmpi_req_t *r;
    while ((r = ipmpi_equeue_pop(&c->sched.eng[e->id].q)))
        ipmpi_ctl_req_fail_one(c, r, e->id, status, msg);
    set_held(c, e, 0);
}

void ipmpi_ctl_engine_died(ipmpi_ctl_t *c, ipmpi_engine_slot_t *e, const char *why)
{
    if (e->dead)
        return;
    /* Engines below it in a broadcast tree get its request directly. */
    ipmpi_ctl_tree_orphans(c, e);
    e->dead = 1;
    c->engines_gen++; /* the tree of all engines is built again */
    c->nlive--;
    c->any_died = 1;
    if (e->join_first == 0)
        ipmpi_ctl_watch_forget(&c->watch, e->rank);
    snprintf(e->why, sizeof e->why, "%s", why);
    ipmpi_log(IPMPI_LOG_ERROR, "engine %d (rank %d) died: %s", e->id, e->rank, why);
    ipmpi_sched_engine_dead(&c->sched, e->id);
    /* A stream still feeding this engine must stop: its sends go now. */
    const ipmpi_sitem_t *head = ipmpi_sched_inflight(&c->sched, e->id);
    if (head && head->type == IPMPI_SITEM_REQ)
        ipmpi_ctl_stream_detach(head->u.req, 1);
    ipmpi_mpilink_abandon(&c->link, e->rank);
    ipmpi_ctl_join_engine_gone(c, e);
    char msg[256];
    ipmpi_ctl_dead_msg(e, msg, sizeof msg);
    settle_engine(c, e, IPMPI_EDEAD, msg);
    if (c->sched.nlive == 0)
        ipmpi_ctl_tasks_fail_all(c, IPMPI_EDEAD, "no engine is alive to run the task");
    /* Tasks it ran go to the others. */
    ipmpi_ctl_kick(c);
}

void ipmpi_ctl_rank_dead(void *arg, int rank, const char *state)
{
    ipmpi_ctl_t *c = arg;
    if (rank < 1 || rank > c->nengines)
        return;
    ipmpi_ctl_engine_died(c, &c->eng[rank - 1], state);
}

void ipmpi_ctl_fail_all(ipmpi_ctl_t *c)
{
    const char *msg = "controller is shutting down: the request did not run";
    ipmpi_ctl_tasks_fail_all(c, IPMPI_ESHUTDOWN, "controller is shutting down: the task did not run");
    for (int i = 0; i < c->nengines; i++) {
        ipmpi_engine_slot_t *e = &c->eng[i];
        /* The engine must be back in step to read its EXIT (if even the
         * abort cannot be posted, the engine is marked dead instead). */
        const ipmpi_sitem_t *head = ipmpi_sched_inflight(&c->sched, i);
        if (head && head->type == IPMPI_SITEM_REQ)
            ipmpi_ctl_stream_abort(head->u.req, "the controller is shutting down");
        if (!e->dead)
            settle_engine(c, e, IPMPI_ESHUTDOWN, msg);
    }
}

/* ---- engine frames ---- */

static void store_ready(ipmpi_ctl_t *c, ipmpi_engine_slot_t *e, ipmpi_parts_t *p)
{
    char *props = NULL;
    if (p->n >= 1) {
        props = malloc((size_t)p->lens[0] + 1);
        if (props) {
            memcpy(props, p->bufs[0], (size_t)p->lens[0]);
            props[p->lens[0]] = '\0';
        }
    }
    free(e->props);
    e->props = props;
    if (p->n >= 2 && e->wake_fd < 0)
        ipmpi_ctl_wake_register(c, e, (const char *)p->bufs[1], (size_t)p->lens[1]);
    if (p->n >= 3)
        ipmpi_ctl_intr_register(e, (const char *)p->bufs[2], (size_t)p->lens[2]);
    if (!e->ready)
        ipmpi_log(IPMPI_LOG_DEBUG, "engine %d (rank %d) ready: %s", e->id, e->rank, props ? props : "");
    c->engines_gen++; /* ready, or how it wakes changed: the tree of all engines is built again */
    if (!e->ready) {
        e->ready = 1;
        /* Its end shows at once if it runs on this host (watch.h). */
        if (e->join_first == 0)
            (void)ipmpi_ctl_watch_pid(&c->watch, e->rank, ipmpi_ctl_engine_pid(e));
        ipmpi_sched_engine_ready(&c->sched, e->id);
        ipmpi_ctl_kick(c);
    }
}

ipmpi_parts_t *ipmpi_ctl_engine_alloc(void *arg, int rank, const ipmpi_hdr_t *h, const uint64_t *lens)
{
    ipmpi_ctl_t *c = arg;
    const ipmpi_sitem_t *it = rank >= 1 && rank <= c->nengines ? ipmpi_sched_inflight(&c->sched, rank - 1) : NULL;
    const ipmpi_req_t *r = it && it->type == IPMPI_SITEM_REQ ? it->u.req : NULL;
    if (r && (r->reply_flags & (IPMPI_F_SHM_OK | IPMPI_F_VM_OK)) == IPMPI_F_SHM_OK && !r->quiet && (h->flags & (IPMPI_F_REPLY | IPMPI_F_MORE)) == IPMPI_F_REPLY &&
        h->req_id == r->id)
        for (uint32_t i = 0; i < h->nparts; i++)
            if (lens[i] >= IPMPI_SHM_MIN)
                return ipmpi_shm_alloc_parts(h->nparts, lens);
    return ipmpi_parts_new(h->nparts, lens);
}

/*
 * Sends a reply; parts that are in own memfds go by shared memory (the
 * client maps them and releases them) while the session's lent bytes stay
 * within IPMPI_SHM_LEND_MAX, otherwise everything goes inline.
 */
int ipmpi_ctl_send_reply(ipmpi_session_t *s, const ipmpi_hdr_t *h, ipmpi_parts_t *parts, int vm)
{
    struct ipmpi_lent lent[parts && parts->n ? parts->n : 1];
    uint32_t k = 0;
    ipmpi_backing_t *hold = NULL;
    ipmpi_parts_t *w = parts && (parts->back || vm) ? ipmpi_shm_wire(parts, vm, &s->next_vm, lent, &k, &hold) : NULL;
    uint64_t bytes = 0;
    for (uint32_t i = 0; i < k; i++)
        bytes += lent[i].bytes;
    uint32_t j = 0;
    if (w && s->lent_bytes + bytes <= IPMPI_SHM_LEND_MAX)
        while (j < k && ipmpi_session_lend(s, lent[j].handle, lent[j].b, lent[j].bytes) == 0)
            j++;
    int rc;
    if (!w || j < k) {
        while (j-- > 0)
            ipmpi_session_release(s, lent[j].handle);
        rc = ipmpi_session_send(s, h, parts);
    } else {
        ipmpi_hdr_t hh = *h;
        hh.flags |= IPMPI_F_SHM;
        hh.aux = (uint64_t)getpid();
        rc = ipmpi_session_send(s, &hh, w);
    }
    ipmpi_backing_unref(hold);
    ipmpi_parts_unref(w);
    return rc;
}

/*
 * A non-final reply (IPMPI_F_MORE) of request r that engine e runs: output
 * streamed to r's client, same header otherwise (doc/protocol.md section
 * 2). Streaming is best effort: while the client has more than
 * IPMPI_OUT_STREAM_BYTES unread it is dropped and counted, never queued
 * (the final reply carries the whole output anyway).
 */
static void forward_output(ipmpi_ctl_t *c, const ipmpi_engine_slot_t *e, ipmpi_req_t *r, ipmpi_parts_t *parts)
{
    if (!(r->eng_flags & IPMPI_F_STREAM) || parts->n != 2) {
        ipmpi_log(IPMPI_LOG_ERROR, "engine %d sent output for a request that does not stream it; dropped", e->id);
        return;
    }
    ipmpi_session_t *s = r->quiet ? NULL : ipmpi_ctl_session(c, r->session);
    if (!s || s->state != IPMPI_SESS_OPEN)
        return;
    if (s->out_bytes > IPMPI_OUT_STREAM_BYTES) {
        r->out_dropped += parts->lens[1];
        return;
    }
    ipmpi_hdr_t out = {.kind = r->kind, .flags = IPMPI_F_REPLY | IPMPI_F_MORE, .req_id = r->client_req,
                       .target = e->id, .total = r->total};
    ipmpi_session_send(s, &out, parts);
}

/* Tells r's client, before engine e's final reply, how much of the
 * streamed output it was too slow to take. */
static void tell_dropped(ipmpi_session_t *s, const ipmpi_engine_slot_t *e, ipmpi_req_t *r)
{
    char note[200];
    int n = snprintf(note, sizeof note,
                     "[ipmpi: %llu bytes of streamed output were dropped: the client did not read them in time; "
                     "the result holds the whole output]\n",
                     (unsigned long long)r->out_dropped);
    r->out_dropped = 0;
    uint64_t lens[2] = {6, (uint64_t)n};
    ipmpi_parts_t *p = ipmpi_parts_new(2, lens);
    if (!p)
        return;
    memcpy(p->bufs[0], "stderr", 6);
    memcpy(p->bufs[1], note, (size_t)n);
    ipmpi_hdr_t out = {.kind = r->kind, .flags = IPMPI_F_REPLY | IPMPI_F_MORE, .req_id = r->client_req,
                       .target = e->id, .total = r->total};
    ipmpi_session_send(s, &out, p);
    ipmpi_parts_unref(p);
}

void ipmpi_ctl_reply_in(ipmpi_ctl_t *c, ipmpi_engine_slot_t *e, uint16_t hflags, uint64_t now, ipmpi_sitem_t *it)
{
    ipmpi_sched_done(&c->sched, e->id, now, it);
    ipmpi_ctl_busy(c, e, -1);
    if (hflags & IPMPI_F_PROPS)
        ipmpi_sched_props_changed(&c->sched, e->id);
}

void ipmpi_ctl_engine_frame(void *arg, int rank, const ipmpi_hdr_t *h, ipmpi_parts_t *parts)
{
    ipmpi_ctl_t *c = arg;
    if (rank < 1 || rank > c->nengines) {
        ipmpi_log(IPMPI_LOG_ERROR, "frame from rank %d, which is not an engine; dropped", rank);
        goto drop;
    }
    if (h->flags & IPMPI_F_GATHER) {
        /* Several engines' replies, from a broadcast tree (tree.c). */
        uint64_t t = ipmpi_cpusec_begin(&c->cpu);
        ipmpi_ctl_tree_gathered(c, rank, parts);
        ipmpi_cpusec_end(&c->cpu, IPMPI_CS_GATHERED, t);
        return;
    }
    ipmpi_engine_slot_t *e = &c->eng[rank - 1];
    if (e->dead)
        goto drop;
    if (h->kind == IPMPI_K_READY) {
        store_ready(c, e, parts);
        goto drop;
    }
    /* Engines answer in the order they were sent work. */
    const ipmpi_sitem_t *head = ipmpi_sched_inflight(&c->sched, e->id);
    uint64_t want = !head ? 0
                    : head->type == IPMPI_SITEM_REQ ? head->u.req->id
                                                    : IPMPI_CONTAINER_OF(head->u.task, ipmpi_task_t, s)->disp;
    if (!head || !(h->flags & IPMPI_F_REPLY) || h->req_id != want) {
        if (!c->stopping)
            ipmpi_log(IPMPI_LOG_ERROR, "unexpected frame from engine %d (kind %u, req %llu); dropped", e->id,
                      h->kind, (unsigned long long)h->req_id);
        goto drop;
    }
    if (h->flags & IPMPI_F_MORE) {
        if (head->type == IPMPI_SITEM_REQ)
            forward_output(c, e, head->u.req, parts);
        goto drop;
    }
    ipmpi_sitem_t it;
    ipmpi_ctl_reply_in(c, e, h->flags, ipmpi_now_ns(), &it);
    if (it.type == IPMPI_SITEM_TASK) {
        ipmpi_ctl_task_reply(c, e, IPMPI_CONTAINER_OF(it.u.task, ipmpi_task_t, s), h, parts);
        ipmpi_ctl_dispatch(c, e);
        ipmpi_ctl_kick(c);
        return;
    }
    ipmpi_req_t *r = it.u.req;
    ipmpi_session_t *s = r->quiet ? NULL : ipmpi_ctl_session(c, r->session);
    if (s) {
        if (r->out_dropped)
            tell_dropped(s, e, r);
        ipmpi_hdr_t out = {.kind = r->kind, .flags = IPMPI_F_REPLY, .req_id = r->client_req,
                           .target = e->id, .status = h->status, .total = r->total};
        if (ipmpi_ctl_send_reply(s, &out, parts, (r->reply_flags & IPMPI_F_VM_OK) != 0) != 0)
            ipmpi_session_send_error(s, r->kind, r->client_req, e->id, r->total, IPMPI_ENOMEM,
                                     "controller out of memory for the reply");
    }
    /* Kept for a client that fetches it by id (results.h). */
    ipmpi_ctl_result_reply(c, r, e->id, h->status, parts, s != NULL);
    /* A KILL whose frame was aborted did not run. */
    int killed = r->kind == IPMPI_K_KILL && h->status != IPMPI_EABORTED;
    if (--r->pending == 0)
        ipmpi_ctl_req_release(c, r);
    /* The engine _exits right after answering KILL. */
    if (killed) {
        ipmpi_ctl_engine_died(c, e, "killed by request");
    } else {
        ipmpi_ctl_dispatch(c, e);
        if (h->flags & IPMPI_F_PROPS)
            ipmpi_ctl_kick(c);
    }
drop:
    ipmpi_parts_unref(parts);
}
