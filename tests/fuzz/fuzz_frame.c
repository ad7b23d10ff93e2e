/*
 * libFuzzer harness for everything that parses bytes from an untrusted
 * peer without I/O: the frame header and length-table decoders
 * (src/common/codec.h), the shm table and task descriptor decoders, and
 * the capability URL parser (src/common/furl.h).
 * Built and run by `make fuzz` (tests/unit/unit.am) with
 * clang -fsanitize=fuzzer,address,undefined; `make check` runs it for
 * FUZZ_CHECK_SECONDS (tests/fuzz/run-fuzz).
 *
 * Beyond "no crash", it checks the parsers' contracts and traps on a
 * breach: a decoded header re-encodes to the same bytes, decoded lengths
 * respect the limits and add up to the reported total, a parsed URL
 * formats and parses back to the same fields. One input, one thread.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "codec.h"
#include "furl.h"
#include "ipmpi/errors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Static, so a 65536-part table does not live on the stack. */
static uint64_t lens[IPMPI_MAX_PARTS];
static uint8_t reenc[IPMPI_HDR_SIZE + 8u * IPMPI_MAX_PARTS];

static void check_frame(const uint8_t *data, size_t size, const ipmpi_limits_t *lim)
{
    ipmpi_hdr_t h;
    long r = ipmpi_hdr_decode(data, size, lim, &h);
    if (r == 0) {
        if (size >= IPMPI_HDR_SIZE)
            __builtin_trap();
        return;
    }
    if (r < 0) {
        if (r != IPMPI_EPROTO && r != IPMPI_E2BIG)
            __builtin_trap();
        return;
    }
    if (r != IPMPI_HDR_SIZE || h.kind == 0 || h.kind >= IPMPI_K_MAX_ || h.nparts > lim->max_parts)
        __builtin_trap();

    uint64_t total = UINT64_MAX;
    long lr = ipmpi_lens_decode(data + IPMPI_HDR_SIZE, size - IPMPI_HDR_SIZE, h.nparts, lim, lens, &total);
    if (lr < 0) {
        if (lr != IPMPI_E2BIG)
            __builtin_trap();
        return;
    }
    if (lr == 0 && h.nparts != 0)
        return; /* need more */
    if (lr != (long)h.nparts * 8)
        __builtin_trap();
    uint64_t sum = 0;
    for (uint32_t i = 0; i < h.nparts; i++) {
        if (lens[i] > lim->max_part)
            __builtin_trap();
        sum += lens[i];
    }
    if (sum != total || total > lim->max_frame)
        __builtin_trap();

    /* The encoder must reproduce the exact bytes the decoder accepted. */
    long er = ipmpi_hdr_encode(&h, lens, reenc, sizeof reenc);
    if (er != IPMPI_HDR_SIZE + lr || memcmp(reenc, data, (size_t)er) != 0)
        __builtin_trap();
}

static void check_furl(const uint8_t *data, size_t size)
{
    ipmpi_furl_t f, g;
    char buf[512];
    if (ipmpi_furl_parse((const char *)data, size, &f) != 0)
        return;
    if (f.port < 1 || f.port > 65535 || f.host[0] == '\0' || strlen(f.fingerprint) != IPMPI_FP_HEX_LEN ||
        strlen(f.key) != IPMPI_KEY_HEX_LEN)
        __builtin_trap();
    int n = ipmpi_furl_format(&f, buf, sizeof buf);
    if (n <= 0 || ipmpi_furl_parse(buf, (size_t)n, &g) != 0 || memcmp(&f.port, &g.port, sizeof f.port) != 0 ||
        strcmp(f.host, g.host) != 0 || strcmp(f.fingerprint, g.fingerprint) != 0 || strcmp(f.key, g.key) != 0)
        __builtin_trap();
}

/* A shm table (doc/protocol.md section 5) from the input: byte 0 gives
 * the part count, byte 1 a bit mask of parts with wire bytes, the rest is
 * the table. Whatever decodes must satisfy every rule the decoder claims. */
static ipmpi_shmref_t shm_out[16];

static void check_shm_table(const uint8_t *data, size_t size, const ipmpi_limits_t *lim)
{
    if (size < 2)
        return;
    uint32_t n = data[0] % 16u + 1u;
    uint64_t wl[16], wire = 0;
    for (uint32_t i = 0; i < n; i++) {
        wl[i] = (data[1] >> (i % 8)) & 1u;
        wire += wl[i];
    }
    long k = ipmpi_shmref_decode(data + 2, size - 2, n, wl, wire, lim, shm_out, 16);
    if (k < 0) {
        if (k != IPMPI_EPROTO && k != IPMPI_E2BIG)
            __builtin_trap();
        return;
    }
    if (k == 0 || (size_t)k * IPMPI_SHMREF_SIZE != size - 2 || (uint32_t)k > n)
        __builtin_trap();
    uint64_t sum = wire;
    for (long i = 0; i < k; i++) {
        const ipmpi_shmref_t *r = &shm_out[i];
        if (r->part >= n || wl[r->part] != 0 || r->len == 0 || r->len > lim->max_part ||
            r->off > UINT64_MAX - r->len || (i > 0 && r->part <= shm_out[i - 1].part))
            __builtin_trap();
        sum += r->len;
        if (sum > lim->max_frame || sum < r->len)
            __builtin_trap();
        uint8_t e[IPMPI_SHMREF_SIZE];
        ipmpi_shmref_encode(r, e);
        if (memcmp(e, data + 2 + (size_t)i * IPMPI_SHMREF_SIZE, IPMPI_SHMREF_SIZE) != 0)
            __builtin_trap();
    }
}

/* A TASK_SUBMIT descriptor, with the frame's part count from byte 0. */
static void check_taskdesc(const uint8_t *data, size_t size)
{
    if (size < 1)
        return;
    uint32_t nparts = data[0];
    ipmpi_taskdesc_t t;
    memset(&t, 0xAB, sizeof t);
    ipmpi_taskdesc_t before = t;
    int rc = ipmpi_taskdesc_decode(data + 1, size - 1, nparts, &t);
    if (rc != 0) {
        if ((rc != IPMPI_EPROTO && rc != IPMPI_EINVAL) || memcmp(&t, &before, sizeof t) != 0)
            __builtin_trap(); /* an error code it may not give, or *out written on failure */
        return;
    }
    if (t.nstages == 0 || t.nstages > IPMPI_TASK_STAGES_MAX || size - 1 != 16 + 8u * t.nstages)
        __builtin_trap();
    uint64_t sum = 0;
    for (uint32_t i = 0; i < t.nstages; i++) {
        if (t.nparts[i] == 0 || t.retries[i] > IPMPI_TASK_RETRIES_MAX)
            __builtin_trap();
        sum += t.nparts[i];
    }
    if (sum + 1 != nparts || t.id != ipmpi_get_u64(data + 1))
        __builtin_trap();
}

/* A gathered part (IPMPI_F_GATHER) walked as the controller and the
 * client walk it: every inner frame lies within the part, and one that is
 * accepted re-encodes to the bytes of its header and lengths. */
static void check_gathered(const uint8_t *data, size_t size, const ipmpi_limits_t *lim)
{
    const uint8_t *p = data;
    size_t left = size;
    ipmpi_hdr_t h;
    long n;
    while ((n = ipmpi_gather_next(p, left, lim, &h)) > 0) {
        size_t wire = ipmpi_hdr_wire_size(h.nparts);
        if ((size_t)n > left || (size_t)n < wire || !(h.flags & IPMPI_F_REPLY) ||
            (h.flags & (IPMPI_F_MORE | IPMPI_F_SHM | IPMPI_F_GATHER | IPMPI_F_PACKED)))
            __builtin_trap();
        uint64_t sum = 0;
        for (uint32_t i = 0; i < h.nparts; i++) {
            lens[i] = ipmpi_get_u64(p + IPMPI_HDR_SIZE + 8u * i);
            sum += lens[i];
        }
        if (wire + sum != (uint64_t)n || ipmpi_hdr_encode(&h, lens, reenc, sizeof reenc) != (long)wire ||
            memcmp(reenc, p, wire) != 0)
            __builtin_trap();
        p += n;
        left -= (size_t)n;
    }
    if (n == 0 ? left != 0 : (n != IPMPI_EPROTO && n != IPMPI_E2BIG))
        __builtin_trap();
}

/* Runs expanded (ipmpi_gather_each), and folded (ipmpi_gather_fold): a
 * fold of an accepted part is never longer and gives the same replies
 * (target, status, lengths and bytes) in the same order; a refused part
 * is refused by the fold too, and left as it came. */
static void check_fold(const uint8_t *data, size_t size, const ipmpi_limits_t *lim)
{
    uint8_t *copy = malloc(size ? size : 1);
    if (!copy)
        return;
    memcpy(copy, data, size);
    long n = ipmpi_gather_fold(copy, size, lim);
    ipmpi_gather_each_t a, b;
    ipmpi_gather_each_init(&a, data, size, lim);
    ipmpi_gather_each_init(&b, copy, n > 0 ? (size_t)n : 0, lim);
    ipmpi_hdr_t ha, hb;
    const uint8_t *fa, *fb;
    int ra, rb = 0;
    while ((ra = ipmpi_gather_each_next(&a, &ha, &fa)) > 0) {
        if (n < 0)
            continue;
        rb = ipmpi_gather_each_next(&b, &hb, &fb);
        size_t wa = ipmpi_hdr_wire_size(ha.nparts), body = 0;
        for (uint32_t i = 0; i < ha.nparts; i++)
            body += (size_t)ipmpi_get_u64(fa + IPMPI_HDR_SIZE + 8u * i);
        if (rb != 1 || ha.target != hb.target || ha.status != hb.status || ha.nparts != hb.nparts ||
            ha.kind != hb.kind || ha.flags != hb.flags || memcmp(fa + IPMPI_HDR_SIZE, fb + IPMPI_HDR_SIZE,
                                                                   wa - IPMPI_HDR_SIZE + body) != 0)
            __builtin_trap();
    }
    if (ra < 0 ? (n != ra || memcmp(copy, data, size) != 0)
               : (n < 0 || (size_t)n > size || ipmpi_gather_each_next(&b, &hb, &fb) != 0))
        __builtin_trap();
    free(copy);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    ipmpi_limits_t def, tight = {8, 4096, 10000}, open = {IPMPI_MAX_PARTS, UINT64_MAX, UINT64_MAX};
    ipmpi_limits_default(&def);
    check_frame(data, size, &def);
    check_frame(data, size, &tight);
    check_frame(data, size, &open);

    /* The length table on its own, with a part count taken from the input,
     * so the table decoder is exercised without a valid header first. */
    if (size >= 2) {
        uint32_t nparts = (uint32_t)(data[0] | (data[1] << 8)) % 64u;
        uint64_t total;
        long lr = ipmpi_lens_decode(data + 2, size - 2, nparts, &open, lens, &total);
        if (lr != 0 && lr != (long)nparts * 8 && lr != IPMPI_E2BIG)
            __builtin_trap();
    }

    check_shm_table(data, size, &tight);
    check_shm_table(data, size, &open);
    check_gathered(data, size, &def);
    check_gathered(data, size, &tight);
    check_fold(data, size, &def);
    check_furl(data, size);
    check_taskdesc(data, size);
    return 0;
}
