/*
 * Payloads, requests, per-engine FIFOs and the request table: see
 * equeue.h. No I/O. Loop thread only.
 */
#include "equeue.h"

#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "hugemem.h"
#include "mcache.h"
#include "ipmpi/errors.h"

/* ---- large payload buffers ----
 *
 * Measured here, touching fresh memory costs far more than moving bytes
 * into it: a 256 MiB malloc'd buffer takes ~130-170 ms to fault in 4 KiB
 * pages (1.6-2 GB/s) and ~20 ms to unmap, while a copy into warm memory
 * takes ~25 ms. The controller stages every payload it forwards, so big
 * parts get memory that is (1) mapped 2 MiB-aligned with MADV_HUGEPAGE
 * (THP is "madvise" on these machines: 512 times fewer faults, ~25 ms
 * for 256 MiB) and (2) kept in a small cache when freed, so the next
 * payload of a similar size (a repeated push, the pull that follows it)
 * lands in memory that is already faulted in. The cache is bounded and
 * gives its memory back after BIG_IDLE_NS without use
 * (ipmpi_parts_cache_trim), so an idle controller holds nothing extra.
 */
#define BIG_MIN ((uint64_t)1 << 20)      /* parts this large use big buffers */
#define BIG_ALIGN IPMPI_HUGE_ALIGN

static void big_unmap(void *p, size_t cap)
{
    munmap(p, cap);
}

static ipmpi_mcache_t big_cache = {.max = (size_t)1 << 30, .idle_ns = 10ull * 1000000000ull,
                                   .destroy = big_unmap};

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int is_big(uint64_t len)
{
    return len >= BIG_MIN;
}

/* The mapping length for a part of len bytes (plus the spare byte every
 * buffer has). A buffer's capacity is always exactly this, so nothing about
 * it needs storing: a header inside the mapping would fault in a whole huge
 * page per part as soon as a length table announced the part, before any
 * byte of it arrived. */
static size_t big_need(uint64_t len)
{
    return ipmpi_huge_round(len + 1);
}

/* Memory for a part of len bytes, untouched (no page is faulted in):
 * a cached buffer that fits, trimmed to size, or a fresh mapping. */
static uint8_t *big_alloc(uint64_t len)
{
    if (len > SIZE_MAX - 2 * BIG_ALIGN)
        return NULL;
    size_t need = big_need(len), cap = 0;
    uint8_t *base = ipmpi_mcache_take(&big_cache, need, &cap);
    if (!base)
        return ipmpi_huge_map(need);
    if (cap > need) /* both multiples of BIG_ALIGN: the capacity stays big_need(len) */
        munmap(base + need, cap - need);
    return base;
}

static void big_free(uint8_t *base, uint64_t len)
{
    ipmpi_mcache_give(&big_cache, base, big_need(len), mono_ns());
}

uint64_t ipmpi_parts_cache_trim(void)
{
    return ipmpi_mcache_trim(&big_cache, mono_ns());
}

static uint8_t *part_alloc(uint64_t len)
{
    if (is_big(len))
        return big_alloc(len);
    /* malloc(0) may return NULL; one spare byte keeps every buffer real. */
    return malloc((size_t)len + 1);
}

static void part_free(uint8_t *buf, uint64_t len)
{
    if (is_big(len))
        big_free(buf, len);
    else
        free(buf);
}

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
        p->bufs[i] = part_alloc(lens[i]);
        if (!p->bufs[i])
            goto free_bufs;
        p->lens[i] = lens[i];
        p->n = i + 1;
    }
    return p;
free_bufs:
    for (uint32_t i = 0; i < p->n; i++)
        part_free(p->bufs[i], p->lens[i]);
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

ipmpi_charge_t *ipmpi_charge_new(void)
{
    ipmpi_charge_t *ch = calloc(1, sizeof *ch);
    if (ch)
        ch->refs = 1;
    return ch;
}

void ipmpi_charge_unref(ipmpi_charge_t *ch)
{
    if (ch && --ch->refs == 0)
        free(ch);
}

void ipmpi_parts_charge(ipmpi_parts_t *p, ipmpi_charge_t *ch)
{
    p->charge = ch;
    ch->refs++;
    p->charged = ipmpi_parts_bytes(p);
    ch->bytes += p->charged;
}

/* p's parts changed: its charge follows its size. */
static void recharge(ipmpi_parts_t *p)
{
    if (!p->charge)
        return;
    uint64_t now = ipmpi_parts_bytes(p);
    p->charge->bytes = p->charge->bytes - p->charged + now;
    p->charged = now;
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
    for (uint32_t i = 0; i < p->n; i++) {
        if (p->back && p->back[i])
            ipmpi_backing_unref(p->back[i]);
        else
            part_free(p->bufs[i], p->lens[i]);
    }
    if (p->charge) {
        p->charge->bytes -= p->charged;
        ipmpi_charge_unref(p->charge);
    }
    free(p->back);
    free(p->bufs);
    free(p->lens);
    free(p);
}

int ipmpi_parts_set_backing(ipmpi_parts_t *p, uint32_t i, ipmpi_backing_t *b, uint8_t *buf, uint64_t len)
{
    if (!p->back) {
        p->back = calloc(p->n, sizeof *p->back);
        if (!p->back)
            return IPMPI_ENOMEM;
    }
    ipmpi_backing_ref(b); /* first: b may be the backing the part has now */
    if (p->back[i])
        ipmpi_backing_unref(p->back[i]);
    else
        part_free(p->bufs[i], p->lens[i]);
    p->back[i] = b;
    p->bufs[i] = buf;
    p->lens[i] = len;
    recharge(p);
    return 0;
}

int ipmpi_parts_resize(ipmpi_parts_t *p, uint32_t i, uint64_t len)
{
    uint8_t *buf = len <= SIZE_MAX - 1 ? part_alloc(len) : NULL;
    if (!buf)
        return IPMPI_ENOMEM;
    if (p->back && p->back[i]) {
        ipmpi_backing_unref(p->back[i]);
        p->back[i] = NULL;
    } else {
        part_free(p->bufs[i], p->lens[i]);
    }
    p->bufs[i] = buf;
    p->lens[i] = len;
    recharge(p);
    return 0;
}

void ipmpi_parts_drop_last(ipmpi_parts_t *p)
{
    uint32_t i = p->n - 1;
    if (p->back && p->back[i])
        ipmpi_backing_unref(p->back[i]);
    else
        part_free(p->bufs[i], p->lens[i]);
    p->n--;
    recharge(p);
}

void ipmpi_parts_drop_first(ipmpi_parts_t *p)
{
    if (p->back && p->back[0])
        ipmpi_backing_unref(p->back[0]);
    else
        part_free(p->bufs[0], p->lens[0]);
    if (p->back)
        memmove(p->back, p->back + 1, (size_t)(p->n - 1) * sizeof *p->back);
    memmove(p->bufs, p->bufs + 1, (size_t)(p->n - 1) * sizeof *p->bufs);
    memmove(p->lens, p->lens + 1, (size_t)(p->n - 1) * sizeof *p->lens);
    p->n--;
    recharge(p);
}

ipmpi_parts_t *ipmpi_parts_take(ipmpi_parts_t *p, uint32_t first, uint32_t n)
{
    if (first > p->n || n > p->n - first)
        return NULL;
    ipmpi_parts_t *q = calloc(1, sizeof *q);
    if (!q)
        return NULL;
    q->refs = 1;
    if (n == 0)
        return q;
    q->lens = malloc((size_t)n * sizeof *q->lens);
    q->bufs = malloc((size_t)n * sizeof *q->bufs);
    q->back = p->back ? calloc(n, sizeof *q->back) : NULL;
    uint8_t **empty = calloc(n, sizeof *empty);
    int ok = q->lens && q->bufs && (!p->back || q->back) && empty;
    for (uint32_t i = 0; ok && i < n; i++)
        ok = (empty[i] = malloc(1)) != NULL;
    if (!ok) {
        for (uint32_t i = 0; empty && i < n; i++)
            free(empty[i]);
        free(empty);
        free(q->back);
        free(q->bufs);
        free(q->lens);
        free(q);
        return NULL;
    }
    for (uint32_t i = 0; i < n; i++) {
        uint32_t k = first + i;
        q->lens[i] = p->lens[k];
        q->bufs[i] = p->bufs[k];
        if (p->back) {
            q->back[i] = p->back[k];
            p->back[k] = NULL;
        }
        p->bufs[k] = empty[i];
        p->lens[k] = 0;
    }
    q->n = n;
    free(empty);
    recharge(p);
    return q;
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
    ipmpi_ql_init(&r->running);
    return r;
}

void ipmpi_req_free(ipmpi_req_t *r)
{
    if (!r)
        return;
    if (r->nfly) /* freed while in flight: a caller's bug, but the running list stays whole */
        ipmpi_ql_remove(&r->running);
    ipmpi_parts_unref(r->payload);
    if (r->tree_back)
        ipmpi_backing_unref(r->tree_back);
    else
        free(r->tree);
    free(r);
}

void ipmpi_equeue_init(ipmpi_equeue_t *q)
{
    memset(q, 0, sizeof *q);
}

void ipmpi_equeue_fini(ipmpi_equeue_t *q)
{
    if (q->total)
        *q->total -= q->len;
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
    if (q->total)
        (*q->total)++;
    return 0;
}

ipmpi_req_t *ipmpi_equeue_pop(ipmpi_equeue_t *q)
{
    if (q->len == 0)
        return NULL;
    ipmpi_req_t *r = q->ring[q->head];
    q->head = (q->head + 1) & (q->cap - 1);
    q->len--;
    if (q->total)
        (*q->total)--;
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

/* A record's id: its first member (equeue.h). */
static uint64_t rec_id(const void *rec)
{
    uint64_t id;
    memcpy(&id, rec, sizeof id);
    return id;
}

void ipmpi_idtab_init(ipmpi_idtab_t *t)
{
    memset(t, 0, sizeof *t);
}

void ipmpi_idtab_fini(ipmpi_idtab_t *t)
{
    free(t->slots);
    memset(t, 0, sizeof *t);
}

static void put_slot(void **slots, uint32_t cap, void *r)
{
    uint32_t i = slot_of(rec_id(r), cap);
    while (slots[i])
        i = (i + 1) & (cap - 1);
    slots[i] = r;
}

int ipmpi_idtab_put(ipmpi_idtab_t *t, void *r)
{
    if ((uint64_t)(t->len + 1) * 2 > t->cap) {
        uint32_t ncap = t->cap ? t->cap * 2 : 16;
        if (ncap < t->cap)
            return IPMPI_ENOMEM;
        void **ns = calloc(ncap, sizeof *ns);
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

static int find_slot(const ipmpi_idtab_t *t, uint64_t id, uint32_t *out)
{
    if (t->cap == 0)
        return 0;
    uint32_t i = slot_of(id, t->cap);
    while (t->slots[i]) {
        if (rec_id(t->slots[i]) == id) {
            *out = i;
            return 1;
        }
        i = (i + 1) & (t->cap - 1);
    }
    return 0;
}

void *ipmpi_idtab_get(const ipmpi_idtab_t *t, uint64_t id)
{
    uint32_t i;
    return find_slot(t, id, &i) ? t->slots[i] : NULL;
}

void *ipmpi_idtab_del(ipmpi_idtab_t *t, uint64_t id)
{
    uint32_t i;
    if (!find_slot(t, id, &i))
        return NULL;
    void *r = t->slots[i];
    t->slots[i] = NULL;
    t->len--;
    /* Backward shift: move later members of the probe run into the hole
     * when their home slot does not lie cyclically in (hole, j]. */
    uint32_t hole = i, j = i, mask = t->cap - 1;
    for (;;) {
        j = (j + 1) & mask;
        if (!t->slots[j])
            break;
        uint32_t home = slot_of(rec_id(t->slots[j]), t->cap);
        int in_range = hole <= j ? (home > hole && home <= j) : (home > hole || home <= j);
        if (!in_range) {
            t->slots[hole] = t->slots[j];
            t->slots[j] = NULL;
            hole = j;
        }
    }
    return r;
}

uint32_t ipmpi_idtab_collect(const ipmpi_idtab_t *t, void **out)
{
    uint32_t n = 0;
    for (uint32_t i = 0; i < t->cap; i++)
        if (t->slots[i])
            out[n++] = t->slots[i];
    return n;
}
