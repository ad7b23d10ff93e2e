/*
 * Controller data structures with no I/O: shared payloads, requests, the
 * per-engine FIFO of request references, and the request table.
 *
 * A payload (ipmpi_parts_t) is the list of parts of one frame, each part in
 * its own heap buffer, reference-counted so that one client payload sent to
 * many engines, or one engine reply queued to a client, is held once and
 * never copied. A request (ipmpi_req_t) is one client request for engines:
 * it is referenced by the FIFO of every target engine until that engine has
 * replied or the request failed there ("pending" counts those references).
 * The request table maps the controller's dispatch ids to live requests.
 *
 * Thread safety: none; only the controller's loop thread uses these.
 */
#ifndef IPMPI_CTL_EQUEUE_H
#define IPMPI_CTL_EQUEUE_H

#include <stddef.h>
#include <stdint.h>

#include "qlink.h"

/*
 * Memory that some parts live in instead of a buffer of their own (a
 * shared-memory mapping, shmbuf.h): reference-counted, release() frees it
 * when the last reference goes.
 */
typedef struct ipmpi_backing {
    unsigned refs;
    void (*release)(struct ipmpi_backing *b);
} ipmpi_backing_t;

static inline ipmpi_backing_t *ipmpi_backing_ref(ipmpi_backing_t *b)
{
    b->refs++;
    return b;
}
static inline void ipmpi_backing_unref(ipmpi_backing_t *b)
{
    if (b && --b->refs == 0)
        b->release(b);
}

/*
 * A byte count that payloads are charged to (the bytes one client has
 * sent that the controller still holds: back-pressure, session.h).
 * Reference-counted: the session holds one, each charged payload one, so
 * a payload may outlive its session.
 */
typedef struct ipmpi_charge {
    unsigned refs;
    uint64_t bytes;
} ipmpi_charge_t;

/* A new charge of 0 bytes, refs = 1 (caller owns). NULL on ENOMEM. */
ipmpi_charge_t *ipmpi_charge_new(void);
/* Drops one reference (NULL is ignored); frees at zero. */
void ipmpi_charge_unref(ipmpi_charge_t *ch);

typedef struct ipmpi_parts {
    unsigned refs;
    uint32_t n;
    uint64_t *lens;  /* n lengths */
    uint8_t **bufs;  /* n buffers, each owned by this object (never NULL) */
    /* NULL, or n entries: back[i] != NULL means bufs[i] points into that
     * backing (one reference held) instead of an own buffer. */
    ipmpi_backing_t **back;
    /* NULL, or the charge this payload's bytes count in (one reference
     * held): `charged` bytes, kept equal to ipmpi_parts_bytes() by the
     * functions below that change parts, until the payload is freed. */
    ipmpi_charge_t *charge;
    uint64_t charged;
} ipmpi_parts_t;

/* Counts p's bytes in ch (a reference is taken) until p is freed; p must
 * not be charged yet. */
void ipmpi_parts_charge(ipmpi_parts_t *p, ipmpi_charge_t *ch);

/*
 * Makes a payload of n parts with the given lengths, each buffer allocated
 * (uninitialised) and refs = 1. lens may be NULL when n == 0. Returns NULL
 * when out of memory. Caller owns the reference.
 */
ipmpi_parts_t *ipmpi_parts_new(uint32_t n, const uint64_t *lens);
/* Makes a one-part payload holding a copy of len bytes of data. NULL on ENOMEM. */
ipmpi_parts_t *ipmpi_parts_from(const void *data, size_t len);
/* Takes one more reference; returns p. */
ipmpi_parts_t *ipmpi_parts_ref(ipmpi_parts_t *p);
/* Drops one reference (NULL is ignored); frees at zero. */
void ipmpi_parts_unref(ipmpi_parts_t *p);
/* Frees part 0 and shifts the others down (the target list of a request).
 * Only valid while the caller holds the only reference and n > 0. */
void ipmpi_parts_drop_first(ipmpi_parts_t *p);
/*
 * Makes part i live in backing b at buf (len bytes) instead of its own
 * buffer, which is freed; takes a reference on b. Only while the caller
 * holds the only reference. Returns 0 or IPMPI_ENOMEM (nothing changed).
 */
int ipmpi_parts_set_backing(ipmpi_parts_t *p, uint32_t i, ipmpi_backing_t *b, uint8_t *buf, uint64_t len);
/* Gives part i a fresh own buffer of len bytes (uninitialised) in place of
 * its buffer or backing. Only while the caller holds the only reference.
 * Returns 0 or IPMPI_ENOMEM (nothing changed). */
int ipmpi_parts_resize(ipmpi_parts_t *p, uint32_t i, uint64_t len);
/* Frees the last part (the shm table of a frame). Only valid while the
 * caller holds the only reference and n > 0. */
void ipmpi_parts_drop_last(ipmpi_parts_t *p);
/*
 * Moves parts first..first+n-1 of p (buffers and backings) into a new
 * payload (refs = 1, caller owns); p keeps its part count, those parts
 * left empty. Only while the caller holds p's only reference. NULL on
 * ENOMEM or a bad range (p unchanged).
 */
ipmpi_parts_t *ipmpi_parts_take(ipmpi_parts_t *p, uint32_t first, uint32_t n);
/* Sum of the part lengths. */
uint64_t ipmpi_parts_bytes(const ipmpi_parts_t *p);
/*
 * Parts of 1 MiB or more live in 2 MiB-aligned transparent-huge-page
 * mappings, and freed ones are kept in a small cache (at most 4 buffers,
 * 1 GiB) for the next payload of a similar size: fresh memory costs more
 * to fault in than the bytes cost to move. This releases cached buffers
 * unused for 10 s and returns the nanoseconds until the next one expires
 * (UINT64_MAX: none cached). The controller's loop calls it every round
 * and wakes up for the next expiry.
 */
uint64_t ipmpi_parts_cache_trim(void);

typedef struct ipmpi_req {
    uint64_t id;          /* dispatch id, sent to engines as req_id; first (ipmpi_idtab_t) */
    uint64_t client_req;  /* the client's req_id, echoed in replies */
    uint64_t session;     /* owning session id; may outlive the session */
    uint8_t kind;
    uint32_t total;       /* target engines: replies the client expects */
    uint32_t pending;     /* engines that still hold this request */
    ipmpi_parts_t *payload; /* owned reference */
    /* While its payload is still being forwarded as it arrives from the
     * client (cut-through, requests.c); NULL otherwise. Borrowed: whoever
     * settles the request first unlinks the two. */
    struct ipmpi_ctl_stream *stream;
    /* Withdrawn cut-through: no client waits for this request (its frame
     * is submitted again once complete); the engine's answer is dropped. */
    int quiet;
    /* The request's IPMPI_F_SHM_OK and IPMPI_F_VM_OK: how the client allows
     * its replies' large parts to come (memfds; process memory); and
     * IPMPI_F_GATHER_OK: whether a tree's gathered replies may go to it
     * whole (tree.c). */
    uint16_t reply_flags;
    /* Header flags passed on to the engines (IPMPI_F_STREAM). */
    uint16_t eng_flags;
    /* Streamed output (IPMPI_F_MORE replies) dropped because the client
     * was not reading: bytes, told to the client before the last reply. */
    uint64_t out_dropped;
    /* Its kept result (results.h), while it runs; NULL: none. Borrowed:
     * the record and the request point at each other until it is done. */
    struct ipmpi_result *res;
    /* Sent as a broadcast tree (tree.h): rank 0 (the controller), then the
     * engines' ranks; owned, NULL: sent to each engine. */
    int32_t *tree;
    uint32_t ntree;
    /* Not NULL: tree lies in this shared memory (the controller's tree of
     * every engine, tree.c), one reference held, instead of being owned. */
    ipmpi_backing_t *tree_back;
    /* Its subtrees whose gathered frame has not come yet (tree.c): the
     * frames the controller's bell may sleep for; 0 once a relay died. */
    uint32_t tree_open;
    /* Engines that hold it in flight (sched.c counts them), and while
     * that is nonzero its link in the scheduler's list of running
     * requests (ipmpi_sched_t.running): the controller's bell reads them
     * instead of every engine (dispatch.c). */
    uint32_t nfly;
    ipmpi_qlink_t running;
} ipmpi_req_t;

/* Allocates a request owning payload (taken on success). NULL on ENOMEM. */
ipmpi_req_t *ipmpi_req_new(uint64_t id, uint64_t client_req, uint64_t session, uint8_t kind,
                           uint32_t total, ipmpi_parts_t *payload);
/* Frees the request and its payload reference. */
void ipmpi_req_free(ipmpi_req_t *r);

/*
 * FIFO of request references for one engine: a power-of-two ring that grows
 * by doubling. Push/pop are O(1) amortised. The queue borrows the requests.
 */
typedef struct ipmpi_equeue {
    ipmpi_req_t **ring;
    uint32_t cap;   /* 0 or a power of two */
    uint32_t head;  /* index of the oldest entry */
    uint32_t len;
    /* NULL, or a count that every push and pop of this queue moves too
     * (the scheduler's requests queued on all its engines). */
    uint32_t *total;
} ipmpi_equeue_t;

void ipmpi_equeue_init(ipmpi_equeue_t *q);
/* Frees the ring (not the requests). */
void ipmpi_equeue_fini(ipmpi_equeue_t *q);
/* Appends r. Returns 0 or IPMPI_ENOMEM (queue unchanged). */
int ipmpi_equeue_push(ipmpi_equeue_t *q, ipmpi_req_t *r);
/* Removes and returns the oldest entry, or NULL when empty. */
ipmpi_req_t *ipmpi_equeue_pop(ipmpi_equeue_t *q);
/* Returns entry i (0 = oldest) without removing it; NULL if out of range. */
ipmpi_req_t *ipmpi_equeue_at(const ipmpi_equeue_t *q, uint32_t i);
static inline uint32_t ipmpi_equeue_len(const ipmpi_equeue_t *q) { return q->len; }

/*
 * Id table: open addressing with linear probing on a u64 id, backward-
 * shift deletion (no tombstones), grown at 50% load. It borrows records
 * whose first member is their uint64_t id: requests (ipmpi_req_t, keyed
 * by dispatch id) and tasks (tasks.h, keyed by task id).
 */
typedef struct ipmpi_idtab {
    void **slots;
    uint32_t cap;  /* 0 or a power of two */
    uint32_t len;
} ipmpi_idtab_t;

void ipmpi_idtab_init(ipmpi_idtab_t *t);
void ipmpi_idtab_fini(ipmpi_idtab_t *t);
/* Inserts rec (its id must not be present). Returns 0 or IPMPI_ENOMEM. */
int ipmpi_idtab_put(ipmpi_idtab_t *t, void *rec);
/* Returns the record with this id, or NULL. */
void *ipmpi_idtab_get(const ipmpi_idtab_t *t, uint64_t id);
/* Removes and returns the record with this id, or NULL. */
void *ipmpi_idtab_del(ipmpi_idtab_t *t, uint64_t id);
/* Writes every record of the table into out (room for t->len entries),
 * in no particular order; returns how many. */
uint32_t ipmpi_idtab_collect(const ipmpi_idtab_t *t, void **out);

/* The request table: an id table of requests by dispatch id. */
typedef ipmpi_idtab_t ipmpi_reqtab_t;
static inline void ipmpi_reqtab_init(ipmpi_reqtab_t *t) { ipmpi_idtab_init(t); }
static inline void ipmpi_reqtab_fini(ipmpi_reqtab_t *t) { ipmpi_idtab_fini(t); }
static inline int ipmpi_reqtab_put(ipmpi_reqtab_t *t, ipmpi_req_t *r) { return ipmpi_idtab_put(t, r); }
static inline ipmpi_req_t *ipmpi_reqtab_get(const ipmpi_reqtab_t *t, uint64_t id) { return ipmpi_idtab_get(t, id); }
static inline ipmpi_req_t *ipmpi_reqtab_del(ipmpi_reqtab_t *t, uint64_t id) { return ipmpi_idtab_del(t, id); }
/* For draining at shutdown. */
static inline uint32_t ipmpi_reqtab_collect(const ipmpi_reqtab_t *t, ipmpi_req_t **out)
{
    return ipmpi_idtab_collect(t, (void **)out);
}

#endif
