/* Error code table: messages and names made from IPMPI_ERRNO_MAP. */
#include "ipmpi/errors.h"

const char *ipmpi_strerror(int code)
{
    switch (code) {
    case IPMPI_OK:
        return "success";
#define XX(name, val, msg)                                                                 \
    case IPMPI_##name:                                                                     \
        return msg;
        IPMPI_ERRNO_MAP(XX)
#undef XX
    default:
        return "unknown error";
    }
}

const char *ipmpi_errname(int code)
{
    switch (code) {
    case IPMPI_OK:
        return "IPMPI_OK";
#define XX(name, val, msg)                                                                 \
    case IPMPI_##name:                                                                     \
        return "IPMPI_" #name;
        IPMPI_ERRNO_MAP(XX)
#undef XX
    default:
        return "IPMPI_EUNKNOWN";
    }
}
