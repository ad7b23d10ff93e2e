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
