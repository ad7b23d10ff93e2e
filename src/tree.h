/*
 * Broadcast trees (doc/protocol.md section 3): the shape both sides agree
 * on. A subtree is an array of ranks whose first is its root; the root's
 * children lead up to IPMPI_TREE_FANOUT contiguous, near-equal slices of
 * the rest. The controller is rank 0 and the root of every request's tree.
 */
#ifndef IPMPI_TREE_H
#define IPMPI_TREE_H

#include <stdint.h>
#include <stdlib.h>

#define IPMPI_TREE_FANOUT 4

/* The children of the root of a subtree of n ranks: slice i is
 * [start[i], start[i] + len[i]). Returns how many (0..FANOUT). */
static inline uint32_t ipmpi_tree_children(uint32_t n, uint32_t start[IPMPI_TREE_FANOUT],
                                           uint32_t len[IPMPI_TREE_FANOUT])
{
    uint32_t rest = n > 0 ? n - 1 : 0, k = rest < IPMPI_TREE_FANOUT ? rest : IPMPI_TREE_FANOUT, at = 1;
    for (uint32_t i = 0; i < k; i++) {
        len[i] = rest / k + (i < rest % k ? 1 : 0);
        start[i] = at;
        at += len[i];
    }
    return k;
}

/* Where rank's own subtree is in t[0..n): 1 and [*lo, *lo + *len), or 0. */
static inline int ipmpi_tree_find(const int32_t *t, uint32_t n, int32_t rank, uint32_t *lo, uint32_t *len)
{
    uint32_t base = 0;
    while (n > 0) {
        if (t[base] == rank) {
            *lo = base;
            *len = n;
            return 1;
        }
        uint32_t start[IPMPI_TREE_FANOUT], sl[IPMPI_TREE_FANOUT], k = ipmpi_tree_children(n, start, sl), i;
        for (i = 0; i < k; i++) {
            int in = 0;
            for (uint32_t j = start[i]; j < start[i] + sl[i] && !in; j++)
                in = t[base + j] == rank;
            if (in)
                break;
        }
        if (i == k)
            return 0;
        base += start[i];
        n = sl[i];
    }
    return 0;
}

/* ---- grouping a request's engines by node ---- */

typedef struct ipmpi_tree_keyed {
    uint64_t key; /* the engine's node: 0 for the controller's */
    int32_t pos;  /* where it was given */
} ipmpi_tree_keyed_t;

static inline int ipmpi_tree_by_key_(const void *x, const void *y)
{
    const ipmpi_tree_keyed_t *a = x, *b = y;
    if (a->key != b->key)
        return a->key < b->key ? -1 : 1;
    return a->pos - b->pos;
}

static inline int ipmpi_tree_by_u64_(const void *x, const void *y)
{
    uint64_t a = *(const uint64_t *)x, b = *(const uint64_t *)y;
    return a < b ? -1 : a > b;
}

/* 1 when k[0..n) is grouped already (key 0 first, each key's entries
 * together), 0 when not, -1 when there is no memory to tell. */
static inline int ipmpi_tree_grouped(const ipmpi_tree_keyed_t *k, uint32_t n)
{
    uint32_t runs = 0;
    for (uint32_t i = 1; i < n; i++)
        if (k[i].key != k[i - 1].key) {
            if (k[i].key == 0)
                return 0;
            runs++;
        }
    if (runs < 2)
        return 1;
    /* Several nodes after the first group: grouped when no key starts two runs. */
    uint64_t *rk = malloc((size_t)runs * sizeof *rk);
    if (!rk)
        return -1;
    uint32_t m = 0;
    for (uint32_t i = 1; i < n; i++)
        if (k[i].key != k[i - 1].key)
            rk[m++] = k[i].key;
    qsort(rk, m, sizeof *rk, ipmpi_tree_by_u64_);
    int ok = 1;
    for (uint32_t i = 1; i < m && ok; i++)
        ok = rk[i] != rk[i - 1];
    free(rk);
    return ok;
}

/*
 * Orders k[0..n) (pos = 0..n-1 on entry) by node: key 0 first, each key's
 * entries together and in the order given. Engines usually come grouped
 * already (all on one node, or mpirun's ranks by node): then nothing
 * moves and nothing is sorted (a qsort of 256 engines cost the controller
 * 70 us of its ~450 us per tree request on the 2-core test machine).
 * Returns 0, or -1 (no memory; k unchanged).
 */
static inline int ipmpi_tree_group(ipmpi_tree_keyed_t *k, uint32_t n)
{
    int g = ipmpi_tree_grouped(k, n);
    if (g < 0)
        return -1;
    if (!g)
        qsort(k, n, sizeof *k, ipmpi_tree_by_key_);
    return 0;
}

#endif
