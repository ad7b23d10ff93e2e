/*
 * Unit tests for the frame codec (src/common/codec.h): every claim of the
 * header comment in codec.h is one test here. Truncations are fed from
 * heap buffers of the exact length, so under AddressSanitizer a read past
 * the end of the input is caught, not only a wrong return value.
 * Single-threaded test program.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "codec.h"
#include "ipmpi/errors.h"

/* A header with every field away from zero, negative where signed. */
static ipmpi_hdr_t sample_hdr(uint32_t nparts)
{
    ipmpi_hdr_t h;
    memset(&h, 0, sizeof h);
    h.kind = IPMPI_K_PULL;
    h.flags = 0xa5c3;
    h.req_id = UINT64_C(0xfedcba9876543210);
    h.target = IPMPI_TARGET_LIST;
    h.status = IPMPI_EREMOTE;
    h.total = 0xdeadbeefu;
    h.nparts = nparts;
    h.aux = UINT64_MAX - 7;
    return h;
}

/* Copies n bytes into a fresh heap block of exactly n bytes (ASan bounds). */
static uint8_t *exact_copy(const uint8_t *src, size_t n)
{
    uint8_t *p = malloc(n ? n : 1);
    assert_non_null(p);
    if (n)
        memcpy(p, src, n);
    return p;
}

static void test_header_round_trip_keeps_every_field(void **state)
{
    (void)state;
    ipmpi_limits_t lim;
    ipmpi_limits_default(&lim);
    uint64_t lens[3] = {0, 1, (uint64_t)3 << 30};
    ipmpi_hdr_t h = sample_hdr(3);
    uint8_t buf[IPMPI_HDR_SIZE + 3 * 8];

    assert_int_equal(ipmpi_hdr_encode(&h, lens, buf, sizeof buf), (long)sizeof buf);
    assert_int_equal(ipmpi_get_u32(buf), IPMPI_MAGIC);

    ipmpi_hdr_t d;
    assert_int_equal(ipmpi_hdr_decode(buf, sizeof buf, &lim, &d), IPMPI_HDR_SIZE);
    assert_int_equal(d.version, IPMPI_PROTO_VERSION);
    assert_int_equal(d.kind, h.kind);
    assert_int_equal(d.flags, h.flags);
    assert_true(d.req_id == h.req_id);
    assert_int_equal(d.target, IPMPI_TARGET_LIST);
    assert_int_equal(d.status, IPMPI_EREMOTE);
    assert_int_equal(d.total, h.total);
    assert_int_equal(d.nparts, 3);
    assert_true(d.aux == h.aux);

    uint64_t got[3], total = 0;
    assert_int_equal(ipmpi_lens_decode(buf + IPMPI_HDR_SIZE, 3 * 8, 3, &lim, got, &total), 3 * 8);
    for (int i = 0; i < 3; i++)
        assert_true(got[i] == lens[i]);
    assert_true(total == lens[0] + lens[1] + lens[2]);
}

static void test_header_round_trip_extreme_values(void **state)
{
    (void)state;
    ipmpi_limits_t lim = {IPMPI_MAX_PARTS, UINT64_MAX, UINT64_MAX};
    /* Each row: signed fields at their extremes, u64s at their top bit. */
    const int32_t ints[] = {INT32_MIN, -1, IPMPI_TARGET_ALL, IPMPI_TARGET_CONTROLLER, 0, INT32_MAX};
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++) {
        ipmpi_hdr_t h = sample_hdr(1);
        h.target = ints[i];
        h.status = ints[sizeof ints / sizeof ints[0] - 1 - i];
        h.req_id = UINT64_MAX - i;
        h.aux = UINT64_C(1) << 63 | i;
        h.flags = (uint16_t)(0xffffu - i);
        h.total = UINT32_MAX - (uint32_t)i;
        uint64_t len = UINT64_MAX - i;
        uint8_t buf[IPMPI_HDR_SIZE + 8];
        ipmpi_hdr_t d;
        uint64_t got, total;
        assert_int_equal(ipmpi_hdr_encode(&h, &len, buf, sizeof buf), (long)sizeof buf);
        assert_int_equal(ipmpi_hdr_decode(buf, sizeof buf, &lim, &d), IPMPI_HDR_SIZE);
        assert_int_equal(d.target, h.target);
        assert_int_equal(d.status, h.status);
        assert_true(d.req_id == h.req_id);
        assert_true(d.aux == h.aux);
        assert_int_equal(d.flags, h.flags);
        assert_int_equal(d.total, h.total);
        assert_int_equal(ipmpi_lens_decode(buf + IPMPI_HDR_SIZE, 8, 1, &lim, &got, &total), 8);
        assert_true(got == len && total == len);
    }
}

static void test_encoder_writes_little_endian_layout(void **state)
{
    (void)state;
    ipmpi_hdr_t h = sample_hdr(1);
    h.target = -2;
    uint64_t len = UINT64_C(0x0102030405060708);
    uint8_t buf[IPMPI_HDR_SIZE + 8];
    assert_int_equal(ipmpi_hdr_encode(&h, &len, buf, sizeof buf), (long)sizeof buf);
    /* "IPMP" in memory order, as protocol.h documents the magic. */
    assert_memory_equal(buf, "IPMP", 4);
    assert_int_equal(buf[4], IPMPI_PROTO_VERSION);
    assert_int_equal(buf[5], IPMPI_K_PULL);
    assert_int_equal(buf[6], 0xc3);
    assert_int_equal(buf[7], 0xa5);
    const uint8_t minus_two[4] = {0xfe, 0xff, 0xff, 0xff};
    assert_memory_equal(buf + 16, minus_two, 4);
    assert_int_equal(buf[28], 1);
    assert_int_equal(buf[IPMPI_HDR_SIZE], 0x08);
    assert_int_equal(buf[IPMPI_HDR_SIZE + 7], 0x01);
}

static void test_encoder_ignores_caller_version(void **state)
{
    (void)state;
    ipmpi_hdr_t h = sample_hdr(0);
    h.version = 99;
    uint8_t buf[IPMPI_HDR_SIZE];
    assert_int_equal(ipmpi_hdr_encode(&h, NULL, buf, sizeof buf), IPMPI_HDR_SIZE);
    assert_int_equal(buf[4], IPMPI_PROTO_VERSION);
}

static void test_encoder_refuses_too_small_buffer(void **state)
{
    (void)state;
    uint64_t lens[2] = {5, 6};
    ipmpi_hdr_t h = sample_hdr(2);
    uint8_t buf[IPMPI_HDR_SIZE + 16];
    for (size_t cap = 0; cap < sizeof buf; cap++) {
        memset(buf, 0x5a, sizeof buf);
        assert_int_equal(ipmpi_hdr_encode(&h, lens, buf, cap), IPMPI_EINVAL);
        /* A refused encode writes nothing, so a partial frame never leaks out. */
        for (size_t i = 0; i < sizeof buf; i++)
            assert_int_equal(buf[i], 0x5a);
    }
    assert_int_equal(ipmpi_hdr_encode(&h, lens, buf, sizeof buf), (long)sizeof buf);
}

static void test_encoder_refuses_nparts_over_hard_limit(void **state)
{
    (void)state;
    ipmpi_hdr_t h = sample_hdr(IPMPI_MAX_PARTS + 1);
    uint8_t buf[IPMPI_HDR_SIZE];
    assert_int_equal(ipmpi_hdr_encode(&h, NULL, buf, SIZE_MAX), IPMPI_EINVAL);
}

static void test_decoder_needs_more_for_every_truncated_header(void **state)
{
    (void)state;
    ipmpi_limits_t lim;
    ipmpi_limits_default(&lim);
    ipmpi_hdr_t h = sample_hdr(0);
    uint8_t buf[IPMPI_HDR_SIZE];
    assert_int_equal(ipmpi_hdr_encode(&h, NULL, buf, sizeof buf), IPMPI_HDR_SIZE);
    for (size_t n = 0; n < IPMPI_HDR_SIZE; n++) {
        uint8_t *p = exact_copy(buf, n);
        ipmpi_hdr_t d;
        memset(&d, 0x77, sizeof d);
        assert_int_equal(ipmpi_hdr_decode(p, n, &lim, &d), 0);
        free(p);
    }
}

static void test_decoder_needs_more_for_every_truncated_length_table(void **state)
{
    (void)state;
    ipmpi_limits_t lim;
    ipmpi_limits_default(&lim);
    enum { N = 5 };
    uint64_t lens[N] = {1, 2, 3, 4, 5};
    ipmpi_hdr_t h = sample_hdr(N);
    uint8_t buf[IPMPI_HDR_SIZE + N * 8];
    assert_int_equal(ipmpi_hdr_encode(&h, lens, buf, sizeof buf), (long)sizeof buf);
    /* Every prefix of the whole header + table: whichever step is reached,
     * the answer is "need more", never an error and never success. */
    for (size_t n = 0; n < sizeof buf; n++) {
        uint8_t *p = exact_copy(buf, n);
        ipmpi_hdr_t d;
        long r = ipmpi_hdr_decode(p, n, &lim, &d);
        if (n < IPMPI_HDR_SIZE) {
            assert_int_equal(r, 0);
        } else {
            assert_int_equal(r, IPMPI_HDR_SIZE);
            uint64_t got[N], total;
            assert_int_equal(ipmpi_lens_decode(p + IPMPI_HDR_SIZE, n - IPMPI_HDR_SIZE, d.nparts, &lim,
                                               got, &total),
                             0);
        }
        free(p);
    }
}

static void test_decoder_rejects_bad_magic(void **state)
{
    (void)state;
    ipmpi_limits_t lim;
    ipmpi_limits_default(&lim);
    uint8_t buf[IPMPI_HDR_SIZE];
    ipmpi_hdr_t h = sample_hdr(0), d;
    assert_int_equal(ipmpi_hdr_encode(&h, NULL, buf, sizeof buf), IPMPI_HDR_SIZE);
    /* Flip each bit of the magic in turn. */
    for (int bit = 0; bit < 32; bit++) {
        buf[bit / 8] ^= (uint8_t)(1u << (bit % 8));
        assert_int_equal(ipmpi_hdr_decode(buf, sizeof buf, &lim, &d), IPMPI_EPROTO);
        buf[bit / 8] ^= (uint8_t)(1u << (bit % 8));
    }
    assert_int_equal(ipmpi_hdr_decode(buf, sizeof buf, &lim, &d), IPMPI_HDR_SIZE);
}

static void test_decoder_rejects_bad_version(void **state)
{
    (void)state;
    ipmpi_limits_t lim;
    ipmpi_limits_default(&lim);
    uint8_t buf[IPMPI_HDR_SIZE];
    ipmpi_hdr_t h = sample_hdr(0), d;
    assert_int_equal(ipmpi_hdr_encode(&h, NULL, buf, sizeof buf), IPMPI_HDR_SIZE);
    for (int v = 0; v < 256; v++) {
        if (v == IPMPI_PROTO_VERSION)
            continue;
        buf[4] = (uint8_t)v;
        assert_int_equal(ipmpi_hdr_decode(buf, sizeof buf, &lim, &d), IPMPI_EPROTO);
    }
}

static void test_decoder_rejects_kind_zero_and_past_max(void **state)
{
    (void)state;
    ipmpi_limits_t lim;
    ipmpi_limits_default(&lim);
    uint8_t buf[IPMPI_HDR_SIZE];
    ipmpi_hdr_t h = sample_hdr(0), d;
    assert_int_equal(ipmpi_hdr_encode(&h, NULL, buf, sizeof buf), IPMPI_HDR_SIZE);
    buf[5] = 0;
    assert_int_equal(ipmpi_hdr_decode(buf, sizeof buf, &lim, &d), IPMPI_EPROTO);
    for (int k = IPMPI_K_MAX_; k < 256; k++) {
        buf[5] = (uint8_t)k;
        assert_int_equal(ipmpi_hdr_decode(buf, sizeof buf, &lim, &d), IPMPI_EPROTO);
    }
    /* The first and last real kinds pass. */
    buf[5] = IPMPI_K_HELLO;
    assert_int_equal(ipmpi_hdr_decode(buf, sizeof buf, &lim, &d), IPMPI_HDR_SIZE);
    buf[5] = IPMPI_K_MAX_ - 1;
    assert_int_equal(ipmpi_hdr_decode(buf, sizeof buf, &lim, &d), IPMPI_HDR_SIZE);
}

static void test_decoder_rejects_nparts_over_limit(void **state)
{
    (void)state;
    ipmpi_limits_t lim;
    ipmpi_limits_default(&lim);
    uint8_t buf[IPMPI_HDR_SIZE];
    ipmpi_hdr_t h = sample_hdr(0), d;
    assert_int_equal(ipmpi_hdr_encode(&h, NULL, buf, sizeof buf), IPMPI_HDR_SIZE);

    ipmpi_put_u32(buf + 28, lim.max_parts);
    assert_int_equal(ipmpi_hdr_decode(buf, sizeof buf, &lim, &d), IPMPI_HDR_SIZE);
    assert_int_equal(d.nparts, lim.max_parts);
    ipmpi_put_u32(buf + 28, lim.max_parts + 1);
    assert_int_equal(ipmpi_hdr_decode(buf, sizeof buf, &lim, &d), IPMPI_E2BIG);
    ipmpi_put_u32(buf + 28, UINT32_MAX);
    assert_int_equal(ipmpi_hdr_decode(buf, sizeof buf, &lim, &d), IPMPI_E2BIG);

    /* A runtime limit above the hard bound does not lift the hard bound. */
    lim.max_parts = UINT32_MAX;
    ipmpi_put_u32(buf + 28, IPMPI_MAX_PARTS);
    assert_int_equal(ipmpi_hdr_decode(buf, sizeof buf, &lim, &d), IPMPI_HDR_SIZE);
    ipmpi_put_u32(buf + 28, IPMPI_MAX_PARTS + 1);
    assert_int_equal(ipmpi_hdr_decode(buf, sizeof buf, &lim, &d), IPMPI_E2BIG);
}

static void put_lens(uint8_t *p, const uint64_t *lens, size_t n)
{
    for (size_t i = 0; i < n; i++)
        ipmpi_put_u64(p + 8 * i, lens[i]);
}

static void test_lens_decoder_rejects_part_over_max_part(void **state)
{
    (void)state;
    ipmpi_limits_t lim = {16, 1000, 1000000};
    uint64_t lens[3] = {1000, 1001, 1};
    uint8_t buf[24];
    uint64_t got[3], total;
    put_lens(buf, lens, 3);
    assert_int_equal(ipmpi_lens_decode(buf, sizeof buf, 1, &lim, got, &total), 8);
    assert_int_equal(ipmpi_lens_decode(buf, sizeof buf, 3, &lim, got, &total), IPMPI_E2BIG);
}

static void test_lens_decoder_rejects_sum_over_max_frame(void **state)
{
    (void)state;
    ipmpi_limits_t lim = {16, 1000, 2500};
    uint64_t lens[3] = {1000, 1000, 500};
    uint8_t buf[24];
    uint64_t got[3], total = 0;
    put_lens(buf, lens, 3);
    /* Exactly max_frame is allowed ... */
    assert_int_equal(ipmpi_lens_decode(buf, sizeof buf, 3, &lim, got, &total), 24);
    assert_true(total == 2500);
    /* ... one byte more is not. */
    lens[2] = 501;
    put_lens(buf, lens, 3);
    assert_int_equal(ipmpi_lens_decode(buf, sizeof buf, 3, &lim, got, &total), IPMPI_E2BIG);
}

static void test_lens_decoder_rejects_sum_that_overflows_u64(void **state)
{
    (void)state;
    /* With no limits at all, only wrap-around can make the sum look small. */
    ipmpi_limits_t lim = {16, UINT64_MAX, UINT64_MAX};
    const uint64_t cases[][3] = {
        {UINT64_C(1) << 63, UINT64_C(1) << 63, 0},
        {UINT64_MAX, 1, 0},
        {UINT64_MAX - 1, 1, 1},
        {UINT64_MAX / 2 + 1, UINT64_MAX / 2 + 1, 5},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        uint8_t buf[24];
        uint64_t got[3], total;
        put_lens(buf, cases[c], 3);
        assert_int_equal(ipmpi_lens_decode(buf, sizeof buf, 3, &lim, got, &total), IPMPI_E2BIG);
    }
    /* The largest sum that does fit is accepted. */
    const uint64_t fits[3] = {UINT64_MAX - 1, 1, 0};
    uint8_t buf[24];
    uint64_t got[3], total;
    put_lens(buf, fits, 3);
    assert_int_equal(ipmpi_lens_decode(buf, sizeof buf, 3, &lim, got, &total), 24);
    assert_true(total == UINT64_MAX);
}

static void test_lens_decoder_accepts_zero_parts(void **state)
{
    (void)state;
    ipmpi_limits_t lim;
    ipmpi_limits_default(&lim);
    uint64_t total = 99;
    assert_int_equal(ipmpi_lens_decode(NULL, 0, 0, &lim, NULL, &total), 0);
    /* nparts 0 is "done, 0 bytes consumed": total must be 0 then. */
    assert_true(total == 0);
}

static void test_failed_decode_leaves_out_params_untouched(void **state)
{
    (void)state;
    ipmpi_limits_t lim = {8, 100, 150};
    uint8_t buf[IPMPI_HDR_SIZE + 3 * 8];
    uint64_t lens[3] = {100, 40, 20}; /* 160 > max_frame */
    ipmpi_hdr_t h = sample_hdr(3);
    assert_int_equal(ipmpi_hdr_encode(&h, lens, buf, sizeof buf), (long)sizeof buf);

    ipmpi_hdr_t d, sentinel;
    memset(&sentinel, 0xa5, sizeof sentinel);

    /* need more, bad magic, bad version, bad kind, too many parts */
    d = sentinel;
    assert_int_equal(ipmpi_hdr_decode(buf, IPMPI_HDR_SIZE - 1, &lim, &d), 0);
    assert_memory_equal(&d, &sentinel, sizeof d);
    const size_t offs[] = {0, 4, 5, 28};
    const uint8_t vals[] = {0x00, 0x09, 0x00, 0xff};
    for (size_t i = 0; i < 4; i++) {
        uint8_t save = buf[offs[i]];
        buf[offs[i]] = vals[i];
        d = sentinel;
        assert_true(ipmpi_hdr_decode(buf, sizeof buf, &lim, &d) < 0);
        assert_memory_equal(&d, &sentinel, sizeof d);
        buf[offs[i]] = save;
    }

    /* lens: need more, part too big (second part ok, first too big), sum too big */
    uint64_t got[3], total;
    uint64_t got_s[3] = {7, 7, 7}, total_s = 7;
    memcpy(got, got_s, sizeof got);
    total = total_s;
    assert_int_equal(ipmpi_lens_decode(buf + IPMPI_HDR_SIZE, 23, 3, &lim, got, &total), 0);
    assert_memory_equal(got, got_s, sizeof got);
    assert_true(total == total_s);
    /* The sum check fails only at the third part, after two were read. */
    assert_int_equal(ipmpi_lens_decode(buf + IPMPI_HDR_SIZE, 24, 3, &lim, got, &total), IPMPI_E2BIG);
    assert_memory_equal(got, got_s, sizeof got);
    assert_true(total == total_s);
    ipmpi_put_u64(buf + IPMPI_HDR_SIZE + 8, 101);
    assert_int_equal(ipmpi_lens_decode(buf + IPMPI_HDR_SIZE, 24, 3, &lim, got, &total), IPMPI_E2BIG);
    assert_memory_equal(got, got_s, sizeof got);
    assert_true(total == total_s);
}

/* xorshift64*: fixed seed, so a failure reproduces exactly. */
static uint64_t rng_next(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * UINT64_C(2685821657736338717);
}

static void test_random_bytes_never_crash_or_decode_without_magic(void **state)
{
    (void)state;
    ipmpi_limits_t lim = {64, 1 << 20, 1 << 22};
    uint64_t seed = UINT64_C(0x9e3779b97f4a7c15);
    static uint64_t lens[64];
    for (int iter = 0; iter < 100000; iter++) {
        size_t n = (size_t)(rng_next(&seed) % (IPMPI_HDR_SIZE + 64 * 8 + 16));
        uint8_t *p = malloc(n ? n : 1);
        assert_non_null(p);
        for (size_t i = 0; i < n; i++)
            p[i] = (uint8_t)rng_next(&seed);
        /* Half of the inputs get a valid magic and version, so the checks
         * behind them (kind, nparts, lengths) see random data too. */
        int planted = (iter & 1) && n >= 5;
        if (planted) {
            ipmpi_put_u32(p, IPMPI_MAGIC);
            p[4] = IPMPI_PROTO_VERSION;
            if (n > 28)
                p[28] = (uint8_t)(p[28] & 0x7f); /* small nparts, often in range */
            if (n > 31)
                p[29] = p[30] = p[31] = 0;
        } else if (n >= 4 && ipmpi_get_u32(p) == IPMPI_MAGIC) {
            p[0] ^= 1; /* "without the magic" must really lack it */
        }
        ipmpi_hdr_t d;
        long r = ipmpi_hdr_decode(p, n, &lim, &d);
        if (n < IPMPI_HDR_SIZE) {
            assert_int_equal(r, 0);
        } else if (!planted) {
            assert_int_equal(r, IPMPI_EPROTO);
        } else {
            assert_true(r == IPMPI_HDR_SIZE || r == IPMPI_EPROTO || r == IPMPI_E2BIG);
        }
        if (r == IPMPI_HDR_SIZE) {
            assert_true(d.kind > 0 && d.kind < IPMPI_K_MAX_);
            assert_true(d.nparts <= lim.max_parts);
            uint64_t total = 0;
            long lr = ipmpi_lens_decode(p + IPMPI_HDR_SIZE, n - IPMPI_HDR_SIZE, d.nparts, &lim, lens,
                                        &total);
            assert_true(lr == 0 || lr == (long)d.nparts * 8 || lr == IPMPI_E2BIG);
            if (lr > 0 || (lr == 0 && d.nparts == 0 && n >= IPMPI_HDR_SIZE)) {
                uint64_t sum = 0;
                for (uint32_t i = 0; i < d.nparts; i++) {
                    assert_true(lens[i] <= lim.max_part);
                    sum += lens[i];
                }
                assert_true(sum == total && total <= lim.max_frame);
            }
        }
        free(p);
    }
}

/* ---- shared-memory table (doc/protocol.md section 5) ---- */

/* Writes n entries with ipmpi_shmref_encode into a heap block of exactly
 * n * IPMPI_SHMREF_SIZE bytes (ASan bounds). */
static uint8_t *shm_table(const ipmpi_shmref_t *refs, size_t n)
{
    uint8_t *p = malloc(n ? n * IPMPI_SHMREF_SIZE : 1);
    assert_non_null(p);
    for (size_t i = 0; i < n; i++)
        ipmpi_shmref_encode(&refs[i], p + i * IPMPI_SHMREF_SIZE);
    return p;
}

/* Decodes refs (encoded) against nparts parts with wire lengths lens and
 * default limits, room for 8 entries. */
static long shm_decode(const ipmpi_shmref_t *refs, size_t n, uint32_t nparts, const uint64_t *lens)
{
    ipmpi_limits_t lim;
    ipmpi_limits_default(&lim);
    ipmpi_shmref_t out[8];
    uint8_t *tab = shm_table(refs, n);
    long r = ipmpi_shmref_decode(tab, (uint64_t)n * IPMPI_SHMREF_SIZE, nparts, lens, 0, &lim, out, 8);
    free(tab);
    return r;
}

static void test_shmref_encoder_writes_little_endian_layout(void **state)
{
    (void)state;
    ipmpi_shmref_t r = {.part = 0x04030201u,
                        .fd = 0x88776655u,
                        .off = UINT64_C(0x100f0e0d0c0b0a09),
                        .len = UINT64_C(0x1817161514131211)};
    uint8_t buf[IPMPI_SHMREF_SIZE + 1];
    memset(buf, 0xee, sizeof buf);
    ipmpi_shmref_encode(&r, buf);
    const uint8_t want[IPMPI_SHMREF_SIZE] = {
        0x01, 0x02, 0x03, 0x04,                         /* u32 part */
        0x55, 0x66, 0x77, 0x88,                         /* u32 fd */
        0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f, 0x10, /* u64 offset */
        0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, /* u64 length */
        0, 0, 0, 0, 0, 0, 0, 0,                         /* u64 reserved */
    };
    assert_int_equal(IPMPI_SHMREF_SIZE, 32);
    assert_memory_equal(buf, want, sizeof want);
    /* Exactly 32 bytes: the byte after the entry is untouched. */
    assert_int_equal(buf[IPMPI_SHMREF_SIZE], 0xee);
}

static void test_shmref_round_trip_of_several_entries(void **state)
{
    (void)state;
    ipmpi_limits_t lim;
    ipmpi_limits_default(&lim);
    /* Parts 1, 3 and 4 of 5 by shared memory; 0 and 2 on the wire. */
    uint64_t lens[5] = {10, 0, 20, 0, 0};
    const ipmpi_shmref_t refs[3] = {
        {.part = 1, .fd = 7, .off = 0, .len = 1},
        {.part = 3, .fd = IPMPI_SHM_VM | 12, .off = UINT64_C(0x7fff12345000), .len = (uint64_t)1 << 20},
        {.part = 4, .fd = 0, .off = UINT64_MAX - 5, .len = 5},
    };
    uint8_t *tab = shm_table(refs, 3);
    ipmpi_shmref_t out[4];
    memset(out, 0x5a, sizeof out);
    assert_int_equal(ipmpi_shmref_decode(tab, 3 * IPMPI_SHMREF_SIZE, 5, lens, 30, &lim, out, 4), 3);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(out[i].part, refs[i].part);
        assert_int_equal(out[i].fd, refs[i].fd);
        assert_true(out[i].off == refs[i].off);
        assert_true(out[i].len == refs[i].len);
    }
    /* Room for 4, only 3 entries: the fourth slot is not written. */
    assert_int_equal(out[3].part, 0x5a5a5a5au);
    free(tab);
}

static void test_shmref_decoder_accepts_process_memory_fd(void **state)
{
    (void)state;
    ipmpi_limits_t lim;
    ipmpi_limits_default(&lim);
    uint64_t lens[1] = {0};
    const uint32_t fds[] = {IPMPI_SHM_VM, IPMPI_SHM_VM | 3, UINT32_MAX};
    for (size_t i = 0; i < sizeof fds / sizeof fds[0]; i++) {
        ipmpi_shmref_t r = {.part = 0, .fd = fds[i], .off = 4096, .len = 64}, out;
        uint8_t *tab = shm_table(&r, 1);
        assert_int_equal(ipmpi_shmref_decode(tab, IPMPI_SHMREF_SIZE, 1, lens, 0, &lim, &out, 1), 1);
        assert_int_equal(out.fd, fds[i]);
        assert_true((out.fd & IPMPI_SHM_VM) != 0);
        free(tab);
    }
}

static void test_shmref_decoder_rejects_bad_table_size(void **state)
{
    (void)state;
    ipmpi_limits_t lim;
    ipmpi_limits_default(&lim);
    uint64_t lens[4] = {0, 0, 0, 0};
    const ipmpi_shmref_t refs[2] = {{.part = 0, .fd = 1, .off = 0, .len = 8},
                                    {.part = 1, .fd = 1, .off = 8, .len = 8}};
    uint8_t *tab = shm_table(refs, 2);
    ipmpi_shmref_t out[4];
    const uint64_t bad[] = {0, 1, 31, 33, 63, 32 + 16};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        assert_int_equal(ipmpi_shmref_decode(tab, bad[i], 4, lens, 0, &lim, out, 4), IPMPI_EPROTO);
    /* The well-sized prefixes of the same bytes pass. */
    assert_int_equal(ipmpi_shmref_decode(tab, 32, 4, lens, 0, &lim, out, 4), 1);
    assert_int_equal(ipmpi_shmref_decode(tab, 64, 4, lens, 0, &lim, out, 4), 2);
    free(tab);
}

static void test_shmref_decoder_rejects_more_entries_than_parts(void **state)
{
    (void)state;
    uint64_t lens[2] = {0, 0};
    const ipmpi_shmref_t refs[3] = {{.part = 0, .fd = 1, .off = 0, .len = 8},
                                    {.part = 1, .fd = 1, .off = 8, .len = 8},
                                    {.part = 2, .fd = 1, .off = 16, .len = 8}};
    assert_int_equal(shm_decode(refs, 2, 2, lens), 2);
    assert_int_equal(shm_decode(refs, 3, 2, lens), IPMPI_EPROTO);
    /* nparts 0: no entry at all may name a part. */
    assert_int_equal(shm_decode(refs, 1, 0, lens), IPMPI_EPROTO);
    /* A caller sizes out for nparts entries: a table with more is a bad
     * frame (EPROTO), not the caller's too-small buffer (EINVAL). */
    ipmpi_limits_t lim;
    ipmpi_limits_default(&lim);
    ipmpi_shmref_t out[2];
    uint8_t *tab = shm_table(refs, 3);
    assert_int_equal(ipmpi_shmref_decode(tab, 3 * IPMPI_SHMREF_SIZE, 2, lens, 0, &lim, out, 2), IPMPI_EPROTO);
    free(tab);
}

static void test_shmref_decoder_rejects_index_out_of_range(void **state)
{
    (void)state;
    /* One length more than nparts, also 0: only the range check can
     * reject part 3 (and no read past the lengths is needed to do so). */
    uint64_t lens[4] = {0, 0, 0, 0};
    ipmpi_shmref_t refs[2] = {{.part = 0, .fd = 1, .off = 0, .len = 8},
                              {.part = 2, .fd = 1, .off = 8, .len = 8}};
    assert_int_equal(shm_decode(refs, 2, 3, lens), 2);
    refs[1].part = 3; /* == nparts */
    assert_int_equal(shm_decode(refs, 2, 3, lens), IPMPI_EPROTO);
    refs[1].part = UINT32_MAX;
    assert_int_equal(shm_decode(refs, 2, 3, lens), IPMPI_EPROTO);
    refs[0].part = 3; /* the first entry too */
    assert_int_equal(shm_decode(refs, 1, 3, lens), IPMPI_EPROTO);
}

static void test_shmref_decoder_rejects_unordered_and_duplicate_indices(void **state)
{
    (void)state;
    uint64_t lens[4] = {0, 0, 0, 0};
    ipmpi_shmref_t refs[3] = {{.part = 0, .fd = 1, .off = 0, .len = 8},
                              {.part = 2, .fd = 1, .off = 8, .len = 8},
                              {.part = 3, .fd = 1, .off = 16, .len = 8}};
    assert_int_equal(shm_decode(refs, 3, 4, lens), 3);
    /* descending */
    refs[1].part = 3;
    refs[2].part = 2;
    assert_int_equal(shm_decode(refs, 3, 4, lens), IPMPI_EPROTO);
    /* duplicate, adjacent */
    refs[1].part = 2;
    refs[2].part = 2;
    assert_int_equal(shm_decode(refs, 3, 4, lens), IPMPI_EPROTO);
    /* duplicate of the first */
    refs[0].part = 1;
    refs[1].part = 1;
    assert_int_equal(shm_decode(refs, 2, 4, lens), IPMPI_EPROTO);
}

static void test_shmref_decoder_rejects_named_part_with_wire_bytes(void **state)
{
    (void)state;
    uint64_t lens[3] = {0, 1, 0};
    ipmpi_shmref_t refs[2] = {{.part = 0, .fd = 1, .off = 0, .len = 8},
                              {.part = 2, .fd = 1, .off = 8, .len = 8}};
    assert_int_equal(shm_decode(refs, 2, 3, lens), 2);
    refs[1].part = 1; /* 1 wire byte */
    assert_int_equal(shm_decode(refs, 2, 3, lens), IPMPI_EPROTO);
    lens[1] = 0;
    assert_int_equal(shm_decode(refs, 2, 3, lens), 2);
    lens[0] = UINT64_MAX;
    assert_int_equal(shm_decode(refs, 2, 3, lens), IPMPI_EPROTO);
}

static void test_shmref_decoder_rejects_nonzero_reserved(void **state)
{
    (void)state;
    ipmpi_limits_t lim;
    ipmpi_limits_default(&lim);
    uint64_t lens[2] = {0, 0};
    const ipmpi_shmref_t refs[2] = {{.part = 0, .fd = 1, .off = 0, .len = 8},
                                    {.part = 1, .fd = 1, .off = 8, .len = 8}};
    uint8_t *tab = shm_table(refs, 2);
    ipmpi_shmref_t out[2];
    /* Each byte of the reserved field of each entry, alone. */
    for (size_t e = 0; e < 2; e++) {
        for (size_t b = 24; b < 32; b++) {
            uint8_t *p = tab + e * IPMPI_SHMREF_SIZE + b;
            *p = 0x01;
            assert_int_equal(ipmpi_shmref_decode(tab, 64, 2, lens, 0, &lim, out, 2), IPMPI_EPROTO);
            *p = 0x80;
            assert_int_equal(ipmpi_shmref_decode(tab, 64, 2, lens, 0, &lim, out, 2), IPMPI_EPROTO);
            *p = 0;
        }
    }
    assert_int_equal(ipmpi_shmref_decode(tab, 64, 2, lens, 0, &lim, out, 2), 2);
    free(tab);
}

static void test_shmref_decoder_rejects_zero_length(void **state)
{
    (void)state;
    uint64_t lens[2] = {0, 0};
    ipmpi_shmref_t refs[2] = {{.part = 0, .fd = 1, .off = 0, .len = 1},
                              {.part = 1, .fd = 1, .off = 8, .len = 1}};
    assert_int_equal(shm_decode(refs, 2, 2, lens), 2);
    refs[1].len = 0;
    assert_int_equal(shm_decode(refs, 2, 2, lens), IPMPI_EPROTO);
    refs[1].len = 1;
    refs[0].len = 0;
    assert_int_equal(shm_decode(refs, 2, 2, lens), IPMPI_EPROTO);
}

static void test_shmref_decoder_rejects_offset_plus_length_overflow(void **state)
{
    (void)state;
    ipmpi_limits_t lim = {16, UINT64_MAX, UINT64_MAX};
    uint64_t lens[1] = {0};
    ipmpi_shmref_t out;
    const struct {
        uint64_t off, len;
        long want;
    } cases[] = {
        {UINT64_MAX, 1, IPMPI_EPROTO},
        {UINT64_MAX - 10, 10, 1}, /* off + len == UINT64_MAX: fits */
        {UINT64_MAX - 10, 11, IPMPI_EPROTO},
        {UINT64_MAX - 9, 10, IPMPI_EPROTO}, /* off + len == 2^64 */
        {1, UINT64_MAX, IPMPI_EPROTO},
        {0, UINT64_MAX, 1},
        {UINT64_C(1) << 63, UINT64_C(1) << 63, IPMPI_EPROTO},
        {(UINT64_C(1) << 63) - 1, UINT64_C(1) << 63, 1},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        ipmpi_shmref_t r = {.part = 0, .fd = 3, .off = cases[c].off, .len = cases[c].len};
        uint8_t *tab = shm_table(&r, 1);
        assert_int_equal(ipmpi_shmref_decode(tab, IPMPI_SHMREF_SIZE, 1, lens, 0, &lim, &out, 1), cases[c].want);
        free(tab);
    }
}

static void test_shmref_decoder_rejects_part_over_max_part(void **state)
{
    (void)state;
    ipmpi_limits_t lim = {16, 1000, 1000000};
    uint64_t lens[2] = {0, 0};
    ipmpi_shmref_t refs[2] = {{.part = 0, .fd = 1, .off = 0, .len = 1000},
                              {.part = 1, .fd = 1, .off = 0, .len = 1000}};
    uint8_t *tab = shm_table(refs, 2);
    ipmpi_shmref_t out[2];
    /* Exactly max_part is allowed ... */
    assert_int_equal(ipmpi_shmref_decode(tab, 64, 2, lens, 0, &lim, out, 2), 2);
    free(tab);
    /* ... one byte more is not, in either entry. */
    for (int e = 0; e < 2; e++) {
        refs[e].len = 1001;
        tab = shm_table(refs, 2);
        assert_int_equal(ipmpi_shmref_decode(tab, 64, 2, lens, 0, &lim, out, 2), IPMPI_E2BIG);
        free(tab);
        refs[e].len = 1000;
    }
    refs[1].len = UINT64_MAX;
    tab = shm_table(refs, 2);
    assert_int_equal(ipmpi_shmref_decode(tab, 64, 2, lens, 0, &lim, out, 2), IPMPI_E2BIG);
    free(tab);
}

static void test_shmref_decoder_rejects_sum_over_max_frame(void **state)
{
    (void)state;
    ipmpi_limits_t lim = {16, 1000, 2500};
    /* Part 0 has 300 wire bytes; parts 1 and 2 by shared memory. */
    uint64_t lens[3] = {300, 0, 0};
    ipmpi_shmref_t refs[2] = {{.part = 1, .fd = 1, .off = 0, .len = 1000},
                              {.part = 2, .fd = 1, .off = 0, .len = 1000}};
    uint8_t *tab = shm_table(refs, 2);
    ipmpi_shmref_t out[2];
    /* 300 + 2000 = 2300 and 500 + 2000 = 2500 fit ... */
    assert_int_equal(ipmpi_shmref_decode(tab, 64, 3, lens, 300, &lim, out, 2), 2);
    assert_int_equal(ipmpi_shmref_decode(tab, 64, 3, lens, 500, &lim, out, 2), 2);
    /* ... one wire byte more does not. */
    assert_int_equal(ipmpi_shmref_decode(tab, 64, 3, lens, 501, &lim, out, 2), IPMPI_E2BIG);
    /* The named lengths alone, over the frame limit with no wire bytes. */
    lim.max_frame = 1999;
    assert_int_equal(ipmpi_shmref_decode(tab, 64, 3, lens, 0, &lim, out, 2), IPMPI_E2BIG);
    lim.max_frame = 2000;
    assert_int_equal(ipmpi_shmref_decode(tab, 64, 3, lens, 0, &lim, out, 2), 2);
    /* One part within max_part but over max_frame alone (max_frame - len
     * must not wrap around). */
    lim.max_frame = 999;
    assert_int_equal(ipmpi_shmref_decode(tab, 32, 3, lens, 0, &lim, out, 2), IPMPI_E2BIG);
    free(tab);
    /* Sums that would wrap around u64 are caught too. */
    ipmpi_limits_t nolim = {16, UINT64_MAX, UINT64_MAX};
    refs[0].len = UINT64_MAX / 2 + 1;
    refs[1].len = UINT64_MAX / 2 + 1;
    tab = shm_table(refs, 2);
    assert_int_equal(ipmpi_shmref_decode(tab, 64, 3, lens, 0, &nolim, out, 2), IPMPI_E2BIG);
    assert_int_equal(ipmpi_shmref_decode(tab, 32, 3, lens, UINT64_MAX / 2, &nolim, out, 2), 1);
    assert_int_equal(ipmpi_shmref_decode(tab, 32, 3, lens, UINT64_MAX / 2 + 1, &nolim, out, 2), IPMPI_E2BIG);
    free(tab);
}

static void test_shmref_decoder_refuses_too_small_out(void **state)
{
    (void)state;
    ipmpi_limits_t lim;
    ipmpi_limits_default(&lim);
    uint64_t lens[3] = {0, 0, 0};
    const ipmpi_shmref_t refs[3] = {{.part = 0, .fd = 1, .off = 0, .len = 8},
                                    {.part = 1, .fd = 1, .off = 8, .len = 8},
                                    {.part = 2, .fd = 1, .off = 16, .len = 8}};
    uint8_t *tab = shm_table(refs, 3);
    ipmpi_shmref_t out[3];
    for (uint32_t cap = 0; cap < 3; cap++)
        assert_int_equal(ipmpi_shmref_decode(tab, 96, 3, lens, 0, &lim, out, cap), IPMPI_EINVAL);
    assert_int_equal(ipmpi_shmref_decode(tab, 96, 3, lens, 0, &lim, out, 3), 3);
    assert_int_equal(out[2].part, 2);
    assert_true(out[2].off == 16);
    free(tab);
}

/* ---- task descriptors ---- */

static size_t make_desc(uint8_t *d, uint64_t id, uint32_t nst, const uint32_t *np, const uint32_t *rt)
{
    ipmpi_put_u64(d, id);
    ipmpi_put_u32(d + 8, nst);
    ipmpi_put_u32(d + 12, 0);
    for (uint32_t i = 0; i < nst; i++) {
        ipmpi_put_u32(d + 16 + 8 * i, np[i]);
        ipmpi_put_u32(d + 20 + 8 * i, rt[i]);
    }
    return 16 + 8 * (size_t)nst;
}

static void test_taskdesc_decodes_stages_and_id(void **state)
{
    (void)state;
    uint8_t d[16 + 8 * 16];
    uint32_t np[2] = {3, 1}, rt[2] = {2, 0};
    size_t len = make_desc(d, 0x0102030405060708ull, 2, np, rt);
    ipmpi_taskdesc_t t;
    assert_int_equal(ipmpi_taskdesc_decode(d, len, 5, &t), 0);
    assert_true(t.id == 0x0102030405060708ull);
    assert_int_equal(t.nstages, 2);
    assert_int_equal(t.nparts[0], 3);
    assert_int_equal(t.nparts[1], 1);
    assert_int_equal(t.retries[0], 2);
}

static void test_taskdesc_rejects_bad_layouts_and_writes_nothing(void **state)
{
    (void)state;
    uint8_t d[16 + 8 * 17];
    uint32_t np[17], rt[17];
    for (int i = 0; i < 17; i++)
        np[i] = 1, rt[i] = 0;
    ipmpi_taskdesc_t t, before;
    memset(&t, 0x5a, sizeof t);
    before = t;
    size_t len = make_desc(d, 1, 1, np, rt);
    assert_int_equal(ipmpi_taskdesc_decode(d, len, 3, &t), IPMPI_EPROTO);       /* parts do not add up */
    assert_int_equal(ipmpi_taskdesc_decode(d, len - 1, 2, &t), IPMPI_EPROTO);   /* truncated */
    assert_int_equal(ipmpi_taskdesc_decode(d, 15, 2, &t), IPMPI_EPROTO);        /* shorter than the header */
    len = make_desc(d, 1, 0, np, rt);
    assert_int_equal(ipmpi_taskdesc_decode(d, len, 2, &t), IPMPI_EPROTO);       /* no stage */
    len = make_desc(d, 1, 17, np, rt);
    assert_int_equal(ipmpi_taskdesc_decode(d, len, 18, &t), IPMPI_EPROTO);      /* too many stages */
    len = make_desc(d, 1, 1, np, rt);
    d[12] = 1;
    assert_int_equal(ipmpi_taskdesc_decode(d, len, 2, &t), IPMPI_EPROTO);       /* reserved word */
    assert_memory_equal(&t, &before, sizeof t);
}

static void test_taskdesc_rejects_empty_stages_and_too_many_retries(void **state)
{
    (void)state;
    uint8_t d[32];
    uint32_t np[2] = {1, 0}, rt[2] = {0, 0};
    ipmpi_taskdesc_t t;
    size_t len = make_desc(d, 9, 2, np, rt);
    assert_int_equal(ipmpi_taskdesc_decode(d, len, 2, &t), IPMPI_EINVAL);
    np[1] = 1;
    rt[1] = IPMPI_TASK_RETRIES_MAX + 1;
    len = make_desc(d, 9, 2, np, rt);
    assert_int_equal(ipmpi_taskdesc_decode(d, len, 3, &t), IPMPI_EINVAL);
    rt[1] = IPMPI_TASK_RETRIES_MAX;
    len = make_desc(d, 9, 2, np, rt);
    assert_int_equal(ipmpi_taskdesc_decode(d, len, 3, &t), 0);
}

static void test_taskdesc_every_truncation_is_refused(void **state)
{
    (void)state;
    uint8_t d[16 + 8 * 3];
    uint32_t np[3] = {1, 2, 1}, rt[3] = {0, 1, 2};
    size_t len = make_desc(d, 77, 3, np, rt);
    ipmpi_taskdesc_t t;
    for (size_t n = 0; n < len; n++)
        assert_int_equal(ipmpi_taskdesc_decode(d, n, 5, &t), IPMPI_EPROTO);
    assert_int_equal(ipmpi_taskdesc_decode(d, len, 5, &t), 0);
}

/* Appends one reply frame (header, lengths, parts) to buf at *at. */
static void put_inner(uint8_t *buf, size_t *at, int32_t target, uint16_t flags, uint32_t nparts,
                      const uint64_t *lens, uint8_t fill)
{
    ipmpi_hdr_t h = {.kind = IPMPI_K_EXECUTE, .flags = flags, .req_id = 77, .target = target, .nparts = nparts};
    long n = ipmpi_hdr_encode(&h, lens, buf + *at, ipmpi_hdr_wire_size(nparts));
    assert_true(n > 0);
    *at += (size_t)n;
    for (uint32_t i = 0; i < nparts; i++) {
        memset(buf + *at, fill, (size_t)lens[i]);
        *at += (size_t)lens[i];
    }
}

static void test_gather_next_walks_every_inner_reply(void **state)
{
    (void)state;
    ipmpi_limits_t lim;
    ipmpi_limits_default(&lim);
    uint8_t buf[512];
    size_t len = 0;
    const uint64_t two[2] = {3, 0}, one[1] = {17};
    put_inner(buf, &len, 0, IPMPI_F_REPLY, 2, two, 'a');
    put_inner(buf, &len, 5, IPMPI_F_REPLY | IPMPI_F_PROPS, 1, one, 'b');
    put_inner(buf, &len, 2, IPMPI_F_REPLY, 0, NULL, 0);
    const uint8_t *p = buf;
    size_t left = len;
    int32_t targets[3];
    ipmpi_hdr_t h;
    long n;
    int k = 0;
    while ((n = ipmpi_gather_next(p, left, &lim, &h)) > 0) {
        assert_true(k < 3);
        targets[k] = h.target;
        if (k == 1) {
            assert_int_equal(h.nparts, 1);
            assert_true(h.flags & IPMPI_F_PROPS);
            assert_true(ipmpi_get_u64(p + IPMPI_HDR_SIZE) == 17);
            assert_int_equal(p[ipmpi_hdr_wire_size(1)], 'b');
        }
        k++;
        p += n;
        left -= (size_t)n;
    }
    assert_int_equal(n, 0);
    assert_int_equal(k, 3);
    assert_int_equal(targets[0], 0);
    assert_int_equal(targets[1], 5);
    assert_int_equal(targets[2], 2);
    assert_int_equal(ipmpi_gather_next(buf, 0, &lim, &h), 0);
}

static void test_gather_next_refuses_what_is_not_one_whole_final_reply(void **state)
{
    (void)state;
    ipmpi_limits_t lim;
    ipmpi_limits_default(&lim);
    uint8_t buf[256];
    const uint64_t one[1] = {40};
    size_t len = 0;
    put_inner(buf, &len, 1, IPMPI_F_REPLY, 1, one, 'x');
    ipmpi_hdr_t h;
    assert_int_equal(ipmpi_gather_next(buf, len, &lim, &h), (long)len);
    /* Every truncation: a header, its lengths or its parts cut short. */
    for (size_t cut = 1; cut < len; cut++)
        assert_int_equal(ipmpi_gather_next(buf, cut, &lim, &h), IPMPI_EPROTO);
    /* Not a final reply of one engine. */
    const uint16_t bad[] = {0, IPMPI_F_REPLY | IPMPI_F_MORE, IPMPI_F_REPLY | IPMPI_F_SHM,
                            IPMPI_F_REPLY | IPMPI_F_GATHER, IPMPI_F_REPLY | IPMPI_F_PACKED};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        len = 0;
        put_inner(buf, &len, 1, bad[i], 1, one, 'x');
        assert_int_equal(ipmpi_gather_next(buf, len, &lim, &h), IPMPI_EPROTO);
    }
    /* A part over the limits, and a bad magic. */
    ipmpi_limits_t small = {16, 39, 1000};
    len = 0;
    put_inner(buf, &len, 1, IPMPI_F_REPLY, 1, one, 'x');
    assert_int_equal(ipmpi_gather_next(buf, len, &small, &h), IPMPI_E2BIG);
    buf[0] ^= 1;
    assert_int_equal(ipmpi_gather_next(buf, len, &lim, &h), IPMPI_EPROTO);
    /* Lengths that claim more than the gathered part holds. */
    buf[0] ^= 1;
    ipmpi_put_u64(buf + IPMPI_HDR_SIZE, 41);
    assert_int_equal(ipmpi_gather_next(buf, len, &lim, &h), IPMPI_EPROTO);
}

/* Appends a run (IPMPI_F_SAME) of count engines from target. */
static void put_run(uint8_t *buf, size_t *at, int32_t target, uint64_t count)
{
    ipmpi_hdr_t h = {.kind = IPMPI_K_EXECUTE, .flags = IPMPI_F_REPLY | IPMPI_F_SAME, .req_id = 77, .target = target,
                     .aux = count};
    assert_int_equal(ipmpi_hdr_encode(&h, NULL, buf + *at, IPMPI_HDR_SIZE), IPMPI_HDR_SIZE);
    *at += IPMPI_HDR_SIZE;
}

/* Every reply of gathered part buf[0..len): targets, statuses and the
 * first byte of part 0 (0 without parts) into the arrays; returns how
 * many, or the iterator's error. */
static int each_reply(const uint8_t *buf, size_t len, int32_t *target, int32_t *status, uint8_t *first, int cap)
{
    ipmpi_limits_t lim;
    ipmpi_limits_default(&lim);
    ipmpi_gather_each_t it;
    ipmpi_gather_each_init(&it, buf, len, &lim);
    ipmpi_hdr_t h;
    const uint8_t *f;
    int rc, k = 0;
    while ((rc = ipmpi_gather_each_next(&it, &h, &f)) > 0) {
        assert_true(k < cap);
        target[k] = h.target;
        status[k] = h.status;
        first[k] = h.nparts && ipmpi_get_u64(f + IPMPI_HDR_SIZE) ? f[ipmpi_hdr_wire_size(h.nparts)] : 0;
        k++;
    }
    return rc < 0 ? rc : k;
}

/* A gathered part of 7 replies: engine 0 ('a'), a run of 1-3 repeating
 * it, engine 9 ('b'), a run of 4-5 repeating that. */
static size_t put_two_runs(uint8_t *buf)
{
    size_t len = 0;
    const uint64_t one[1] = {5};
    put_inner(buf, &len, 0, IPMPI_F_REPLY, 1, one, 'a');
    put_run(buf, &len, 1, 3);
    put_inner(buf, &len, 9, IPMPI_F_REPLY, 1, one, 'b');
    put_run(buf, &len, 4, 2);
    return len;
}

static void test_gather_each_expands_runs_to_the_frame_they_repeat(void **state)
{
    (void)state;
    uint8_t buf[512];
    size_t len = put_two_runs(buf);
    int32_t t[16], st[16];
    uint8_t first[16];
    assert_int_equal(each_reply(buf, len, t, st, first, 16), 7);
    const int32_t want_t[7] = {0, 1, 2, 3, 9, 4, 5};
    const char want_f[8] = "aaaabbb";
    for (int i = 0; i < 7; i++) {
        assert_int_equal(t[i], want_t[i]);
        assert_int_equal(first[i], (uint8_t)want_f[i]);
    }
}

static void test_gather_each_run_gives_whole_runs_and_the_rest_of_a_begun_one(void **state)
{
    (void)state;
    uint8_t buf[512];
    size_t len = put_two_runs(buf);
    ipmpi_limits_t lim;
    ipmpi_limits_default(&lim);
    ipmpi_gather_each_t it;
    ipmpi_gather_each_init(&it, buf, len, &lim);
    ipmpi_hdr_t h;
    const uint8_t *f, *fa;
    uint32_t n = 0;
    assert_int_equal(ipmpi_gather_each_run(&it, &h, &fa, &n), 1);
    assert_int_equal(h.target, 0);
    assert_int_equal(n, 1);
    assert_int_equal(fa[ipmpi_hdr_wire_size(1)], 'a');
    /* One engine of the run by each_next, the rest as a run. */
    assert_int_equal(ipmpi_gather_each_next(&it, &h, &f), 1);
    assert_int_equal(h.target, 1);
    assert_int_equal(ipmpi_gather_each_run(&it, &h, &f, &n), 1);
    assert_int_equal(h.target, 2);
    assert_int_equal(n, 2);
    assert_ptr_equal(f, fa);
    assert_int_equal(h.flags & IPMPI_F_SAME, 0); /* the header of the frame it repeats */
    assert_int_equal(ipmpi_gather_each_run(&it, &h, &f, &n), 1);
    assert_int_equal(h.target, 9);
    assert_int_equal(n, 1);
    assert_int_equal(ipmpi_gather_each_run(&it, &h, &f, &n), 1);
    assert_int_equal(h.target, 4);
    assert_int_equal(n, 2);
    assert_int_equal(f[ipmpi_hdr_wire_size(1)], 'b');
    assert_int_equal(ipmpi_gather_each_run(&it, &h, &f, &n), 0);
    /* A run with nothing to repeat: refused as by each_next. */
    len = 0;
    put_run(buf, &len, 1, 1);
    ipmpi_gather_each_init(&it, buf, len, &lim);
    assert_int_equal(ipmpi_gather_each_run(&it, &h, &f, &n), IPMPI_EPROTO);
}

static void test_gather_each_refuses_runs_that_repeat_nothing_or_overflow(void **state)
{
    (void)state;
    uint8_t buf[512];
    int32_t t[4], st[4];
    uint8_t first[4];
    const uint64_t one[1] = {5};
    size_t len = 0;
    put_run(buf, &len, 1, 1); /* nothing before it to repeat */
    assert_int_equal(each_reply(buf, len, t, st, first, 4), IPMPI_EPROTO);
    const uint64_t bad[] = {0, (uint64_t)IPMPI_GATHER_RUN_MAX + 1, (uint64_t)INT32_MAX};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        len = 0;
        put_inner(buf, &len, 0, IPMPI_F_REPLY, 1, one, 'a');
        put_run(buf, &len, 1, bad[i]);
        assert_int_equal(each_reply(buf, len, t, st, first, 4), IPMPI_EPROTO);
    }
    /* A whole frame may name any target, INT32_MAX too (the fuzzer's
     * find: the iterator's next target overflowed). */
    len = 0;
    put_inner(buf, &len, INT32_MAX, IPMPI_F_REPLY, 1, one, 'a');
    assert_int_equal(each_reply(buf, len, t, st, first, 4), 1);
    assert_int_equal(t[0], INT32_MAX);
    /* A run with parts of its own, and a whole frame with a count. */
    len = 0;
    put_inner(buf, &len, 0, IPMPI_F_REPLY, 1, one, 'a');
    put_inner(buf, &len, 1, IPMPI_F_REPLY | IPMPI_F_SAME, 1, one, 'a');
    assert_int_equal(each_reply(buf, len, t, st, first, 4), IPMPI_EPROTO);
    len = 0;
    put_inner(buf, &len, 0, IPMPI_F_REPLY, 1, one, 'a');
    ipmpi_put_u64(buf + 32, 2);
    assert_int_equal(each_reply(buf, len, t, st, first, 4), IPMPI_EPROTO);
}

static void test_gather_fold_makes_runs_of_agreeing_replies_and_keeps_every_reply(void **state)
{
    (void)state;
    ipmpi_limits_t lim;
    ipmpi_limits_default(&lim);
    uint8_t buf[2048];
    size_t len = 0;
    const uint64_t one[1] = {50};
    /* A relay's own reply, then two children's parts: the first already
     * folded (a whole frame and a run), the second not. Engine 7 differs;
     * engine 8 agrees with the others again. */
    put_inner(buf, &len, 0, IPMPI_F_REPLY, 1, one, 'a');
    put_inner(buf, &len, 1, IPMPI_F_REPLY, 1, one, 'a');
    put_run(buf, &len, 2, 3);
    put_inner(buf, &len, 5, IPMPI_F_REPLY, 1, one, 'a');
    put_inner(buf, &len, 6, IPMPI_F_REPLY, 1, one, 'a');
    put_inner(buf, &len, 7, IPMPI_F_REPLY, 1, one, 'z');
    put_inner(buf, &len, 8, IPMPI_F_REPLY, 1, one, 'a');
    int32_t t0[16], s0[16], t1[16], s1[16];
    uint8_t f0[16], f1[16];
    int k = each_reply(buf, len, t0, s0, f0, 16);
    assert_int_equal(k, 9);
    long n = ipmpi_gather_fold(buf, len, &lim);
    /* 0 whole, run 1..6, 7 whole, 8 whole (it repeats 7's predecessor, not 7). */
    assert_int_equal(n, (long)(3 * (ipmpi_hdr_wire_size(1) + 50) + IPMPI_HDR_SIZE));
    assert_int_equal(each_reply(buf, (size_t)n, t1, s1, f1, 16), k);
    for (int i = 0; i < k; i++) {
        assert_int_equal(t1[i], t0[i]);
        assert_int_equal(s1[i], s0[i]);
        assert_int_equal(f1[i], f0[i]);
    }
    /* Folding again changes nothing. */
    assert_int_equal(ipmpi_gather_fold(buf, (size_t)n, &lim), n);
}

static void test_gather_fold_keeps_replies_that_differ_in_status_or_flags_apart(void **state)
{
    (void)state;
    ipmpi_limits_t lim;
    ipmpi_limits_default(&lim);
    uint8_t buf[1024];
    size_t len = 0;
    const uint64_t one[1] = {8};
    put_inner(buf, &len, 0, IPMPI_F_REPLY, 1, one, 'a');
    put_inner(buf, &len, 1, IPMPI_F_REPLY | IPMPI_F_PROPS, 1, one, 'a');
    put_inner(buf, &len, 2, IPMPI_F_REPLY, 1, one, 'a');
    ipmpi_put_u32(buf + 2 * (ipmpi_hdr_wire_size(1) + 8) + 20, (uint32_t)IPMPI_EREMOTE); /* engine 2's status */
    put_inner(buf, &len, 3, IPMPI_F_REPLY, 0, NULL, 0);
    put_inner(buf, &len, 4, IPMPI_F_REPLY, 0, NULL, 0);
    long n = ipmpi_gather_fold(buf, len, &lim);
    /* Only 4 joins 3: as a run, whose 40 bytes are those of a frame
     * without parts. */
    assert_int_equal(n, (long)len);
    ipmpi_hdr_t h;
    assert_int_equal(ipmpi_hdr_decode(buf + len - IPMPI_HDR_SIZE, IPMPI_HDR_SIZE, &lim, &h), IPMPI_HDR_SIZE);
    assert_true(h.flags & IPMPI_F_SAME);
    assert_int_equal(h.aux, 1);
    assert_int_equal(h.target, 4);
    ipmpi_hdr_t h2;
    assert_int_equal(ipmpi_hdr_decode(buf + len - 2 * IPMPI_HDR_SIZE, IPMPI_HDR_SIZE, &lim, &h2), IPMPI_HDR_SIZE);
    assert_false(h2.flags & IPMPI_F_SAME);
    int32_t t[8], st[8];
    uint8_t f[8];
    assert_int_equal(each_reply(buf, (size_t)n, t, st, f, 8), 5);
    assert_int_equal(st[2], IPMPI_EREMOTE);
    assert_int_equal(st[1], 0);
    assert_int_equal(t[4], 4);
    /* Malformed: refused, the bytes left as they came. */
    uint8_t copy[1024];
    memcpy(copy, buf, (size_t)n);
    assert_int_equal(ipmpi_gather_fold(buf, (size_t)n - 1, &lim), IPMPI_EPROTO);
    assert_memory_equal(buf, copy, (size_t)n);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_header_round_trip_keeps_every_field),
        cmocka_unit_test(test_header_round_trip_extreme_values),
        cmocka_unit_test(test_encoder_writes_little_endian_layout),
        cmocka_unit_test(test_encoder_ignores_caller_version),
        cmocka_unit_test(test_encoder_refuses_too_small_buffer),
        cmocka_unit_test(test_encoder_refuses_nparts_over_hard_limit),
        cmocka_unit_test(test_decoder_needs_more_for_every_truncated_header),
        cmocka_unit_test(test_decoder_needs_more_for_every_truncated_length_table),
        cmocka_unit_test(test_decoder_rejects_bad_magic),
        cmocka_unit_test(test_decoder_rejects_bad_version),
        cmocka_unit_test(test_decoder_rejects_kind_zero_and_past_max),
        cmocka_unit_test(test_decoder_rejects_nparts_over_limit),
        cmocka_unit_test(test_lens_decoder_rejects_part_over_max_part),
        cmocka_unit_test(test_lens_decoder_rejects_sum_over_max_frame),
        cmocka_unit_test(test_lens_decoder_rejects_sum_that_overflows_u64),
        cmocka_unit_test(test_lens_decoder_accepts_zero_parts),
        cmocka_unit_test(test_failed_decode_leaves_out_params_untouched),
        cmocka_unit_test(test_random_bytes_never_crash_or_decode_without_magic),
        cmocka_unit_test(test_shmref_encoder_writes_little_endian_layout),
        cmocka_unit_test(test_shmref_round_trip_of_several_entries),
        cmocka_unit_test(test_shmref_decoder_accepts_process_memory_fd),
        cmocka_unit_test(test_shmref_decoder_rejects_bad_table_size),
        cmocka_unit_test(test_shmref_decoder_rejects_more_entries_than_parts),
        cmocka_unit_test(test_shmref_decoder_rejects_index_out_of_range),
        cmocka_unit_test(test_shmref_decoder_rejects_unordered_and_duplicate_indices),
        cmocka_unit_test(test_shmref_decoder_rejects_named_part_with_wire_bytes),
        cmocka_unit_test(test_shmref_decoder_rejects_nonzero_reserved),
        cmocka_unit_test(test_shmref_decoder_rejects_zero_length),
        cmocka_unit_test(test_shmref_decoder_rejects_offset_plus_length_overflow),
        cmocka_unit_test(test_shmref_decoder_rejects_part_over_max_part),
        cmocka_unit_test(test_shmref_decoder_rejects_sum_over_max_frame),
        cmocka_unit_test(test_shmref_decoder_refuses_too_small_out),
        cmocka_unit_test(test_taskdesc_decodes_stages_and_id),
        cmocka_unit_test(test_taskdesc_rejects_bad_layouts_and_writes_nothing),
        cmocka_unit_test(test_taskdesc_rejects_empty_stages_and_too_many_retries),
        cmocka_unit_test(test_taskdesc_every_truncation_is_refused),
        cmocka_unit_test(test_gather_next_walks_every_inner_reply),
        cmocka_unit_test(test_gather_next_refuses_what_is_not_one_whole_final_reply),
        cmocka_unit_test(test_gather_each_expands_runs_to_the_frame_they_repeat),
        cmocka_unit_test(test_gather_each_run_gives_whole_runs_and_the_rest_of_a_begun_one),
        cmocka_unit_test(test_gather_each_refuses_runs_that_repeat_nothing_or_overflow),
        cmocka_unit_test(test_gather_fold_makes_runs_of_agreeing_replies_and_keeps_every_reply),
        cmocka_unit_test(test_gather_fold_keeps_replies_that_differ_in_status_or_flags_apart),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
