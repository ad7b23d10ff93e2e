/*
 * A small cache of large buffers kept for reuse: at most IPMPI_MCACHE_SLOTS
 * entries and max bytes, each given back (destroy) after idle_ns unused.
 * Used wherever fresh memory costs more to fault in than the bytes cost to
 * move: the controller's payload buffers and memfds, and the Python
 * receive buffers of clients and engines.
 *
 * Thread safety: none; callers that share a cache between threads lock it.
 */
#ifndef IPMPI_MCACHE_H
#define IPMPI_MCACHE_H

#include <stddef.h>
#include <stdint.h>

#define IPMPI_MCACHE_SLOTS 4

typedef struct ipmpi_mcache {
    struct {
        void *p;     /* NULL: empty */
        size_t cap;
        uint64_t t;  /* when it was given back */
    } slot[IPMPI_MCACHE_SLOTS];
    size_t cached;   /* bytes held */
    size_t max;      /* most bytes held */
    uint64_t idle_ns;
    void (*destroy)(void *p, size_t cap);
} ipmpi_mcache_t;

/* The smallest cached entry of at least need bytes that wastes at most a
 * quarter of itself (removed from the cache; its size in *cap), or NULL. */
void *ipmpi_mcache_take(ipmpi_mcache_t *m, size_t need, size_t *cap);

/* Keeps p (cap bytes) for reuse, evicting the oldest entries to stay in
 * bounds; destroys it at once when it alone is over max. */
void ipmpi_mcache_give(ipmpi_mcache_t *m, void *p, size_t cap, uint64_t now);

/* Destroys entries unused for idle_ns; returns the ns until the next one
 * expires (UINT64_MAX: none held). */
uint64_t ipmpi_mcache_trim(ipmpi_mcache_t *m, uint64_t now);

#endif
