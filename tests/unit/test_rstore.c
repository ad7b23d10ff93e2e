/*
 * Unit tests of the result budget (src/controller/rstore.c): accounting,
 * the eviction order (delivered first, oldest first, then kept, oldest
 * first; the delivered share; the entry that must stay), and the set of
 * evicted ids. No I/O.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "controller/rstore.h"

/* Evicts like the stores do; returns how many went, victims' indexes in out. */
static int evict(ipmpi_rstore_t *st, uint64_t need, const ipmpi_rentry_t *keep, ipmpi_rentry_t *base, int *out)
{
    int n = 0;
    ipmpi_rentry_t *e;
    while ((e = ipmpi_rstore_victim(st, need, keep))) {
        out[n++] = (int)(e - base);
        ipmpi_idset_add(&st->evicted, (uint64_t)(e - base));
        ipmpi_rstore_del(st, e);
    }
    return n;
}

static void test_add_delivered_del_keep_the_counts(void **state)
{
    (void)state;
    ipmpi_rstore_t st;
    ipmpi_rstore_init(&st, 1000, 1000);
    ipmpi_rentry_t e[2];
    ipmpi_rentry_init(&e[0]);
    ipmpi_rentry_init(&e[1]);
    assert_false(ipmpi_rstore_has(&e[0]));
    ipmpi_rstore_add(&st, &e[0], 100);
    ipmpi_rstore_add(&st, &e[1], 50);
    ipmpi_rstore_count(&st, 7); /* the owner's own bytes (queued payloads) */
    assert_true(ipmpi_rstore_has(&e[0]));
    assert_int_equal(st.bytes, 157);
    ipmpi_rstore_delivered(&st, &e[1]);
    ipmpi_rstore_delivered(&st, &e[1]); /* twice: counted once */
    assert_int_equal(st.delivered_bytes, 50);
    ipmpi_rstore_del(&st, &e[1]);
    ipmpi_rstore_del(&st, &e[1]); /* not in the store any more: no-op */
    assert_int_equal(st.delivered_bytes, 0);
    assert_int_equal(st.bytes, 107);
    ipmpi_rstore_del(&st, &e[0]);
    ipmpi_rstore_count(&st, -7);
    assert_int_equal(st.bytes, 0);
    assert_null(ipmpi_rstore_victim(&st, 1000, NULL));
    assert_true(ipmpi_rstore_fits(&st, 1000));
    assert_false(ipmpi_rstore_fits(&st, 1001));
    ipmpi_rstore_fini(&st);
}

static void test_eviction_takes_delivered_first_then_kept_oldest_first(void **state)
{
    (void)state;
    ipmpi_rstore_t st;
    ipmpi_rstore_init(&st, 100, 100);
    ipmpi_rentry_t e[5];
    for (int i = 0; i < 5; i++) {
        ipmpi_rentry_init(&e[i]);
        ipmpi_rstore_add(&st, &e[i], 20);
    }
    ipmpi_rstore_delivered(&st, &e[3]);
    ipmpi_rstore_delivered(&st, &e[1]);
    /* Full (100 of 100): 50 more need three entries out: 3, 1 (delivered,
     * in the order they were delivered), then 0 (the oldest kept). */
    int out[5];
    assert_int_equal(evict(&st, 50, NULL, e, out), 3);
    assert_int_equal(out[0], 3);
    assert_int_equal(out[1], 1);
    assert_int_equal(out[2], 0);
    assert_int_equal(st.bytes, 40);
    assert_true(ipmpi_idset_has(&st.evicted, 3));
    assert_true(ipmpi_idset_has(&st.evicted, 0));
    assert_false(ipmpi_idset_has(&st.evicted, 2));
    ipmpi_rstore_fini(&st);
}

static void test_the_entry_to_keep_is_never_chosen(void **state)
{
    (void)state;
    ipmpi_rstore_t st;
    ipmpi_rstore_init(&st, 30, 30);
    ipmpi_rentry_t e[2];
    ipmpi_rentry_init(&e[0]);
    ipmpi_rentry_init(&e[1]);
    ipmpi_rstore_add(&st, &e[0], 20);
    ipmpi_rstore_add(&st, &e[1], 20); /* over: 40 of 30 */
    int out[2];
    assert_int_equal(evict(&st, 0, &e[0], e, out), 1);
    assert_int_equal(out[0], 1);
    /* Only keep is left and it alone is over the budget: nothing to do. */
    ipmpi_rstore_count(&st, 50);
    assert_null(ipmpi_rstore_victim(&st, 0, &e[0]));
    assert_false(ipmpi_rstore_fits(&st, 0));
    ipmpi_rstore_fini(&st);
}

static void test_delivered_entries_are_bounded_by_their_share(void **state)
{
    (void)state;
    ipmpi_rstore_t st;
    ipmpi_rstore_init(&st, 1000, 50);
    ipmpi_rentry_t e[4];
    int out[4];
    for (int i = 0; i < 4; i++) {
        ipmpi_rentry_init(&e[i]);
        ipmpi_rstore_add(&st, &e[i], 20);
        ipmpi_rstore_delivered(&st, &e[i]);
        evict(&st, 0, NULL, e, out);
    }
    /* 80 delivered bytes against a share of 50: the two oldest went,
     * though the budget had room for all. */
    assert_int_equal(st.delivered_bytes, 40);
    assert_false(ipmpi_rstore_has(&e[0]));
    assert_false(ipmpi_rstore_has(&e[1]));
    assert_true(ipmpi_rstore_has(&e[2]));
    /* Undelivered entries are not bounded by the share. */
    ipmpi_rentry_t k[3];
    for (int i = 0; i < 3; i++) {
        ipmpi_rentry_init(&k[i]);
        ipmpi_rstore_add(&st, &k[i], 100);
    }
    assert_null(ipmpi_rstore_victim(&st, 0, NULL));
    ipmpi_rstore_fini(&st);
}

static void test_idset_grows_and_forgets_all_at_its_bound(void **state)
{
    (void)state;
    ipmpi_idset_t s = {0};
    assert_false(ipmpi_idset_has(&s, 0));
    for (uint64_t i = 0; i < 5000; i++)
        ipmpi_idset_add(&s, i * 7919);
    ipmpi_idset_add(&s, 7919); /* again: no duplicate */
    assert_int_equal(s.len, 5000);
    for (uint64_t i = 0; i < 5000; i++)
        assert_true(ipmpi_idset_has(&s, i * 7919));
    assert_false(ipmpi_idset_has(&s, 1));
    assert_true(ipmpi_idset_has(&s, 0));
    ipmpi_idset_add(&s, UINT64_MAX - 1);
    assert_true(ipmpi_idset_has(&s, UINT64_MAX - 1));
    /* At the bound the old memories go at once. */
    s.len = IPMPI_EVICTED_MAX;
    ipmpi_idset_add(&s, 42);
    assert_int_equal(s.len, 1);
    assert_true(ipmpi_idset_has(&s, 42));
    assert_false(ipmpi_idset_has(&s, 7919));
    ipmpi_idset_fini(&s);
    assert_null(s.slots);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_add_delivered_del_keep_the_counts),
        cmocka_unit_test(test_eviction_takes_delivered_first_then_kept_oldest_first),
        cmocka_unit_test(test_the_entry_to_keep_is_never_chosen),
        cmocka_unit_test(test_delivered_entries_are_bounded_by_their_share),
        cmocka_unit_test(test_idset_grows_and_forgets_all_at_its_bound),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
