/*
 * A set of engine ids as bits in 64-bit words: what a request to every
 * engine holds per engine (sched.h's gang, tree.c's far engines), so that
 * a run of N engines that answered together is settled in N/64 word
 * operations, not N. The caller owns the words (ipmpi_bits_words() of
 * them for n ids). No allocation, no I/O.
 */
#ifndef IPMPI_CTL_BITSET_H
#define IPMPI_CTL_BITSET_H

#include <stddef.h>
#include <stdint.h>

static inline size_t ipmpi_bits_words(uint32_t n) { return ((size_t)n + 63) / 64; }

static inline int ipmpi_bit_get(const uint64_t *w, uint32_t i) { return (int)((w[i / 64] >> (i % 64)) & 1u); }
static inline void ipmpi_bit_set(uint64_t *w, uint32_t i) { w[i / 64] |= 1ull << (i % 64); }
static inline void ipmpi_bit_clear(uint64_t *w, uint32_t i) { w[i / 64] &= ~(1ull << (i % 64)); }

/* The bits of word k that lie in [lo, lo + n) (n >= 1, k within it). */
static inline uint64_t ipmpi_bits_mask(uint32_t lo, uint32_t n, size_t k)
{
    uint64_t first = (uint64_t)lo, end = first + n; /* end exclusive */
    uint64_t wlo = (uint64_t)k * 64, mask = ~0ull;
    if (first > wlo)
        mask &= ~0ull << (first - wlo);
    if (end < wlo + 64)
        mask &= ~(~0ull << (end - wlo));
    return mask;
}

/* 1 when every id of [lo, lo + n) is in the set (n = 0: 1). */
static inline int ipmpi_bits_all(const uint64_t *w, uint32_t lo, uint32_t n)
{
    if (n == 0)
        return 1;
    for (size_t k = lo / 64; k <= ((uint64_t)lo + n - 1) / 64; k++) {
        uint64_t m = ipmpi_bits_mask(lo, n, k);
        if ((w[k] & m) != m)
            return 0;
    }
    return 1;
}

/* How many ids of [lo, lo + n) are in the set. */
static inline uint32_t ipmpi_bits_count(const uint64_t *w, uint32_t lo, uint32_t n)
{
    uint32_t c = 0;
    if (n == 0)
        return 0;
    for (size_t k = lo / 64; k <= ((uint64_t)lo + n - 1) / 64; k++)
        c += (uint32_t)__builtin_popcountll(w[k] & ipmpi_bits_mask(lo, n, k));
    return c;
}

/* Adds (on) or removes (!on) every id of [lo, lo + n). */
static inline void ipmpi_bits_put(uint64_t *w, uint32_t lo, uint32_t n, int on)
{
    if (n == 0)
        return;
    for (size_t k = lo / 64; k <= ((uint64_t)lo + n - 1) / 64; k++) {
        uint64_t m = ipmpi_bits_mask(lo, n, k);
        w[k] = on ? w[k] | m : w[k] & ~m;
    }
}

#endif
