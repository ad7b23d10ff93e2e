/*
 * Unit tests for the spin-then-sleep wait policy (src/common/backoff.h).
 * ipmpi_backoff_next() is a pure function of its state and the clock it is
 * given, so every claim is checked with a synthetic clock and nothing here
 * sleeps. Single-threaded test program.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "backoff.h"

#define US 1000u
#define MS 1000000u
/* An arbitrary start far from 0, so no test passes by clock == 0 alone. */
#define T0 (UINT64_C(5) * 1000000000u)

static void test_spins_within_the_spin_window(void **state)
{
    (void)state;
    ipmpi_backoff_t b;
    ipmpi_backoff_init(&b, 200, 1000, T0);
    for (uint64_t t = T0; t < T0 + 200 * US; t += 7 * US)
        assert_true(ipmpi_backoff_next(&b, t) == 0);
    assert_true(ipmpi_backoff_next(&b, T0 + 200 * US - 1) == 0);
    /* Spinning does not advance the sleep length. */
    assert_true(ipmpi_backoff_next(&b, T0 + 200 * US) == 1 * US);
}

static void test_sleeps_start_at_min_and_double_while_idle_allows(void **state)
{
    (void)state;
    ipmpi_backoff_t b;
    ipmpi_backoff_init(&b, 200, 1000, T0);
    /* Long idle already (4 ms): plain doubling from min up to the cap. */
    uint64_t t = T0 + 4 * MS;
    uint64_t want = b.min_ns;
    assert_true(want == 1 * US);
    for (int i = 0; i < 10; i++) {
        uint64_t d = ipmpi_backoff_next(&b, t);
        assert_true(d == want);
        t += d;
        want = want * 2 > 1000 * US ? 1000 * US : want * 2;
    }
    /* 1, 2, 4, ... 512 µs, then the 1 ms cap for good. */
    for (int i = 0; i < 1000; i++) {
        uint64_t d = ipmpi_backoff_next(&b, t);
        assert_true(d == 1000 * US);
        t += d;
    }
}

static void test_sleep_never_exceeds_a_quarter_of_the_idle_time(void **state)
{
    (void)state;
    ipmpi_backoff_t b;
    ipmpi_backoff_init(&b, 200, 25 * 1000, T0);
    uint64_t t = T0 + 200 * US, grew = 0;
    while (t - T0 < 400 * MS) {
        uint64_t d = ipmpi_backoff_next(&b, t);
        uint64_t quarter = (t - T0) / 4;
        assert_true(d >= 1 * US);
        assert_true(d <= (quarter > 1 * US ? quarter : 1 * US));
        assert_true(d <= 25 * MS);
        grew = d > grew ? d : grew;
        t += d;
    }
    /* After 100 ms idle (4x the cap) the cap is reached. */
    assert_true(grew == 25 * MS);
    assert_true(ipmpi_backoff_next(&b, t) == 25 * MS);
}

static void test_cap_that_is_not_a_power_of_two_is_reached_exactly(void **state)
{
    (void)state;
    ipmpi_backoff_t b;
    ipmpi_backoff_init(&b, 0, 50 * 1000, T0); /* 50 ms, the cap for many idle ranks */
    uint64_t last = 0, t = T0;
    while (t - T0 < 1000 * MS) {
        uint64_t d = ipmpi_backoff_next(&b, t);
        assert_true(d >= last);
        assert_true(d <= 50 * MS);
        last = d;
        t += d;
    }
    assert_true(last == 50 * MS);
}

static void test_never_sleeps_longer_than_cap(void **state)
{
    (void)state;
    const uint64_t caps_us[] = {1, 3, 1000, 12345, 50000};
    for (size_t c = 0; c < sizeof caps_us / sizeof caps_us[0]; c++) {
        ipmpi_backoff_t b;
        ipmpi_backoff_init(&b, 10, caps_us[c], T0);
        for (int i = 0; i < 100; i++)
            assert_true(ipmpi_backoff_next(&b, T0 + 1000 * MS + (uint64_t)i) <= caps_us[c] * US);
    }
}

static void test_busy_resets_to_spinning_then_min_sleep(void **state)
{
    (void)state;
    ipmpi_backoff_t b;
    ipmpi_backoff_init(&b, 100, 1000, T0);
    uint64_t t = T0 + 100 * US;
    while (t - T0 < 10 * MS)
        t += ipmpi_backoff_next(&b, t);
    assert_true(ipmpi_backoff_next(&b, t) == 1000 * US);

    ipmpi_backoff_busy(&b, t);
    assert_true(ipmpi_backoff_next(&b, t) == 0);
    assert_true(ipmpi_backoff_next(&b, t + 99 * US) == 0);
    assert_true(ipmpi_backoff_next(&b, t + 100 * US) == 1 * US);
    assert_true(ipmpi_backoff_next(&b, t + 101 * US) == 2 * US);
    /* 120 µs idle: a quarter is 30 µs, so 4, 8, 16, then 30 and not 32. */
    assert_true(ipmpi_backoff_next(&b, t + 120 * US) == 4 * US);
    assert_true(ipmpi_backoff_next(&b, t + 120 * US) == 8 * US);
    assert_true(ipmpi_backoff_next(&b, t + 120 * US) == 16 * US);
    assert_true(ipmpi_backoff_next(&b, t + 120 * US) == 30 * US);
}

static void test_zero_cap_always_spins(void **state)
{
    (void)state;
    ipmpi_backoff_t b;
    ipmpi_backoff_init(&b, 0, 0, T0);
    for (uint64_t t = T0; t < T0 + UINT64_C(3600) * 1000 * MS; t += 7 * 1000 * MS)
        assert_true(ipmpi_backoff_next(&b, t) == 0);
    ipmpi_backoff_init(&b, 200, 0, T0);
    assert_true(ipmpi_backoff_next(&b, T0 + 1000 * MS) == 0);
}

static void test_zero_spin_window_sleeps_at_once(void **state)
{
    (void)state;
    ipmpi_backoff_t b;
    ipmpi_backoff_init(&b, 0, 1000, T0);
    assert_true(ipmpi_backoff_next(&b, T0) == 1 * US);
}

static void test_wait_with_zero_cap_returns_at_once(void **state)
{
    (void)state;
    ipmpi_backoff_t b;
    ipmpi_backoff_init(&b, 0, 0, ipmpi_now_ns());
    uint64_t t0 = ipmpi_now_ns();
    for (int i = 0; i < 1000; i++)
        ipmpi_backoff_wait(&b);
    /* 1000 calls that never sleep take far less than a second. */
    assert_true(ipmpi_now_ns() - t0 < 1000 * MS);
}

static void test_clock_is_monotonic(void **state)
{
    (void)state;
    uint64_t prev = ipmpi_now_ns();
    assert_true(prev > 0);
    for (int i = 0; i < 100000; i++) {
        uint64_t now = ipmpi_now_ns();
        assert_true(now >= prev);
        prev = now;
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_spins_within_the_spin_window),
        cmocka_unit_test(test_sleeps_start_at_min_and_double_while_idle_allows),
        cmocka_unit_test(test_sleep_never_exceeds_a_quarter_of_the_idle_time),
        cmocka_unit_test(test_cap_that_is_not_a_power_of_two_is_reached_exactly),
        cmocka_unit_test(test_never_sleeps_longer_than_cap),
        cmocka_unit_test(test_busy_resets_to_spinning_then_min_sleep),
        cmocka_unit_test(test_zero_cap_always_spins),
        cmocka_unit_test(test_zero_spin_window_sleeps_at_once),
        cmocka_unit_test(test_wait_with_zero_cap_returns_at_once),
        cmocka_unit_test(test_clock_is_monotonic),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
