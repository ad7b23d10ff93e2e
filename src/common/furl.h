/*
 * Capability URLs (.furl files):
 *   ipmpi+tls://<sha256 fingerprint hex>@<host>:<port>/<key hex>
 * host may be a name, an IPv4 address or a bracketed IPv6 address.
 * No I/O, no allocation. Thread safety: reentrant.
 */
#ifndef IPMPI_FURL_H
#define IPMPI_FURL_H

#include <stddef.h>

#include "ipmpi/protocol.h"

#define IPMPI_FURL_SCHEME "ipmpi+tls://"
#define IPMPI_FURL_HOST_MAX 255

typedef struct ipmpi_furl {
    char fingerprint[IPMPI_FP_HEX_LEN + 1]; /* lowercase hex, NUL-terminated */
    char host[IPMPI_FURL_HOST_MAX + 1];     /* without IPv6 brackets */
    int port;                               /* 1..65535 */
    char key[IPMPI_KEY_HEX_LEN + 1];        /* lowercase hex, NUL-terminated */
} ipmpi_furl_t;

/*
 * Parses text (len bytes, need not be NUL-terminated; one trailing newline
 * and surrounding whitespace are allowed). Hex digits are accepted in either
 * case and stored lowercase. Returns 0, or IPMPI_EINVAL for anything
 * malformed. *out is written only on success.
 */
int ipmpi_furl_parse(const char *text, size_t len, ipmpi_furl_t *out);

/*
 * Writes the URL for f, NUL-terminated, without a newline, into buf.
 * Returns the length written (excluding NUL), or IPMPI_EINVAL if f is
 * invalid or cap is too small.
 */
int ipmpi_furl_format(const ipmpi_furl_t *f, char *buf, size_t cap);

#endif
