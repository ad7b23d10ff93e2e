/*
 * An engine: ranks 1..N of the job, engine id = world rank - 1. It pins
 * itself with hwloc, starts an embedded CPython holding one persistent
 * namespace (ipmpi._engine.Engine), announces itself to the controller
 * with READY, then serves one request at a time from rank 0 until EXIT
 * (doc/protocol.md sections 3 and 4).
 *
 * Waiting: MPI has no blocking receive that does not spin, so the loop
 * polls MPI_Improbe with a spin-then-sleep back-off (backoff.h): right
 * after a reply it spins, so a client's next request is answered in
 * microseconds; long idle it sleeps up to --wait-max-us between polls, so
 * many idle engines leave the cores to those that compute. The GIL is
 * released whenever the engine waits or moves bytes, so threads started by
 * user code keep running.
 *
 * Threads: everything here runs on the process's main thread, the only one
 * that calls MPI (MPI_THREAD_FUNNELED); on a node without the controller
 * a small thread watches the wake-up socket for INTERRUPTs while a
 * request runs (wake.c).
 */
#include <arpa/inet.h>
#include <pthread.h>
#include <netinet/in.h>
#include <sched.h>
#include <stdatomic.h>
#include <sys/socket.h>
#include <stdint.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "bigbuf.h"
#include "backoff.h"
#include "doorbell.h"
#include "engine.h"
#include "ipmpi/errors.h"
#include "json.h"
#include "log.h"

/* An idle engine asks whether its controller still lives this often. */
#define WATCH_INTERVAL_NS (2000000000ull)

/* Waiting for the rest of a part that the controller forwards while it
 * arrives from the client (a chunk every few ms at TLS speed): spin this
 * briefly after each chunk, then sleep in growing steps up to
 * PART_SLEEP_MAX_US, so the engine takes no core from the client and the
 * controller that produce the bytes. A client that stalls mid-frame for
 * PART_PATIENCE_NS lets the sleeps grow to --wait-max-us, as when idle. */
#define PART_SPIN_US 50u
#define PART_SLEEP_MAX_US 1000u
#define PART_PATIENCE_NS (1000000000ull)

/* The header flags Engine.handle may ask for on its reply (the 4th item
 * of its result); the others (framing, shared memory) are this side's. */
#define ENGINE_REPLY_FLAGS (IPMPI_F_PROPS)

typedef struct engine {
    const ipmpi_opts_t *o;
    const ipmpi_job_t *job;
    MPI_Comm comm;          /* the runtime's private duplicate of the world */
    int eid;
    PyObject *handle;       /* bound method Engine.handle (owned) */
    PyObject *failure;      /* bound method Engine.failure (owned) */
    ipmpi_eng_watch_t *watch; /* serve_loop's controller watch (borrowed) */
    ipmpi_eng_wake_t wake;    /* on a node without the controller: its wake-ups (fd -1: none) */
    ipmpi_backoff_t part_bo;  /* waiting inside a part (part_wait) */
    pid_t pid;              /* this engine's process: a fork of it must not answer */
    int src;                /* who sent the current request: 0, or the parent in a tree */
    int32_t *tree;          /* IPMPI_F_TREE: this engine and its subtree (NULL: none) */
    uint32_t ntree;
    uint64_t seen[8];       /* ids of the last tree and retry requests (tree.c) */
    uint32_t nseen;
    /* This engine's own reply to its last tree request, as sent up the
     * tree: a message to a parent that died may vanish unnoticed (eager
     * sends complete into a dead peer's queue), so a retry of that
     * request gets it again, directly. */
    uint64_t last_tree_id;
    uint8_t *last_reply;
    size_t last_reply_len;
    ipmpi_eng_deaths_t deaths; /* this job's dead ranks, for tree waits */
} engine_t;

/*
 * INTERRUPT (doorbell.h): the controller writes the id of the request it
 * means into this engine's doorbell slot, counts it, then sends SIGINT.
 * The handler turns it into KeyboardInterrupt (PyErr_SetInterruptEx,
 * async-signal-safe) only while that request is this engine's current
 * one; a request that arrives with its id already in the slot is
 * interrupted at its start. Each INTERRUPT raises once: the signal of an
 * INTERRUPT already raised at the start must not raise a second
 * KeyboardInterrupt (it would land in the engine's own error handling).
 * Signal handlers see only globals: these are the engine's current
 * request and its doorbell, written by the main thread, and the count of
 * the last INTERRUPT raised, written by both (atomic exchange).
 */
static const ipmpi_doorbell_t *g_bell;
static volatile sig_atomic_t g_in_request;
static volatile uint64_t g_req_id;
static _Atomic uint64_t g_intr_done;
/* On another node the INTERRUPT comes by datagram instead (wake.c): its
 * watcher thread keeps it in g_wake and sends the main thread SIGINT. */
static ipmpi_eng_wake_t *g_wake;
static _Atomic uint64_t g_far_done;
static pthread_t g_main;

/* Raises KeyboardInterrupt if an INTERRUPT not yet raised names req_id. */
static void interrupt_if_meant(uint64_t req_id)
{
    uint64_t seq = 0;
    if (req_id == 0)
        return;
    if (ipmpi_doorbell_interrupt(g_bell, &seq) == req_id && atomic_exchange(&g_intr_done, seq) != seq) {
        PyErr_SetInterruptEx(SIGINT);
        return;
    }
    if (!g_wake)
        return;
    /* The count first: it was written after the id it goes with. */
    seq = atomic_load(&g_wake->intr_seq);
    if (seq != 0 && atomic_load(&g_wake->intr_req) == req_id && atomic_exchange(&g_far_done, seq) != seq)
        PyErr_SetInterruptEx(SIGINT);
}

int ipmpi_eng_far_interrupt_for(uint64_t req_id)
{
    return req_id != 0 && g_wake && atomic_load(&g_wake->intr_seq) != 0 && atomic_load(&g_wake->intr_req) == req_id;
}

/* The watcher thread took an INTERRUPT datagram: the main thread's
 * handler decides, as for the controller's own SIGINT (a signal also
 * ends a sleep or a blocking system call, which a flag alone would not). */
static void far_interrupt(void)
{
    if (g_in_request)
        pthread_kill(g_main, SIGINT);
}

static void on_sigint(int sig)
{
    (void)sig;
    if (g_in_request)
        interrupt_if_meant(g_req_id);
}

/* The request that starts now (0: none); interrupts it if it was meant. */
static void current_request(uint64_t req_id)
{
    g_in_request = 0;
    g_req_id = req_id;
    g_in_request = req_id != 0;
    if (g_wake)
        ipmpi_eng_wake_watch(g_wake, req_id != 0);
    interrupt_if_meant(req_id);
}

/* ipmpi_eng_link_send's question while a send does not complete: is the
 * controller gone (then the send never will)? Runs without the GIL. */
static int controller_gone(void *arg)
{
    engine_t *e = arg;
    return e->watch && ipmpi_eng_watch_controller_gone(e->watch, ipmpi_now_ns());
}

/* Tree waits' question (tree.c): is rank gone? Rank 0 is the controller. */
static int rank_gone(void *arg, int rank)
{
    engine_t *e = arg;
    uint64_t now = ipmpi_now_ns();
    if (rank == 0 || e->job->joined)
        return e->watch && ipmpi_eng_watch_controller_gone(e->watch, now);
    return ipmpi_eng_rank_dead(&e->deaths, rank, now);
}

/* A tree or retry request seen before (its id is among the last few). */
static int seen_before(engine_t *e, uint64_t id)
{
    for (uint32_t i = 0; i < sizeof e->seen / sizeof e->seen[0]; i++)
        if (e->seen[i] == id)
            return 1;
    e->seen[e->nseen++ % (sizeof e->seen / sizeof e->seen[0])] = id;
    return 0;
}

/* ipmpi_eng_link_wait_cb for parts; runs without the GIL. */
static int part_wait(void *arg, int first)
{
    engine_t *e = arg;
    uint64_t now = ipmpi_now_ns();
    if (first) {
        uint64_t cap = e->o->wait_max_us < PART_SLEEP_MAX_US ? e->o->wait_max_us : PART_SLEEP_MAX_US;
        ipmpi_backoff_init(&e->part_bo, PART_SPIN_US, cap, now);
    }
    if (now - e->part_bo.last_busy >= PART_PATIENCE_NS)
        e->part_bo.max_ns = e->o->wait_max_us * 1000u;
    uint64_t d = ipmpi_backoff_next(&e->part_bo, now);
    if (d == 0) {
        sched_yield();
        return 0;
    }
    if (now - e->part_bo.last_busy >= WATCH_INTERVAL_NS && now - e->watch->last_check >= WATCH_INTERVAL_NS &&
        ipmpi_eng_watch_controller_gone(e->watch, now)) {
        ipmpi_log(IPMPI_LOG_ERROR, "engine %d: its controller is gone in the middle of a frame", e->eid);
        return IPMPI_EDEAD;
    }
    struct timespec tsl = {(time_t)(d / 1000000000u), (long)(d % 1000000000u)};
    nanosleep(&tsl, NULL);
    return 0;
}

/* Receives the parts of a request into dst (NULL entries, or dst NULL:
 * dropped). No GIL. Returns as ipmpi_eng_link_recv_part; after
 * IPMPI_EABORTED nothing more of the frame follows. */
static int recv_parts(engine_t *e, uint32_t nparts, const uint64_t *lens, char **dst)
{
    int rc = 0;
    for (uint32_t i = 0; i < nparts && rc == 0; i++)
        rc = ipmpi_eng_link_recv_part(e->comm, e->src, dst ? dst[i] : NULL, lens[i], part_wait, e);
    return rc;
}

/* A reply ready to go: the Python objects it came from stay referenced and
 * their buffers exported until the frame is sent. */
typedef struct reply {
    PyObject *result;       /* the (status, parts, exit_after[, flags]) tuple (owned) */
    PyObject *seq;          /* parts as a fast sequence (owned) */
    Py_buffer *views;       /* nparts exported buffers */
    uint32_t nviews;        /* how many of views are held */
    uint64_t *lens;
    const void **bufs;
    int status;
    int exit_after;
    uint16_t flags;         /* ENGINE_REPLY_FLAGS bits for the header */
} reply_t;

static void reply_release(reply_t *r)
{
    for (uint32_t i = 0; i < r->nviews; i++)
        PyBuffer_Release(&r->views[i]);
    free(r->views);
    free(r->lens);
    free(r->bufs);
    Py_XDECREF(r->seq);
    Py_XDECREF(r->result);
    memset(r, 0, sizeof *r);
}

/* Takes ownership of result (a reference from handle or failure). Exports
 * every part's buffer. Returns 0, or IPMPI_EPYTHON with a Python error set
 * (result released). GIL held. */
static int reply_prepare(reply_t *r, PyObject *result)
{
    memset(r, 0, sizeof *r);
    r->result = result;
    if (!PyTuple_Check(result) || (PyTuple_GET_SIZE(result) != 3 && PyTuple_GET_SIZE(result) != 4)) {
        PyErr_SetString(PyExc_TypeError, "Engine.handle must return (status, parts, exit_after[, flags])");
        goto fail;
    }
    long status = PyLong_AsLong(PyTuple_GET_ITEM(result, 0));
    if (status == -1 && PyErr_Occurred())
        goto fail;
    unsigned long flags = 0;
    if (PyTuple_GET_SIZE(result) == 4) {
        flags = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(result, 3));
        if (flags == (unsigned long)-1 && PyErr_Occurred())
            goto fail;
        if (flags & ~(unsigned long)ENGINE_REPLY_FLAGS) {
            PyErr_Format(PyExc_ValueError, "reply flags 0x%lx: an engine may set only 0x%x", flags,
                         (unsigned)ENGINE_REPLY_FLAGS);
            goto fail;
        }
    }
    int exit_after = PyObject_IsTrue(PyTuple_GET_ITEM(result, 2));
    if (exit_after < 0)
        goto fail;
    r->seq = PySequence_Fast(PyTuple_GET_ITEM(result, 1), "reply parts must be a sequence");
    if (!r->seq)
        goto fail;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(r->seq);
    if ((uint64_t)n > IPMPI_MAX_PARTS) {
        PyErr_Format(PyExc_ValueError, "a reply of %zd parts is more than a frame can hold", n);
        goto fail;
    }
    r->views = calloc((size_t)n + 1, sizeof *r->views);
    r->lens = calloc((size_t)n + 1, sizeof *r->lens);
    r->bufs = calloc((size_t)n + 1, sizeof *r->bufs);
    if (!r->views || !r->lens || !r->bufs) {
        PyErr_NoMemory();
        goto fail;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        /* PyBUF_SIMPLE: contiguous bytes, sent straight from the object's
         * memory (a pulled numpy array is never copied). */
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(r->seq, i), &r->views[i], PyBUF_SIMPLE) != 0)
            goto fail;
        r->nviews++;
        r->lens[i] = (uint64_t)r->views[i].len;
        r->bufs[i] = r->views[i].buf;
    }
    r->status = (int)status;
    r->exit_after = exit_after;
    r->flags = (uint16_t)flags;
    return 0;

fail:
    reply_release(r);
    return IPMPI_EPYTHON;
}

/* The header of this engine's reply to req. */
static ipmpi_hdr_t reply_hdr(const engine_t *e, const ipmpi_hdr_t *req, int status, uint32_t nparts,
                             uint16_t flags)
{
    ipmpi_hdr_t h = {.kind = req->kind, .flags = (uint16_t)(IPMPI_F_REPLY | flags), .req_id = req->req_id,
                     .target = e->eid, .status = status, .total = 1, .nparts = nparts};
    return h;
}

/* Sends r as the reply to req. GIL held on entry and return; released
 * for the transfer (r's buffers stay exported meanwhile). */
static int reply_send(engine_t *e, const ipmpi_hdr_t *req, const reply_t *r)
{
    ipmpi_hdr_t h = reply_hdr(e, req, r->status, r->nviews, r->flags);
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = ipmpi_eng_link_send(e->comm, 0, &h, r->lens, r->bufs, controller_gone, e);
    Py_END_ALLOW_THREADS
    return rc;
}

/* A reply of one UTF-8 message with status, in the form the controller
 * uses for its own errors. */
static int reply_send_text(engine_t *e, const ipmpi_hdr_t *req, int status, const char *msg)
{
    ipmpi_hdr_t h = reply_hdr(e, req, status, 1, 0);
    uint64_t len = strlen(msg);
    const void *buf = msg;
    return ipmpi_eng_link_send(e->comm, 0, &h, &len, &buf, controller_gone, e);
}

/* The controller ended the request's frame early (its client went away
 * mid-frame, or the controller is stopping): answer without running it. */
static int reply_aborted(engine_t *e, const ipmpi_hdr_t *req)
{
    ipmpi_log(IPMPI_LOG_INFO, "request %llu aborted by the controller before it was complete",
              (unsigned long long)req->req_id);
    return reply_send_text(e, req, IPMPI_EABORTED,
                           "request aborted: the controller stopped forwarding it before it was complete");
}

/* Tree replies travel gathered, as whole frames back to back; larger ones
 * (and those with framing flags) go to the controller directly. */
#define TREE_REPLY_MAX 65536u

/* Appends r, as the reply frame to req, to the gather buffer; 0, or 1 if
 * it does not belong there (the caller sends it directly). */
static int tree_add_reply(engine_t *e, const ipmpi_hdr_t *req, const reply_t *r, uint8_t **buf, size_t *len,
                          size_t *cap)
{
    ipmpi_hdr_t h = reply_hdr(e, req, r->status, r->nviews, r->flags);
    size_t hl = ipmpi_hdr_wire_size(r->nviews), total = hl;
    for (uint32_t i = 0; i < r->nviews; i++)
        total += (size_t)r->lens[i];
    if (total > TREE_REPLY_MAX || (r->flags & ~(unsigned)ENGINE_REPLY_FLAGS) ||
        ipmpi_eng_tree_reserve(buf, cap, *len + total) != 0)
        return 1;
    ipmpi_hdr_encode(&h, r->lens, *buf + *len, hl);
    size_t at = *len + hl;
    for (uint32_t i = 0; i < r->nviews; i++) {
        memcpy(*buf + at, r->bufs[i], (size_t)r->lens[i]);
        at += (size_t)r->lens[i];
    }
    *len = at;
    return 0;
}

/* Replies of a tree request, whole frames back to back, to the controller
 * as one IPMPI_F_GATHER frame. No GIL needed. */
static int send_gathered(engine_t *e, const ipmpi_hdr_t *req, const uint8_t *buf, size_t len)
{
    ipmpi_hdr_t h = {.kind = req->kind, .flags = IPMPI_F_REPLY | IPMPI_F_GATHER, .req_id = req->req_id,
                     .target = e->eid, .total = 1, .nparts = 1};
    uint64_t l = len;
    const void *b = buf;
    return ipmpi_eng_link_send(e->comm, 0, &h, &l, &b, controller_gone, e);
}

/* The end of a tree request: the children's gathered replies join this
 * engine's, and all go to the parent in one message (to the controller
 * as one IPMPI_F_GATHER frame when the parent is the controller, or has
 * died). No GIL. */
static int tree_finish(engine_t *e, const ipmpi_hdr_t *req, uint8_t **buf, size_t *len, size_t *cap)
{
    int rc = ipmpi_eng_tree_gather(e->comm, e->job->bell, e->tree, e->ntree, buf, len, cap, rank_gone, e);
    if (rc != 0)
        return rc;
    /* Replies that agree travel as runs (IPMPI_F_SAME): what goes up
     * grows with the distinct replies, not with the engines. */
    ipmpi_limits_t lim;
    ipmpi_limits_default(&lim);
    long folded = *len ? ipmpi_gather_fold(*buf, *len, &lim) : 0;
    if (folded > 0)
        *len = (size_t)folded;
    if (e->src != 0) {
        rc = ipmpi_eng_tree_send_up(e->comm, e->src, *buf ? *buf : (const uint8_t *)"", *len, rank_gone, e);
        if (rc != IPMPI_EDEAD)
            return rc;
        ipmpi_log(IPMPI_LOG_WARN, "engine %d: its parent in the tree (rank %d) is gone; replies go to the "
                  "controller", e->eid, e->src);
    }
    return *len == 0 ? 0 : send_gathered(e, req, *buf, *len);
}

/* Turns the pending Python exception into Engine.failure's reply.
 * Returns a new reference or NULL (error logged). GIL held. */
static PyObject *failure_result(engine_t *e, int kind)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb && value)
        PyException_SetTraceback(value, tb);
    PyObject *res = NULL;
    if (value)
        res = PyObject_CallFunction(e->failure, "iO", kind, value);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    if (!res)
        ipmpi_eng_py_log_error("Engine.failure raised");
    return res;
}

/*
 * Serves one request whose header h and lengths lens were received. GIL
 * held on entry and on return. Returns 0 (replied; *exit_after set), or a
 * negative code when the MPI link failed (the engine cannot go on).
 */
static int serve(engine_t *e, const ipmpi_hdr_t *h, const uint64_t *lens, int *exit_after)
{
    PyObject *parts = NULL, *result = NULL;
    PyObject *alloc_err_type = NULL, *alloc_err = NULL, *alloc_tb = NULL;
    char **dst = NULL;
    reply_t r;
    int rc = IPMPI_ENOMEM;
    uint8_t *gbuf = NULL; /* tree: the gathered replies */
    size_t glen = 0, gcap = 0;

    *exit_after = 0;
    memset(&r, 0, sizeof r);
    dst = calloc((size_t)h->nparts + 1, sizeof *dst);
    parts = PyList_New((Py_ssize_t)h->nparts);
    if (!dst || !parts) {
        PyErr_NoMemory();
        goto drain;
    }
    for (uint32_t i = 0; i < h->nparts; i++) {
        /* Large parts land in cached huge-page buffers (bigbuf.h): a
         * repeated push of similar arrays reuses warm memory. */
        PyObject *ba;
        if (lens[i] >= IPMPI_BIGBUF_MIN) {
            ba = ipmpi_bigbuf_new(lens[i], &dst[i]);
        } else {
            ba = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)lens[i]);
            if (ba)
                dst[i] = PyByteArray_AS_STRING(ba);
        }
        if (!ba)
            goto drain; /* MemoryError: keep it, drain the rest, report it */
        PyList_SET_ITEM(parts, i, ba);
    }
    /* The bytearrays are referenced only by us, so their memory stays put
     * while other Python threads run during the transfer. */
    Py_BEGIN_ALLOW_THREADS
    rc = recv_parts(e, h->nparts, lens, dst);
    Py_END_ALLOW_THREADS
    if (rc == IPMPI_EABORTED)
        goto aborted;
    if (rc != 0)
        goto free_all;
    if (e->tree) {
        /* The children get the request before it runs here: nobody waits
         * for this engine's work to get theirs. */
        Py_BEGIN_ALLOW_THREADS
        rc = ipmpi_eng_tree_forward(e->comm, h, lens, dst, e->tree, e->ntree, e->job->bell, rank_gone, e);
        Py_END_ALLOW_THREADS
        if (rc != 0)
            ipmpi_log(IPMPI_LOG_ERROR, "engine %d: forwarding request %llu in its tree failed: %s", e->eid,
                      (unsigned long long)h->req_id, ipmpi_strerror(rc));
    }
    ipmpi_eng_pymod_request(h);
    result = PyObject_CallFunction(e->handle, "iO", (int)h->kind, parts);
    ipmpi_eng_pymod_request(NULL);
    if (getpid() != e->pid) {
        /* User code forked and the child came back here without _exit:
         * it shares the parent's MPI state and must never answer as this
         * engine (its replies would corrupt the parent's link). */
        _exit(0);
    }
    /* handle never raises by contract, but a signal that arrives before
     * its first line (KeyboardInterrupt) can still make the call fail. */
    if (!result)
        result = failure_result(e, h->kind);
    goto reply;

drain:
    /* Allocation failed: the rest of the frame is still on the wire and
     * must be taken off it to keep the link in step. */
    PyErr_Fetch(&alloc_err_type, &alloc_err, &alloc_tb);
    Py_BEGIN_ALLOW_THREADS
    rc = recv_parts(e, h->nparts, lens, dst);
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        Py_XDECREF(alloc_err_type);
        Py_XDECREF(alloc_err);
        Py_XDECREF(alloc_tb);
        if (rc == IPMPI_EABORTED)
            goto aborted;
        goto free_all;
    }
    Py_CLEAR(parts);
    PyErr_Restore(alloc_err_type, alloc_err, alloc_tb);
    ipmpi_log(IPMPI_LOG_WARN, "no memory for a request of %u parts", h->nparts);
    result = failure_result(e, h->kind);

reply:
    Py_CLEAR(parts); /* the request's buffers are not needed for the reply */
    if (result && reply_prepare(&r, result) != 0) {
        /* E.g. a part without the buffer protocol: that error becomes the
         * reply, so the client learns what went wrong. */
        ipmpi_log(IPMPI_LOG_WARN, "Engine.handle returned an unusable reply");
        result = failure_result(e, h->kind);
        if (result && reply_prepare(&r, result) != 0) {
            ipmpi_eng_py_log_error("Engine.failure returned an unusable reply");
            result = NULL;
        }
    } else if (!result) {
        PyErr_Clear();
    }
    if (e->tree) {
        e->last_tree_id = h->req_id;
        free(e->last_reply);
        e->last_reply = NULL;
        e->last_reply_len = 0;
    }
    if (result) {
        if (!e->tree || tree_add_reply(e, h, &r, &gbuf, &glen, &gcap) != 0)
            rc = reply_send(e, h, &r);
        else if ((e->last_reply = malloc(glen)) != NULL)
            memcpy(e->last_reply, gbuf, e->last_reply_len = glen);
        *exit_after = r.exit_after;
        reply_release(&r);
    } else {
        /* Last resort when Python cannot even build an error reply: the
         * request is still answered. */
        rc = reply_send_text(e, h, IPMPI_EPYTHON, "the engine's Python layer failed; see the engine's log");
    }
    if (rc != 0)
        ipmpi_log(IPMPI_LOG_ERROR, "cannot send the reply to request %llu: %s",
                  (unsigned long long)h->req_id, ipmpi_strerror(rc));
    if (e->tree && rc == 0) {
        Py_BEGIN_ALLOW_THREADS
        rc = tree_finish(e, h, &gbuf, &glen, &gcap);
        Py_END_ALLOW_THREADS
        if (rc != 0)
            ipmpi_log(IPMPI_LOG_ERROR, "cannot send the gathered replies of request %llu: %s",
                      (unsigned long long)h->req_id, ipmpi_strerror(rc));
    }
    goto free_all;

aborted:
    rc = reply_aborted(e, h);
    if (rc != 0)
        ipmpi_log(IPMPI_LOG_ERROR, "cannot send the reply to request %llu: %s",
                  (unsigned long long)h->req_id, ipmpi_strerror(rc));

free_all:
    Py_XDECREF(parts);
    free(dst);
    free(gbuf);
    return rc;
}

/* Builds the engines-only communicator for --mpi=mpi4py: world ranks 1..N,
 * rank = engine id. Collective over the engines only; the controller never
 * joins. Returns 0 and *fint (its Fortran handle), or IPMPI_EMPI. */
static int make_user_comm(const ipmpi_job_t *job, MPI_Fint *fint)
{
    if (job->joined) {
        /* A job that joined later: its whole world is engines. */
        MPI_Comm ucomm = MPI_COMM_NULL;
        if (MPI_Comm_dup(MPI_COMM_WORLD, &ucomm) != MPI_SUCCESS)
            return IPMPI_EMPI;
        *fint = MPI_Comm_c2f(ucomm);
        return 0;
    }
    MPI_Group world = MPI_GROUP_NULL, engines = MPI_GROUP_NULL;
    MPI_Comm ucomm = MPI_COMM_NULL;
    int rc = IPMPI_EMPI;
    int ranks[1] = {0};
    if (MPI_Comm_group(MPI_COMM_WORLD, &world) != MPI_SUCCESS)
        return rc;
    if (MPI_Group_excl(world, 1, ranks, &engines) != MPI_SUCCESS)
        goto free_world;
    if (MPI_Comm_create_group(MPI_COMM_WORLD, engines, 0x1e9, &ucomm) != MPI_SUCCESS)
        goto free_engines;
    /* ucomm lives as long as the process: user code holds it as `comm`. */
    *fint = MPI_Comm_c2f(ucomm);
    rc = 0;
free_engines:
    MPI_Group_free(&engines);
free_world:
    MPI_Group_free(&world);
    return rc;
}

/* "0,2" -> [0, 2] (new reference; an empty list for NULL). GIL held. */
static PyObject *numa_pylist(const char *s)
{
    PyObject *l = PyList_New(0);
    while (l && s && *s) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s)
            break;
        PyObject *n = PyLong_FromLong(v);
        if (!n || PyList_Append(l, n) != 0) {
            Py_XDECREF(n);
            Py_CLEAR(l);
            break;
        }
        Py_DECREF(n);
        s = *end == ',' ? end + 1 : end;
    }
    return l;
}

/* Sets name to the engine's core count unless the user set it: OpenMP,
 * OpenBLAS and MKL then start as many threads as the engine has cores,
 * not one per core of the node. Before Python (and numpy) start. */
static void set_thread_env(const char *name, int cores)
{
    char v[16];
    if (getenv(name))
        return;
    snprintf(v, sizeof v, "%d", cores > 0 ? cores : 1);
    setenv(name, v, 0);
}

/* READY's JSON: the fields of make_engine's props, built here because the
 * json module would import re, ~2 ms of each engine's start-up. Returns a
 * new bytes object, or NULL with MemoryError set. GIL held. */
static PyObject *ready_json(const engine_t *e, const ipmpi_eng_place_t *pl, const char *version)
{
    jbuf_t b = {0};
    jb_printf(&b, "{\"id\": %d, \"rank\": %d, \"mpi_rank\": %d, \"pid\": %d, \"host\": ", e->eid,
              e->job->world_rank, e->job->world_rank, (int)getpid());
    jb_str(&b, e->job->hostname);
    jb_printf(&b, ", \"local_rank\": %d, \"local_size\": %d, \"cpuset\": ", e->job->local_rank, pl->local_size);
    jb_str(&b, pl->cpuset ? pl->cpuset : "");
    /* numa is bind.c's list of indexes, "0,2": a JSON array's inside. */
    jb_printf(&b, ", \"cores\": %d, \"numa\": [%s], \"bound\": %s, \"oversubscribed\": %s, \"jobid\": ",
              pl->cores, pl->numa ? pl->numa : "", pl->bound ? "true" : "false",
              pl->oversubscribed ? "true" : "false");
    jb_str(&b, e->job->jobid);
    jb_printf(&b, ", \"python\": ");
    jb_str(&b, version);
    jb_printf(&b, "}");
    PyObject *r = b.oom ? PyErr_NoMemory() : PyBytes_FromStringAndSize(b.s, (Py_ssize_t)b.len);
    free(b.s);
    return r;
}

/* Creates the Engine object and returns the READY JSON (new reference to a
 * bytes object). GIL held. */
static PyObject *make_engine(engine_t *e, const ipmpi_eng_place_t *pl, PyObject *comm_fint)
{
    PyObject *mod = NULL, *cls = NULL, *props = NULL, *eng = NULL, *ready = NULL;
    const char *version = Py_GetVersion();

    /* READY: where this engine runs (ipcluster status prints it, engine_info
     * returns it). numa is a list of NUMA node indexes; rank = mpi_rank. */
    props = Py_BuildValue("{s:i,s:i,s:i,s:i,s:s,s:i,s:i,s:s,s:i,s:N,s:N,s:N,s:s,s:s}", "id", e->eid,
                          "rank", e->job->world_rank, "mpi_rank", e->job->world_rank,
                          "pid", (int)getpid(), "host", e->job->hostname, "local_rank",
                          e->job->local_rank, "local_size", pl->local_size,
                          "cpuset", pl->cpuset ? pl->cpuset : "", "cores", pl->cores,
                          "numa", numa_pylist(pl->numa), "bound", PyBool_FromLong(pl->bound),
                          "oversubscribed", PyBool_FromLong(pl->oversubscribed),
                          "jobid", e->job->jobid, "python", version);
    if (!props)
        goto decref;
    mod = PyImport_ImportModule("ipmpi._engine");
    if (!mod)
        goto decref;
    cls = PyObject_GetAttrString(mod, "Engine");
    if (!cls)
        goto decref;
    eng = PyObject_CallFunction(cls, "iiOO", e->eid, e->job->joined ? e->job->world_size : e->job->world_size - 1,
                                props, comm_fint);
    if (!eng)
        goto decref;
    PyObject *mp = PyLong_FromUnsignedLong(e->o->limits.max_parts);
    if (!mp || PyObject_SetAttrString(eng, "max_parts", mp) != 0) {
        Py_XDECREF(mp);
        goto decref;
    }
    Py_DECREF(mp);
    /* SIGINT (the controller's INTERRUPT): Python's own handler raises
     * KeyboardInterrupt, and ours in front of it lets through only the
     * interrupts meant for the current request (on_sigint). */
    PyObject *sig = PyObject_CallMethod(eng, "install_signals", NULL);
    if (!sig)
        goto decref;
    Py_DECREF(sig);
    g_bell = e->job->bell;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigint;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    sigaction(SIGINT, &sa, NULL);
    e->handle = PyObject_GetAttrString(eng, "handle");
    e->failure = PyObject_GetAttrString(eng, "failure");
    if (!e->handle || !e->failure)
        goto decref;
    ready = ready_json(e, pl, version);

decref:
    if (!ready) {
        Py_CLEAR(e->handle);
        Py_CLEAR(e->failure);
    }
    Py_XDECREF(eng); /* the bound methods keep it alive */
    Py_XDECREF(cls);
    Py_XDECREF(mod);
    Py_XDECREF(props);
    return ready;
}

/* Ends the process at once, flushing what Python and stdio hold. */
static void die_now(int status, PyThreadState *ts)
{
    if (ts)
        PyEval_RestoreThread(ts);
    ipmpi_eng_py_flush();
    _exit(status);
}

/* Doorbell's last look: a header from the controller waits. */
static int header_pending(void *arg)
{
    const engine_t *e = arg;
    int flag = 0;
    MPI_Iprobe(MPI_ANY_SOURCE, IPMPI_TAG_HDR, e->comm, &flag, MPI_STATUS_IGNORE);
    return flag;
}

/*
 * Waits for the next frame header from rank 0 with the GIL released (ts
 * is the saved thread state). Returns 0 with *buf (caller frees) and *len,
 * or IPMPI_EMPI / IPMPI_ENOMEM. Never returns when the controller is gone.
 */
static int wait_header(engine_t *e, ipmpi_backoff_t *b, ipmpi_eng_watch_t *w, PyThreadState *ts, uint8_t **buf,
                       int *len)
{
    for (;;) {
        int flag = 0;
        MPI_Message msg;
        MPI_Status st;
        /* From the controller, or from a parent engine in a broadcast
         * tree (tree.c): it is where the rest of the frame comes from. */
        if (MPI_Improbe(MPI_ANY_SOURCE, IPMPI_TAG_HDR, e->comm, &flag, &msg, &st) != MPI_SUCCESS)
            return IPMPI_EMPI;
        if (flag) {
            e->src = st.MPI_SOURCE;
            int n = 0;
            MPI_Get_count(&st, MPI_BYTE, &n);
            uint8_t *p = malloc(n > 0 ? (size_t)n : 1);
            if (!p)
                return IPMPI_ENOMEM;
            if (MPI_Mrecv(p, n, MPI_BYTE, &msg, MPI_STATUS_IGNORE) != MPI_SUCCESS) {
                free(p);
                return IPMPI_EMPI;
            }
            *buf = p;
            *len = n;
            return 0;
        }
        uint64_t now = ipmpi_now_ns();
        uint64_t d = ipmpi_backoff_next(b, now);
        if (d == 0) {
            /* Spin politely: on a shared node the client and the
             * controller need this core too. */
            sched_yield();
            continue;
        }
        if (now - b->last_busy >= WATCH_INTERVAL_NS && now - w->last_check >= WATCH_INTERVAL_NS &&
            ipmpi_eng_watch_controller_gone(w, now)) {
            ipmpi_log(IPMPI_LOG_ERROR, "engine %d exits: its controller is gone", e->eid);
            die_now(1, ts);
        }
        /* Idle: cached receive buffers go back after a while unused. */
        if (now - b->last_busy >= WATCH_INTERVAL_NS)
            ipmpi_bigbuf_trim();
        if (ipmpi_doorbell_reaches(e->job->bell, 0)) {
            /* The controller shares this node and rings after posting a
             * frame: sleep in the kernel until then (waking for the
             * watch), then poll for the spin window, since the frame
             * may take a moment to show. */
            if (ipmpi_doorbell_sleep(e->job->bell, WATCH_INTERVAL_NS, header_pending, e))
                ipmpi_backoff_busy(b, ipmpi_now_ns());
            continue;
        }
        if (e->wake.fd >= 0) {
            /* Another node: sleep until the controller's datagram says a
             * frame was posted (wake.c), waking for the watch. */
            if (ipmpi_eng_wake_sleep(&e->wake, WATCH_INTERVAL_NS, (uint64_t)e->o->wait_max_us * 1000u,
                                     header_pending, e))
                ipmpi_backoff_busy(b, ipmpi_now_ns());
            continue;
        }
        struct timespec tsl = {(time_t)(d / 1000000000u), (long)(d % 1000000000u)};
        nanosleep(&tsl, NULL);
    }
}

static int serve_loop(engine_t *e)
{
    ipmpi_backoff_t b;
    ipmpi_eng_watch_t w;
    uint64_t *lens = NULL;
    uint8_t *buf = NULL;
    int rc = 0;

    ipmpi_backoff_init(&b, e->o->wait_spin_us, e->o->wait_max_us, ipmpi_now_ns());
    /* Idle from the start: no request comes before every engine is ready
     * and a client connected, and engines spinning after READY took the
     * cores from those still starting (64 x 10 ms at 64 engines). The
     * doorbell, or the back-off's first short sleeps, answer the first
     * request. */
    b.last_busy -= b.spin_ns;
    ipmpi_eng_watch_init(&w, e->job, ipmpi_now_ns());
    e->watch = &w;
    lens = malloc(sizeof *lens * ((size_t)e->o->limits.max_parts + 1));
    if (!lens)
        return IPMPI_ENOMEM;

    PyThreadState *ts = PyEval_SaveThread();
    for (;;) {
        int len = 0;
        ipmpi_hdr_t h;
        uint64_t total = 0;
        rc = wait_header(e, &b, &w, ts, &buf, &len);
        if (rc != 0)
            break;
        ipmpi_backoff_busy(&b, ipmpi_now_ns());
        long hn = ipmpi_hdr_decode(buf, (size_t)len, &e->o->limits, &h);
        long ln = hn > 0 ? ipmpi_lens_decode(buf + hn, (size_t)len - (size_t)hn, h.nparts, &e->o->limits,
                                             lens, &total)
                         : hn;
        int bad = hn < 0 ? (int)hn : hn == 0 ? IPMPI_EPROTO : ln < 0 ? (int)ln : 0;
        if (!bad && ((size_t)len != ipmpi_hdr_wire_size(h.nparts) || (h.flags & IPMPI_F_REPLY)))
            bad = IPMPI_EPROTO;
        if (bad) {
            /* The controller is trusted and checks clients' frames against
             * the same limits, so this is a bug; the parts that may follow
             * cannot be framed, and going on would answer garbage. */
            ipmpi_log(IPMPI_LOG_ERROR, "malformed frame from the controller (%d bytes): %s", len,
                      ipmpi_strerror(bad));
            free(buf);
            die_now(1, ts);
        }
        free(buf);
        buf = NULL;

        if (h.kind == IPMPI_K_EXIT) {
            rc = recv_parts(e, h.nparts, lens, NULL);
            ipmpi_log(IPMPI_LOG_INFO, "EXIT from the controller%s",
                      h.aux == 1 ? " (a rank died: ending without MPI_Finalize)" : "");
            if (h.aux == 1)
                die_now(0, ts);
            break;
        }
        ipmpi_log(IPMPI_LOG_DEBUG, "request %llu kind %d, %u parts, %llu bytes", (unsigned long long)h.req_id,
                  h.kind, h.nparts, (unsigned long long)total);
        if (h.flags & (IPMPI_F_TREE | IPMPI_F_RETRY)) {
            int dup = seen_before(e, h.req_id);
            if (h.flags & IPMPI_F_TREE) {
                rc = ipmpi_eng_tree_recv(e->comm, e->src, &e->tree, &e->ntree, rank_gone, e);
                if (rc != 0) {
                    ipmpi_log(IPMPI_LOG_ERROR, "engine %d: no subtree with request %llu: %s", e->eid,
                              (unsigned long long)h.req_id, ipmpi_strerror(rc));
                    e->tree = NULL;
                    dup = 1; /* the controller sends it again once it sees the sender gone */
                }
            }
            if (dup) {
                /* Run already (the controller sent it again while the tree
                 * copy was under way, or the other way round): take it off
                 * the wire; a parent waits for this subtree's message, and
                 * a retry means the reply sent up may be lost: again. */
                rc = recv_parts(e, h.nparts, lens, NULL);
                if (rc == 0 && e->tree && e->src != 0)
                    rc = ipmpi_eng_tree_send_up(e->comm, e->src, (const uint8_t *)"", 0, rank_gone, e);
                if (rc == 0 && (h.flags & IPMPI_F_RETRY) && h.req_id == e->last_tree_id && e->last_reply)
                    rc = send_gathered(e, &h, e->last_reply, e->last_reply_len);
                free(e->tree);
                e->tree = NULL;
                if (rc != 0 && rc != IPMPI_EDEAD)
                    break;
                rc = 0;
                continue;
            }
        }

        int exit_after = 0;
        PyEval_RestoreThread(ts);
        current_request(h.req_id);
        rc = serve(e, &h, lens, &exit_after);
        current_request(0);
        free(e->tree);
        e->tree = NULL;
        /* An interrupt that came after the reply was made must not land in
         * the next request: run the pending handler now and drop it. */
        if (PyErr_CheckSignals() != 0)
            PyErr_Clear();
        if (exit_after) {
            ipmpi_log(IPMPI_LOG_INFO, "killed by request %llu", (unsigned long long)h.req_id);
            die_now(0, NULL);
        }
        ts = PyEval_SaveThread();
        if (rc != 0)
            break;
        /* Spin again: the next request of a busy client comes soon. */
        ipmpi_backoff_busy(&b, ipmpi_now_ns());
    }
    /* Hold the GIL from here on: user threads must not run Python (and
     * perhaps MPI) while main finalises MPI. */
    PyEval_RestoreThread(ts);
    ipmpi_eng_py_flush();
    free(lens);
    return rc;
}

/* Where the controller sends this engine's wake-ups: its host name, or
 * for an engine that joined later the address its liveness connection
 * to the controller comes from (a route the controller surely has; the
 * other job's host names may not resolve there). */
static const char *wake_host(const ipmpi_job_t *job)
{
    static char addr[INET6_ADDRSTRLEN];
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    if (!job->joined || job->live_fd < 0 || getsockname(job->live_fd, (struct sockaddr *)&ss, &len) != 0)
        return job->hostname;
    const void *a = ss.ss_family == AF_INET ? (const void *)&((struct sockaddr_in *)&ss)->sin_addr
                    : ss.ss_family == AF_INET6 ? (const void *)&((struct sockaddr_in6 *)&ss)->sin6_addr : NULL;
    if (!a || !inet_ntop(ss.ss_family, a, addr, sizeof addr))
        return job->hostname;
    return addr;
}

int ipmpi_engine_run(const ipmpi_opts_t *o, const ipmpi_job_t *job, MPI_Comm comm)
{
    engine_t e = {.o = o, .job = job, .comm = comm, .pid = getpid(), .wake = {.fd = -1},
                  .eid = job->joined ? job->join_first + job->world_rank : job->world_rank - 1};
    ipmpi_eng_place_t pl;
    MPI_Fint fint = 0;
    int use_mpi4py = strcmp(o->mpi_mode, "mpi4py") == 0;

    /* PMIX_LOCAL_SIZE answers 1 on the second node of a multi-node mpirun
     * job (Open MPI 4.1, seen in the ssh mode) while Open MPI's own
     * variable is right: take the larger, and never less than local_rank+1. */
    int lsize = job->local_size;
    const char *lse = getenv("OMPI_COMM_WORLD_LOCAL_SIZE");
    if (lse && atoi(lse) > lsize)
        lsize = atoi(lse);
    if (lsize <= job->local_rank)
        lsize = job->local_rank + 1;
    if (ipmpi_eng_bind(o->bind, job->local_rank, lsize, &pl) != 0)
        ipmpi_log(IPMPI_LOG_WARN, "binding unknown: hwloc failed");
    double t_bound = ipmpi_log_clock(), cpu_bound = ipmpi_log_cpu();
    set_thread_env("OMP_NUM_THREADS", pl.cores);
    set_thread_env("OPENBLAS_NUM_THREADS", pl.cores);
    set_thread_env("MKL_NUM_THREADS", pl.cores);
    /* Before Python starts, so that every engine reaches this collective
     * even if its Python later fails to start. */
    if (use_mpi4py && make_user_comm(job, &fint) != 0) {
        ipmpi_log(IPMPI_LOG_ERROR, "cannot create the engines' communicator");
        _exit(1);
    }
    if (ipmpi_eng_pymod_register() != 0 || ipmpi_eng_py_start() != 0) {
        fflush(NULL);
        _exit(1);
    }
    double t_python = ipmpi_log_clock(), cpu_python = ipmpi_log_cpu();

    PyObject *comm_arg = use_mpi4py ? PyLong_FromLong((long)fint) : Py_NewRef(Py_None);
    PyObject *ready = comm_arg ? make_engine(&e, &pl, comm_arg) : NULL;
    Py_XDECREF(comm_arg);
    free(pl.cpuset);
    free(pl.numa);
    if (!ready) {
        ipmpi_eng_py_log_error("cannot create the engine (ipmpi._engine.Engine)");
        die_now(1, NULL);
    }

    ipmpi_eng_pymod_bind(comm, e.eid, job->bell, controller_gone, &e);
    /* For broadcast trees (tree.c): which ranks of this job died. */
    e.deaths.nspace = job->jobid;
    e.deaths.have_pmix = job->have_pmix;
    e.deaths.size = job->world_size;
    e.deaths.dead = calloc((size_t)job->world_size, 1);

    /* READY: the JSON, and on a node without the controller a second part
     * "wake PORT KEY HOST" (wake.c) for the controller's wake-up datagrams
     * (HOST: this node's name as the launcher knows it). */
    e.wake.fd = -1;
    char wake[320] = "", intr[8 + 2 * IPMPI_ENG_IKEY_LEN] = "";
    if (!ipmpi_doorbell_reaches(job->bell, 0) && ipmpi_eng_wake_open(&e.wake) == 0) {
        snprintf(wake, sizeof wake, "wake %u %016llx %s", (unsigned)e.wake.port, (unsigned long long)e.wake.key,
                 wake_host(job));
        /* A third part "intr HEX": the key of the controller's INTERRUPT
         * datagrams (wake.c), if a thread can watch for them. */
        g_main = pthread_self();
        g_wake = &e.wake;
        if (ipmpi_eng_wake_watch_start(&e.wake, far_interrupt) == 0) {
            int k = snprintf(intr, sizeof intr, "intr ");
            for (size_t i = 0; i < sizeof e.wake.ikey; i++)
                k += snprintf(intr + k, sizeof intr - (size_t)k, "%02x", e.wake.ikey[i]);
        }
    }
    ipmpi_hdr_t h = {0};
    h.kind = IPMPI_K_READY;
    h.target = e.eid;
    h.nparts = intr[0] ? 3 : wake[0] ? 2 : 1;
    uint64_t lens2[3] = {(uint64_t)PyBytes_GET_SIZE(ready), strlen(wake), strlen(intr)};
    const void *bufs2[3] = {PyBytes_AS_STRING(ready), wake, intr};
    /* One line that says where this engine's start-up went (wall clock
     * stamps; tools/startup_phases.py reads them). */
    ipmpi_log(IPMPI_LOG_INFO, "start-up: main=%.6f mpi=%.6f pmix=%.6f node=%.6f bound=%.6f python=%.6f "
              "engine=%.6f cpu_mpi=%.4f cpu_node=%.4f cpu_bound=%.4f cpu_python=%.4f cpu=%.4f", job->t.main,
              job->t.mpi, job->t.pmix, job->t.node, t_bound, t_python, ipmpi_log_clock(), job->t.cpu_mpi,
              job->t.cpu_node, cpu_bound, cpu_python, ipmpi_log_cpu());
    ipmpi_log(IPMPI_LOG_INFO, "ready: %s", PyBytes_AS_STRING(ready));
    /* The controller may have given up already (a start-up error): the
     * watch ends this engine instead of a send that never completes. */
    ipmpi_eng_watch_t w;
    ipmpi_eng_watch_init(&w, job, ipmpi_now_ns());
    e.watch = &w;
    ipmpi_eng_link_set_bell(job->bell);
    e.wake.eid = e.eid;
    if (e.wake.fd >= 0)
        ipmpi_eng_link_set_wake(&e.wake);
    int rc = ipmpi_eng_link_send(comm, 0, &h, lens2, bufs2, controller_gone, &e);
    e.watch = NULL;
    Py_DECREF(ready);
    if (rc != 0) {
        ipmpi_log(IPMPI_LOG_ERROR, "cannot send READY: %s", ipmpi_strerror(rc));
        die_now(1, NULL);
    }

    rc = serve_loop(&e);
    if (rc != 0) {
        ipmpi_log(IPMPI_LOG_ERROR, "engine loop failed: %s", ipmpi_strerror(rc));
        die_now(1, NULL);
    }
    return 0;
}
