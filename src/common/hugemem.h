/*
 * Transparent-huge-page advice for large buffers that fresh data is about
 * to be written into. Faulting new memory in 4 KiB pages is the slowest step
 * of a large transfer on these machines (256 MiB: ~130-170 ms, against
 * ~25 ms to copy the bytes); huge pages ("madvise" THP mode) cut that to
 * ~25-45 ms. Reentrant.
 */
#ifndef IPMPI_HUGEMEM_H
#define IPMPI_HUGEMEM_H

#include <stddef.h>
#include <stdint.h>

/* Buffers shorter than this are left alone. */
#define IPMPI_HUGE_ADVISE_MIN ((uint64_t)4 << 20)

/*
 * Advises huge pages for the 2 MiB-aligned interior of [p, p+len), which
 * belongs to this buffer alone. A hint: failure changes nothing.
 */
void ipmpi_advise_huge(void *p, uint64_t len);

/* Huge page size on x86-64: mappings from ipmpi_huge_map are aligned to it. */
#define IPMPI_HUGE_ALIGN ((size_t)2 << 20)

/* len rounded up to whole huge pages, at least one. The caller keeps len
 * at most SIZE_MAX - IPMPI_HUGE_ALIGN. */
static inline size_t ipmpi_huge_round(uint64_t len)
{
    size_t n = ((size_t)len + IPMPI_HUGE_ALIGN - 1) & ~(IPMPI_HUGE_ALIGN - 1);
    return n ? n : IPMPI_HUGE_ALIGN;
}

/*
 * A fresh private anonymous mapping of cap bytes (a multiple of
 * IPMPI_HUGE_ALIGN), 2 MiB-aligned and advised MADV_HUGEPAGE, untouched.
 * NULL on failure. Free with munmap(p, cap).
 */
void *ipmpi_huge_map(size_t cap);

#endif
