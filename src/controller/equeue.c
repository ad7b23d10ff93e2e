/*
 * Payloads, requests, per-engine FIFOs and the request table: see
 * equeue.h. No I/O. Loop thread only.
 */
#include "equeue.h"

#include <stdlib.h>
#include <string.h>

#include "ipmpi/errors.h"

ipmpi_parts_t *ipmpi_parts_new(uint32_t n, const uint64_t *lens)
{
    ipmpi_parts_t *p = calloc(1, sizeof *p);
    if (!p)
        return NULL;
    p->refs = 1;
    if (n == 0)
        return p;
    p->lens = malloc((size_t)n * sizeof *p->lens);
    p->bufs = calloc(n, sizeof *p->bufs);
    if (!p->lens || !p->bufs)
        goto free_p;
    for (uint32_t i = 0; i < n; i++) {
        if (lens[i] > SIZE_MAX - 1)
            goto free_bufs;
        /* malloc(0) may return NULL; one spare byte keeps every buffer real. */
        p->bufs[i] = malloc((size_t)lens[i] + 1);
        if (!p->bufs[i])
            goto free_bufs;
        p->lens[i] = lens[i];
        p->n = i + 1;
    }
    return p;
free_bufs:
    for (uint32_t i = 0; i < p->n; i++)
        free(p->bufs[i]);
free_p:
    free(p->bufs);
    free(p->lens);
    free(p);
    return NULL;
}

ipmpi_parts_t *ipmpi_parts_from(const void *data, size_t len)
{
    uint64_t l = len;
    ipmpi_parts_t *p = ipmpi_parts_new(1, &l);
    if (p && len)
        memcpy(p->bufs[0], data, len);
    return p;
}

ipmpi_parts_t *ipmpi_parts_ref(ipmpi_parts_t *p)
{
    p->refs++;
    return p;
}

void ipmpi_parts_unref(ipmpi_parts_t *p)
{
    if (!p || --p->refs > 0)
        return;
    for (uint32_t i = 0; i < p->n; i++)
        free(p->bufs[i]);
    free(p->bufs);
    free(p->lens);
    free(p);
}

void ipmpi_parts_drop_first(ipmpi_parts_t *p)
{
    free(p->bufs[0]);
    memmove(p->bufs, p->bufs + 1, (size_t)(p->n - 1) * sizeof *p->bufs);
    memmove(p->lens, p->lens + 1, (size_t)(p->n - 1) * sizeof *p->lens);
    p->n--;
}

uint64_t ipmpi_parts_bytes(const ipmpi_parts_t *p)
{
    uint64_t s = 0;
    for (uint32_t i = 0; i < p->n; i++)
        s += p->lens[i];
    return s;
}

ipmpi_req_t *ipmpi_req_new(uint64_t id, uint64_t client_req, uint64_t session, uint8_t kind,
                           uint32_t total, ipmpi_parts_t *payload)
{
    ipmpi_req_t *r = calloc(1, sizeof *r);
    if (!r)
        return NULL;
    r->id = id;
    r->client_req = client_req;
    r->session = session;
    r->kind = kind;
    r->total = total;
    r->payload = payload;
    return r;
}

void ipmpi_req_free(ipmpi_req_t *r)
{
    if (!r)
        return;
    ipmpi_parts_unref(r->payload);
    free(r);
}

void ipmpi_equeue_init(ipmpi_equeue_t *q)
{
    memset(q, 0, sizeof *q);
}

void ipmpi_equeue_fini(ipmpi_equeue_t *q)
{
    free(q->ring);
    memset(q, 0, sizeof *q);
}

int ipmpi_equeue_push(ipmpi_equeue_t *q, ipmpi_req_t *r)
{
    if (q->len == q->cap) {
        uint32_t ncap = q->cap ? q->cap * 2 : 8;
        if (ncap < q->cap)
            return IPMPI_ENOMEM;
        ipmpi_req_t **nr = malloc((size_t)ncap * sizeof *nr);
        if (!nr)
            return IPMPI_ENOMEM;
        /* Unwrap the ring so the oldest entry lands at index 0. */
        for (uint32_t i = 0; i < q->len; i++)
            nr[i] = q->ring[(q->head + i) & (q->cap - 1)];
        free(q->ring);
        q->ring = nr;
        q->cap = ncap;
        q->head = 0;
    }
    q->ring[(q->head + q->len) & (q->cap - 1)] = r;
    q->len++;
    return 0;
}

ipmpi_req_t *ipmpi_equeue_pop(ipmpi_equeue_t *q)
{
    if (q->len == 0)
        return NULL;
    ipmpi_req_t *r = q->ring[q->head];
    q->head = (q->head + 1) & (q->cap - 1);
    q->len--;
    return r;
}

ipmpi_req_t *ipmpi_equeue_at(const ipmpi_equeue_t *q, uint32_t i)
{
    if (i >= q->len)
        return NULL;
    return q->ring[(q->head + i) & (q->cap - 1)];
}

/* Fibonacci hashing spreads sequential dispatch ids over the table. */
static uint32_t slot_of(uint64_t id, uint32_t cap)
{
    return (uint32_t)((id * 0x9E3779B97F4A7C15ull) >> 32) & (cap - 1);
}

void ipmpi_reqtab_init(ipmpi_reqtab_t *t)
{
    memset(t, 0, sizeof *t);
}

void ipmpi_reqtab_fini(ipmpi_reqtab_t *t)
{
    free(t->slots);
    memset(t, 0, sizeof *t);
}

static void put_slot(ipmpi_req_t **slots, uint32_t cap, ipmpi_req_t *r)
{
    uint32_t i = slot_of(r->id, cap);
    while (slots[i])
        i = (i + 1) & (cap - 1);
    slots[i] = r;
}

int ipmpi_reqtab_put(ipmpi_reqtab_t *t, ipmpi_req_t *r)
{
    if ((uint64_t)(t->len + 1) * 2 > t->cap) {
        uint32_t ncap = t->cap ? t->cap * 2 : 16;
        if (ncap < t->cap)
            return IPMPI_ENOMEM;
        ipmpi_req_t **ns = calloc(ncap, sizeof *ns);
        if (!ns)
            return IPMPI_ENOMEM;
        for (uint32_t i = 0; i < t->cap; i++)
            if (t->slots[i])
                put_slot(ns, ncap, t->slots[i]);
        free(t->slots);
        t->slots = ns;
        t->cap = ncap;
    }
    put_slot(t->slots, t->cap, r);
    t->len++;
    return 0;
}

static int find_slot(const ipmpi_reqtab_t *t, uint64_t id, uint32_t *out)
{
    if (t->cap == 0)
        return 0;
    uint32_t i = slot_of(id, t->cap);
    while (t->slots[i]) {
        if (t->slots[i]->id == id) {
            *out = i;
            return 1;
        }
        i = (i + 1) & (t->cap - 1);
    }
    return 0;
}

ipmpi_req_t *ipmpi_reqtab_get(const ipmpi_reqtab_t *t, uint64_t id)
{
    uint32_t i;
    return find_slot(t, id, &i) ? t->slots[i] : NULL;
}

ipmpi_req_t *ipmpi_reqtab_del(ipmpi_reqtab_t *t, uint64_t id)
{
    uint32_t i;
    if (!find_slot(t, id, &i))
        return NULL;
    ipmpi_req_t *r = t->slots[i];
    t->slots[i] = NULL;
    t->len--;
    /* Backward shift: move later members of the probe run into the hole
     * when their home slot does not lie cyclically in (hole, j]. */
    uint32_t hole = i, j = i, mask = t->cap - 1;
    for (;;) {
        j = (j + 1) & mask;
        if (!t->slots[j])
            break;
        uint32_t home = slot_of(t->slots[j]->id, t->cap);
        int in_range = hole <= j ? (home > hole && home <= j) : (home > hole || home <= j);
        if (!in_range) {
            t->slots[hole] = t->slots[j];
            t->slots[j] = NULL;
            hole = j;
        }
    }
    return r;
}

uint32_t ipmpi_reqtab_collect(const ipmpi_reqtab_t *t, ipmpi_req_t **out)
{
    uint32_t n = 0;
    for (uint32_t i = 0; i < t->cap; i++)
        if (t->slots[i])
            out[n++] = t->slots[i];
    return n;
}
