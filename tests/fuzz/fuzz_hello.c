/*
 * libFuzzer harness for what a connection without a key makes the
 * controller parse before HELLO (doc/protocol.md section 1), read as its
 * session reads it (src/controller/session.c): the frame header, the
 * pre-HELLO rule (ipmpi_hello_hdr_ok: HELLO, not a reply, one part), the
 * length table and the key's length (ipmpi_hello_len_ok); and the writer
 * of the HELLO reply's JSON (jb_str, src/common/json.c) given any bytes.
 * The controller reads no JSON from a client: HELLO carries the key as a
 * bare part, and the reply's JSON is read by the client's Python json
 * module. Built and run by `make fuzz FUZZ_TARGETS=fuzz_hello` and, for a
 * bounded time, by `make check` (tests/fuzz/run-fuzz).
 *
 * Contracts, trapped on a breach: a header the rule lets through is a
 * HELLO with one part that is no reply; a length it lets through is the
 * key's, so nothing larger is ever allocated for a stranger; jb_str's
 * output is one JSON string literal (no raw control character, quote or
 * backslash inside) that unescapes to its input.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "codec.h"
#include "ipmpi/errors.h"
#include "json.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_preauth(const uint8_t *data, size_t size, const ipmpi_limits_t *lim)
{
    ipmpi_hdr_t h;
    long r = ipmpi_hdr_decode(data, size, lim, &h);
    if (r != IPMPI_HDR_SIZE || !ipmpi_hello_hdr_ok(&h))
        return;
    if (h.kind != IPMPI_K_HELLO || h.nparts != 1 || (h.flags & IPMPI_F_REPLY))
        __builtin_trap();
    uint64_t len = UINT64_MAX, total = UINT64_MAX;
    long lr = ipmpi_lens_decode(data + IPMPI_HDR_SIZE, size - IPMPI_HDR_SIZE, h.nparts, lim, &len, &total);
    if (lr <= 0)
        return;
    if (lr != 8 || len != total)
        __builtin_trap();
    if (!ipmpi_hello_len_ok(len))
        return;
    if (len != IPMPI_KEY_HEX_LEN)
        __builtin_trap();
}

/* The same rule on a frame built from the input's first bytes (kind,
 * flags, part count, first length), with the rest as the parts' bytes:
 * raw bytes alone rarely make a header the rule lets through, so this
 * reaches the key-length check at once. */
static uint8_t built[IPMPI_HDR_SIZE + 3 * 8 + 4096];

static void check_preauth_built(const uint8_t *data, size_t size, const ipmpi_limits_t *lim)
{
    if (size < 12)
        return;
    ipmpi_hdr_t h = {0};
    h.kind = (uint8_t)(data[0] % (IPMPI_K_MAX_ + 1));
    h.flags = (uint16_t)(data[1] & 0x03);
    h.nparts = data[2] % 3u;
    h.target = IPMPI_TARGET_CONTROLLER;
    h.req_id = 1;
    uint64_t lens[3];
    lens[0] = data[3] & 1 ? IPMPI_KEY_HEX_LEN : ipmpi_get_u64(data + 4);
    lens[1] = lens[2] = ipmpi_get_u64(data + 4) >> 1;
    long n = ipmpi_hdr_encode(&h, lens, built, sizeof built);
    if (n <= 0)
        return;
    size_t rest = size - 12 < sizeof built - (size_t)n ? size - 12 : sizeof built - (size_t)n;
    memcpy(built + n, data + 12, rest);
    check_preauth(built, (size_t)n + rest, lim);
}

static int hexval(int c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

static void check_json_str(const uint8_t *data, size_t size)
{
    char *in = malloc(size + 1);
    if (!in)
        return;
    memcpy(in, data, size);
    in[size] = '\0'; /* jb_str takes a C string: up to the first NUL */
    size_t n = strlen(in);
    jbuf_t b = {0};
    jb_str(&b, in);
    if (b.oom) {
        free(b.s);
        free(in);
        return;
    }
    if (b.len < 2 || b.s[0] != '"' || b.s[b.len - 1] != '"' || b.s[b.len] != '\0')
        __builtin_trap();
    size_t k = 0;
    for (size_t i = 1; i + 1 < b.len; i++) {
        unsigned char c = (unsigned char)b.s[i];
        if (c < 0x20 || c == '"')
            __builtin_trap();
        if (c == '\\') {
            unsigned char e = (unsigned char)b.s[++i];
            if (e == '"' || e == '\\') {
                c = e;
            } else if (e == 'u' && i + 4 < b.len - 1) {
                int v = 0;
                for (int d = 0; d < 4; d++) {
                    int x = hexval(b.s[++i]);
                    if (x < 0)
                        __builtin_trap();
                    v = v * 16 + x;
                }
                if (v >= 0x20)
                    __builtin_trap(); /* only control characters are escaped */
                c = (unsigned char)v;
            } else {
                __builtin_trap();
            }
        }
        if (k >= n || (unsigned char)in[k] != c)
            __builtin_trap();
        k++;
    }
    if (k != n)
        __builtin_trap();
    free(b.s);
    free(in);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    ipmpi_limits_t def, tight = {8, 4096, 10000};
    ipmpi_limits_default(&def);
    check_preauth(data, size, &def);
    check_preauth(data, size, &tight);
    check_preauth_built(data, size, &def);
    check_preauth_built(data, size, &tight);
    check_json_str(data, size);
    return 0;
}
