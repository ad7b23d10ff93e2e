/*
 * Unit tests for capability URLs (src/common/furl.h): the accepted forms,
 * every way a URL may be malformed, every truncation, and the formatter's
 * refusals. Inputs are parsed from heap copies of their exact length (no
 * NUL), so under AddressSanitizer a read past the given length is caught.
 * Single-threaded test program.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "furl.h"
#include "ipmpi/errors.h"

#define FP "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
#define KEY "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210"
#define GOOD "ipmpi+tls://" FP "@node17.cluster:40123/" KEY

/* Parses len bytes of s from an exact-size heap copy. */
static int parse_n(const char *s, size_t len, ipmpi_furl_t *out)
{
    char *p = malloc(len ? len : 1);
    assert_non_null(p);
    memcpy(p, s, len);
    int r = ipmpi_furl_parse(p, len, out);
    free(p);
    return r;
}

static int parse(const char *s, ipmpi_furl_t *out)
{
    return parse_n(s, strlen(s), out);
}

/* Asserts s is rejected and the out-param was not written. */
static void assert_rejected(const char *s)
{
    ipmpi_furl_t f, sentinel;
    memset(&sentinel, 0x5a, sizeof sentinel);
    f = sentinel;
    int r = parse(s, &f);
    if (r != IPMPI_EINVAL)
        fail_msg("accepted or wrong error (%d) for: %s", r, s);
    assert_memory_equal(&f, &sentinel, sizeof f);
}

/* Field by field: bytes after each NUL are not part of the value. */
static void assert_furl_equal(const ipmpi_furl_t *a, const ipmpi_furl_t *b)
{
    assert_string_equal(a->fingerprint, b->fingerprint);
    assert_string_equal(a->host, b->host);
    assert_int_equal(a->port, b->port);
    assert_string_equal(a->key, b->key);
}

static void test_parse_accepts_valid_url_and_splits_fields(void **state)
{
    (void)state;
    ipmpi_furl_t f;
    assert_int_equal(parse(GOOD, &f), 0);
    assert_string_equal(f.fingerprint, FP);
    assert_string_equal(f.host, "node17.cluster");
    assert_int_equal(f.port, 40123);
    assert_string_equal(f.key, KEY);
}

static void test_format_then_parse_round_trips(void **state)
{
    (void)state;
    ipmpi_furl_t f, g;
    char buf[512];
    assert_int_equal(parse(GOOD, &f), 0);
    int n = ipmpi_furl_format(&f, buf, sizeof buf);
    assert_int_equal(n, (int)strlen(GOOD));
    assert_string_equal(buf, GOOD);
    assert_int_equal(parse(buf, &g), 0);
    assert_furl_equal(&f, &g);
}

static void test_parse_accepts_ipv4_and_edge_ports(void **state)
{
    (void)state;
    ipmpi_furl_t f;
    assert_int_equal(parse("ipmpi+tls://" FP "@127.0.0.1:1/" KEY, &f), 0);
    assert_string_equal(f.host, "127.0.0.1");
    assert_int_equal(f.port, 1);
    assert_int_equal(parse("ipmpi+tls://" FP "@h:65535/" KEY, &f), 0);
    assert_string_equal(f.host, "h");
    assert_int_equal(f.port, 65535);
}

static void test_parse_ipv6_bracketed_host_and_format_brackets_it(void **state)
{
    (void)state;
    ipmpi_furl_t f;
    char buf[512];
    const char *url = "ipmpi+tls://" FP "@[::1]:8443/" KEY;
    assert_int_equal(parse(url, &f), 0);
    assert_string_equal(f.host, "::1");
    assert_int_equal(f.port, 8443);
    assert_int_equal(ipmpi_furl_format(&f, buf, sizeof buf), (int)strlen(url));
    assert_string_equal(buf, url);

    assert_int_equal(parse("ipmpi+tls://" FP "@[fe80::1%eth0]:9/" KEY, &f), 0);
    assert_string_equal(f.host, "fe80::1%eth0");
}

static void test_parse_lowercases_uppercase_hex(void **state)
{
    (void)state;
    ipmpi_furl_t f;
    assert_int_equal(parse("ipmpi+tls://0123456789ABCDEF0123456789abcdef0123456789ABCDEF0123456789abcdef"
                           "@h:1/FEDCBA9876543210FEDCBA9876543210FEDCBA9876543210FEDCBA9876543210",
                           &f),
                     0);
    assert_string_equal(f.fingerprint, FP);
    assert_string_equal(f.key, KEY);
}

static void test_parse_accepts_surrounding_whitespace_and_trailing_newline(void **state)
{
    (void)state;
    ipmpi_furl_t f;
    const char *forms[] = {GOOD "\n", GOOD "\r\n", "  " GOOD, "\t" GOOD " \n", "\n" GOOD "\n"};
    for (size_t i = 0; i < sizeof forms / sizeof forms[0]; i++) {
        memset(&f, 0, sizeof f);
        assert_int_equal(parse(forms[i], &f), 0);
        assert_string_equal(f.host, "node17.cluster");
        assert_string_equal(f.key, KEY);
    }
}

static void test_parse_reads_only_len_bytes(void **state)
{
    (void)state;
    /* A file read into a larger buffer: junk after len is not looked at. */
    ipmpi_furl_t f;
    char buf[sizeof GOOD + 8];
    memcpy(buf, GOOD "garbage", sizeof GOOD + 7);
    assert_int_equal(ipmpi_furl_parse(buf, strlen(GOOD), &f), 0);
    assert_string_equal(f.key, KEY);
}

static void test_parse_rejects_wrong_scheme(void **state)
{
    (void)state;
    assert_rejected("ipmpi+tcp://" FP "@h:1/" KEY);
    assert_rejected("https://" FP "@h:1/" KEY);
    assert_rejected("ipmpi+tls:/" FP "@h:1/" KEY);
    assert_rejected(FP "@h:1/" KEY);
    assert_rejected("");
    assert_rejected("   \n");
}

static void test_parse_rejects_bad_fingerprint(void **state)
{
    (void)state;
    /* short, long, non-hex, empty */
    assert_rejected("ipmpi+tls://0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde@h:1/" KEY);
    assert_rejected("ipmpi+tls://" FP "0@h:1/" KEY);
    assert_rejected("ipmpi+tls://0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdeg@h:1/" KEY);
    assert_rejected("ipmpi+tls://0123456789abcdef0123456789abcdef 123456789abcdef0123456789abcdef@h:1/" KEY);
    assert_rejected("ipmpi+tls://@h:1/" KEY);
}

static void test_parse_rejects_missing_at(void **state)
{
    (void)state;
    assert_rejected("ipmpi+tls://" FP "h:1/" KEY);
    assert_rejected("ipmpi+tls://" FP ":1/" KEY);
}

static void test_parse_rejects_empty_host(void **state)
{
    (void)state;
    assert_rejected("ipmpi+tls://" FP "@:1/" KEY);
    assert_rejected("ipmpi+tls://" FP "@[]:1/" KEY);
}

static void test_parse_rejects_host_over_255_and_accepts_255(void **state)
{
    (void)state;
    char host[300], url[600];
    ipmpi_furl_t f;
    memset(host, 'a', sizeof host);
    host[255] = '\0';
    snprintf(url, sizeof url, "ipmpi+tls://%s@%s:1/%s", FP, host, KEY);
    assert_int_equal(parse(url, &f), 0);
    assert_int_equal(strlen(f.host), 255);
    host[255] = 'a';
    host[256] = '\0';
    snprintf(url, sizeof url, "ipmpi+tls://%s@%s:1/%s", FP, host, KEY);
    assert_rejected(url);
    snprintf(url, sizeof url, "ipmpi+tls://%s@[%s]:1/%s", FP, host, KEY);
    assert_rejected(url);
}

static void test_parse_rejects_bad_host_characters(void **state)
{
    (void)state;
    const char *hosts[] = {"ho st", "a/b", "a@b", "a\\b", "a;b", "\xc3\xa9t\xc3\xa9", "a\tb", "a%b",
                           "[::1", "::1", "[::1]x", "[a b]", "[::1/64]"};
    for (size_t i = 0; i < sizeof hosts / sizeof hosts[0]; i++) {
        char url[400];
        snprintf(url, sizeof url, "ipmpi+tls://%s@%s:1/%s", FP, hosts[i], KEY);
        assert_rejected(url);
    }
    /* A NUL inside the given length is a bad character, not an end. */
    char url[400];
    int n = snprintf(url, sizeof url, "ipmpi+tls://%s@ab:1/%s", FP, KEY);
    url[12 + 64 + 2] = '\0';
    ipmpi_furl_t f;
    assert_int_equal(parse_n(url, (size_t)n, &f), IPMPI_EINVAL);
}

static void test_parse_rejects_bad_port(void **state)
{
    (void)state;
    const char *ports[] = {"h/",        "h:/",    "h:0/",    "h:00/", "h:65536/", "h:99999/",
                           "h:123456/", "h:8x0/", "h:x/",    "h:-1/", "h:+80/",   "h: 80/",
                           "h:80 /",    "h:1:2/", "h:0x50/", "[::1]/", "[::1]:/"};
    for (size_t i = 0; i < sizeof ports / sizeof ports[0]; i++) {
        char url[400];
        snprintf(url, sizeof url, "ipmpi+tls://%s@%s%s", FP, ports[i], KEY);
        assert_rejected(url);
    }
}

static void test_parse_rejects_missing_or_bad_key(void **state)
{
    (void)state;
    assert_rejected("ipmpi+tls://" FP "@h:1");
    assert_rejected("ipmpi+tls://" FP "@h:1/");
    assert_rejected("ipmpi+tls://" FP "@h:1" KEY);
    /* short, long, non-hex */
    assert_rejected("ipmpi+tls://" FP "@h:1/fedcba9876543210fedcba9876543210fedcba9876543210fedcba987654321");
    assert_rejected("ipmpi+tls://" FP "@h:1/" KEY "0");
    assert_rejected("ipmpi+tls://" FP "@h:1/fedcba9876543210fedcba9876543210fedcba9876543210fedcba987654321z");
}

static void test_parse_rejects_trailing_junk(void **state)
{
    (void)state;
    assert_rejected(GOOD "/");
    assert_rejected(GOOD "?x=1");
    assert_rejected(GOOD " junk");
    assert_rejected(GOOD "\n" GOOD);
    /* A NUL inside the given length is junk too, not an end of string. */
    ipmpi_furl_t f;
    assert_int_equal(parse_n(GOOD "\n\0x", strlen(GOOD) + 3, &f), IPMPI_EINVAL);
}

static void test_parse_rejects_every_truncation(void **state)
{
    (void)state;
    const size_t len = strlen(GOOD);
    for (size_t n = 0; n < len; n++) {
        ipmpi_furl_t f, sentinel;
        memset(&sentinel, 0x33, sizeof sentinel);
        f = sentinel;
        if (parse_n(GOOD, n, &f) != IPMPI_EINVAL)
            fail_msg("prefix of %zu bytes accepted", n);
        assert_memory_equal(&f, &sentinel, sizeof f);
    }
    /* and every suffix with the start cut off */
    for (size_t n = 1; n < len; n++) {
        ipmpi_furl_t f;
        if (parse_n(GOOD + n, len - n, &f) != IPMPI_EINVAL)
            fail_msg("suffix from %zu accepted", n);
    }
}

static void test_format_refuses_too_small_buffer(void **state)
{
    (void)state;
    ipmpi_furl_t f;
    assert_int_equal(parse(GOOD, &f), 0);
    const size_t len = strlen(GOOD);
    char buf[512];
    for (size_t cap = 0; cap <= len; cap++)
        assert_int_equal(ipmpi_furl_format(&f, buf, cap), IPMPI_EINVAL);
    assert_int_equal(ipmpi_furl_format(&f, buf, len + 1), (int)len);
    assert_string_equal(buf, GOOD);
}

static void test_format_refuses_invalid_fields(void **state)
{
    (void)state;
    ipmpi_furl_t good, f;
    char buf[512];
    assert_int_equal(parse(GOOD, &good), 0);

    const int ports[] = {0, -1, 65536, 1 << 30};
    for (size_t i = 0; i < sizeof ports / sizeof ports[0]; i++) {
        f = good;
        f.port = ports[i];
        assert_int_equal(ipmpi_furl_format(&f, buf, sizeof buf), IPMPI_EINVAL);
    }
    f = good;
    f.host[0] = '\0';
    assert_int_equal(ipmpi_furl_format(&f, buf, sizeof buf), IPMPI_EINVAL);
    f = good;
    memset(f.host, 'a', sizeof f.host); /* no NUL within 256 bytes */
    assert_int_equal(ipmpi_furl_format(&f, buf, sizeof buf), IPMPI_EINVAL);
    f = good;
    f.fingerprint[10] = 'x';
    assert_int_equal(ipmpi_furl_format(&f, buf, sizeof buf), IPMPI_EINVAL);
    f = good;
    f.fingerprint[30] = '\0';
    assert_int_equal(ipmpi_furl_format(&f, buf, sizeof buf), IPMPI_EINVAL);
    f = good;
    f.key[63] = 'Z';
    assert_int_equal(ipmpi_furl_format(&f, buf, sizeof buf), IPMPI_EINVAL);
    f = good;
    f.key[0] = '\0';
    assert_int_equal(ipmpi_furl_format(&f, buf, sizeof buf), IPMPI_EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse_accepts_valid_url_and_splits_fields),
        cmocka_unit_test(test_format_then_parse_round_trips),
        cmocka_unit_test(test_parse_accepts_ipv4_and_edge_ports),
        cmocka_unit_test(test_parse_ipv6_bracketed_host_and_format_brackets_it),
        cmocka_unit_test(test_parse_lowercases_uppercase_hex),
        cmocka_unit_test(test_parse_accepts_surrounding_whitespace_and_trailing_newline),
        cmocka_unit_test(test_parse_reads_only_len_bytes),
        cmocka_unit_test(test_parse_rejects_wrong_scheme),
        cmocka_unit_test(test_parse_rejects_bad_fingerprint),
        cmocka_unit_test(test_parse_rejects_missing_at),
        cmocka_unit_test(test_parse_rejects_empty_host),
        cmocka_unit_test(test_parse_rejects_host_over_255_and_accepts_255),
        cmocka_unit_test(test_parse_rejects_bad_host_characters),
        cmocka_unit_test(test_parse_rejects_bad_port),
        cmocka_unit_test(test_parse_rejects_missing_or_bad_key),
        cmocka_unit_test(test_parse_rejects_trailing_junk),
        cmocka_unit_test(test_parse_rejects_every_truncation),
        cmocka_unit_test(test_format_refuses_too_small_buffer),
        cmocka_unit_test(test_format_refuses_invalid_fields),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
