/* Capability URL parsing and formatting: see furl.h. */
#include "furl.h"

#include <stdio.h>
#include <string.h>

#include "ipmpi/errors.h"

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Copies exactly n hex digits from s to out (lowercased, NUL-terminated). */
static int take_hex(const char *s, size_t n, char *out)
{
    for (size_t i = 0; i < n; i++) {
        int v = hexval(s[i]);
        if (v < 0)
            return IPMPI_EINVAL;
        out[i] = "0123456789abcdef"[v];
    }
    out[n] = '\0';
    return 0;
}

static int is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

static int host_char_ok(char c, int v6)
{
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
        c == '.' || c == '_')
        return 1;
    return v6 && (c == ':' || c == '%');
}

int ipmpi_furl_parse(const char *text, size_t len, ipmpi_furl_t *out)
{
    ipmpi_furl_t f;
    const char *p = text, *end = text + len;
    const size_t slen = sizeof(IPMPI_FURL_SCHEME) - 1;

    while (p < end && is_space(*p))
        p++;
    while (end > p && is_space(end[-1]))
        end--;
    if ((size_t)(end - p) < slen || memcmp(p, IPMPI_FURL_SCHEME, slen) != 0)
        return IPMPI_EINVAL;
    p += slen;
    if ((size_t)(end - p) < IPMPI_FP_HEX_LEN + 1 || p[IPMPI_FP_HEX_LEN] != '@')
        return IPMPI_EINVAL;
    if (take_hex(p, IPMPI_FP_HEX_LEN, f.fingerprint) != 0)
        return IPMPI_EINVAL;
    p += IPMPI_FP_HEX_LEN + 1;

    const char *hs, *he;
    int v6 = 0;
    if (p < end && *p == '[') {
        v6 = 1;
        hs = ++p;
        while (p < end && *p != ']')
            p++;
        if (p == end)
            return IPMPI_EINVAL;
        he = p++;
    } else {
        hs = p;
        while (p < end && *p != ':')
            p++;
        he = p;
    }
    size_t hlen = (size_t)(he - hs);
    if (hlen == 0 || hlen > IPMPI_FURL_HOST_MAX)
        return IPMPI_EINVAL;
    for (const char *q = hs; q < he; q++)
        if (!host_char_ok(*q, v6))
            return IPMPI_EINVAL;
    memcpy(f.host, hs, hlen);
    f.host[hlen] = '\0';

    if (p == end || *p != ':')
        return IPMPI_EINVAL;
    p++;
    long port = 0;
    int digits = 0;
    while (p < end && *p >= '0' && *p <= '9' && digits < 6) {
        port = port * 10 + (*p - '0');
        p++;
        digits++;
    }
    if (digits == 0 || port < 1 || port > 65535)
        return IPMPI_EINVAL;
    f.port = (int)port;

    if (p == end || *p != '/')
        return IPMPI_EINVAL;
    p++;
    if ((size_t)(end - p) != IPMPI_KEY_HEX_LEN || take_hex(p, IPMPI_KEY_HEX_LEN, f.key) != 0)
        return IPMPI_EINVAL;
    *out = f;
    return 0;
}

int ipmpi_furl_format(const ipmpi_furl_t *f, char *buf, size_t cap)
{
    char tmp[IPMPI_KEY_HEX_LEN + 1];
    size_t hlen = strnlen(f->host, IPMPI_FURL_HOST_MAX + 1);
    if (f->port < 1 || f->port > 65535 || hlen == 0 || hlen > IPMPI_FURL_HOST_MAX)
        return IPMPI_EINVAL;
    if (take_hex(f->fingerprint, IPMPI_FP_HEX_LEN, tmp) != 0 || f->fingerprint[IPMPI_FP_HEX_LEN])
        return IPMPI_EINVAL;
    if (take_hex(f->key, IPMPI_KEY_HEX_LEN, tmp) != 0 || f->key[IPMPI_KEY_HEX_LEN])
        return IPMPI_EINVAL;
    int v6 = strchr(f->host, ':') != NULL;
    int n = snprintf(buf, cap, "%s%s@%s%s%s:%d/%s", IPMPI_FURL_SCHEME, f->fingerprint, v6 ? "[" : "",
                     f->host, v6 ? "]" : "", f->port, f->key);
    if (n < 0 || (size_t)n >= cap)
        return IPMPI_EINVAL;
    return n;
}
