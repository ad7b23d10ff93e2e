/*
 * What the controller does with each frame: client requests (access
 * rules, target resolution, controller kinds answered here, engine kinds
 * queued per engine), engine replies (forwarded to the owning client) and
 * engine deaths (their requests fail with IPMPI_EDEAD).
 * Controller JSON replies are built with snprintf into a growing buffer.
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
#include "ipmpi/errors.h"
#include "log.h"
#include "shm.h"
#include "shmbuf.h"
#include "tls.h"

#include <openssl/rand.h>

/* ---- small JSON text builder ---- */

typedef struct jbuf {
    char *s;
    size_t len, cap;
    int oom;
} jbuf_t;

static void jb_grow(jbuf_t *b, size_t need)
{
    if (b->oom || b->len + need + 1 <= b->cap)
        return;
    size_t ncap = b->cap ? b->cap : 256;
    while (ncap < b->len + need + 1)
        ncap *= 2;
    char *n = realloc(b->s, ncap);
    if (!n) {
        b->oom = 1;
        return;
    }
    b->s = n;
    b->cap = ncap;
}

static void jb_printf(jbuf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void jb_printf(jbuf_t *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0) {
        b->oom = 1;
        return;
    }
    jb_grow(b, (size_t)n);
    if (b->oom)
        return;
    va_start(ap, fmt);
    vsnprintf(b->s + b->len, b->cap - b->len, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

/* Appends s as a JSON string literal, escaping quotes, backslashes and
 * control characters (other bytes pass through: they are UTF-8). */
static void jb_str(jbuf_t *b, const char *s)
{
    jb_printf(b, "\"");
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            jb_printf(b, "\\%c", ch);
        else if (ch < 0x20)
            jb_printf(b, "\\u%04x", ch);
        else
            jb_printf(b, "%c", ch);
    }
    jb_printf(b, "\"");
}

/* ---- helpers ---- */

static const char *kind_name(unsigned k)
{
    static const char *const names[IPMPI_K_MAX_] = {
        [IPMPI_K_HELLO] = "hello",           [IPMPI_K_EXECUTE] = "execute",
        [IPMPI_K_PUSH] = "push",             [IPMPI_K_PULL] = "pull",
        [IPMPI_K_APPLY] = "apply",           [IPMPI_K_RESET] = "reset",
        [IPMPI_K_KEYS] = "keys",             [IPMPI_K_KILL] = "kill",
        [IPMPI_K_QUEUE_STATUS] = "queue_status", [IPMPI_K_CLEAR_QUEUE] = "clear_queue",
        [IPMPI_K_GET_RESULT] = "get_result", [IPMPI_K_GET_IDS] = "get_ids",
        [IPMPI_K_SHUTDOWN] = "shutdown",     [IPMPI_K_TASK_SUBMIT] = "task_submit",
        [IPMPI_K_TASK_ABORT] = "task_abort", [IPMPI_K_TASK_BARRIER] = "task_barrier",
        [IPMPI_K_SHM_PROBE] = "shm_probe",   [IPMPI_K_RELEASE] = "release",
        [IPMPI_K_PROPERTIES] = "properties", [IPMPI_K_READY] = "ready",
        [IPMPI_K_EXIT] = "exit",
    };
    return k < IPMPI_K_MAX_ && names[k] ? names[k] : "unknown";
}

static int is_engine_kind(unsigned k)
{
    switch (k) {
    case IPMPI_K_EXECUTE: case IPMPI_K_PUSH: case IPMPI_K_PULL: case IPMPI_K_APPLY:
    case IPMPI_K_RESET: case IPMPI_K_KEYS: case IPMPI_K_KILL: case IPMPI_K_GET_RESULT:
        return 1;
    default:
        return 0;
    }
}

static int is_task_kind(unsigned k)
{
    return k == IPMPI_K_TASK_SUBMIT || k == IPMPI_K_TASK_ABORT || k == IPMPI_K_TASK_BARRIER;
}

ipmpi_session_t *ipmpi_ctl_session(const ipmpi_ctl_t *c, uint64_t id)
{
    uint32_t slot = (uint32_t)id, gen = (uint32_t)(id >> 32);
    if (slot >= c->scap || !c->sess[slot] || c->sgen[slot] != gen)
        return NULL;
    return c->sess[slot];
}

static void send_json(ipmpi_session_t *s, const ipmpi_hdr_t *req, jbuf_t *b)
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

static void reply_err(ipmpi_session_t *s, const ipmpi_hdr_t *req, int status, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void reply_err(ipmpi_session_t *s, const ipmpi_hdr_t *req, int status, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    ipmpi_session_send_error(s, req->kind, req->req_id, IPMPI_TARGET_CONTROLLER, 1, status, msg);
}

static void dead_msg(const ipmpi_engine_slot_t *e, char *buf, size_t cap)
{
    snprintf(buf, cap, "engine %d died (rank %d): %s", e->id, e->rank, e->why);
}

/* ---- cut-through ----
 *
 * A large frame for one idle engine is forwarded while it arrives from the
 * client instead of after (doc/protocol.md section 3): TLS decryption,
 * the MPI copy and the engine's wake-up then overlap instead of adding up.
 * The request is created and made the engine's running request as soon as
 * the header and lengths are in; the session feeds the stream as bytes
 * arrive. Smaller frames gain nothing and are stored then forwarded, as is
 * everything for several engines (the payload must be held once) or for a
 * busy engine (FIFO order).
 *
 * A stream holds its engine until the client has sent the whole frame. So
 * that a slow or stalled client never makes others wait, a stream is
 * withdrawn when another request is queued for its engine meanwhile: the
 * engine gets the abort and answers it (that answer is dropped), the
 * other request runs, and the frame, once complete, is submitted like any
 * other, behind it, which is the order store-and-forward would give.
 */
#define STREAM_MIN ((uint64_t)1 << 20)

struct ipmpi_ctl_stream {
    ipmpi_session_stream_t base; /* first: the session's handle is ours */
    ipmpi_ctl_t *c;
    ipmpi_engine_slot_t *e;
    ipmpi_req_t *r;        /* NULL once the request was settled or fully posted */
    ipmpi_sendop_t *op;    /* NULL once fully posted, aborted or abandoned */
    int withdrawn;         /* the complete frame goes to the frame callback */
};

static void stream_unlink(struct ipmpi_ctl_stream *st)
{
    if (st->r)
        st->r->stream = NULL;
    st->r = NULL;
}

/* Posts the abort of an unfinished stream; the engine then answers the
 * request with an error of its own. If even that cannot be posted, the
 * link to the engine is out of step and the engine is lost. */
static void stream_abort(struct ipmpi_ctl_stream *st, const char *why)
{
    ipmpi_sendop_t *op = st->op;
    st->op = NULL;
    stream_unlink(st);
    ipmpi_log(IPMPI_LOG_INFO, "engine %d: request aborted mid-frame: %s", st->e->id, why);
    int rc = ipmpi_mpilink_stream_abort(&st->c->link, op);
    if (rc != 0) {
        char msg[160];
        snprintf(msg, sizeof msg, "the controller lost step with it (%s)", ipmpi_strerror(rc));
        ipmpi_ctl_engine_died(st->c, st->e, msg);
    }
}

static void stream_feed(ipmpi_session_stream_t *base, uint32_t part, uint64_t filled)
{
    struct ipmpi_ctl_stream *st = (struct ipmpi_ctl_stream *)base;
    if (!st->op)
        return;
    int rc = ipmpi_mpilink_stream_feed(&st->c->link, st->op, part, filled);
    if (rc == 1) {
        st->op = NULL;
        stream_unlink(st);
    } else if (rc < 0) {
        stream_abort(st, ipmpi_strerror(rc));
    }
}

static int stream_end(ipmpi_session_stream_t *base, int aborted)
{
    struct ipmpi_ctl_stream *st = (struct ipmpi_ctl_stream *)base;
    int taken = !st->withdrawn;
    if (st->op && aborted)
        stream_abort(st, "the client's frame ended early");
    stream_unlink(st);
    free(st);
    return taken;
}

/* Another request is queued for the stream's engine: see above. */
static void stream_withdraw(struct ipmpi_ctl_stream *st)
{
    st->withdrawn = 1;
    if (st->r)
        st->r->quiet = 1;
    stream_abort(st, "another request was queued for the engine while the frame still arrived; "
                     "it is submitted again once complete");
}

/* Engine e is gone or the request is settled without it: the stream's
 * sends were abandoned with the rank, or the request must not hold it. */
static void stream_detach(ipmpi_req_t *r, int drop_op)
{
    struct ipmpi_ctl_stream *st = r->stream;
    if (!st)
        return;
    if (drop_op)
        st->op = NULL;
    stream_unlink(st);
}

static void req_release(ipmpi_ctl_t *c, ipmpi_req_t *r)
{
    stream_detach(r, 0);
    ipmpi_reqtab_del(&c->reqs, r->id);
    ipmpi_req_free(r);
}

/* One target of r is settled without a reply from the engine: send the
 * client an error reply for that engine and drop the engine's reference. */
static void req_fail_one(ipmpi_ctl_t *c, ipmpi_req_t *r, int engine, int status, const char *msg)
{
    ipmpi_session_t *s = ipmpi_ctl_session(c, r->session);
    if (s && !r->quiet)
        ipmpi_session_send_error(s, r->kind, r->client_req, engine, r->total, status, msg);
    if (--r->pending == 0)
        req_release(c, r);
}

/* Sends the next queued request to e if it is idle. */
/* 1 when r's client has too many unread replies for r to run now. */
static int must_hold(const ipmpi_ctl_t *c, const ipmpi_req_t *r)
{
    const ipmpi_session_t *s = ipmpi_ctl_session(c, r->session);
    return s && s->state == IPMPI_SESS_OPEN && s->out_bytes > IPMPI_OUT_HOLD_BYTES;
}

static void dispatch(ipmpi_ctl_t *c, ipmpi_engine_slot_t *e)
{
    while (!e->dead && !e->running && ipmpi_equeue_len(&e->q) > 0) {
        if (must_hold(c, ipmpi_equeue_at(&e->q, 0))) {
            if (!e->held) {
                e->held = 1;
                c->nheld++;
            }
            return;
        }
        if (e->held) {
            e->held = 0;
            c->nheld--;
        }
        ipmpi_req_t *r = ipmpi_equeue_pop(&e->q);
        ipmpi_hdr_t h = {.kind = r->kind, .req_id = r->id, .target = e->id};
        int rc = ipmpi_mpilink_send(&c->link, e->rank, &h, r->payload);
        if (rc != 0) {
            char msg[160];
            snprintf(msg, sizeof msg, "controller could not send the request to engine %d: %s", e->id,
                     ipmpi_strerror(rc));
            ipmpi_log(IPMPI_LOG_ERROR, "%s", msg);
            req_fail_one(c, r, e->id, rc, msg);
            continue;
        }
        e->running = r;
        c->nbusy++;
    }
}

void ipmpi_ctl_release_held(ipmpi_ctl_t *c, uint64_t now)
{
    if (c->nheld == 0)
        return;
    for (int i = 0; i < c->nengines; i++) {
        ipmpi_engine_slot_t *e = &c->eng[i];
        if (!e->held)
            continue;
        ipmpi_req_t *head = ipmpi_equeue_len(&e->q) ? ipmpi_equeue_at(&e->q, 0) : NULL;
        ipmpi_session_t *s = head ? ipmpi_ctl_session(c, head->session) : NULL;
        if (s && s->out_bytes > IPMPI_OUT_HOLD_BYTES && s->state == IPMPI_SESS_OPEN &&
            now - s->t_out_progress > IPMPI_OUT_STALL_NS) {
            ipmpi_log(IPMPI_LOG_WARN,
                      "client %s has read none of its %llu MiB of replies for %llu s; closing it",
                      s->peer, (unsigned long long)(s->out_bytes >> 20),
                      (unsigned long long)(IPMPI_OUT_STALL_NS / 1000000000ull));
            ipmpi_session_close_after_flush(s, now);
        }
        if (!head || !must_hold(c, head)) {
            e->held = 0;
            c->nheld--;
            dispatch(c, e);
        }
    }
}

void ipmpi_ctl_engine_died(ipmpi_ctl_t *c, ipmpi_engine_slot_t *e, const char *why)
{
    if (e->dead)
        return;
    e->dead = 1;
    c->nlive--;
    c->any_died = 1;
    snprintf(e->why, sizeof e->why, "%s", why);
    ipmpi_log(IPMPI_LOG_ERROR, "engine %d (rank %d) died: %s", e->id, e->rank, why);
    /* A stream still feeding this engine must stop: its sends go now. */
    if (e->running)
        stream_detach(e->running, 1);
    ipmpi_mpilink_abandon(&c->link, e->rank);
    char msg[256];
    dead_msg(e, msg, sizeof msg);
    if (e->running) {
        ipmpi_req_t *r = e->running;
        e->running = NULL;
        c->nbusy--;
        req_fail_one(c, r, e->id, IPMPI_EDEAD, msg);
    }
    ipmpi_req_t *r;
    while ((r = ipmpi_equeue_pop(&e->q)))
        req_fail_one(c, r, e->id, IPMPI_EDEAD, msg);
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
    for (int i = 0; i < c->nengines; i++) {
        ipmpi_engine_slot_t *e = &c->eng[i];
        /* The engine must be back in step to read its EXIT (if even the
         * abort cannot be posted, the engine is marked dead instead). */
        if (e->running && e->running->stream && e->running->stream->op)
            stream_abort(e->running->stream, "the controller is shutting down");
        if (e->running) {
            ipmpi_req_t *r = e->running;
            e->running = NULL;
            c->nbusy--;
            req_fail_one(c, r, e->id, IPMPI_ESHUTDOWN, msg);
        }
        ipmpi_req_t *r;
        while ((r = ipmpi_equeue_pop(&e->q)))
            req_fail_one(c, r, e->id, IPMPI_ESHUTDOWN, msg);
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
    if (!e->ready)
        ipmpi_log(IPMPI_LOG_DEBUG, "engine %d (rank %d) ready: %s", e->id, e->rank, props ? props : "");
    e->ready = 1;
    (void)c;
}

ipmpi_parts_t *ipmpi_ctl_engine_alloc(void *arg, int rank, const ipmpi_hdr_t *h, const uint64_t *lens)
{
    ipmpi_ctl_t *c = arg;
    const ipmpi_req_t *r = rank >= 1 && rank <= c->nengines ? c->eng[rank - 1].running : NULL;
    if (r && r->reply_flags == IPMPI_F_SHM_OK && !r->quiet && (h->flags & IPMPI_F_REPLY) && h->req_id == r->id)
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
static int send_reply(ipmpi_session_t *s, const ipmpi_hdr_t *h, ipmpi_parts_t *parts, int vm)
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

void ipmpi_ctl_engine_frame(void *arg, int rank, const ipmpi_hdr_t *h, ipmpi_parts_t *parts)
{
    ipmpi_ctl_t *c = arg;
    if (rank < 1 || rank > c->nengines) {
        ipmpi_log(IPMPI_LOG_ERROR, "frame from rank %d, which is not an engine; dropped", rank);
        goto drop;
    }
    ipmpi_engine_slot_t *e = &c->eng[rank - 1];
    if (e->dead)
        goto drop;
    if (h->kind == IPMPI_K_READY) {
        store_ready(c, e, parts);
        goto drop;
    }
    ipmpi_req_t *r = e->running;
    if (!r || !(h->flags & IPMPI_F_REPLY) || h->req_id != r->id) {
        if (!c->stopping)
            ipmpi_log(IPMPI_LOG_ERROR, "unexpected frame from engine %d (kind %u, req %llu); dropped", e->id,
                      h->kind, (unsigned long long)h->req_id);
        goto drop;
    }
    e->running = NULL;
    c->nbusy--;
    ipmpi_session_t *s = r->quiet ? NULL : ipmpi_ctl_session(c, r->session);
    if (s) {
        ipmpi_hdr_t out = {.kind = r->kind, .flags = IPMPI_F_REPLY, .req_id = r->client_req,
                           .target = e->id, .status = h->status, .total = r->total};
        if (send_reply(s, &out, parts, (r->reply_flags & IPMPI_F_VM_OK) != 0) != 0)
            ipmpi_session_send_error(s, r->kind, r->client_req, e->id, r->total, IPMPI_ENOMEM,
                                     "controller out of memory for the reply");
    }
    /* A KILL whose frame was aborted did not run. */
    int killed = r->kind == IPMPI_K_KILL && h->status != IPMPI_EABORTED;
    if (--r->pending == 0)
        req_release(c, r);
    /* The engine _exits right after answering KILL. */
    if (killed)
        ipmpi_ctl_engine_died(c, e, "killed by request");
    else
        dispatch(c, e);
drop:
    ipmpi_parts_unref(parts);
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
        (h->target == IPMPI_TARGET_CONTROLLER && !is_engine_kind(h->kind))) {
        for (int i = 0; i < c->nengines; i++)
            if (!c->eng[i].dead && c->eng[i].ready)
                c->targets[n++] = i;
        if (n == 0 && is_engine_kind(h->kind)) {
            reply_err(s, h, IPMPI_ENOENT, "no live engines");
            return IPMPI_ENOENT;
        }
        return n;
    }
    if (h->target >= 0) {
        if (h->target >= c->nengines) {
            reply_err(s, h, IPMPI_ENOENT, "no engine %d: ids are 0..%d", h->target, c->nengines - 1);
            return IPMPI_ENOENT;
        }
        c->targets[0] = h->target;
        return 1;
    }
    if (h->target != IPMPI_TARGET_LIST) {
        reply_err(s, h, IPMPI_ENOENT, "bad target %d", h->target);
        return IPMPI_ENOENT;
    }
    if (!p || p->n < 1 || p->lens[0] == 0 || p->lens[0] % 4 != 0) {
        reply_err(s, h, IPMPI_EPROTO, "target list: part 0 must be a non-empty array of int32 engine ids");
        return IPMPI_EPROTO;
    }
    uint64_t cnt = p->lens[0] / 4;
    if (cnt > (uint64_t)c->nengines) {
        reply_err(s, h, IPMPI_ENOENT, "target list of %llu ids, but there are only %d engines",
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
            reply_err(s, h, IPMPI_ENOENT, "no engine %d: ids are 0..%d", id, c->nengines - 1);
            return IPMPI_ENOENT;
        }
        if (c->mark[id] == c->markgen) {
            reply_err(s, h, IPMPI_EPROTO, "target list names engine %d twice", id);
            return IPMPI_EPROTO;
        }
        c->mark[id] = c->markgen;
        c->targets[n++] = id;
    }
    return n;
}

/*
 * The session's offer of a frame whose parts are about to be read: takes
 * it over when it is a large engine request for one idle engine, with
 * exactly the checks ipmpi_ctl_client_frame and submit would pass, so the
 * outcome is the one store-and-forward would have.
 */
static ipmpi_session_stream_t *stream_try(ipmpi_ctl_t *c, ipmpi_session_t *s, const ipmpi_hdr_t *h,
                                          ipmpi_parts_t *parts)
{
    if (c->stopping || s->cap != IPMPI_CAP_MEC || (h->flags & IPMPI_F_REPLY) || !is_engine_kind(h->kind) ||
        h->target < 0 || h->target >= c->nengines || ipmpi_parts_bytes(parts) < STREAM_MIN)
        return NULL;
    ipmpi_engine_slot_t *e = &c->eng[h->target];
    if (e->dead || !e->ready || e->running || ipmpi_equeue_len(&e->q) > 0)
        return NULL;
    struct ipmpi_ctl_stream *st = calloc(1, sizeof *st);
    if (!st)
        return NULL;
    ipmpi_req_t *r = ipmpi_req_new(++c->next_req, h->req_id, s->id, h->kind, 1, ipmpi_parts_ref(parts));
    if (!r) {
        ipmpi_parts_unref(parts);
        goto free_st;
    }
    r->reply_flags = h->flags & (IPMPI_F_SHM_OK | IPMPI_F_VM_OK);
    if (ipmpi_reqtab_put(&c->reqs, r) != 0)
        goto free_r;
    ipmpi_hdr_t eh = {.kind = r->kind, .req_id = r->id, .target = e->id};
    if (ipmpi_mpilink_stream_start(&c->link, e->rank, &eh, parts, &st->op) != 0)
        goto del_r;
    r->pending = 1;
    e->running = r;
    c->nbusy++;
    st->base.feed = stream_feed;
    st->base.end = stream_end;
    st->c = c;
    st->e = e;
    st->r = r;
    r->stream = st;
    ipmpi_log(IPMPI_LOG_DEBUG, "client %s: %s of %llu bytes cut through to engine %d", s->peer,
              kind_name(h->kind), (unsigned long long)ipmpi_parts_bytes(parts), e->id);
    /* Leading empty parts are complete already. */
    stream_feed(&st->base, 0, 0);
    return &st->base;

del_r:
    ipmpi_reqtab_del(&c->reqs, r->id);
free_r:
    ipmpi_req_free(r);
free_st:
    free(st);
    return NULL;
}

/* The session's offer: frames with a shm table are complete on the wire
 * before their bulk is in; copy_vm streams those. */
static ipmpi_session_stream_t *stream_begin(void *arg, ipmpi_session_t *s, const ipmpi_hdr_t *h,
                                            ipmpi_parts_t *parts)
{
    return (h->flags & IPMPI_F_SHM) ? NULL : stream_try(arg, s, h, parts);
}

/*
 * Copies the parts of p that are in the client's memory (vm, in part
 * order) out of it, in 8 MiB steps; when the request can be cut through
 * to one idle engine, each step is forwarded at once, so the engine reads
 * while we copy the next. Then acknowledges, so the client may touch its
 * memory again. Returns 1 if the stream delivered the request, 0 if p is
 * to be submitted as usual, -1 if the copy failed (answered here, or
 * through the aborted stream's own reply).
 */
#define VM_STEP ((uint64_t)8 << 20)
static int copy_vm(ipmpi_ctl_t *c, ipmpi_session_t *s, const ipmpi_hdr_t *h, ipmpi_parts_t *p,
                   const ipmpi_shmref_t *vm, uint32_t nvm)
{
    ipmpi_session_stream_t *st = NULL;
    int pid = (int)h->aux;
    for (uint32_t i = 0; i < nvm; i++) {
        uint8_t *dst = p->bufs[vm[i].part];
        for (uint64_t off = 0; off < vm[i].len; off += VM_STEP) {
            uint64_t n = vm[i].len - off < VM_STEP ? vm[i].len - off : VM_STEP;
            int bad = ipmpi_vm_read(pid, vm[i].off + off, dst + off, n) != 0;
            /* The stream starts once the client's memory proved readable,
             * so a bad address gets a plain refusal. */
            if (!bad && i == 0 && off == 0)
                st = stream_try(c, s, h, p);
            if (bad) {
                char why[200];
                snprintf(why, sizeof why, "cannot read %llu bytes at 0x%llx of pid %d: %s",
                         (unsigned long long)n, (unsigned long long)(vm[i].off + off), pid, strerror(errno));
                ipmpi_log(IPMPI_LOG_WARN, "client %s: shared memory of %s refused: %s", s->peer,
                          kind_name(h->kind), why);
                if (st) /* the engine answers the aborted frame (EABORTED) */
                    st->end(st, 1);
                else
                    reply_err(s, h, IPMPI_EACCES, "shared memory refused: %s", why);
                return -1;
            }
            if (st)
                st->feed(st, vm[i].part, off + n);
        }
        if (st)
            st->feed(st, i + 1 < nvm ? vm[i + 1].part : p->n, 0);
    }
    ipmpi_hdr_t ack = {.kind = IPMPI_K_RELEASE, .flags = IPMPI_F_REPLY, .req_id = h->req_id,
                       .target = IPMPI_TARGET_CONTROLLER};
    ipmpi_session_send(s, &ack, NULL);
    return st ? st->end(st, 0) : 0;
}

static void do_hello(ipmpi_ctl_t *c, ipmpi_session_t *s, const ipmpi_hdr_t *h, const ipmpi_parts_t *p)
{
    int cap = IPMPI_CAP_NONE;
    if (p->n >= 1 && p->lens[0] == IPMPI_KEY_HEX_LEN) {
        /* Both comparisons always run: the time taken says nothing about the key. */
        int mec = ipmpi_consttime_eq(p->bufs[0], c->sec.mec_key, IPMPI_KEY_HEX_LEN);
        int tc = ipmpi_consttime_eq(p->bufs[0], c->sec.tc_key, IPMPI_KEY_HEX_LEN);
        cap = mec ? IPMPI_CAP_MEC : tc ? IPMPI_CAP_TC : IPMPI_CAP_NONE;
    }
    if (cap == IPMPI_CAP_NONE) {
        ipmpi_log(IPMPI_LOG_WARN, "client %s refused: wrong key", s->peer);
        reply_err(s, h, IPMPI_EACCES, "access denied: wrong key");
        ipmpi_session_close_after_flush(s, ipmpi_now_ns());
        return;
    }
    ipmpi_log(IPMPI_LOG_INFO, "client %s connected with capability %s", s->peer,
              cap == IPMPI_CAP_MEC ? "mec" : "tc");
    s->cap = cap;
    s->stream_begin = cap == IPMPI_CAP_MEC ? stream_begin : NULL;
    if (RAND_bytes(s->shm_nonce, sizeof s->shm_nonce) != 1)
        c->host_id[0] = '\0'; /* no randomness, no shared memory: never offered again */
    jbuf_t b = {0};
    jb_printf(&b, "{\"capability\": \"%s\", \"engines\": %d, \"ids\": [", cap == IPMPI_CAP_MEC ? "mec" : "tc",
              c->nlive);
    int first = 1;
    for (int i = 0; i < c->nengines; i++)
        if (!c->eng[i].dead && c->eng[i].ready) {
            jb_printf(&b, first ? "%d" : ", %d", i);
            first = 0;
        }
    jb_printf(&b, "], \"version\": %d", IPMPI_PROTO_VERSION);
    if (c->host_id[0]) {
        jb_printf(&b, ", \"host\": ");
        jb_str(&b, c->host_id);
        jb_printf(&b, ", \"pid\": %ld, \"uid\": %lu, \"shm_nonce\": \"", (long)getpid(),
                  (unsigned long)geteuid());
        for (size_t i = 0; i < sizeof s->shm_nonce; i++)
            jb_printf(&b, "%02x", s->shm_nonce[i]);
        jb_printf(&b, "\"");
    }
    jb_printf(&b, "}");
    send_json(s, h, &b);
}

static void do_get_ids(ipmpi_ctl_t *c, ipmpi_session_t *s, const ipmpi_hdr_t *h)
{
    jbuf_t b = {0};
    jb_printf(&b, "[");
    int first = 1;
    for (int i = 0; i < c->nengines; i++)
        if (!c->eng[i].dead && c->eng[i].ready) {
            jb_printf(&b, first ? "%d" : ", %d", i);
            first = 0;
        }
    jb_printf(&b, "]");
    send_json(s, h, &b);
}

static void do_queue_status(ipmpi_ctl_t *c, ipmpi_session_t *s, const ipmpi_hdr_t *h, int n)
{
    jbuf_t b = {0};
    jb_printf(&b, "[");
    for (int i = 0; i < n; i++) {
        ipmpi_engine_slot_t *e = &c->eng[c->targets[i]];
        jb_printf(&b, "%s{\"id\": %d, \"running\": ", i ? ", " : "", e->id);
        if (e->running)
            jb_printf(&b, "\"%s\"", kind_name(e->running->kind));
        else
            jb_printf(&b, "null");
        jb_printf(&b, ", \"queue\": [");
        for (uint32_t k = 0; k < ipmpi_equeue_len(&e->q); k++)
            jb_printf(&b, "%s\"%s\"", k ? ", " : "", kind_name(ipmpi_equeue_at(&e->q, k)->kind));
        jb_printf(&b, "]}");
    }
    jb_printf(&b, "]");
    send_json(s, h, &b);
}

static void do_clear_queue(ipmpi_ctl_t *c, ipmpi_session_t *s, const ipmpi_hdr_t *h, int n)
{
    unsigned long cleared = 0;
    for (int i = 0; i < n; i++) {
        ipmpi_engine_slot_t *e = &c->eng[c->targets[i]];
        char msg[128];
        snprintf(msg, sizeof msg, "removed from the queue of engine %d by CLEAR_QUEUE before it ran", e->id);
        ipmpi_req_t *r;
        while ((r = ipmpi_equeue_pop(&e->q))) {
            req_fail_one(c, r, e->id, IPMPI_EABORTED, msg);
            cleared++;
        }
    }
    jbuf_t b = {0};
    jb_printf(&b, "{\"cleared\": %lu}", cleared);
    send_json(s, h, &b);
}

static void do_properties(ipmpi_ctl_t *c, ipmpi_session_t *s, const ipmpi_hdr_t *h, int n)
{
    jbuf_t b = {0};
    jb_printf(&b, "[");
    for (int i = 0; i < n; i++) {
        ipmpi_engine_slot_t *e = &c->eng[c->targets[i]];
        jb_printf(&b, "%s{\"id\": %d", i ? ", " : "", e->id);
        /* The READY JSON is an object built by our engine: splice its
         * members in after our "id"; anything else goes in as a string. */
        const char *p = e->props;
        if (p) {
            size_t len = strlen(p);
            while (len && (p[len - 1] == ' ' || p[len - 1] == '\n' || p[len - 1] == '\r' || p[len - 1] == '\t'))
                len--;
            while (len && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t'))
                p++, len--;
            if (len >= 2 && p[0] == '{' && p[len - 1] == '}') {
                const char *in = p + 1;
                size_t il = len - 2;
                while (il && (*in == ' ' || *in == '\n' || *in == '\t' || *in == '\r'))
                    in++, il--;
                if (il)
                    jb_printf(&b, ", %.*s", (int)il, in);
            } else {
                jb_printf(&b, ", \"ready\": ");
                jb_str(&b, e->props);
            }
        }
        if (e->dead) {
            jb_printf(&b, ", \"dead\": ");
            jb_str(&b, e->why);
        }
        jb_printf(&b, "}");
    }
    jb_printf(&b, "]");
    send_json(s, h, &b);
}

/* Queues an engine-kind request on every target engine: one shared payload. */
static void submit(ipmpi_ctl_t *c, ipmpi_session_t *s, const ipmpi_hdr_t *h, ipmpi_parts_t *p, int n)
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
        reply_err(s, h, IPMPI_ENOMEM, "controller out of memory");
        return;
    }
    r->pending = (uint32_t)n;
    r->reply_flags = h->flags & (IPMPI_F_SHM_OK | IPMPI_F_VM_OK);
    char msg[256];
    /* r may be freed by the last req_fail_one; nothing reads it after that. */
    for (int i = 0; i < n; i++) {
        ipmpi_engine_slot_t *e = &c->eng[c->targets[i]];
        if (e->running && e->running->stream && e->running->stream->op)
            stream_withdraw(e->running->stream);
        if (e->dead) {
            dead_msg(e, msg, sizeof msg);
            req_fail_one(c, r, e->id, IPMPI_EDEAD, msg);
        } else if (!e->ready) {
            snprintf(msg, sizeof msg, "engine %d never became ready", e->id);
            req_fail_one(c, r, e->id, IPMPI_EDEAD, msg);
        } else if (ipmpi_equeue_push(&e->q, r) != 0) {
            req_fail_one(c, r, e->id, IPMPI_ENOMEM, "controller out of memory");
        } else {
            dispatch(c, e);
        }
    }
}

/* RELEASE: part 0 lists the u32 handles (memfd fds, or IPMPI_SHM_VM
 * handles) of lent memory the client is done with. */
static void do_release(ipmpi_session_t *s, const ipmpi_parts_t *p)
{
    if (p->n != 1 || p->lens[0] % 4 != 0) {
        ipmpi_log(IPMPI_LOG_WARN, "client %s: malformed RELEASE ignored", s->peer);
        return;
    }
    for (uint64_t i = 0; i < p->lens[0] / 4; i++)
        ipmpi_session_release(s, ipmpi_get_u32(p->bufs[0] + 4 * i));
}

/* SHM_PROBE: the nonce came through the client's memfd; it goes back
 * through one of ours, so the client knows both directions work. */
static void do_shm_probe(ipmpi_session_t *s, const ipmpi_hdr_t *h, const ipmpi_parts_t *p)
{
    /* client_frame checked that part 0 came by shared memory. */
    if (!(h->flags & IPMPI_F_SHM) || p->n != 1 || p->lens[0] != sizeof s->shm_nonce ||
        ipmpi_consttime_eq(p->bufs[0], s->shm_nonce, sizeof s->shm_nonce) != 1) {
        reply_err(s, h, IPMPI_EACCES, "SHM_PROBE: part 0, in the shared memory of pid %llu, must be the "
                  "32-byte shm_nonce of this session's HELLO", (unsigned long long)h->aux);
        return;
    }
    /* Only the process that holds our random nonce is this client: from
     * now on the session's shared memory must be that pid's. */
    s->shm_pid = (int)h->aux;
    ipmpi_hdr_t rh = {.kind = h->kind, .flags = IPMPI_F_REPLY, .req_id = h->req_id,
                      .target = IPMPI_TARGET_CONTROLLER, .total = 1};
    if (h->flags & IPMPI_F_VM_OK) {
        /* Process memory both ways: the nonce goes back from our memory,
         * as a part large enough to go that way. */
        uint64_t big = IPMPI_SHM_MIN;
        ipmpi_parts_t *out = ipmpi_parts_new(1, &big);
        if (out) {
            memset(out->bufs[0], 0, (size_t)big);
            memcpy(out->bufs[0], p->bufs[0], (size_t)p->lens[0]);
        }
        if (!out || send_reply(s, &rh, out, 1) != 0)
            reply_err(s, h, IPMPI_ENOMEM, "controller out of memory for the probe");
        ipmpi_parts_unref(out);
        return;
    }
    uint64_t zero = 0;
    ipmpi_parts_t *out = ipmpi_parts_new(1, &zero);
    ipmpi_shmbuf_t *sb = out ? ipmpi_shmbuf_get(p->lens[0]) : NULL;
    if (sb) {
        memcpy(sb->base, p->bufs[0], (size_t)p->lens[0]);
        if (ipmpi_parts_set_backing(out, 0, &sb->b, sb->base, p->lens[0]) != 0) {
            ipmpi_parts_unref(out);
            out = NULL;
        }
        ipmpi_backing_unref(&sb->b);
    }
    if (!sb || !out || send_reply(s, &rh, out, 0) != 0)
        reply_err(s, h, IPMPI_ENOMEM, "controller out of memory for shared memory");
    ipmpi_parts_unref(out);
}

static int allowed(int cap, unsigned kind)
{
    if (kind == IPMPI_K_HELLO || kind == IPMPI_K_GET_IDS || kind == IPMPI_K_PROPERTIES ||
        kind == IPMPI_K_QUEUE_STATUS || kind == IPMPI_K_SHM_PROBE || kind == IPMPI_K_RELEASE)
        return 1;
    if (cap == IPMPI_CAP_TC)
        return is_task_kind(kind);
    return cap == IPMPI_CAP_MEC && !is_task_kind(kind);
}

void ipmpi_ctl_client_frame(void *arg, ipmpi_session_t *s, const ipmpi_hdr_t *h, ipmpi_parts_t *p)
{
    ipmpi_ctl_t *c = arg;
    int n;
    /* The reply flag is checked first: a reply-flagged HELLO is no request. */
    if (h->kind == IPMPI_K_READY || h->kind == IPMPI_K_EXIT || (h->flags & IPMPI_F_REPLY)) {
        reply_err(s, h, IPMPI_EKIND, "kind %u (%s)%s is not a request a client may send", h->kind,
                  kind_name(h->kind), (h->flags & IPMPI_F_REPLY) ? " with the reply flag" : "");
        goto done;
    }
    if (h->kind == IPMPI_K_HELLO) {
        if (s->cap != IPMPI_CAP_NONE) {
            /* A session keeps the capability it opened with: a second key
             * must not silently turn a MultiEngine session into a task one. */
            reply_err(s, h, IPMPI_EINVAL, "this connection already said HELLO; open a new one for another capability");
            goto done;
        }
        do_hello(c, s, h, p);
        goto done;
    }
    if (!allowed(s->cap, h->kind)) {
        ipmpi_log(IPMPI_LOG_WARN, "client %s: %s refused for capability %s", s->peer, kind_name(h->kind),
                  s->cap == IPMPI_CAP_MEC ? "mec" : "tc");
        reply_err(s, h, IPMPI_EACCES, "access denied: %s is not allowed with the %s capability",
                  kind_name(h->kind), s->cap == IPMPI_CAP_MEC ? "mec" : "tc");
        goto done;
    }
    if (h->kind == IPMPI_K_RELEASE) {
        do_release(s, p);
        goto done;
    }
    if ((h->flags & IPMPI_F_SHM) && h->kind != IPMPI_K_SHM_PROBE &&
        (s->shm_pid == 0 || h->aux != (uint64_t)s->shm_pid)) {
        /* Only the process that proved it is this client may name its
         * memory: a key holder must not make the controller read another
         * process of the same user (or any process, for a root controller). */
        ipmpi_log(IPMPI_LOG_WARN, "client %s: shared memory of pid %llu refused (probed pid: %d)", s->peer,
                  (unsigned long long)h->aux, s->shm_pid);
        reply_err(s, h, IPMPI_EACCES, "shared memory refused: pid %llu is not the one this session's SHM_PROBE "
                  "proved (%d)", (unsigned long long)h->aux, s->shm_pid);
        goto done;
    }
    if (h->kind == IPMPI_K_SHM_PROBE && (!(h->flags & IPMPI_F_SHM) || p->n != 2 || p->lens[0] != 0)) {
        reply_err(s, h, IPMPI_EACCES, "SHM_PROBE: part 0 must come by shared memory");
        goto done;
    }
    if (h->flags & IPMPI_F_SHM) {
        char why[256];
        uint32_t nvm = 0;
        ipmpi_shmref_t vm[p->n ? p->n : 1];
        int rc = ipmpi_shm_attach(&s->shm_peer, h->aux <= INT32_MAX ? (int)h->aux : -1, p, &c->o->limits, why,
                                  sizeof why, vm, &nvm);
        if (rc != 0) {
            ipmpi_log(IPMPI_LOG_WARN, "client %s: shared memory of %s refused: %s", s->peer, kind_name(h->kind),
                      why);
            reply_err(s, h, rc, "shared memory refused: %s", why);
            if (rc != IPMPI_EACCES)
                ipmpi_session_close_after_flush(s, ipmpi_now_ns());
            goto done;
        }
        if (nvm > 0) {
            int taken = copy_vm(c, s, h, p, vm, nvm);
            if (taken != 0)
                goto done; /* streamed (the request holds its reference), or failed */
        }
    }
    if (c->stopping) {
        reply_err(s, h, IPMPI_ESHUTDOWN, "controller is shutting down");
        goto done;
    }
    if (is_task_kind(h->kind)) {
        reply_err(s, h, IPMPI_EKIND,
                  "task kinds are served by the task scheduler, which this controller does not run yet");
        goto done;
    }
    switch (h->kind) {
    case IPMPI_K_GET_IDS:
        do_get_ids(c, s, h);
        break;
    case IPMPI_K_SHM_PROBE:
        do_shm_probe(s, h, p);
        break;
    case IPMPI_K_SHUTDOWN: {
        ipmpi_log(IPMPI_LOG_INFO, "SHUTDOWN requested by client %s", s->peer);
        jbuf_t b = {0};
        jb_printf(&b, "{\"stopping\": true}");
        send_json(s, h, &b);
        c->stopping = 1;
        break;
    }
    case IPMPI_K_QUEUE_STATUS:
    case IPMPI_K_CLEAR_QUEUE:
    case IPMPI_K_PROPERTIES:
        if ((n = resolve(c, s, h, p)) < 0)
            break;
        if (h->kind == IPMPI_K_QUEUE_STATUS)
            do_queue_status(c, s, h, n);
        else if (h->kind == IPMPI_K_CLEAR_QUEUE)
            do_clear_queue(c, s, h, n);
        else
            do_properties(c, s, h, n);
        break;
    default:
        if (!is_engine_kind(h->kind)) {
            reply_err(s, h, IPMPI_EKIND, "unknown request kind %u", h->kind);
            break;
        }
        if ((n = resolve(c, s, h, p)) < 0)
            break;
        submit(c, s, h, p, n);
        return; /* submit took p */
    }
done:
    ipmpi_parts_unref(p);
}
