/*
 * ipmpi._ipmpi: the client's C extension module. It wraps the transport of
 * conn.h in one type, Connection, and exports the protocol's constants.
 * Multi-phase init, module state, a heap type with GC support
 * (CPython's Modules/xxlimited.c is the model).
 *
 * The GIL is released around every call into the transport; the transport
 * takes the GIL back only through the hooks below, to allocate the
 * bytearrays that received parts land in and to run signal handlers while
 * waiting. Lock order is transport locks, then the GIL, and no thread waits
 * for a transport lock while holding the GIL, so several Python threads
 * may share one Connection.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backoff.h"
#include "codec.h"
#include "bigbuf.h"
#include "conn.h"
#include "furl.h"
#include "shm.h"
#include "ipmpi/errors.h"
#include "ipmpi/protocol.h"

typedef struct {
    PyObject *connection_type;
} module_state;

typedef struct {
    PyObject_HEAD
    ipmpi_cl_t *cl;
    PyObject *capability; /* "mec" or "tc" */
    PyObject *hello;      /* the controller's HELLO JSON text */
    PyObject *host;
    int port;
    PyObject *shm_note;   /* why shared memory is off, or None */
} ConnObject;

/* ---- hooks: how the transport reaches Python ---- */

/* ts is this thread's saved state while the GIL is released, NULL while
 * the GIL is held. */
typedef struct {
    PyThreadState *ts;
} gil_ctx;

static void gil_take(gil_ctx *g)
{
    if (g->ts)
        PyEval_RestoreThread(g->ts);
}

static void gil_drop(gil_ctx *g)
{
    if (g->ts)
        g->ts = PyEval_SaveThread();
}

/* A bytearray of len bytes; bytearrays are not GC-tracked, so making one
 * never runs a collection (no Python code runs under the transport lock). */
static void *hook_alloc(void *ctx, uint64_t len, char **data)
{
    gil_ctx *g = ctx;
    PyObject *b = NULL;
    gil_take(g);
    if (len >= IPMPI_BIGBUF_MIN) {
        /* Warm memory for large parts (bigbuf.h). */
        b = ipmpi_bigbuf_new(len, data);
    } else if (len <= (uint64_t)PY_SSIZE_T_MAX) {
        b = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)len);
        if (b)
            *data = PyByteArray_AS_STRING(b);
    }
    if (!b)
        PyErr_Clear();
    gil_drop(g);
    return b;
}

static void hook_release(void *ctx, void *obj)
{
    gil_ctx *g = ctx;
    gil_take(g);
    Py_DECREF((PyObject *)obj);
    gil_drop(g);
}

/* Runs pending signal handlers (Ctrl-C); the exception stays set for the
 * caller to raise. */
static int hook_interrupted(void *ctx)
{
    gil_ctx *g = ctx;
    gil_take(g);
    int r = PyErr_CheckSignals();
    gil_drop(g);
    return r < 0;
}

/* The memory of a part object (the probe's parts: a bytearray, or a big
 * buffer for its IPMPI_SHM_MIN-byte part); its owner holds a reference, so
 * no GIL is needed. */
static const char *hook_data(void *ctx, void *obj)
{
    (void)ctx;
    PyObject *o = obj;
    return PyByteArray_Check(o) ? PyByteArray_AS_STRING(o) : ipmpi_bigbuf_data(o);
}

#define HOOKS(g)                                                                                      \
    {.alloc = hook_alloc, .release = hook_release, .interrupted = hook_interrupted, .data = hook_data, \
     .ctx = &(g)}

/* ---- errors ---- */

static PyObject *conn_error(ConnObject *self, int rc, uint64_t req_id)
{
    char msg[520];
    if (rc == IPMPI_CL_EINTR)
        return NULL; /* the signal handler's exception is set */
    if (rc == IPMPI_ETIMEDOUT)
        return PyErr_Format(PyExc_TimeoutError, "request %llu: no complete answer yet (timed out); "
                            "nothing is lost, call recv again", (unsigned long long)req_id);
    if (rc == IPMPI_ENOENT)
        return PyErr_Format(PyExc_KeyError, "no pending request %llu on this connection", (unsigned long long)req_id);
    if (rc == IPMPI_ENOMEM)
        return PyErr_NoMemory();
    if (rc == IPMPI_E2BIG)
        return PyErr_Format(PyExc_ValueError, "request too large: %s", ipmpi_strerror(rc));
    int err = 0;
    if (self->cl) {
        /* Never wait for the transport lock with the GIL held. */
        PyThreadState *ts = PyEval_SaveThread();
        err = ipmpi_cl_error(self->cl, msg, sizeof msg);
        PyEval_RestoreThread(ts);
    }
    if (err != 0)
        return PyErr_Format(PyExc_ConnectionError, "%s", msg);
    return PyErr_Format(PyExc_ConnectionError, "connection to controller %U:%d: %s", self->host, self->port,
                        ipmpi_strerror(rc));
}

/* Says what is wrong with a furl that ipmpi_furl_parse refused. */
static const char *furl_problem(const char *s, Py_ssize_t n)
{
    static const char hex[] = "0123456789abcdefABCDEF";
    while (n > 0 && (s[n - 1] == '\n' || s[n - 1] == '\r' || s[n - 1] == ' ' || s[n - 1] == '\t'))
        n--;
    while (n > 0 && (*s == ' ' || *s == '\t' || *s == '\n')) {
        s++;
        n--;
    }
    size_t sl = strlen(IPMPI_FURL_SCHEME);
    if ((size_t)n < sl || memcmp(s, IPMPI_FURL_SCHEME, sl) != 0)
        return "it does not start with " IPMPI_FURL_SCHEME;
    s += sl;
    n -= (Py_ssize_t)sl;
    if (n < IPMPI_FP_HEX_LEN + 1 || strspn(s, hex) < IPMPI_FP_HEX_LEN || s[IPMPI_FP_HEX_LEN] != '@')
        return "the certificate fingerprint must be 64 hex digits followed by '@'";
    s += IPMPI_FP_HEX_LEN + 1;
    n -= IPMPI_FP_HEX_LEN + 1;
    const char *slash = memchr(s, '/', (size_t)n);
    if (!slash)
        return "'/' and the key are missing after HOST:PORT";
    Py_ssize_t keylen = n - (slash - s) - 1;
    if (keylen != IPMPI_KEY_HEX_LEN || (Py_ssize_t)strspn(slash + 1, hex) < IPMPI_KEY_HEX_LEN)
        return "the key after '/' must be 64 hex digits";
    return "the address must be HOST:PORT (IPv6 as [ADDR]:PORT) with a port in 1..65535";
}

/* ---- Connection ---- */

/* The 32-byte shm_nonce of HELLO's JSON d (64 hex digits): 0, or -1 with
 * no exception. */
static int hello_nonce(PyObject *d, uint8_t out[32])
{
    PyObject *hx = PyDict_Check(d) ? PyDict_GetItemString(d, "shm_nonce") : NULL;
    const char *t = hx && PyUnicode_Check(hx) ? PyUnicode_AsUTF8(hx) : NULL;
    if (!t || strlen(t) != 64) {
        PyErr_Clear();
        return -1;
    }
    for (int i = 0; i < 32; i++) {
        unsigned v;
        if (sscanf(t + 2 * i, "%2x", &v) != 1)
            return -1;
        out[i] = (uint8_t)v;
    }
    return 0;
}

/* 1 if HELLO's JSON d names our own host id and uid (shared memory may
 * work), 0 if not, -1 with no exception when it cannot tell. */
static int same_host(PyObject *d)
{
    char mine[IPMPI_HOST_ID_MAX];
    PyObject *host = PyDict_Check(d) ? PyDict_GetItemString(d, "host") : NULL;
    PyObject *uid = PyDict_Check(d) ? PyDict_GetItemString(d, "uid") : NULL;
    if (!host || !uid || !PyUnicode_Check(host) || !PyLong_Check(uid) || ipmpi_host_id(mine, sizeof mine) != 0)
        return -1;
    const char *theirs = PyUnicode_AsUTF8(host);
    long u = PyLong_AsLong(uid);
    if (!theirs || (u == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return -1;
    }
    return strcmp(theirs, mine) == 0 && u == (long)geteuid();
}

static PyObject *conn_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"furl", "timeout", "shm", NULL};
    const char *text;
    Py_ssize_t len;
    int want_shm = 1;
    PyObject *timeout_obj = Py_None;
    double timeout = 30.0;
    ipmpi_furl_t f;
    char msg[520];
    ipmpi_cl_entry_t *e = NULL;
    uint64_t id = 0;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "s#|Op:Connection", kwlist, &text, &len, &timeout_obj, &want_shm))
        return NULL;
    if (timeout_obj != Py_None) {
        timeout = PyFloat_AsDouble(timeout_obj);
        if (timeout == -1.0 && PyErr_Occurred())
            return NULL;
        if (timeout <= 0) {
            PyErr_SetString(PyExc_ValueError, "timeout must be positive or None");
            return NULL;
        }
    } else {
        timeout = 0; /* no deadline */
    }
    if (ipmpi_furl_parse(text, (size_t)len, &f) != 0)
        return PyErr_Format(PyExc_ValueError, "bad furl: %s", furl_problem(text, len));

    ConnObject *self = (ConnObject *)type->tp_alloc(type, 0);
    if (!self)
        return NULL;
    self->host = PyUnicode_FromString(f.host);
    self->port = f.port;
    if (!self->host)
        goto fail;

    gil_ctx g = {NULL};
    ipmpi_cl_hooks_t hk = HOOKS(g);
    uint64_t deadline = timeout > 0 ? ipmpi_now_ns() + (uint64_t)(timeout * 1e9) : 0;
    g.ts = PyEval_SaveThread();
    int rc = ipmpi_cl_connect(&f, timeout, &hk, &self->cl, msg, sizeof msg);
    if (rc == 0) {
        struct iovec key = {.iov_base = f.key, .iov_len = IPMPI_KEY_HEX_LEN};
        rc = ipmpi_cl_send(self->cl, IPMPI_K_HELLO, IPMPI_TARGET_ALL, 0, 1, &key, &hk, &id);
        if (rc == 0)
            rc = ipmpi_cl_wait(self->cl, id, deadline, &hk, &e);
    }
    PyEval_RestoreThread(g.ts);
    g.ts = NULL;

    if (rc != 0 && !self->cl) {
        if (rc == IPMPI_CL_EINTR)
            goto fail;
        PyErr_Format(rc == IPMPI_ETIMEDOUT ? PyExc_TimeoutError : PyExc_ConnectionError, "%s", msg);
        goto fail;
    }
    if (rc == IPMPI_ETIMEDOUT) {
        PyErr_Format(PyExc_TimeoutError, "controller at %s:%d did not answer HELLO in time", f.host, f.port);
        goto fail;
    }
    if (rc != 0) {
        conn_error(self, rc, id);
        goto fail;
    }
    ipmpi_cl_reply_t *r = &e->reps[0];
    PyObject *text0 = NULL;
    if (r->nparts >= 1 && r->parts[0])
        text0 = PyUnicode_DecodeUTF8(PyByteArray_AS_STRING(r->parts[0]), PyByteArray_GET_SIZE(r->parts[0]),
                                     "replace");
    else
        text0 = PyUnicode_FromString("");
    if (!text0)
        goto fail;
    if (r->status != 0) {
        PyErr_Format(PyExc_PermissionError, "controller at %s:%d refused the connection: %U", f.host, f.port,
                     text0);
        Py_DECREF(text0);
        goto fail;
    }
    self->hello = text0;
    PyObject *json = PyImport_ImportModule("json");
    PyObject *d = json ? PyObject_CallMethod(json, "loads", "O", text0) : NULL;
    Py_XDECREF(json);
    if (!d)
        goto fail;
    PyObject *cap = PyDict_Check(d) ? PyDict_GetItemString(d, "capability") : NULL;
    if (!cap || !PyUnicode_Check(cap)) {
        Py_DECREF(d);
        PyErr_Format(PyExc_ConnectionError, "controller at %s:%d sent a HELLO without a capability: %U", f.host,
                     f.port, text0);
        goto fail;
    }
    Py_INCREF(cap);
    self->capability = cap;
    const char *env = getenv("IPMPI_SHM");
    if (!want_shm || (env && strcmp(env, "0") == 0))
        self->shm_note = PyUnicode_FromString("turned off by the caller (shm=False or IPMPI_SHM=0)");
    else if (same_host(d) != 1)
        self->shm_note = PyUnicode_FromString("the controller runs on another host, or under another uid");
    else {
        char pmsg[256] = "";
        uint8_t nonce[32];
        int prc = hello_nonce(d, nonce);
        g.ts = PyEval_SaveThread();
        if (prc == 0)
            prc = ipmpi_cl_shm_probe(self->cl, nonce, !(env && strcmp(env, "memfd") == 0), deadline, &hk, pmsg,
                                     sizeof pmsg);
        else
            snprintf(pmsg, sizeof pmsg, "the controller's HELLO has no shm_nonce");
        PyEval_RestoreThread(g.ts);
        g.ts = NULL;
        if (prc == IPMPI_CL_EINTR) {
            Py_DECREF(d);
            goto fail;
        }
        self->shm_note = prc == 0 && !pmsg[0] ? Py_NewRef(Py_None) : PyUnicode_FromString(pmsg);
    }
    Py_DECREF(d);
    if (!self->shm_note)
        goto fail;
    ipmpi_cl_hooks_t held = HOOKS(g);
    ipmpi_cl_entry_free(e, &held);
    return (PyObject *)self;
fail:
    if (e) {
        gil_ctx g2 = {NULL};
        ipmpi_cl_hooks_t held = HOOKS(g2);
        ipmpi_cl_entry_free(e, &held);
    }
    Py_DECREF(self);
    return NULL;
}

static int conn_traverse(ConnObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->capability);
    Py_VISIT(self->hello);
    Py_VISIT(self->shm_note);
    Py_VISIT(self->host);
    return 0;
}

static int conn_clear(ConnObject *self)
{
    Py_CLEAR(self->capability);
    Py_CLEAR(self->hello);
    Py_CLEAR(self->shm_note);
    Py_CLEAR(self->host);
    return 0;
}

static void conn_dealloc(ConnObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    if (self->cl) {
        /* No other thread can be inside a method: they would hold a reference. */
        gil_ctx g = {NULL};
        ipmpi_cl_hooks_t hk = HOOKS(g);
        ipmpi_cl_free(self->cl, &hk);
        self->cl = NULL;
    }
    conn_clear(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static int check_open(ConnObject *self)
{
    if (!self->cl) {
        PyErr_SetString(PyExc_ValueError, "Connection is not initialised");
        return -1;
    }
    return 0;
}

static PyObject *conn_send(ConnObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"kind", "target", "parts", "targets", "stream", NULL};
    int kind, target, stream = 0;
    PyObject *parts_obj, *targets = Py_None;
    PyObject *seq = NULL, *result = NULL;
    Py_buffer *views = NULL;
    struct iovec *iov = NULL;
    uint8_t *tlist = NULL;
    Py_ssize_t nviews = 0, ntargets = 0;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iiO|Op:send", kwlist, &kind, &target, &parts_obj, &targets,
                                     &stream))
        return NULL;
    if (check_open(self) < 0)
        return NULL;
    if (kind <= 0 || kind >= IPMPI_K_MAX_)
        return PyErr_Format(PyExc_ValueError, "unknown request kind %d", kind);
    seq = PySequence_Fast(parts_obj, "parts must be a list of buffers");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (targets != Py_None) {
        PyObject *tseq = PySequence_Fast(targets, "targets must be a list of engine ids");
        if (!tseq)
            goto cleanup;
        ntargets = PySequence_Fast_GET_SIZE(tseq);
        tlist = PyMem_Malloc(ntargets ? (size_t)ntargets * 4 : 1);
        if (!tlist) {
            Py_DECREF(tseq);
            PyErr_NoMemory();
            goto cleanup;
        }
        for (Py_ssize_t i = 0; i < ntargets; i++) {
            long v = PyLong_AsLong(PySequence_Fast_GET_ITEM(tseq, i));
            if (v == -1 && PyErr_Occurred()) {
                Py_DECREF(tseq);
                goto cleanup;
            }
            if (v < 0 || v > INT32_MAX) {
                Py_DECREF(tseq);
                PyErr_Format(PyExc_ValueError, "engine id %ld out of range", v);
                goto cleanup;
            }
            ipmpi_put_u32(tlist + 4 * i, (uint32_t)v);
        }
        Py_DECREF(tseq);
        target = IPMPI_TARGET_LIST;
    }
    Py_ssize_t total = n + (tlist ? 1 : 0);
    if (total > (Py_ssize_t)IPMPI_MAX_PARTS) {
        PyErr_Format(PyExc_ValueError, "too many parts (%zd)", total);
        goto cleanup;
    }
    views = PyMem_Calloc((size_t)(n ? n : 1), sizeof *views);
    iov = PyMem_Calloc((size_t)(total ? total : 1), sizeof *iov);
    if (!views || !iov) {
        PyErr_NoMemory();
        goto cleanup;
    }
    Py_ssize_t k = 0;
    if (tlist) {
        iov[k].iov_base = tlist;
        iov[k++].iov_len = (size_t)ntargets * 4;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, i), &views[i], PyBUF_SIMPLE) < 0)
            goto cleanup;
        nviews++;
        iov[k].iov_base = views[i].buf;
        iov[k++].iov_len = (size_t)views[i].len;
    }
    gil_ctx g = {NULL};
    ipmpi_cl_hooks_t hk = HOOKS(g);
    uint64_t id = 0;
    g.ts = PyEval_SaveThread();
    int rc = ipmpi_cl_send(self->cl, kind, target, stream ? IPMPI_F_STREAM : 0, (uint32_t)total, iov, &hk, &id);
    PyEval_RestoreThread(g.ts);
    if (rc != 0)
        conn_error(self, rc, 0);
    else
        result = PyLong_FromUnsignedLongLong(id);
cleanup:
    for (Py_ssize_t i = 0; i < nviews; i++)
        PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    PyMem_Free(iov);
    PyMem_Free(tlist);
    Py_DECREF(seq);
    return result;
}

static int parse_req_id(PyObject *o, uint64_t *id)
{
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *id = v;
    return 0;
}

/* Builds [(target, status, [bytearray, ...]), ...] from e, taking its part
 * references. GIL held. */
static PyObject *entry_to_list(ipmpi_cl_entry_t *e)
{
    PyObject *list = PyList_New(e->nrep);
    if (!list)
        return NULL;
    for (uint32_t i = 0; i < e->nrep; i++) {
        ipmpi_cl_reply_t *r = &e->reps[i];
        PyObject *parts = PyList_New(r->nparts);
        if (!parts)
            goto fail;
        for (uint32_t j = 0; j < r->nparts; j++) {
            PyObject *p = r->parts[j];
            r->parts[j] = NULL;
            if (!p)
                p = PyByteArray_FromStringAndSize(NULL, 0);
            if (!p) {
                Py_DECREF(parts);
                goto fail;
            }
            PyList_SET_ITEM(parts, j, p);
        }
        PyObject *t = Py_BuildValue("iiN", r->target, r->status, parts);
        if (!t)
            goto fail;
        PyList_SET_ITEM(list, i, t);
    }
    return list;
fail:
    Py_DECREF(list);
    return NULL;
}

static PyObject *conn_recv(ConnObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"req_id", "timeout", NULL};
    PyObject *id_obj, *timeout_obj = Py_None;
    uint64_t id, deadline = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|O:recv", kwlist, &id_obj, &timeout_obj))
        return NULL;
    if (check_open(self) < 0 || parse_req_id(id_obj, &id) < 0)
        return NULL;
    if (timeout_obj != Py_None) {
        double t = PyFloat_AsDouble(timeout_obj);
        if (t == -1.0 && PyErr_Occurred())
            return NULL;
        if (t < 0)
            t = 0;
        deadline = ipmpi_now_ns() + (uint64_t)(t * 1e9);
        if (deadline == 0)
            deadline = 1;
    }
    gil_ctx g = {NULL};
    ipmpi_cl_hooks_t hk = HOOKS(g);
    ipmpi_cl_entry_t *e = NULL;
    g.ts = PyEval_SaveThread();
    ipmpi_bigbuf_trim();
    int rc = ipmpi_cl_wait(self->cl, id, deadline, &hk, &e);
    PyEval_RestoreThread(g.ts);
    g.ts = NULL;
    if (rc != 0)
        return conn_error(self, rc, id);
    PyObject *list = entry_to_list(e);
    ipmpi_cl_entry_free(e, &hk);
    return list;
}

/* Parses an optional timeout in seconds into a deadline (0: none). */
static int parse_deadline(PyObject *timeout_obj, uint64_t *deadline)
{
    *deadline = 0;
    if (timeout_obj == Py_None)
        return 0;
    double t = PyFloat_AsDouble(timeout_obj);
    if (t == -1.0 && PyErr_Occurred())
        return -1;
    if (t < 0)
        t = 0;
    *deadline = ipmpi_now_ns() + (uint64_t)(t * 1e9);
    if (*deadline == 0)
        *deadline = 1;
    return 0;
}

static PyObject *conn_output(ConnObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"req_id", "timeout", NULL};
    PyObject *id_obj, *timeout_obj = Py_None;
    uint64_t id, deadline;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|O:output", kwlist, &id_obj, &timeout_obj))
        return NULL;
    if (check_open(self) < 0 || parse_req_id(id_obj, &id) < 0 || parse_deadline(timeout_obj, &deadline) < 0)
        return NULL;
    gil_ctx g = {NULL};
    ipmpi_cl_hooks_t hk = HOOKS(g);
    ipmpi_cl_entry_t *e = NULL;
    g.ts = PyEval_SaveThread();
    int rc = ipmpi_cl_wait_output(self->cl, id, deadline, &hk, &e);
    PyEval_RestoreThread(g.ts);
    g.ts = NULL;
    if (rc == IPMPI_ETIMEDOUT)
        return Py_BuildValue("(O[]K)", Py_False, 0ULL);
    if (rc != 0)
        return conn_error(self, rc, id);
    PyObject *list = entry_to_list(e);
    PyObject *res = list ? Py_BuildValue("(ONK)", e->total ? Py_True : Py_False, list,
                                         (unsigned long long)e->out_dropped)
                         : NULL;
    ipmpi_cl_entry_free(e, &hk);
    return res;
}

static PyObject *conn_ready(ConnObject *self, PyObject *id_obj)
{
    uint64_t id;
    if (check_open(self) < 0 || parse_req_id(id_obj, &id) < 0)
        return NULL;
    gil_ctx g = {NULL};
    ipmpi_cl_hooks_t hk = HOOKS(g);
    g.ts = PyEval_SaveThread();
    int rc = ipmpi_cl_ready(self->cl, id, &hk);
    PyEval_RestoreThread(g.ts);
    if (rc < 0)
        return conn_error(self, rc, id);
    return PyBool_FromLong(rc);
}

static PyObject *conn_forget(ConnObject *self, PyObject *id_obj)
{
    uint64_t id;
    if (check_open(self) < 0 || parse_req_id(id_obj, &id) < 0)
        return NULL;
    gil_ctx g = {NULL};
    ipmpi_cl_hooks_t hk = HOOKS(g);
    g.ts = PyEval_SaveThread();
    ipmpi_cl_forget(self->cl, id, &hk);
    PyEval_RestoreThread(g.ts);
    Py_RETURN_NONE;
}

static PyObject *conn_close(ConnObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->cl) {
        PyThreadState *ts = PyEval_SaveThread();
        ipmpi_cl_close(self->cl);
        PyEval_RestoreThread(ts);
    }
    Py_RETURN_NONE;
}

static PyObject *conn_get_closed(ConnObject *self, void *Py_UNUSED(closure))
{
    if (!self->cl)
        Py_RETURN_TRUE;
    PyThreadState *ts = PyEval_SaveThread();
    int err = ipmpi_cl_error(self->cl, NULL, 0);
    PyEval_RestoreThread(ts);
    return PyBool_FromLong(err != 0);
}

static PyMethodDef conn_methods[] = {
    {"send", (PyCFunction)(void (*)(void))conn_send, METH_VARARGS | METH_KEYWORDS,
     "send(kind, target, parts, targets=None, stream=False) -> req_id\n\n"
     "Sends one request; each part is any object with the buffer protocol,\n"
     "written from its own memory with the GIL released. With targets (a\n"
     "list of engine ids) target becomes TARGET_LIST. stream=True: the\n"
     "engines stream the output of the code as it runs (see output())."},
    {"recv", (PyCFunction)(void (*)(void))conn_recv, METH_VARARGS | METH_KEYWORDS,
     "recv(req_id, timeout=None) -> [(target, status, [bytearray, ...]), ...]\n\n"
     "Waits until every reply of req_id is in (order of arrival). TimeoutError\n"
     "loses nothing; ConnectionError when the connection is gone."},
    {"output", (PyCFunction)(void (*)(void))conn_output, METH_VARARGS | METH_KEYWORDS,
     "output(req_id, timeout=None) -> (done, [(target, status, [name, text]), ...], dropped): the streamed "
     "output of a request sent with stream=True, waiting up to timeout for some; done once every reply is in "
     "(then recv(req_id) returns at once); dropped counts bytes that did not fit in the client."},
    {"ready", (PyCFunction)conn_ready, METH_O, "ready(req_id) -> bool, without blocking."},
    {"forget", (PyCFunction)conn_forget, METH_O, "forget(req_id): drop its replies, now and later."},
    {"close", (PyCFunction)conn_close, METH_NOARGS, "close(): pending and later calls raise ConnectionError."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef conn_members[] = {
    {"capability", T_OBJECT_EX, offsetof(ConnObject, capability), READONLY, "'mec' or 'tc'"},
    {"hello", T_OBJECT_EX, offsetof(ConnObject, hello), READONLY, "the controller's HELLO reply (JSON text)"},
    {"host", T_OBJECT_EX, offsetof(ConnObject, host), READONLY, "controller host from the furl"},
    {"port", T_INT, offsetof(ConnObject, port), READONLY, "controller port from the furl"},
    {"shm_note", T_OBJECT, offsetof(ConnObject, shm_note), READONLY,
     "None while the fastest shared-memory path is in use, else why not"},
    {NULL, 0, 0, 0, NULL},
};

static PyObject *conn_get_shm(ConnObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->cl && ipmpi_cl_shm_on(self->cl));
}

static PyObject *conn_get_shm_path(ConnObject *self, void *Py_UNUSED(closure))
{
    int m = self->cl ? ipmpi_cl_shm_on(self->cl) : 0;
    if (m == 2)
        return PyUnicode_FromString("process memory");
    if (m == 1)
        return PyUnicode_FromString("memfd");
    Py_RETURN_NONE;
}

static PyGetSetDef conn_getset[] = {
    {"shm_path", (getter)conn_get_shm_path, NULL,
     "'process memory' (process_vm_readv), 'memfd', or None (TLS only)", NULL},
    {"closed", (getter)conn_get_closed, NULL, "True once the connection is closed or broken", NULL},
    {"shm", (getter)conn_get_shm, NULL,
     "True when large parts travel through shared memory (client on the controller's host)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot conn_slots[] = {
    {Py_tp_doc, "Connection(furl, timeout=30.0, shm=True): a TLS 1.3 link to an ipmpi controller.\n\n"
                "Connects, pins the certificate to the furl's fingerprint and presents\n"
                "the furl's key (HELLO). On the controller's own host (and unless shm\n"
                "is False or IPMPI_SHM=0) large parts then travel through shared\n"
                "memory (see .shm). Thread-safe."},
    {Py_tp_new, conn_new},
    {Py_tp_dealloc, conn_dealloc},
    {Py_tp_traverse, conn_traverse},
    {Py_tp_clear, conn_clear},
    {Py_tp_methods, conn_methods},
    {Py_tp_members, conn_members},
    {Py_tp_getset, conn_getset},
    {0, NULL},
};

static PyType_Spec conn_spec = {
    .name = "ipmpi._ipmpi.Connection",
    .basicsize = sizeof(ConnObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .slots = conn_slots,
};

/* ---- module ---- */

static PyObject *mod_strerror(PyObject *Py_UNUSED(m), PyObject *arg)
{
    long code = PyLong_AsLong(arg);
    if (code == -1 && PyErr_Occurred())
        return NULL;
    return PyUnicode_FromString(ipmpi_strerror((int)code));
}

static PyObject *mod_errname(PyObject *Py_UNUSED(m), PyObject *arg)
{
    long code = PyLong_AsLong(arg);
    if (code == -1 && PyErr_Occurred())
        return NULL;
    return PyUnicode_FromString(ipmpi_errname((int)code));
}

static PyMethodDef mod_methods[] = {
    {"strerror", mod_strerror, METH_O, "strerror(code) -> the message for an IPMPI_E* code"},
    {"errname", mod_errname, METH_O, "errname(code) -> 'IPMPI_EDEAD' etc."},
    {NULL, NULL, 0, NULL},
};

static int mod_exec(PyObject *m)
{
    module_state *st = PyModule_GetState(m);
    if (ipmpi_bigbuf_init() != 0)
        return -1;
    st->connection_type = PyType_FromModuleAndSpec(m, &conn_spec, NULL);
    if (!st->connection_type || PyModule_AddObjectRef(m, "Connection", st->connection_type) < 0)
        return -1;
    static const struct {
        const char *name;
        long value;
    } consts[] = {
#define XX(name, val, str, who) {"K_" #name, val},
        IPMPI_KIND_MAP(XX)
#undef XX
        {"TARGET_ALL", IPMPI_TARGET_ALL},
        {"TARGET_CONTROLLER", IPMPI_TARGET_CONTROLLER},
        {"TARGET_LIST", IPMPI_TARGET_LIST},
        {"F_REPLY", IPMPI_F_REPLY},
        {"F_PROPS", IPMPI_F_PROPS},
        {"PROTO_VERSION", IPMPI_PROTO_VERSION},
        {"MAGIC", (long)IPMPI_MAGIC},
        {"HDR_SIZE", IPMPI_HDR_SIZE},
        {"OK", IPMPI_OK},
#define XX(name, val, msg) {#name, val},
        IPMPI_ERRNO_MAP(XX)
#undef XX
    };
    for (size_t i = 0; i < sizeof consts / sizeof consts[0]; i++)
        if (PyModule_AddIntConstant(m, consts[i].name, consts[i].value) < 0)
            return -1;
    return 0;
}

static int mod_traverse(PyObject *m, visitproc visit, void *arg)
{
    module_state *st = PyModule_GetState(m);
    Py_VISIT(st->connection_type);
    return 0;
}

static int mod_clear(PyObject *m)
{
    module_state *st = PyModule_GetState(m);
    Py_CLEAR(st->connection_type);
    return 0;
}

static void mod_free(void *m)
{
    mod_clear((PyObject *)m);
}

static PyModuleDef_Slot mod_slots[] = {
    {Py_mod_exec, mod_exec},
    {0, NULL},
};

static struct PyModuleDef ipmpi_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_ipmpi",
    .m_doc = "ipmpi client transport: TLS 1.3 link to the controller, framing, result tracking.",
    .m_size = sizeof(module_state),
    .m_methods = mod_methods,
    .m_slots = mod_slots,
    .m_traverse = mod_traverse,
    .m_clear = mod_clear,
    .m_free = mod_free,
};

PyMODINIT_FUNC PyInit__ipmpi(void);
PyMODINIT_FUNC PyInit__ipmpi(void)
{
    return PyModuleDef_Init(&ipmpi_module);
}
