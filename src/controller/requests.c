/*
 * What the controller does with each client frame: access rules by
 * capability (the kind table's masks), shared-memory checks, target
 * resolution, and routing: controller kinds to admin.c, task kinds to
 * tasks.c, engine kinds to the scheduler (sched.h) through dispatch.c.
 * Loop thread only.
 */
#include <errno.h>
#include <signal.h>
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

/* ---- helpers ---- */

ipmpi_session_t *ipmpi_ctl_session(const ipmpi_ctl_t *c, uint64_t id)
{
    uint32_t slot = (uint32_t)id, gen = (uint32_t)(id >> 32);
    if (slot >= c->scap || !c->sess[slot] || c->sgen[slot] != gen)
        return NULL;
    return c->sess[slot];
}

void ipmpi_ctl_send_json(ipmpi_session_t *s, const ipmpi_hdr_t *req, jbuf_t *b)
{
    if (b->oom) {
        ipmpi_session_send_error(s, req->kind, req->req_id, IPMPI_TARGET_CONTROLLER, 1, IPMPI_ENOMEM,
                                 "controller out of memory");
        free(b->s);
        return;
    }
    ipmpi_parts_t *p = ipmpi_parts_from(b->s ? b->s : "", b->len);
    free(b->s);
    if (!p) {
        ipmpi_session_send_error(s, req->kind, req->req_id, IPMPI_TARGET_CONTROLLER, 1, IPMPI_ENOMEM,
                                 "controller out of memory");
        return;
    }
    ipmpi_hdr_t h = {.kind = req->kind, .flags = IPMPI_F_REPLY, .req_id = req->req_id,
                     .target = IPMPI_TARGET_CONTROLLER, .total = 1};
    ipmpi_session_send(s, &h, p);
    ipmpi_parts_unref(p);
}

void ipmpi_ctl_reply_err(ipmpi_session_t *s, const ipmpi_hdr_t *req, int status, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    ipmpi_session_send_error(s, req->kind, req->req_id, IPMPI_TARGET_CONTROLLER, 1, status, msg);
}

void ipmpi_ctl_dead_msg(const ipmpi_engine_slot_t *e, char *buf, size_t cap)
{
    snprintf(buf, cap, "engine %d died (rank %d): %s", e->id, e->rank, e->why);
}


/* ---- client frames ---- */

/*
 * Resolves h->target into c->targets. ALL (and, for controller kinds, the
 * controller target) means live engines. Returns the count, or a negative
 * status after replying with the reason.
 */
static int resolve(ipmpi_ctl_t *c, ipmpi_session_t *s, const ipmpi_hdr_t *h, const ipmpi_parts_t *p)
{
    int n = 0;
    if (h->target == IPMPI_TARGET_ALL ||
        (h->target == IPMPI_TARGET_CONTROLLER && !ipmpi_ctl_is_engine_kind(h->kind))) {
        for (int i = 0; i < c->nengines; i++)
            if (!c->eng[i].dead && c->eng[i].ready)
                c->targets[n++] = i;
        if (n == 0 && ipmpi_ctl_is_engine_kind(h->kind)) {
            ipmpi_ctl_reply_err(s, h, IPMPI_ENOENT, "no live engines");
            return IPMPI_ENOENT;
        }
        return n;
    }
    if (h->target >= 0) {
        if (h->target >= c->nengines) {
            ipmpi_ctl_reply_err(s, h, IPMPI_ENOENT, "no engine %d: ids are 0..%d", h->target, c->nengines - 1);
            return IPMPI_ENOENT;
        }
        c->targets[0] = h->target;
        return 1;
    }
    if (h->target != IPMPI_TARGET_LIST) {
        ipmpi_ctl_reply_err(s, h, IPMPI_ENOENT, "bad target %d", h->target);
        return IPMPI_ENOENT;
    }
    if (!p || p->n < 1 || p->lens[0] == 0 || p->lens[0] % 4 != 0) {
        ipmpi_ctl_reply_err(s, h, IPMPI_EPROTO, "target list: part 0 must be a non-empty array of int32 engine ids");
        return IPMPI_EPROTO;
    }
    uint64_t cnt = p->lens[0] / 4;
    if (cnt > (uint64_t)c->nengines) {
        ipmpi_ctl_reply_err(s, h, IPMPI_ENOENT, "target list of %llu ids, but there are only %d engines",
                  (unsigned long long)cnt, c->nengines);
        return IPMPI_ENOENT;
    }
    if (++c->markgen == 0) {
        memset(c->mark, 0, (size_t)c->nengines * sizeof *c->mark);
        c->markgen = 1;
    }
    for (uint64_t i = 0; i < cnt; i++) {
        int32_t id = (int32_t)ipmpi_get_u32(p->bufs[0] + 4 * i);
        if (id < 0 || id >= c->nengines) {
            ipmpi_ctl_reply_err(s, h, IPMPI_ENOENT, "no engine %d: ids are 0..%d", id, c->nengines - 1);
            return IPMPI_ENOENT;
        }
        if (c->mark[id] == c->markgen) {
            ipmpi_ctl_reply_err(s, h, IPMPI_EPROTO, "target list names engine %d twice", id);
            return IPMPI_EPROTO;
        }
        c->mark[id] = c->markgen;
        c->targets[n++] = id;
    }
    return n;
}


/*
 * KILL of a busy engine ends it now instead of after the requests before
 * it (which may run for hours): SIGKILL, when the engine is a process we
 * may signal (ipmpi_ctl_signal_engine), else a KILL datagram (another
 * node, joined: ipmpi_ctl_far_signal; the engine sends itself SIGKILL).
 * Returns 1 if it was signalled; an idle engine ends itself after
 * answering, its logs flushed.
 */
static int kill_now(ipmpi_ctl_t *c, const ipmpi_engine_slot_t *e, uint64_t req_id)
{
    if (ipmpi_sched_idle(&c->sched, e->id))
        return 0;
    if (ipmpi_ctl_signal_engine(e, SIGKILL) != 0 && ipmpi_ctl_far_signal(c, e, IPMPI_WAKE_KILL, req_id) != 0)
        return 0;
    ipmpi_log(IPMPI_LOG_INFO, "engine %d killed by request while busy", e->id);
    return 1;
}

/* Queues r on engine e and hands e what is next, or settles r for e when
 * there is no memory for it. */
static void queue_on(ipmpi_ctl_t *c, ipmpi_req_t *r, ipmpi_engine_slot_t *e)
{
    if (ipmpi_sched_queue_req(&c->sched, e->id, r) != 0)
        ipmpi_ctl_req_fail_one(c, r, e->id, IPMPI_ENOMEM, "controller out of memory");
    else
        ipmpi_ctl_dispatch(c, e);
}

/* Queues an engine-kind request on every target engine: one shared
 * payload. all: the targets are every live engine, n of them, sent as one
 * gang (ipmpi_ctl_tree_all_ready said so; c->targets is not filled). */
static void submit(ipmpi_ctl_t *c, ipmpi_session_t *s, const ipmpi_hdr_t *h, ipmpi_parts_t *p, int n, int all)
{
    if (h->target == IPMPI_TARGET_LIST)
        ipmpi_parts_drop_first(p);
    ipmpi_req_t *r = ipmpi_req_new(++c->next_req, h->req_id, s->id, h->kind, (uint32_t)n, p);
    if (!r || ipmpi_reqtab_put(&c->reqs, r) != 0) {
        if (r) {
            r->payload = NULL;
            ipmpi_req_free(r);
        }
        ipmpi_parts_unref(p);
        ipmpi_ctl_reply_err(s, h, IPMPI_ENOMEM, "controller out of memory");
        return;
    }
    r->pending = (uint32_t)n;
    r->reply_flags = h->flags & (IPMPI_F_SHM_OK | IPMPI_F_VM_OK | IPMPI_F_GATHER_OK);
    r->eng_flags = h->flags & IPMPI_F_STREAM;
    ipmpi_ctl_result_open(c, s, r);
    if (all) {
        uint64_t t = ipmpi_cpusec_begin(&c->cpu);
        ipmpi_ctl_tree_send_all(c, r);
        ipmpi_cpusec_end(&c->cpu, IPMPI_CS_TREE_SEND, t);
        return;
    }
    char msg[256];
    /* Many idle engines: a broadcast tree, one per node (tree.c). */
    int tree = ipmpi_ctl_tree_may(c, s, h->kind, n), ntree = 0;
    /* r may be freed by the last req_fail_one; nothing reads it after that. */
    for (int i = 0; i < n; i++) {
        ipmpi_engine_slot_t *e = &c->eng[c->targets[i]];
        /* (Nothing in flight anywhere: no engine's slot in the scheduler
         * need be read.) */
        const ipmpi_sitem_t *run = ipmpi_sched_quiet(&c->sched) ? NULL : ipmpi_sched_inflight(&c->sched, e->id);
        if (run && run->type == IPMPI_SITEM_REQ)
            ipmpi_ctl_stream_withdraw(run->u.req);
        if (e->dead) {
            ipmpi_ctl_dead_msg(e, msg, sizeof msg);
            ipmpi_ctl_req_fail_one(c, r, e->id, IPMPI_EDEAD, msg);
        } else if (!e->ready) {
            snprintf(msg, sizeof msg, "engine %d never became ready", e->id);
            ipmpi_ctl_req_fail_one(c, r, e->id, IPMPI_EDEAD, msg);
        } else if (h->kind == IPMPI_K_KILL && kill_now(c, e, r->id)) {
            /* Answered here (no meta: the engine did not run it), then
             * the engine's requests fail as for any death. */
            ipmpi_hdr_t rh = {.kind = h->kind, .flags = IPMPI_F_REPLY, .req_id = h->req_id, .target = e->id,
                              .total = (uint32_t)n};
            ipmpi_session_send(s, &rh, NULL);
            ipmpi_ctl_result_reply(c, r, e->id, 0, NULL, 1);
            if (--r->pending == 0) {
                ipmpi_reqtab_del(&c->reqs, r->id);
                ipmpi_req_free(r);
            }
            ipmpi_ctl_engine_died(c, e, "killed by request");
        } else if (tree && ipmpi_ctl_tree_engine(c, e)) {
            c->tree_ids[ntree++] = e->id; /* sent below, as a tree or one by one */
        } else {
            queue_on(c, r, e);
        }
    }
    if (ntree > 0 && ntree >= (int)c->o->tree_min) {
        uint64_t t = ipmpi_cpusec_begin(&c->cpu);
        ipmpi_ctl_tree_send(c, r, c->tree_ids, ntree);
        ipmpi_cpusec_end(&c->cpu, IPMPI_CS_TREE_SEND, t);
        return;
    }
    for (int i = 0; i < ntree; i++)
        queue_on(c, r, &c->eng[c->tree_ids[i]]);
}


/* The kind table says which capability may send what; an unknown kind
 * passes here and is answered EKIND below. */
static int allowed(int cap, unsigned kind)
{
    unsigned who = ipmpi_kind_who(kind);
    if (who == 0)
        return cap != IPMPI_CAP_NONE;
    return (cap == IPMPI_CAP_MEC && (who & IPMPI_KW_MEC)) || (cap == IPMPI_CAP_TC && (who & IPMPI_KW_TC));
}

void ipmpi_ctl_client_frame(void *arg, ipmpi_session_t *s, const ipmpi_hdr_t *h, ipmpi_parts_t *p)
{
    ipmpi_ctl_t *c = arg;
    /* The reply flag is checked first: a reply-flagged HELLO is no request. */
    if (h->kind == IPMPI_K_READY || h->kind == IPMPI_K_EXIT || (h->flags & IPMPI_F_REPLY)) {
        ipmpi_ctl_reply_err(s, h, IPMPI_EKIND, "kind %u (%s)%s is not a request a client may send", h->kind,
                  ipmpi_kind_name(h->kind), (h->flags & IPMPI_F_REPLY) ? " with the reply flag" : "");
        goto done;
    }
    if (h->kind == IPMPI_K_HELLO) {
        if (s->cap != IPMPI_CAP_NONE) {
            /* A session keeps the capability it opened with: a second key
             * must not silently turn a MultiEngine session into a task one. */
            ipmpi_ctl_reply_err(s, h, IPMPI_EINVAL, "this connection already said HELLO; open a new one for another capability");
            goto done;
        }
        ipmpi_ctl_do_hello(c, s, h, p);
        goto done;
    }
    if (!allowed(s->cap, h->kind)) {
        ipmpi_log(IPMPI_LOG_WARN, "client %s: %s refused for capability %s", s->peer, ipmpi_kind_name(h->kind),
                  s->cap == IPMPI_CAP_MEC ? "mec" : "tc");
        ipmpi_ctl_reply_err(s, h, IPMPI_EACCES, "access denied: %s is not allowed with the %s capability",
                  ipmpi_kind_name(h->kind), s->cap == IPMPI_CAP_MEC ? "mec" : "tc");
        goto done;
    }
    if (h->kind == IPMPI_K_RELEASE) {
        ipmpi_ctl_do_release(s, p);
        goto done;
    }
    if ((h->flags & IPMPI_F_SHM) && h->kind != IPMPI_K_SHM_PROBE &&
        (s->shm_pid == 0 || h->aux != (uint64_t)s->shm_pid)) {
        /* Only the process that proved it is this client may name its
         * memory: a key holder must not make the controller read another
         * process of the same user (or any process, for a root controller). */
        ipmpi_log(IPMPI_LOG_WARN, "client %s: shared memory of pid %llu refused (probed pid: %d)", s->peer,
                  (unsigned long long)h->aux, s->shm_pid);
        ipmpi_ctl_reply_err(s, h, IPMPI_EACCES, "shared memory refused: pid %llu is not the one this session's SHM_PROBE "
                  "proved (%d)", (unsigned long long)h->aux, s->shm_pid);
        goto done;
    }
    if (h->kind == IPMPI_K_SHM_PROBE && (!(h->flags & IPMPI_F_SHM) || p->n != 2 || p->lens[0] != 0)) {
        ipmpi_ctl_reply_err(s, h, IPMPI_EACCES, "SHM_PROBE: part 0 must come by shared memory");
        goto done;
    }
    if (h->flags & IPMPI_F_SHM) {
        char why[256];
        uint32_t nvm = 0;
        ipmpi_shmref_t vm[p->n ? p->n : 1];
        int rc = ipmpi_shm_attach(&s->shm_peer, h->aux <= INT32_MAX ? (int)h->aux : -1, p, &c->o->limits, why,
                                  sizeof why, vm, &nvm);
        if (rc != 0) {
            ipmpi_log(IPMPI_LOG_WARN, "client %s: shared memory of %s refused: %s", s->peer, ipmpi_kind_name(h->kind),
                      why);
            ipmpi_ctl_reply_err(s, h, rc, "shared memory refused: %s", why);
            if (rc != IPMPI_EACCES)
                ipmpi_session_close_after_flush(s, ipmpi_now_ns());
            goto done;
        }
        if (nvm > 0) {
            ipmpi_ctl_copy_vm(c, s, h, p, vm, nvm);
            goto done; /* the copy job holds its own reference, or it failed */
        }
    }
    ipmpi_ctl_route(c, s, h, p);
    return;
done:
    ipmpi_parts_unref(p);
}

void ipmpi_ctl_route(ipmpi_ctl_t *c, ipmpi_session_t *s, const ipmpi_hdr_t *h, ipmpi_parts_t *p)
{
    int n;
    if (c->stopping) {
        ipmpi_ctl_reply_err(s, h, IPMPI_ESHUTDOWN, "controller is shutting down");
        goto done;
    }
    if (s->cap == IPMPI_CAP_TC && !(ipmpi_kind_who(h->kind) & IPMPI_KW_MEC) && ipmpi_kind_who(h->kind)) {
        ipmpi_ctl_task_frame(c, s, h, p);
        return; /* took p */
    }
    switch (h->kind) {
    case IPMPI_K_GET_IDS:
        ipmpi_ctl_do_get_ids(c, s, h);
        break;
    case IPMPI_K_SHM_PROBE:
        ipmpi_ctl_do_shm_probe(s, h, p);
        break;
    case IPMPI_K_RESULT_FETCH:
    case IPMPI_K_RESULT_CLEAR:
        ipmpi_ctl_result_frame(c, s, h, p);
        break;
    case IPMPI_K_SHUTDOWN: {
        ipmpi_log(IPMPI_LOG_INFO, "SHUTDOWN requested by client %s", s->peer);
        jbuf_t b = {0};
        jb_printf(&b, "{\"stopping\": true}");
        ipmpi_ctl_send_json(s, h, &b);
        c->stopping = 1;
        break;
    }
    case IPMPI_K_QUEUE_STATUS:
    case IPMPI_K_CLEAR_QUEUE:
    case IPMPI_K_PROPERTIES:
    case IPMPI_K_INTERRUPT:
        if ((n = resolve(c, s, h, p)) < 0)
            break;
        if (h->kind == IPMPI_K_INTERRUPT)
            ipmpi_ctl_do_interrupt(c, s, h, p, n);
        else if (h->kind == IPMPI_K_QUEUE_STATUS)
            ipmpi_ctl_do_queue_status(c, s, h, n);
        else if (h->kind == IPMPI_K_CLEAR_QUEUE)
            ipmpi_ctl_do_clear_queue(c, s, h, n);
        else
            ipmpi_ctl_do_properties(c, s, h, n);
        break;
    default:
        if (!ipmpi_ctl_is_engine_kind(h->kind)) {
            ipmpi_ctl_reply_err(s, h, IPMPI_EKIND, "unknown request kind %u", h->kind);
            break;
        }
        /* To all while nothing else runs: one gang, no engine looked at. */
        if (h->target == IPMPI_TARGET_ALL && ipmpi_ctl_tree_all_ready(c, s, h)) {
            submit(c, s, h, p, c->sched.nlive, 1);
            return;
        }
        if ((n = resolve(c, s, h, p)) < 0)
            break;
        submit(c, s, h, p, n, 0);
        return; /* submit took p */
    }
done:
    ipmpi_parts_unref(p);
}

