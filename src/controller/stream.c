/*
 * Cut-through forwarding and process-memory copies of client requests
 * (doc/protocol.md sections 3 and 5): a large request for one idle engine
 * goes on to the engine while its bytes still arrive. Loop thread only.
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
#include "json.h"
#include "log.h"
#include "shm.h"
#include "shmbuf.h"
#include "tls.h"

/* ---- cut-through ----
 *
 * A large frame for one idle engine is forwarded while it arrives from the
 * client instead of after (doc/protocol.md section 3): TLS decryption,
 * the MPI copy and the engine's wake-up then overlap instead of adding up.
 * The request is created and put in flight on the engine as soon as
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

int ipmpi_ctl_stream_active(const ipmpi_req_t *r)
{
    return r->stream && r->stream->op;
}

void ipmpi_ctl_stream_abort(ipmpi_req_t *r, const char *why)
{
    if (ipmpi_ctl_stream_active(r))
        stream_abort(r->stream, why);
}

void ipmpi_ctl_stream_withdraw(ipmpi_req_t *r)
{
    if (ipmpi_ctl_stream_active(r))
        stream_withdraw(r->stream);
}

/* Engine e is gone or the request is settled without it: the stream's
 * sends were abandoned with the rank, or the request must not hold it. */
void ipmpi_ctl_stream_detach(ipmpi_req_t *r, int drop_op)
{
    struct ipmpi_ctl_stream *st = r->stream;
    if (!st)
        return;
    if (drop_op)
        st->op = NULL;
    stream_unlink(st);
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
    if (c->stopping || s->cap != IPMPI_CAP_MEC || (h->flags & IPMPI_F_REPLY) || !ipmpi_ctl_is_engine_kind(h->kind) ||
        h->target < 0 || h->target >= c->nengines || ipmpi_parts_bytes(parts) < STREAM_MIN)
        return NULL;
    ipmpi_engine_slot_t *e = &c->eng[h->target];
    if (e->dead || !e->ready || !ipmpi_sched_idle(&c->sched, e->id))
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
    r->eng_flags = h->flags & IPMPI_F_STREAM;
    if (ipmpi_reqtab_put(&c->reqs, r) != 0)
        goto free_r;
    ipmpi_ctl_result_open(c, s, r);
    ipmpi_hdr_t eh = {.kind = r->kind, .flags = r->eng_flags, .req_id = r->id, .target = e->id};
    if (ipmpi_mpilink_stream_start(&c->link, e->rank, &eh, parts, &st->op) != 0)
        goto del_r;
    r->pending = 1;
    ipmpi_sched_start_req(&c->sched, e->id, r, ipmpi_now_ns()); /* e is idle: checked above */
    ipmpi_ctl_busy(c, e, 1);
    st->base.feed = stream_feed;
    st->base.end = stream_end;
    st->c = c;
    st->e = e;
    st->r = r;
    r->stream = st;
    ipmpi_log(IPMPI_LOG_DEBUG, "client %s: %s of %llu bytes cut through to engine %d", s->peer,
              ipmpi_kind_name(h->kind), (unsigned long long)ipmpi_parts_bytes(parts), e->id);
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
ipmpi_session_stream_t *ipmpi_ctl_stream_begin(void *arg, ipmpi_session_t *s, const ipmpi_hdr_t *h,
                                            ipmpi_parts_t *parts)
{
    return (h->flags & IPMPI_F_SHM) ? NULL : stream_try(arg, s, h, parts);
}

/*
 * Copies the parts of p that are in the client's memory (vm, in part
 * order) out of it, VM_STEP bytes per loop turn, so that a 256 MiB push
 * does not hold the loop (and every other client) for the ~30 ms of the
 * copy; when the request can be cut through to one idle engine, each step
 * is forwarded at once, so the engine reads while we copy the next. The
 * session reads no further frame meanwhile. When the copy is done, the
 * client is acknowledged (it may touch its memory again) and the request
 * goes on (ipmpi_ctl_route), unless a stream delivered it.
 */
#define VM_STEP ((uint64_t)1 << 20)

struct ipmpi_ctl_vmjob {
    ipmpi_hdr_t h;
    ipmpi_parts_t *p;          /* owned reference */
    ipmpi_shmref_t *vm;        /* nvm entries, owned */
    uint32_t nvm, i;
    uint64_t off;
    ipmpi_session_stream_t *st;
    int pid;
};

static void vmjob_free(ipmpi_session_t *s, int aborted)
{
    struct ipmpi_ctl_vmjob *j = s->vmjob;
    if (!j)
        return;
    s->vmjob = NULL;
    s->in_paused = 0;
    s->read_more = 1; /* input may wait in the TLS buffer */
    if (j->st)
        j->st->end(j->st, aborted);
    ipmpi_parts_unref(j->p);
    free(j->vm);
    free(j);
}

void ipmpi_ctl_vmjob_drop(ipmpi_session_t *s)
{
    vmjob_free(s, 1);
}

/* One step of s's job. Returns 1 when the job is over. */
static int vmjob_step(ipmpi_ctl_t *c, ipmpi_session_t *s)
{
    struct ipmpi_ctl_vmjob *j = s->vmjob;
    const ipmpi_shmref_t *v = &j->vm[j->i];
    uint8_t *dst = j->p->bufs[v->part];
    uint64_t n = v->len - j->off < VM_STEP ? v->len - j->off : VM_STEP;
    int bad = ipmpi_vm_read(j->pid, v->off + j->off, dst + j->off, n) != 0;
    /* The stream starts once the client's memory proved readable, so a
     * bad address gets a plain refusal. */
    if (!bad && j->i == 0 && j->off == 0)
        j->st = stream_try(c, s, &j->h, j->p);
    if (bad) {
        char why[200];
        snprintf(why, sizeof why, "cannot read %llu bytes at 0x%llx of pid %d: %s", (unsigned long long)n,
                 (unsigned long long)(v->off + j->off), j->pid, strerror(errno));
        ipmpi_log(IPMPI_LOG_WARN, "client %s: shared memory of %s refused: %s", s->peer,
                  ipmpi_kind_name(j->h.kind), why);
        if (!j->st) /* else the engine answers the aborted frame (EABORTED) */
            ipmpi_ctl_reply_err(s, &j->h, IPMPI_EACCES, "shared memory refused: %s", why);
        vmjob_free(s, 1);
        return 1;
    }
    j->off += n;
    if (j->st)
        j->st->feed(j->st, v->part, j->off);
    if (j->off < v->len)
        return 0;
    j->i++;
    j->off = 0;
    if (j->st)
        j->st->feed(j->st, j->i < j->nvm ? j->vm[j->i].part : j->p->n, 0);
    if (j->i < j->nvm)
        return 0;
    /* All copied: the client may reuse its memory. */
    ipmpi_hdr_t ack = {.kind = IPMPI_K_RELEASE, .flags = IPMPI_F_REPLY, .req_id = j->h.req_id,
                       .target = IPMPI_TARGET_CONTROLLER};
    ipmpi_session_send(s, &ack, NULL);
    ipmpi_session_stream_t *st = j->st;
    j->st = NULL;
    ipmpi_hdr_t h = j->h;
    ipmpi_parts_t *p = ipmpi_parts_ref(j->p);
    vmjob_free(s, 0);
    if (st && st->end(st, 0)) {
        ipmpi_parts_unref(p); /* the stream delivered it; the request holds its own reference */
        return 1;
    }
    ipmpi_ctl_route(c, s, &h, p);
    return 1;
}

int ipmpi_ctl_copy_vm(ipmpi_ctl_t *c, ipmpi_session_t *s, const ipmpi_hdr_t *h, ipmpi_parts_t *p,
                      const ipmpi_shmref_t *vm, uint32_t nvm)
{
    struct ipmpi_ctl_vmjob *j = calloc(1, sizeof *j);
    ipmpi_shmref_t *v = calloc(nvm, sizeof *v);
    if (!j || !v) {
        free(j);
        free(v);
        ipmpi_ctl_reply_err(s, h, IPMPI_ENOMEM, "controller out of memory");
        return -1;
    }
    memcpy(v, vm, nvm * sizeof *v);
    j->h = *h;
    j->p = ipmpi_parts_ref(p);
    j->vm = v;
    j->nvm = nvm;
    j->pid = (int)h->aux;
    s->vmjob = j;
    s->in_paused = 1;
    /* The first step at once: a small transfer is done in it. */
    vmjob_step(c, s);
    return 1;
}

int ipmpi_ctl_vmjobs_step(ipmpi_ctl_t *c)
{
    int n = 0;
    for (uint32_t i = 0; i < c->scap; i++) {
        ipmpi_session_t *s = c->sess[i];
        if (s && s->vmjob) {
            vmjob_step(c, s);
            n++;
        }
    }
    return n;
}

