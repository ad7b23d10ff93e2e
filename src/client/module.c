/* placeholder: replaced by the client extension module */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "_ipmpi", NULL, 0, NULL, NULL, NULL, NULL, NULL};
PyMODINIT_FUNC PyInit__ipmpi(void);
PyMODINIT_FUNC PyInit__ipmpi(void) { return PyModuleDef_Init(&mod); }
