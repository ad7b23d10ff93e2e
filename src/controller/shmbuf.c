/* Controller shared-memory backings: see shmbuf.h. Loop thread only. */
#include "shmbuf.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "ipmpi/errors.h"
#include "backoff.h"
#include "codec.h"
#include "hugemem.h"
#include "mcache.h"
#include "shm.h"

static void destroy(ipmpi_shmbuf_t *sb)
{
    munmap(sb->base, (size_t)sb->cap);
    if (sb->fd >= 0)
        close(sb->fd);
    free(sb);
}

static void pool_destroy(void *p, size_t cap)
{
    (void)cap;
    destroy(p);
}

/* Own memfds no reply uses, for the next ones. */
static ipmpi_mcache_t pool = {.max = (size_t)1 << 30, .idle_ns = 10ull * 1000000000ull, .destroy = pool_destroy};

/* Last reference of an own memfd gone: keep it for the next reply. */
static void own_release(ipmpi_backing_t *b)
{
    ipmpi_shmbuf_t *sb = (ipmpi_shmbuf_t *)b;
    ipmpi_mcache_give(&pool, sb, (size_t)sb->cap, ipmpi_now_ns());
}

static void peer_release(ipmpi_backing_t *b)
{
    destroy((ipmpi_shmbuf_t *)b);
}

ipmpi_shmbuf_t *ipmpi_shmbuf_get(uint64_t len)
{
    if (len > SIZE_MAX - IPMPI_HUGE_ALIGN)
        return NULL;
    size_t need = ipmpi_huge_round(len), cap = 0;
    ipmpi_shmbuf_t *sb = ipmpi_mcache_take(&pool, (size_t)need, &cap);
    if (sb) {
        sb->b.refs = 1;
        return sb;
    }
    sb = calloc(1, sizeof *sb);
    if (!sb)
        return NULL;
    sb->fd = ipmpi_shm_create("reply", need);
    if (sb->fd < 0) {
        free(sb);
        return NULL;
    }
    sb->base = ipmpi_shm_map(sb->fd, need, 1, 0);
    if (!sb->base) {
        close(sb->fd);
        free(sb);
        return NULL;
    }
    sb->cap = need;
    sb->b.refs = 1;
    sb->b.release = own_release;
    return sb;
}

uint64_t ipmpi_shmbuf_trim(void)
{
    return ipmpi_mcache_trim(&pool, ipmpi_now_ns());
}

ipmpi_shmbuf_t *ipmpi_shmbuf_peer(ipmpi_shmcache_t *cache, int pid, uint32_t fd, uint64_t need, char *why,
                                  size_t whycap)
{
    uint64_t size = 0, ino = 0;
    int g = ipmpi_shm_open_peer(pid, fd, need, &size, &ino, why, whycap);
    if (g < 0)
        return NULL;
    int victim = -1;
    for (int i = 0; i < IPMPI_SHMCACHE_SLOTS; i++) {
        ipmpi_shmbuf_t *sb = cache->sb[i];
        if (sb && cache->fd[i] == fd && sb->ino == ino && sb->cap == size) {
            close(g);
            cache->use[i] = ++cache->tick;
            cache->t[i] = ipmpi_now_ns();
            return (ipmpi_shmbuf_t *)ipmpi_backing_ref(&sb->b);
        }
        /* The victim: an empty slot, else the least recently used. */
        if (victim < 0 || (cache->sb[victim] && (!sb || cache->use[i] < cache->use[victim])))
            victim = i;
    }
    ipmpi_shmbuf_t *sb = calloc(1, sizeof *sb);
    if (!sb) {
        close(g);
        snprintf(why, whycap, "controller out of memory");
        return NULL;
    }
    /* Populated at once: the pages are the client's, already faulted in;
     * mapping them in one go is much cheaper than faulting one by one. */
    sb->base = size ? ipmpi_shm_map(g, size, 0, 1) : NULL;
    close(g);
    if (!sb->base) {
        free(sb);
        snprintf(why, whycap, "cannot map memfd %u of pid %d (%llu bytes)", fd, pid, (unsigned long long)size);
        return NULL;
    }
    sb->fd = -1;
    sb->cap = size;
    sb->ino = ino;
    sb->b.refs = 1;
    sb->b.release = peer_release;
    if (cache->sb[victim])
        ipmpi_backing_unref(&cache->sb[victim]->b);
    cache->sb[victim] = (ipmpi_shmbuf_t *)ipmpi_backing_ref(&sb->b);
    cache->fd[victim] = fd;
    cache->use[victim] = ++cache->tick;
    cache->t[victim] = ipmpi_now_ns();
    return sb;
}

#define PEER_IDLE_NS (10ull * 1000000000ull)

uint64_t ipmpi_shmcache_trim(ipmpi_shmcache_t *cache, uint64_t now)
{
    uint64_t next = UINT64_MAX;
    for (int i = 0; i < IPMPI_SHMCACHE_SLOTS; i++) {
        if (!cache->sb[i])
            continue;
        if (now - cache->t[i] >= PEER_IDLE_NS) {
            ipmpi_backing_unref(&cache->sb[i]->b);
            cache->sb[i] = NULL;
        } else if (cache->t[i] + PEER_IDLE_NS - now < next) {
            next = cache->t[i] + PEER_IDLE_NS - now;
        }
    }
    return next;
}

void ipmpi_shmcache_clear(ipmpi_shmcache_t *cache)
{
    for (int i = 0; i < IPMPI_SHMCACHE_SLOTS; i++) {
        if (cache->sb[i])
            ipmpi_backing_unref(&cache->sb[i]->b);
        cache->sb[i] = NULL;
    }
}

/* ---- frames ---- */

int ipmpi_shm_attach(ipmpi_shmcache_t *cache, int pid, ipmpi_parts_t *p, const ipmpi_limits_t *lim, char *why,
                     size_t whycap, ipmpi_shmref_t *vm, uint32_t *nvm)
{
    *nvm = 0;
    if (p->n < 2) {
        snprintf(why, whycap, "a shared-memory frame needs a part and the table");
        return IPMPI_EPROTO;
    }
    uint32_t n = p->n - 1;
    uint64_t wire = 0;
    for (uint32_t i = 0; i < n; i++)
        wire += p->lens[i];
    ipmpi_shmref_t *refs = malloc((size_t)n * sizeof *refs);
    if (!refs) {
        snprintf(why, whycap, "controller out of memory");
        return IPMPI_EACCES;
    }
    long k = ipmpi_shmref_decode(p->bufs[n], p->lens[n], n, p->lens, wire, lim, refs, n);
    if (k < 0) {
        snprintf(why, whycap, k == IPMPI_E2BIG ? "shared-memory parts over the frame limits"
                                               : "malformed shared-memory table of %llu bytes",
                 (unsigned long long)p->lens[n]);
        free(refs);
        return k == IPMPI_E2BIG ? IPMPI_E2BIG : IPMPI_EPROTO;
    }
    ipmpi_parts_drop_last(p);
    int rc = 0;
    for (long i = 0; i < k && rc == 0; i++) {
        if (refs[i].fd & IPMPI_SHM_VM) {
            /* Process memory: room now, the bytes are the caller's to copy
             * (ipmpi_vm_read), so it can forward them as they come. */
            if (ipmpi_parts_resize(p, refs[i].part, refs[i].len) != 0) {
                snprintf(why, whycap, "controller out of memory");
                rc = IPMPI_EACCES;
            } else {
                vm[(*nvm)++] = refs[i];
            }
            continue;
        }
        ipmpi_shmbuf_t *sb = ipmpi_shmbuf_peer(cache, pid, refs[i].fd, refs[i].off + refs[i].len, why, whycap);
        if (!sb)
            rc = IPMPI_EACCES;
        else if (ipmpi_parts_set_backing(p, refs[i].part, &sb->b, sb->base + refs[i].off, refs[i].len) != 0) {
            snprintf(why, whycap, "controller out of memory");
            rc = IPMPI_EACCES;
        }
        if (sb)
            ipmpi_backing_unref(&sb->b);
    }
    free(refs);
    return rc;
}

ipmpi_parts_t *ipmpi_shm_alloc_parts(uint32_t n, const uint64_t *lens)
{
    uint64_t *l0 = calloc(n ? n : 1, sizeof *l0);
    if (!l0)
        return NULL;
    for (uint32_t i = 0; i < n; i++)
        l0[i] = lens[i] >= IPMPI_SHM_MIN ? 0 : lens[i];
    ipmpi_parts_t *p = ipmpi_parts_new(n, l0);
    free(l0);
    for (uint32_t i = 0; p && i < n; i++) {
        if (lens[i] < IPMPI_SHM_MIN)
            continue;
        ipmpi_shmbuf_t *sb = ipmpi_shmbuf_get(lens[i]);
        int rc = sb ? ipmpi_parts_set_backing(p, i, &sb->b, sb->base, lens[i]) : IPMPI_ENOMEM;
        if (sb)
            ipmpi_backing_unref(&sb->b);
        if (rc != 0) {
            /* No memfd to be had: plain memory for the whole frame. */
            ipmpi_parts_unref(p);
            return ipmpi_parts_new(n, lens);
        }
    }
    return p;
}

/* A backing that is a reference to another payload (a wire form shares
 * the small parts of the payload it was made from). */
typedef struct view_backing {
    ipmpi_backing_t b;
    ipmpi_parts_t *of;
} view_backing_t;

static void view_release(ipmpi_backing_t *b)
{
    view_backing_t *v = (view_backing_t *)b;
    ipmpi_parts_unref(v->of);
    free(v);
}

ipmpi_backing_t *ipmpi_parts_hold(ipmpi_parts_t *p)
{
    view_backing_t *v = calloc(1, sizeof *v);
    if (!v)
        return NULL;
    v->b.release = view_release;
    v->b.refs = 1;
    v->of = ipmpi_parts_ref(p);
    return &v->b;
}

static int is_own(const ipmpi_parts_t *p, uint32_t i)
{
    return p->back && p->back[i] && p->back[i]->release == own_release;
}

ipmpi_parts_t *ipmpi_shm_wire(ipmpi_parts_t *parts, int vm, uint32_t *next_vm, struct ipmpi_lent *lent,
                              uint32_t *nlent, ipmpi_backing_t **hold_out)
{
    *hold_out = NULL;
    uint32_t n = parts ? parts->n : 0, k = 0;
    for (uint32_t i = 0; i < n; i++)
        k += (uint32_t)(is_own(parts, i) || (vm && parts->lens[i] >= IPMPI_SHM_MIN));
    *nlent = 0;
    if (k == 0)
        return NULL;
    uint64_t *lens = calloc((size_t)n + 1, sizeof *lens);
    if (!lens)
        return NULL;
    lens[n] = (uint64_t)k * IPMPI_SHMREF_SIZE;
    ipmpi_parts_t *w = ipmpi_parts_new(n + 1, lens);
    free(lens);
    ipmpi_backing_t *hold = w ? ipmpi_parts_hold(parts) : NULL;
    if (!hold) {
        ipmpi_parts_unref(w);
        return NULL;
    }
    uint32_t j = 0;
    int rc = 0;
    for (uint32_t i = 0; i < n && rc == 0; i++) {
        ipmpi_shmref_t r = {.part = i, .len = parts->lens[i]};
        if (is_own(parts, i)) {
            ipmpi_shmbuf_t *sb = (ipmpi_shmbuf_t *)parts->back[i];
            r.fd = (uint32_t)sb->fd;
            r.off = (uint64_t)(parts->bufs[i] - sb->base);
            lent[j] = (struct ipmpi_lent){.handle = r.fd, .b = &sb->b, .bytes = sb->cap};
        } else if (vm && parts->lens[i] >= IPMPI_SHM_MIN) {
            r.fd = IPMPI_SHM_VM | (++*next_vm & ~IPMPI_SHM_VM);
            r.off = (uint64_t)(uintptr_t)parts->bufs[i];
            lent[j] = (struct ipmpi_lent){.handle = r.fd, .b = hold, .bytes = parts->lens[i]};
        } else {
            if (parts->lens[i] > 0)
                rc = ipmpi_parts_set_backing(w, i, hold, parts->bufs[i], parts->lens[i]);
            continue;
        }
        ipmpi_shmref_encode(&r, w->bufs[n] + (size_t)j * IPMPI_SHMREF_SIZE);
        j++;
    }
    if (rc != 0) {
        ipmpi_backing_unref(hold);
        ipmpi_parts_unref(w);
        return NULL;
    }
    *nlent = j;
    *hold_out = hold; /* the caller drops it once it has lent what it needs */
    return w;
}
