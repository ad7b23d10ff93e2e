/*
 * Keeping results within a memory budget, with no I/O: the accounting and
 * the eviction order that the task store (tasks.h) and the store of
 * MultiEngine request results (results.c) share, and the set of ids
 * whose results were evicted, so that asking for one says "evicted", not
 * "unknown".
 *
 * A kept result is an ipmpi_rentry_t embedded in its record. Entries are
 * either delivered (some client got the result: it is kept only in case
 * that client's link dropped before it read it) or kept (nobody got it
 * yet: its client is gone, or it was never asked for). Eviction takes
 * delivered entries first, oldest first, then kept ones, oldest first;
 * delivered entries may also be bounded on their own (delivered_max), so
 * that results of live clients cost little.
 *
 * `bytes` is everything counted against the budget: the entries' bytes
 * plus whatever else the owner counts (queued task payloads, replies of
 * requests still running) through ipmpi_rstore_count.
 *
 * Thread safety: none; the controller's loop thread only.
 */
#ifndef IPMPI_CTL_RSTORE_H
#define IPMPI_CTL_RSTORE_H

#include <stdint.h>

#include "sched.h" /* ipmpi_qlink_t */

/* Ids remembered as evicted, at most; beyond that the oldest memories go
 * all at once (those ids then read as unknown). */
#define IPMPI_EVICTED_MAX (1u << 20)

/* A set of u64 ids: open addressing, no deletion (cleared as a whole). */
typedef struct ipmpi_idset {
    uint64_t *slots; /* id + 1; 0 marks an empty slot */
    uint32_t cap, len;
} ipmpi_idset_t;

int ipmpi_idset_has(const ipmpi_idset_t *set, uint64_t id);
/* Adds id; out of memory, it is silently not remembered (the id then
 * reads as unknown: no harm beyond the wording). */
void ipmpi_idset_add(ipmpi_idset_t *set, uint64_t id);
void ipmpi_idset_fini(ipmpi_idset_t *set);

typedef struct ipmpi_rentry {
    ipmpi_qlink_t q;   /* in delivered or kept, oldest first; unlinked: not in the store */
    uint64_t bytes;
    int delivered;
} ipmpi_rentry_t;

typedef struct ipmpi_rstore {
    uint64_t bytes, budget;
    uint64_t delivered_bytes, delivered_max;
    ipmpi_qlink_t delivered, kept;
    ipmpi_idset_t evicted;
} ipmpi_rstore_t;

/* delivered_max: bound on delivered entries' bytes (budget: none of their own). */
void ipmpi_rstore_init(ipmpi_rstore_t *st, uint64_t budget, uint64_t delivered_max);
/* Frees the evicted set; the records are the owner's. */
void ipmpi_rstore_fini(ipmpi_rstore_t *st);
/* Counts n more bytes of the owner's own (negative: fewer). */
static inline void ipmpi_rstore_count(ipmpi_rstore_t *st, int64_t n) { st->bytes += (uint64_t)n; }
/* e (not in the store) joins it as the newest kept entry of `bytes` bytes. */
void ipmpi_rstore_add(ipmpi_rstore_t *st, ipmpi_rentry_t *e, uint64_t bytes);
/* e's result went to a client: it becomes the newest delivered entry. */
void ipmpi_rstore_delivered(ipmpi_rstore_t *st, ipmpi_rentry_t *e);
/* e leaves the store (cleared or evicted); no-op when it is not in it. */
void ipmpi_rstore_del(ipmpi_rstore_t *st, ipmpi_rentry_t *e);
static inline int ipmpi_rstore_has(const ipmpi_rentry_t *e) { return e->q.next != NULL && e->q.next != &e->q; }
/* An entry initialised as not in the store. */
static inline void ipmpi_rentry_init(ipmpi_rentry_t *e) { ipmpi_ql_init(&e->q); e->bytes = 0; e->delivered = 0; }
/*
 * The next entry to evict so that `need` more bytes fit in the budget and
 * the delivered entries within delivered_max, or NULL when everything
 * fits (or nothing but keep is left to evict). The caller removes it
 * (ipmpi_rstore_del, after ipmpi_idset_add(&st->evicted, id)) and asks
 * again.
 */
ipmpi_rentry_t *ipmpi_rstore_victim(const ipmpi_rstore_t *st, uint64_t need, const ipmpi_rentry_t *keep);
/* Some entry of the store (the oldest delivered, else the oldest kept), or
 * NULL when it has none: for clearing it all. */
ipmpi_rentry_t *ipmpi_rstore_first(const ipmpi_rstore_t *st);
static inline int ipmpi_rstore_fits(const ipmpi_rstore_t *st, uint64_t need)
{
    return st->bytes + need <= st->budget;
}

#endif
