/* Huge-page advice: see hugemem.h. */
#include "hugemem.h"

#include <sys/mman.h>

#define HUGE_PAGE ((uintptr_t)2 << 20)

void ipmpi_advise_huge(void *p, uint64_t len)
{
    if (len < IPMPI_HUGE_ADVISE_MIN)
        return;
    uintptr_t a = ((uintptr_t)p + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1);
    uintptr_t end = ((uintptr_t)p + (uintptr_t)len) & ~(HUGE_PAGE - 1);
    if (end > a)
        madvise((void *)a, end - a, MADV_HUGEPAGE);
}

void *ipmpi_huge_map(size_t cap)
{
    /* Map one alignment more, then unmap the unaligned head and tail. */
    size_t len = cap + IPMPI_HUGE_ALIGN;
    if (len < cap)
        return NULL;
    uint8_t *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED)
        return NULL;
    uint8_t *a = (uint8_t *)(((uintptr_t)m + IPMPI_HUGE_ALIGN - 1) & ~(uintptr_t)(IPMPI_HUGE_ALIGN - 1));
    if (a > m)
        munmap(m, (size_t)(a - m));
    size_t tail = (size_t)(m + len - (a + cap));
    if (tail)
        munmap(a + cap, tail);
    /* Advice only: without THP the buffer still works, in small pages. */
    madvise(a, cap, MADV_HUGEPAGE);
    return a;
}
