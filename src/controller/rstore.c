/*
 * Results within a memory budget: see rstore.h. No I/O. Loop thread only.
 */
#include "rstore.h"

#include <stdlib.h>
#include <string.h>

/* ---- the set of evicted ids ---- */

static uint32_t slot_of(uint64_t v, uint32_t cap)
{
    return (uint32_t)((v * 0x9e3779b97f4a7c15ull) >> 32) & (cap - 1);
}

/* The set stores id + 1, so that 0 marks an empty slot. */
int ipmpi_idset_has(const ipmpi_idset_t *set, uint64_t id)
{
    if (set->cap == 0)
        return 0;
    for (uint32_t i = slot_of(id + 1, set->cap);; i = (i + 1) & (set->cap - 1)) {
        if (set->slots[i] == 0)
            return 0;
        if (set->slots[i] == id + 1)
            return 1;
    }
}

void ipmpi_idset_add(ipmpi_idset_t *set, uint64_t id)
{
    if (set->len >= IPMPI_EVICTED_MAX) {
        memset(set->slots, 0, (size_t)set->cap * sizeof *set->slots);
        set->len = 0;
    }
    if ((set->len + 1) * 2 > set->cap) {
        uint32_t ncap = set->cap ? 2 * set->cap : 1024;
        uint64_t *n = calloc(ncap, sizeof *n);
        if (!n)
            return;
        for (uint32_t i = 0; i < set->cap; i++) {
            if (!set->slots[i])
                continue;
            uint32_t k = slot_of(set->slots[i], ncap);
            while (n[k])
                k = (k + 1) & (ncap - 1);
            n[k] = set->slots[i];
        }
        free(set->slots);
        set->slots = n;
        set->cap = ncap;
    }
    uint32_t k = slot_of(id + 1, set->cap);
    while (set->slots[k] && set->slots[k] != id + 1)
        k = (k + 1) & (set->cap - 1);
    if (!set->slots[k]) {
        set->slots[k] = id + 1;
        set->len++;
    }
}

void ipmpi_idset_fini(ipmpi_idset_t *set)
{
    free(set->slots);
    memset(set, 0, sizeof *set);
}

/* ---- the store ---- */

void ipmpi_rstore_init(ipmpi_rstore_t *st, uint64_t budget, uint64_t delivered_max)
{
    memset(st, 0, sizeof *st);
    st->budget = budget;
    st->delivered_max = delivered_max;
    ipmpi_ql_init(&st->delivered);
    ipmpi_ql_init(&st->kept);
}

void ipmpi_rstore_fini(ipmpi_rstore_t *st)
{
    ipmpi_idset_fini(&st->evicted);
}

void ipmpi_rstore_add(ipmpi_rstore_t *st, ipmpi_rentry_t *e, uint64_t bytes)
{
    e->bytes = bytes;
    e->delivered = 0;
    st->bytes += bytes;
    ipmpi_ql_push_back(&st->kept, &e->q);
}

void ipmpi_rstore_delivered(ipmpi_rstore_t *st, ipmpi_rentry_t *e)
{
    if (!ipmpi_rstore_has(e) || e->delivered)
        return;
    e->delivered = 1;
    st->delivered_bytes += e->bytes;
    ipmpi_ql_remove(&e->q);
    ipmpi_ql_push_back(&st->delivered, &e->q);
}

void ipmpi_rstore_del(ipmpi_rstore_t *st, ipmpi_rentry_t *e)
{
    if (!ipmpi_rstore_has(e))
        return;
    ipmpi_ql_remove(&e->q);
    st->bytes -= e->bytes;
    if (e->delivered)
        st->delivered_bytes -= e->bytes;
    e->delivered = 0;
}

/* The oldest entry of list l that is not keep, or NULL. */
static ipmpi_rentry_t *oldest(const ipmpi_qlink_t *l, const ipmpi_rentry_t *keep)
{
    for (ipmpi_qlink_t *q = l->next; q != l; q = q->next) {
        ipmpi_rentry_t *e = IPMPI_CONTAINER_OF(q, ipmpi_rentry_t, q);
        if (e != keep)
            return e;
    }
    return NULL;
}

ipmpi_rentry_t *ipmpi_rstore_first(const ipmpi_rstore_t *st)
{
    ipmpi_rentry_t *e = oldest(&st->delivered, NULL);
    return e ? e : oldest(&st->kept, NULL);
}

ipmpi_rentry_t *ipmpi_rstore_victim(const ipmpi_rstore_t *st, uint64_t need, const ipmpi_rentry_t *keep)
{
    ipmpi_rentry_t *e = NULL;
    if (st->delivered_bytes > st->delivered_max)
        e = oldest(&st->delivered, keep);
    if (!e && st->bytes + need > st->budget && !(e = oldest(&st->delivered, keep)))
        e = oldest(&st->kept, keep);
    return e;
}
