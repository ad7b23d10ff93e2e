/*
 * Broadcast trees (doc/protocol.md section 3): the shape both sides agree
 * on. A subtree is an array of ranks whose first is its root; the root's
 * children lead up to IPMPI_TREE_FANOUT contiguous, near-equal slices of
 * the rest. The controller is rank 0 and the root of every request's tree.
 */
#ifndef IPMPI_TREE_H
#define IPMPI_TREE_H

#include <stdint.h>

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

#endif
