/*
 * The controller's side of same-host shared memory (doc/protocol.md
 * section 5): payload backings that are memfd mappings.
 *
 * - Own memfds, for large reply parts that the controller receives from
 *   engines and lends to a client on its node: ipmpi_shmbuf_get. When the
 *   last reference goes (the payload is freed and the client released
 *   it), the memfd goes back to a small pool (at most 4, 1 GiB, 10 s
 *   idle), because filling fresh shared memory costs ~7x more than the
 *   copy into memory already faulted in.
 * - A client's memfds, mapped read-only for a request's large parts:
 *   ipmpi_shmbuf_peer, through a per-session cache of the last mappings
 *   (ipmpi_shmcache_t), so a client that reuses its memfds costs one
 *   open() and fstat() per part.
 *
 * Thread safety: none; the controller's loop thread only.
 */
#ifndef IPMPI_CTL_SHMBUF_H
#define IPMPI_CTL_SHMBUF_H

#include <stddef.h>
#include <stdint.h>

#include "codec.h"
#include "equeue.h"

typedef struct ipmpi_shmbuf {
    ipmpi_backing_t b; /* first: a shmbuf is a backing */
    int fd;            /* own memfd (lendable), or -1 for a client's */
    uint8_t *base;     /* mapping of cap bytes */
    uint64_t cap;
    uint64_t ino;
    uint64_t t;        /* when it went back to the pool */
} ipmpi_shmbuf_t;

/* An own memfd of at least len bytes (from the pool when one fits), refs
 * = 1. NULL when out of memory or file descriptors. */
ipmpi_shmbuf_t *ipmpi_shmbuf_get(uint64_t len);

/* Closes pooled memfds unused for 10 s; returns ns until the next expiry
 * (UINT64_MAX: none pooled). */
uint64_t ipmpi_shmbuf_trim(void);

/* What a reply lent the client: a memfd (handle = its fd) or our own
 * memory (handle with IPMPI_SHM_VM set), kept alive by b. */
struct ipmpi_lent {
    uint32_t handle;
    ipmpi_backing_t *b;
    uint64_t bytes;
};

#define IPMPI_SHMCACHE_SLOTS 8
typedef struct ipmpi_shmcache {
    uint32_t fd[IPMPI_SHMCACHE_SLOTS];
    ipmpi_shmbuf_t *sb[IPMPI_SHMCACHE_SLOTS]; /* one reference each; NULL: empty */
    uint64_t use[IPMPI_SHMCACHE_SLOTS];
    uint64_t t[IPMPI_SHMCACHE_SLOTS]; /* last use (ns) */
    uint64_t tick;
} ipmpi_shmcache_t;

/*
 * The mapping of memfd fd of client pid covering [0, need) (a reference
 * for the caller), from the cache when the fd still names the same memfd.
 * NULL with the reason in why when the fd is not an acceptable memfd
 * (ipmpi_shm_open_peer) or cannot be mapped.
 */
ipmpi_shmbuf_t *ipmpi_shmbuf_peer(ipmpi_shmcache_t *cache, int pid, uint32_t fd, uint64_t need, char *why,
                                  size_t whycap);
/* Drops every cached mapping. */
void ipmpi_shmcache_clear(ipmpi_shmcache_t *cache);
/* Drops mappings unused for 10 s; returns ns until the next one expires
 * (UINT64_MAX: none held). */
uint64_t ipmpi_shmcache_trim(ipmpi_shmcache_t *cache, uint64_t now);

/*
 * Frames (codec and payload glue, no session state):
 *
 * ipmpi_shm_attach: p is a client frame with IPMPI_F_SHM from pid: decodes
 * its shm table (the last part; removed) and makes each part it names live
 * in the client's memfd. Returns 0; IPMPI_EPROTO or IPMPI_E2BIG for a bad
 * table (the stream is not to be trusted: close); IPMPI_EACCES when a memfd
 * is refused (p unchanged apart from parts already attached; drop it).
 * why gets the reason. Parts named as process memory (IPMPI_SHM_VM) get
 * buffers of their length, and their entries go to vm[] (room for p->n),
 * *nvm many, in part order: the caller copies them (ipmpi_vm_read) and
 * then acknowledges, so the client may touch that memory again.
 */
int ipmpi_shm_attach(ipmpi_shmcache_t *cache, int pid, ipmpi_parts_t *p, const ipmpi_limits_t *lim, char *why,
                     size_t whycap, ipmpi_shmref_t *vm, uint32_t *nvm);

/* A payload for a reply of n parts whose parts of IPMPI_SHM_MIN bytes or
 * more are own memfds (others, or all if memfds run out: plain buffers). */
ipmpi_parts_t *ipmpi_shm_alloc_parts(uint32_t n, const uint64_t *lens);

/*
 * The wire form of parts for an IPMPI_F_SHM reply: every part in an own
 * memfd, and with vm every other part of IPMPI_SHM_MIN bytes or more (as
 * process memory, handle from ++*next_vm), becomes an empty part named in
 * a table appended as the last part; the other parts are shared with parts,
 * not copied. NULL when no part qualifies, or on ENOMEM (then send parts
 * as they are). lent[] (room for parts->n) gets what each entry lends,
 * *nlent many, with borrowed backings; *hold_out is a reference the caller
 * drops once it has taken its own (ipmpi_session_lend).
 */
ipmpi_parts_t *ipmpi_shm_wire(ipmpi_parts_t *parts, int vm, uint32_t *next_vm, struct ipmpi_lent *lent,
                              uint32_t *nlent, ipmpi_backing_t **hold_out);

/* A backing that holds a reference to p (keeps its buffers alive while a
 * client reads them from our memory). refs = 1; NULL on ENOMEM. */
ipmpi_backing_t *ipmpi_parts_hold(ipmpi_parts_t *p);

#endif
