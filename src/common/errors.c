/* Error code table (IPMPI_ERRNO_MAP) and request kind table
 * (IPMPI_KIND_MAP): messages, names and masks made from them. */
#include "ipmpi/errors.h"
#include "ipmpi/protocol.h"

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

const char *ipmpi_kind_name(unsigned k)
{
    switch (k) {
#define XX(name, val, str, who)                                                            \
    case val:                                                                              \
        return str;
        IPMPI_KIND_MAP(XX)
#undef XX
    default:
        return "unknown";
    }
}

unsigned ipmpi_kind_who(unsigned k)
{
    switch (k) {
#define XX(name, val, str, who)                                                            \
    case val:                                                                              \
        return who;
        IPMPI_KIND_MAP(XX)
#undef XX
    default:
        return 0;
    }
}
