/* Cached huge-page buffers for Python: see bigbuf.h. */
#include "bigbuf.h"

#include <pthread.h>
#include <sys/mman.h>
#include <time.h>

#include "hugemem.h"
#include "mcache.h"

typedef struct {
    PyObject_HEAD
    char *base;   /* mapping of cap bytes */
    size_t cap;
    Py_ssize_t len;
} bigbuf_t;

static void unmap(void *p, size_t cap)
{
    munmap(p, cap);
}

/* Shared by every thread of the process: mu guards it. */
static ipmpi_mcache_t cache = {.max = (size_t)1 << 30, .idle_ns = 10ull * 1000000000ull, .destroy = unmap};
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static PyTypeObject *bigbuf_type;

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

void ipmpi_bigbuf_trim(void)
{
    pthread_mutex_lock(&mu);
    ipmpi_mcache_trim(&cache, mono_ns());
    pthread_mutex_unlock(&mu);
}

static char *take(size_t need, size_t *cap)
{
    pthread_mutex_lock(&mu);
    char *p = ipmpi_mcache_take(&cache, need, cap);
    pthread_mutex_unlock(&mu);
    if (!p) {
        p = ipmpi_huge_map(need);
        *cap = need;
    }
    return p;
}

static void give_back(char *p, size_t cap)
{
    uint64_t t = mono_ns();
    pthread_mutex_lock(&mu);
    ipmpi_mcache_trim(&cache, t);
    ipmpi_mcache_give(&cache, p, cap, t);
    pthread_mutex_unlock(&mu);
}

static void bigbuf_dealloc(PyObject *o)
{
    bigbuf_t *b = (bigbuf_t *)o;
    PyTypeObject *tp = Py_TYPE(o);
    if (b->base)
        give_back(b->base, b->cap);
    tp->tp_free(o);
    Py_DECREF(tp);
}

static int bigbuf_getbuffer(PyObject *o, Py_buffer *view, int flags)
{
    bigbuf_t *b = (bigbuf_t *)o;
    return PyBuffer_FillInfo(view, o, b->base, b->len, 0, flags);
}

static Py_ssize_t bigbuf_length(PyObject *o)
{
    return ((bigbuf_t *)o)->len;
}

static PyType_Slot slots[] = {
    {Py_tp_doc, "A large received part in a cached huge-page buffer (buffer protocol, writable)."},
    {Py_tp_dealloc, bigbuf_dealloc},
    {Py_bf_getbuffer, bigbuf_getbuffer},
    {Py_sq_length, bigbuf_length},
    {0, NULL},
};

static PyType_Spec spec = {
    .name = "ipmpi.BigBuffer",
    .basicsize = sizeof(bigbuf_t),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = slots,
};

const char *ipmpi_bigbuf_data(PyObject *o)
{
    return bigbuf_type && Py_TYPE(o) == bigbuf_type ? ((bigbuf_t *)o)->base : NULL;
}

int ipmpi_bigbuf_init(void)
{
    if (bigbuf_type)
        return 0;
    bigbuf_type = (PyTypeObject *)PyType_FromSpec(&spec);
    return bigbuf_type ? 0 : -1;
}

PyObject *ipmpi_bigbuf_new(uint64_t len, char **data)
{
    if (!bigbuf_type && ipmpi_bigbuf_init() != 0)
        return NULL;
    if (len > (uint64_t)PY_SSIZE_T_MAX - IPMPI_HUGE_ALIGN)
        return PyErr_NoMemory();
    size_t need = ipmpi_huge_round(len);
    bigbuf_t *b = PyObject_New(bigbuf_t, bigbuf_type);
    if (!b)
        return NULL;
    b->base = NULL;
    b->len = (Py_ssize_t)len;
    b->base = take(need, &b->cap);
    if (!b->base) {
        Py_DECREF(b);
        return PyErr_NoMemory();
    }
    *data = b->base;
    return (PyObject *)b;
}
