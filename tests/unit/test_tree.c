/*
 * Unit tests for the shape of broadcast trees (src/tree.h): the slices a
 * root hands its children and the lookup the controller uses to find the
 * engines below one that died. The engines and the controller both build
 * on these two functions, so every rank must be in exactly one subtree.
 * Pure functions; single-threaded test program.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "tree.h"

static void test_children_slices_are_contiguous_near_equal_and_cover_the_rest(void **state)
{
    (void)state;
    uint32_t start[IPMPI_TREE_FANOUT], len[IPMPI_TREE_FANOUT];
    assert_int_equal(ipmpi_tree_children(0, start, len), 0);
    assert_int_equal(ipmpi_tree_children(1, start, len), 0); /* a leaf */
    assert_int_equal(ipmpi_tree_children(3, start, len), 2);
    assert_int_equal(start[0], 1);
    assert_int_equal(len[0], 1);
    assert_int_equal(start[1], 2);
    for (uint32_t n = 2; n < 300; n++) {
        uint32_t k = ipmpi_tree_children(n, start, len), at = 1, lo = n, hi = 0;
        assert_true(k >= 1 && k <= IPMPI_TREE_FANOUT);
        for (uint32_t i = 0; i < k; i++) {
            assert_int_equal(start[i], at);
            assert_true(len[i] >= 1);
            at += len[i];
            lo = len[i] < lo ? len[i] : lo;
            hi = len[i] > hi ? len[i] : hi;
        }
        assert_int_equal(at, n);    /* every rank below the root, once */
        assert_true(hi - lo <= 1);  /* balanced */
    }
}

/* Marks every rank of the subtree at t[base..base+n) in seen[], checking
 * that ipmpi_tree_find finds each one's own subtree where it is. */
static void walk(const int32_t *t, uint32_t total, uint32_t base, uint32_t n, int *seen, uint32_t *depth,
                 uint32_t d)
{
    uint32_t lo, len;
    assert_int_equal(ipmpi_tree_find(t, total, t[base], &lo, &len), 1);
    assert_int_equal(lo, base);
    assert_int_equal(len, n);
    seen[t[base]]++;
    if (d > *depth)
        *depth = d;
    uint32_t start[IPMPI_TREE_FANOUT], sl[IPMPI_TREE_FANOUT];
    uint32_t k = ipmpi_tree_children(n, start, sl);
    for (uint32_t i = 0; i < k; i++)
        walk(t, total, base + start[i], sl[i], seen, depth, d + 1);
}

static void test_every_rank_is_found_at_its_own_subtree_and_depth_is_logarithmic(void **state)
{
    (void)state;
    enum { MAX = 1025 };
    static int32_t t[MAX];
    static int seen[MAX];
    for (uint32_t n = 1; n <= MAX; n += (n < 70 ? 1 : 37)) {
        /* The controller (rank 0) first, the engines' ranks in any order. */
        for (uint32_t i = 0; i < n; i++)
            t[i] = (int32_t)(i == 0 ? 0 : (i * 7919u) % (n - 1) + 1);
        if (n > 2) {
            /* (i * 7919) % (n - 1) is a permutation only for n - 1 prime to
             * 7919; fall back to the identity otherwise. */
            memset(seen, 0, sizeof seen);
            int perm = 1;
            for (uint32_t i = 1; i < n && perm; i++)
                perm = ++seen[t[i]] == 1;
            if (!perm)
                for (uint32_t i = 0; i < n; i++)
                    t[i] = (int32_t)i;
        }
        memset(seen, 0, sizeof seen);
        uint32_t depth = 0;
        walk(t, n, 0, n, seen, &depth, 0);
        for (uint32_t r = 0; r < n; r++)
            assert_int_equal(seen[r], 1);
        uint32_t bound = 1, reach = 1;
        while (reach < n) {
            reach = reach * IPMPI_TREE_FANOUT + 1;
            bound++;
        }
        assert_true(depth <= bound);
    }
    /* A rank that is not in the tree is not found. */
    int32_t small[3] = {0, 5, 9};
    uint32_t lo, len;
    assert_int_equal(ipmpi_tree_find(small, 3, 7, &lo, &len), 0);
    assert_int_equal(ipmpi_tree_find(small, 3, 9, &lo, &len), 1);
    assert_int_equal(lo, 2);
    assert_int_equal(len, 1);
}

/* The positions ipmpi_tree_group leaves keys[0..n) in. */
static void group(const uint64_t *keys, uint32_t n, int32_t *pos)
{
    ipmpi_tree_keyed_t k[16];
    assert_true(n <= 16);
    for (uint32_t i = 0; i < n; i++) {
        k[i].key = keys[i];
        k[i].pos = (int32_t)i;
    }
    assert_int_equal(ipmpi_tree_group(k, n), 0);
    for (uint32_t i = 0; i < n; i++)
        pos[i] = k[i].pos;
}

static void test_grouping_by_node_puts_the_controllers_first_and_keeps_each_nodes_order(void **state)
{
    (void)state;
    int32_t pos[16];
    /* Grouped already, the other nodes in any key order: nothing moves. */
    const uint64_t one[] = {0, 0, 0, 0};
    const uint64_t nodes[] = {0, 0, 9, 9, 9, 3, 3, 7};
    const int32_t same[] = {0, 1, 2, 3, 4, 5, 6, 7};
    group(one, 4, pos);
    assert_memory_equal(pos, same, 4 * sizeof *pos);
    group(nodes, 8, pos);
    assert_memory_equal(pos, same, 8 * sizeof *pos);
    /* Interleaved: sorted by key, each node's engines in the order given. */
    const uint64_t mixed[] = {5, 0, 5, 0, 2};
    const int32_t want_mixed[] = {1, 3, 4, 0, 2};
    group(mixed, 5, pos);
    assert_memory_equal(pos, want_mixed, 5 * sizeof *pos);
    /* A node's engines in two runs. */
    const uint64_t split[] = {0, 8, 8, 4, 8};
    const int32_t want_split[] = {0, 3, 1, 2, 4};
    group(split, 5, pos);
    assert_memory_equal(pos, want_split, 5 * sizeof *pos);
    /* Nothing, and one. */
    assert_int_equal(ipmpi_tree_group(NULL, 0), 0);
    group(split + 1, 1, pos);
    assert_int_equal(pos[0], 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_children_slices_are_contiguous_near_equal_and_cover_the_rest),
        cmocka_unit_test(test_every_rank_is_found_at_its_own_subtree_and_depth_is_logarithmic),
        cmocka_unit_test(test_grouping_by_node_puts_the_controllers_first_and_keeps_each_nodes_order),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
