/*
 * ipmpi error codes: functions return 0 or a negative IPMPI_E* code. The
 * same codes travel in the status field of reply frames, so their values
 * are part of the wire protocol and must never change.
 * Thread safety: ipmpi_strerror() and ipmpi_errname() are reentrant.
 */
#ifndef IPMPI_ERRORS_H
#define IPMPI_ERRORS_H

/* XX(name, value, message) */
#define IPMPI_ERRNO_MAP(XX)                                                        \
    XX(EPROTO, -1, "malformed frame")                                              \
    XX(E2BIG, -2, "message too large")                                             \
    XX(EACCES, -3, "access denied: wrong key or capability")                       \
    XX(ENOENT, -4, "no such engine")                                               \
    XX(EDEAD, -5, "engine died")                                                   \
    XX(EREMOTE, -6, "remote exception")                                            \
    XX(EABORTED, -7, "request aborted before it ran")                              \
    XX(ENOMEM, -8, "out of memory")                                                \
    XX(EIO, -9, "input/output error")                                              \
    XX(ETLS, -10, "TLS error")                                                     \
    XX(ETIMEDOUT, -11, "timed out")                                                \
    XX(EINVAL, -12, "invalid argument")                                            \
    XX(ESHUTDOWN, -13, "controller is shutting down")                              \
    XX(EAGAIN, -14, "try again")                                                   \
    XX(ECLOSED, -15, "connection closed")                                          \
    XX(EKIND, -16, "unknown request kind")                                         \
    XX(EMPI, -17, "MPI error")                                                     \
    XX(EPMIX, -18, "PMIx error")                                                   \
    XX(EPYTHON, -19, "Python error")                                               \
    XX(EEVICTED, -20, "result evicted: the controller's memory budget for results made room") \
    XX(EREJECT, -21, "the task's depend refused this engine")

enum ipmpi_errno {
    IPMPI_OK = 0,
#define IPMPI_XX_(name, val, msg) IPMPI_##name = (val),
    IPMPI_ERRNO_MAP(IPMPI_XX_)
#undef IPMPI_XX_
};

/* Returns a static message for code (never NULL; unknown codes get a generic one). */
const char *ipmpi_strerror(int code);
/* Returns the static name ("IPMPI_EDEAD") for code, never NULL. */
const char *ipmpi_errname(int code);

#endif
