/*
 * _ipmpi_engine: the engine's built-in module (registered with
 * PyImport_AppendInittab before the interpreter starts), through which the
 * engine's Python (ipmpi._engine) reaches this side while a request runs:
 *
 *   streaming()            True while the current request asked for its
 *                          output to be streamed (IPMPI_F_STREAM)
 *   send_output(name, b)   sends b (bytes: whole lines of UTF-8 text) of
 *                          stream name ("stdout" or "stderr") to the client
 *                          now, as a non-final reply (IPMPI_F_MORE);
 *                          False when the request does not stream or the
 *                          send failed (then streaming stops for it)
 *   interrupt_pending()    True when the controller's INTERRUPT for the
 *                          current request is in this engine's doorbell
 *   engine_id()            this engine's id
 *
 * Main thread only (MPI_THREAD_FUNNELED): the functions are called by the
 * thread that runs the request. doc/protocol.md sections 2 and 4.
 */
#include <string.h>

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "doorbell.h"
#include "engine.h"
#include "ipmpi/errors.h"
#include "ipmpi/protocol.h"
#include "log.h"

static struct {
    MPI_Comm comm;
    int eid;
    const ipmpi_doorbell_t *bell;
    int (*gone)(void *arg);
    void *gone_arg;
    ipmpi_hdr_t req;  /* the current request's header */
    int running;      /* a request is running */
    int streaming;    /* ... and its output goes to the client as it comes */
} g;

void ipmpi_eng_pymod_bind(MPI_Comm comm, int eid, const ipmpi_doorbell_t *bell, int (*gone)(void *arg),
                          void *gone_arg)
{
    g.comm = comm;
    g.eid = eid;
    g.bell = bell;
    g.gone = gone;
    g.gone_arg = gone_arg;
}

void ipmpi_eng_pymod_request(const ipmpi_hdr_t *h)
{
    g.running = h != NULL;
    g.streaming = h && (h->flags & IPMPI_F_STREAM);
    if (h)
        g.req = *h;
}

static PyObject *pm_streaming(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(a))
{
    return PyBool_FromLong(g.streaming);
}

static PyObject *pm_send_output(PyObject *Py_UNUSED(m), PyObject *args)
{
    const char *name;
    Py_ssize_t name_len;
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "s#y*:send_output", &name, &name_len, &data))
        return NULL;
    if (!(name_len == 6 && (memcmp(name, "stdout", 6) == 0 || memcmp(name, "stderr", 6) == 0))) {
        PyBuffer_Release(&data);
        return PyErr_Format(PyExc_ValueError, "stream name must be 'stdout' or 'stderr', not %.20s", name);
    }
    if (!g.streaming) {
        PyBuffer_Release(&data);
        Py_RETURN_FALSE;
    }
    ipmpi_hdr_t h = {.kind = g.req.kind, .flags = IPMPI_F_REPLY | IPMPI_F_MORE, .req_id = g.req.req_id,
                     .target = g.eid, .total = 1, .nparts = 2};
    uint64_t lens[2] = {(uint64_t)name_len, (uint64_t)data.len};
    const void *bufs[2] = {name, data.buf};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = ipmpi_eng_link_send(g.comm, 0, &h, lens, bufs, g.gone, g.gone_arg);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    if (rc != 0) {
        /* The final reply will fail the same way and say so in the log. */
        ipmpi_log(IPMPI_LOG_WARN, "streamed output of request %llu not sent: %s; streaming stops",
                  (unsigned long long)g.req.req_id, ipmpi_strerror(rc));
        g.streaming = 0;
        Py_RETURN_FALSE;
    }
    Py_RETURN_TRUE;
}

static PyObject *pm_interrupt_pending(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(a))
{
    return PyBool_FromLong(g.running && ((g.bell && ipmpi_doorbell_interrupt(g.bell, NULL) == g.req.req_id) ||
                                         ipmpi_eng_far_interrupt_for(g.req.req_id)));
}

static PyObject *pm_engine_id(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(a))
{
    return PyLong_FromLong(g.eid);
}

static PyMethodDef pm_methods[] = {
    {"streaming", pm_streaming, METH_NOARGS, "streaming() -> True if the running request streams its output."},
    {"send_output", pm_send_output, METH_VARARGS,
     "send_output(name, data) -> True if data (bytes of whole lines) of stream name went to the client."},
    {"interrupt_pending", pm_interrupt_pending, METH_NOARGS,
     "interrupt_pending() -> True if the controller asked to interrupt the running request."},
    {"engine_id", pm_engine_id, METH_NOARGS, "engine_id() -> this engine's id."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef pm_def = {
    PyModuleDef_HEAD_INIT, "_ipmpi_engine",
    "The engine's C side, for ipmpi._engine (exists only inside an ipmpi engine).", -1, pm_methods,
    NULL, NULL, NULL, NULL,
};

static PyObject *pm_init(void)
{
    return PyModule_Create(&pm_def);
}

int ipmpi_eng_pymod_register(void)
{
    return PyImport_AppendInittab("_ipmpi_engine", pm_init) == 0 ? 0 : IPMPI_ENOMEM;
}
