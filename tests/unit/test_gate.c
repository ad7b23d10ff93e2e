/*
 * Unit tests for the controller's gate (src/controller/gate.h): refusals
 * of one address and reason are logged in full a few times per interval,
 * then counted and summed up in one line when the interval ends; other
 * addresses and reasons have their own counts; past the tracked addresses
 * refusals are counted as "other addresses"; connections before HELLO are
 * counted per address. Time is passed in, so no test sleeps. Logs go to a
 * temporary file (fd 2 is pointed at it and restored after each test).
 * Single-threaded test program.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "controller/gate.h"
#include "log.h"

#define SEC 1000000000ull

struct fixture {
    char path[64];
    int saved_err;
    ipmpi_gate_t *g;
};

static int setup(void **state)
{
    struct fixture *fx = calloc(1, sizeof *fx);
    if (!fx)
        return -1;
    strcpy(fx->path, "/tmp/ipmpi-test-gate-XXXXXX");
    int fd = mkstemp(fx->path);
    if (fd < 0) {
        free(fx);
        return -1;
    }
    fflush(stderr);
    fx->saved_err = dup(2);
    dup2(fd, 2);
    close(fd);
    ipmpi_log_setup("controller", 2);
    fx->g = ipmpi_gate_new();
    *state = fx;
    return fx->g ? 0 : -1;
}

static int teardown(void **state)
{
    struct fixture *fx = *state;
    ipmpi_gate_free(fx->g);
    fflush(stderr);
    dup2(fx->saved_err, 2);
    close(fx->saved_err);
    unlink(fx->path);
    free(fx);
    return 0;
}

/* The log so far (caller frees). */
static char *slurp(const struct fixture *fx)
{
    FILE *f = fopen(fx->path, "r");
    assert_non_null(f);
    char *buf = calloc(1, 1 << 20);
    assert_non_null(buf);
    size_t n = fread(buf, 1, (1 << 20) - 1, f);
    fclose(f);
    buf[n] = '\0';
    return buf;
}

static size_t count(const char *s, const char *needle)
{
    size_t n = 0;
    for (const char *p = strstr(s, needle); p; p = strstr(p + 1, needle))
        n++;
    return n;
}

static void test_source_is_the_address_without_the_port(void **state)
{
    (void)state;
    char src[64];
    ipmpi_gate_source("10.1.2.3:51234", src, sizeof src);
    assert_string_equal(src, "10.1.2.3");
    ipmpi_gate_source("fe80::1:443", src, sizeof src);
    assert_string_equal(src, "fe80::1");
    ipmpi_gate_source("noport", src, sizeof src);
    assert_string_equal(src, "noport");
    ipmpi_gate_source("10.1.2.3:1", src, 4);
    assert_string_equal(src, "10.");
}

static void test_a_flood_logs_a_few_lines_and_one_summary(void **state)
{
    struct fixture *fx = *state;
    uint64_t t0 = 100 * SEC;
    for (int i = 0; i < 1000; i++)
        ipmpi_gate_refused(fx->g, t0 + (uint64_t)i * 1000000ull, "10.0.0.7:4000", "wrong key",
                           "client 10.0.0.7:%d refused: wrong key", 4000 + i);
    char *log = slurp(fx);
    assert_int_equal(count(log, "refused: wrong key"), IPMPI_GATE_LOG_FULL);
    assert_int_equal(count(log, "more connections"), 0);
    free(log);
    /* Not yet due: nothing; due: one summary of the rest. */
    assert_int_equal(ipmpi_gate_tick(fx->g, t0 + SEC), t0 + IPMPI_GATE_INTERVAL_NS);
    assert_int_equal(ipmpi_gate_tick(fx->g, t0 + IPMPI_GATE_INTERVAL_NS), UINT64_MAX);
    log = slurp(fx);
    assert_int_equal(count(log, "997 more connections from 10.0.0.7 refused in the last 10 s: wrong key"), 1);
    free(log);
    /* The next interval starts afresh: logged in full again. */
    ipmpi_gate_refused(fx->g, t0 + 11 * SEC, "10.0.0.7:5000", "wrong key", "client 10.0.0.7:5000 refused: wrong key");
    log = slurp(fx);
    assert_int_equal(count(log, "refused: wrong key"), IPMPI_GATE_LOG_FULL + 1);
    free(log);
}

static void test_addresses_and_reasons_are_counted_apart(void **state)
{
    struct fixture *fx = *state;
    uint64_t t = 5 * SEC;
    for (int i = 0; i < 10; i++) {
        ipmpi_gate_refused(fx->g, t, "10.0.0.1:1", "wrong key", "A wrong key");
        ipmpi_gate_refused(fx->g, t, "10.0.0.2:1", "wrong key", "B wrong key");
        ipmpi_gate_refused(fx->g, t, "10.0.0.1:2", "no HELLO within 10 s", "A no hello");
    }
    ipmpi_gate_tick(fx->g, t + IPMPI_GATE_INTERVAL_NS);
    char *log = slurp(fx);
    assert_int_equal(count(log, "A wrong key"), IPMPI_GATE_LOG_FULL);
    assert_int_equal(count(log, "B wrong key"), IPMPI_GATE_LOG_FULL);
    assert_int_equal(count(log, "A no hello"), IPMPI_GATE_LOG_FULL);
    assert_int_equal(count(log, "7 more connections from 10.0.0.1 refused in the last 10 s: wrong key"), 1);
    assert_int_equal(count(log, "7 more connections from 10.0.0.2 refused in the last 10 s: wrong key"), 1);
    assert_int_equal(count(log, "7 more connections from 10.0.0.1 refused in the last 10 s: no HELLO"), 1);
    free(log);
}

static void test_a_late_refusal_ends_the_old_interval_first(void **state)
{
    struct fixture *fx = *state;
    for (int i = 0; i < 5; i++)
        ipmpi_gate_refused(fx->g, SEC, "10.0.0.3:1", "wrong key", "line");
    /* No tick ran; the next refusal comes after the interval. */
    ipmpi_gate_refused(fx->g, SEC + IPMPI_GATE_INTERVAL_NS + 1, "10.0.0.3:1", "wrong key", "line");
    char *log = slurp(fx);
    assert_int_equal(count(log, "2 more connections from 10.0.0.3"), 1);
    assert_int_equal(count(log, "line"), IPMPI_GATE_LOG_FULL + 1);
    free(log);
}

static void test_many_addresses_share_one_count_beyond_the_table(void **state)
{
    struct fixture *fx = *state;
    char peer[64];
    for (unsigned i = 0; i < IPMPI_GATE_MAX_SOURCES + 500; i++) {
        snprintf(peer, sizeof peer, "10.%u.%u.1:9", i >> 8, i & 255);
        for (int k = 0; k < 4; k++)
            ipmpi_gate_refused(fx->g, SEC, peer, "wrong key", "x");
    }
    ipmpi_gate_tick(fx->g, SEC + IPMPI_GATE_INTERVAL_NS);
    char *log = slurp(fx);
    /* 500 addresses x 4 refusals, the first 3 of them logged. */
    assert_int_equal(count(log, "1997 more connections from other addresses refused"), 1);
    free(log);
}

static void test_connections_before_hello_are_counted_per_address(void **state)
{
    struct fixture *fx = *state;
    assert_int_equal(ipmpi_gate_pending(fx->g, "10.0.0.9:1"), 0);
    assert_int_equal(ipmpi_gate_pending_add(fx->g, "10.0.0.9:1"), 1);
    assert_int_equal(ipmpi_gate_pending_add(fx->g, "10.0.0.9:2"), 2);
    assert_int_equal(ipmpi_gate_pending_add(fx->g, "10.0.0.8:2"), 1);
    assert_int_equal(ipmpi_gate_pending(fx->g, "10.0.0.9:77"), 2);
    ipmpi_gate_pending_del(fx->g, "10.0.0.9:1");
    assert_int_equal(ipmpi_gate_pending(fx->g, "10.0.0.9:5"), 1);
    ipmpi_gate_pending_del(fx->g, "10.0.0.9:2");
    assert_int_equal(ipmpi_gate_pending(fx->g, "10.0.0.9:5"), 0);
    ipmpi_gate_pending_del(fx->g, "10.0.0.9:2"); /* not counted: ignored */
    assert_int_equal(ipmpi_gate_pending(fx->g, "10.0.0.8:5"), 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_source_is_the_address_without_the_port),
        cmocka_unit_test_setup_teardown(test_a_flood_logs_a_few_lines_and_one_summary, setup, teardown),
        cmocka_unit_test_setup_teardown(test_addresses_and_reasons_are_counted_apart, setup, teardown),
        cmocka_unit_test_setup_teardown(test_a_late_refusal_ends_the_old_interval_first, setup, teardown),
        cmocka_unit_test_setup_teardown(test_many_addresses_share_one_count_beyond_the_table, setup, teardown),
        cmocka_unit_test_setup_teardown(test_connections_before_hello_are_counted_per_address, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
