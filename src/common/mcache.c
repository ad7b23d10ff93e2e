/* Cache of large buffers: see mcache.h. */
#include "mcache.h"

static void drop(ipmpi_mcache_t *m, int i)
{
    m->destroy(m->slot[i].p, m->slot[i].cap);
    m->cached -= m->slot[i].cap;
    m->slot[i].p = NULL;
}

void *ipmpi_mcache_take(ipmpi_mcache_t *m, size_t need, size_t *cap)
{
    int best = -1;
    for (int i = 0; i < IPMPI_MCACHE_SLOTS; i++) {
        size_t c = m->slot[i].cap;
        if (m->slot[i].p && c >= need && c - need <= c / 4 && (best < 0 || c < m->slot[best].cap))
            best = i;
    }
    if (best < 0)
        return NULL;
    void *p = m->slot[best].p;
    *cap = m->slot[best].cap;
    m->slot[best].p = NULL;
    m->cached -= *cap;
    return p;
}

void ipmpi_mcache_give(ipmpi_mcache_t *m, void *p, size_t cap, uint64_t now)
{
    if (cap > m->max) {
        m->destroy(p, cap);
        return;
    }
    for (;;) {
        int free_slot = -1, oldest = -1;
        for (int i = 0; i < IPMPI_MCACHE_SLOTS; i++) {
            if (!m->slot[i].p)
                free_slot = free_slot < 0 ? i : free_slot;
            else if (oldest < 0 || m->slot[i].t < m->slot[oldest].t)
                oldest = i;
        }
        if (free_slot >= 0 && m->cached + cap <= m->max) {
            m->slot[free_slot].p = p;
            m->slot[free_slot].cap = cap;
            m->slot[free_slot].t = now;
            m->cached += cap;
            return;
        }
        drop(m, oldest); /* oldest >= 0: the cache is not empty here */
    }
}

uint64_t ipmpi_mcache_trim(ipmpi_mcache_t *m, uint64_t now)
{
    uint64_t next = UINT64_MAX;
    for (int i = 0; i < IPMPI_MCACHE_SLOTS; i++) {
        if (!m->slot[i].p)
            continue;
        if (now - m->slot[i].t >= m->idle_ns)
            drop(m, i);
        else if (m->slot[i].t + m->idle_ns - now < next)
            next = m->slot[i].t + m->idle_ns - now;
    }
    return next;
}
