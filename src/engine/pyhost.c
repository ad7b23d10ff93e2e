/*
 * The embedded CPython of an engine (see engine.h): start-up, error
 * logging and flushing. The interpreter is started once, on the engine's
 * main thread, after MPI_Init_thread (mpi4py then finds MPI initialised and
 * leaves initialisation and finalisation to us). It is never finalised:
 * threads started by user code could hang Py_FinalizeEx, and the engine
 * ends with return-to-main or _exit anyway.
 */
#include <signal.h>
#include <stdio.h>

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "engine.h"
#include "ipmpi/errors.h"
#include "log.h"

#ifndef IPMPI_PYTHON
#error "IPMPI_PYTHON (the interpreter to embed, e.g. /usr/bin/python3) must be defined by the build"
#endif
#ifndef IPMPI_PYTHONDIR
#error "IPMPI_PYTHONDIR (where the ipmpi package is installed) must be defined by the build"
#endif

void ipmpi_eng_py_log_error(const char *what)
{
    ipmpi_log(IPMPI_LOG_ERROR, "%s:", what);
    if (!PyErr_Occurred())
        return;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb && value)
        PyException_SetTraceback(value, tb);
    /* PyErr_Display writes to sys.stderr (fd 2, the log) and, unlike
     * PyErr_Print, never exits the process on SystemExit. */
    PyErr_Display(type, value, tb);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    PyErr_Clear();
}

void ipmpi_eng_py_flush(void)
{
    static const char *names[] = {"stdout", "stderr"};
    for (int i = 0; i < 2; i++) {
        PyObject *f = PySys_GetObject(names[i]); /* borrowed */
        if (f && f != Py_None) {
            PyObject *r = PyObject_CallMethod(f, "flush", NULL);
            Py_XDECREF(r);
        }
        PyErr_Clear();
    }
    fflush(NULL);
}

/* Appends IPMPI_PYTHONDIR to sys.path unless it is there already, so an
 * installed engine finds its package without PYTHONPATH. */
static int add_pythondir(void)
{
    int rc = IPMPI_EPYTHON;
    PyObject *path = PySys_GetObject("path"); /* borrowed */
    PyObject *dir = PyUnicode_DecodeFSDefault(IPMPI_PYTHONDIR);
    if (!path || !PyList_Check(path) || !dir)
        goto decref_dir;
    int has = PySequence_Contains(path, dir);
    if (has < 0 || (!has && PyList_Append(path, dir) != 0))
        goto decref_dir;
    rc = 0;
decref_dir:
    Py_XDECREF(dir);
    return rc;
}

/* faulthandler dumps the Python stack of every thread to fd 2 on SIGSEGV,
 * SIGBUS, SIGFPE, SIGILL and SIGABRT, then re-raises the signal with the
 * handler that was there before; resetting them to the default first makes
 * that the default action (the process dies, the controller notices
 * through PMIx) rather than whatever handler MPI installed. */
static int enable_faulthandler(void)
{
    static const int sigs[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT};
    for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++)
        signal(sigs[i], SIG_DFL);
    PyObject *mod = PyImport_ImportModule("faulthandler");
    if (!mod)
        return IPMPI_EPYTHON;
    /* enable() dumps every thread's stack by default (all_threads=True). */
    PyObject *r = PyObject_CallMethod(mod, "enable", NULL);
    Py_DECREF(mod);
    if (!r)
        return IPMPI_EPYTHON;
    Py_DECREF(r);
    return 0;
}

int ipmpi_eng_py_start(void)
{
    PyConfig config;
    PyStatus st;
    int rc = IPMPI_EPYTHON;

    PyConfig_InitPythonConfig(&config);
    /* No argv parsing: the engine's own command line is not Python's. */
    config.parse_argv = 0;
    /* sys.executable must be the real interpreter (multiprocessing, pip and
     * user code launch it); without this it would be the ipmpi binary. */
    st = PyConfig_SetBytesString(&config, &config.program_name, IPMPI_PYTHON);
    if (PyStatus_Exception(st))
        goto clear_config;
    st = PyConfig_SetBytesString(&config, &config.executable, IPMPI_PYTHON);
    if (PyStatus_Exception(st))
        goto clear_config;
    st = Py_InitializeFromConfig(&config);
    if (PyStatus_Exception(st))
        goto clear_config;
    rc = 0;

clear_config:
    PyConfig_Clear(&config);
    if (rc != 0) {
        ipmpi_log(IPMPI_LOG_ERROR, "cannot start Python (%s): %s%s%s", IPMPI_PYTHON,
                  st.func ? st.func : "", st.func ? ": " : "", st.err_msg ? st.err_msg : "unknown error");
        return rc;
    }
    if (add_pythondir() != 0) {
        ipmpi_eng_py_log_error("cannot add " IPMPI_PYTHONDIR " to sys.path");
        return IPMPI_EPYTHON;
    }
    if (enable_faulthandler() != 0) {
        ipmpi_eng_py_log_error("cannot enable faulthandler");
        return IPMPI_EPYTHON;
    }
    return 0;
}
