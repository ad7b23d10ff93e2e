/*
 * Controller side of the MPI framing (doc/protocol.md section 3): a frame
 * is one IPMPI_TAG_HDR message (header + length table), then each part as
 * messages of tag IPMPI_TAG_PART of at most IPMPI_MPI_CHUNK bytes.
 *
 * Sends are non-blocking and go straight from the shared payload buffers
 * (a reference is held until every message of the frame completed).
 * Receives start when MPI_Improbe finds a header: the header is taken with
 * MPI_Mrecv, every part is posted with MPI_Irecv into a fresh buffer, and
 * the frame is handed over once all of them completed. Nothing here ever
 * blocks on one rank, so a rank that died mid-transfer costs nothing but
 * the abandoned requests (ipmpi_mpilink_abandon).
 *
 * Thread safety: none; the controller's loop thread only.
 */
#ifndef IPMPI_CTL_MPILINK_H
#define IPMPI_CTL_MPILINK_H

#include <stdint.h>

#include <mpi.h>

#include "codec.h"
#include "equeue.h"

typedef struct ipmpi_sendop ipmpi_sendop_t;
typedef struct ipmpi_recvop ipmpi_recvop_t;

/* Engines of a job that joined later: link ranks base..base+n-1 are
 * ranks 1..n of comm (the controller is its rank 0). */
typedef struct ipmpi_mpilink_comm {
    MPI_Comm comm;
    int base, n;
    int open; /* 0 once the job left: its headers are not probed any more */
} ipmpi_mpilink_comm_t;

/* The longest the link goes without probing comm for headers, however
 * quiet the bell says it is: a net under the announcements. */
#define IPMPI_PROBE_MAX_NS (10000000ull)

typedef struct ipmpi_mpilink {
    MPI_Comm comm;
    int comm_size; /* link ranks below it are ranks of comm */
    ipmpi_mpilink_comm_t *extra;
    uint32_t nextra, extra_cap;
    /* All outstanding send requests, flat for MPI_Testsome; sop[i] is the
     * frame that request i belongs to. */
    MPI_Request *sreq;
    ipmpi_sendop_t **sop;
    int *sidx;
    uint32_t ns, scap;
    ipmpi_recvop_t *recv_head; /* frames being received */
    uint32_t nbulk;            /* frames in flight with a part over the eager size */
    ipmpi_limits_t lim;        /* bounds on frames from engines */
    /* Makes the payload a frame from an engine is received into (refs =
     * 1, NULL on failure); NULL: ipmpi_parts_new. Set by the owner. */
    ipmpi_parts_t *(*alloc)(void *arg, int rank, const ipmpi_hdr_t *h, const uint64_t *lens);
    void *alloc_arg;
    /* Rung after every header posted (doorbell.h); NULL: none. Set by the owner. */
    const struct ipmpi_doorbell *bell;
    /* Headers taken off the wire from ranks of comm on this node: the
     * frames seen, against those the engines announced on the
     * controller's bell (doorbell.h). */
    uint64_t near_hdrs;
    /* Set by the owner before each progress: 1 when every rank of comm
     * that may send a header now is on this node, so announces it on the
     * bell first (no engine of another node has work). Then progress
     * skips the probe of comm while every announced header was seen
     * (Open MPI's probe for any source walks every peer: its cost grows
     * with the engines), but for one probe every IPMPI_PROBE_MAX_NS, and
     * stops probing once every announced header was taken. (A receive
     * posted ahead for any source is no cheaper: ob1 walks every peer
     * when it is posted; measured, within the spread at 256 engines.) */
    int bell_tells;
    uint64_t probe_due;
    uint64_t probes_skipped; /* counted for the log at the end */
    /* Who announced the frames not taken yet (the bell's ring of
     * announcers, doorbell.h): pend[rank] frames of each, the ranks in
     * pend_list (in pend's allocation); ann_cur is the next announcement
     * to read. While they are
     * known the link probes those ranks alone; when not (a maker not
     * recorded yet, or more than the ring holds) it probes any source, as
     * it does at least every IPMPI_PROBE_MAX_NS. */
    uint32_t *pend;
    int *pend_list;
    uint32_t npend;
    uint64_t ann_cur;
    int ann_lost;
    uint64_t wild_due;
    uint64_t probes_named, probes_any; /* counted for the log at the end */
    /* Called after every header posted, with the rank (engines on other
     * nodes: a wake-up datagram); NULL: none. Set by the owner. */
    void (*wake)(void *arg, int rank);
    void *wake_arg;
} ipmpi_mpilink_t;

/* Called with each complete frame from an engine; takes ownership of parts. */
typedef void (*ipmpi_mpilink_cb)(void *arg, int rank, const ipmpi_hdr_t *h, ipmpi_parts_t *parts);

void ipmpi_mpilink_init(ipmpi_mpilink_t *l, MPI_Comm comm);
/* Frees what is left; requests still outstanding are abandoned. */
void ipmpi_mpilink_fini(ipmpi_mpilink_t *l);

/*
 * Starts sending the frame h + parts to rank (parts may be NULL: no parts;
 * a reference is taken and released when the sends completed). Returns 0,
 * IPMPI_ENOMEM or IPMPI_EMPI.
 */
int ipmpi_mpilink_send(ipmpi_mpilink_t *l, int rank, const ipmpi_hdr_t *h, ipmpi_parts_t *parts);
/* One message of tag with part 0 of parts (held until sent): the subtree
 * that precedes a broadcast tree's request (IPMPI_TAG_TREE). */
int ipmpi_mpilink_send_msg(ipmpi_mpilink_t *l, int rank, int tag, ipmpi_parts_t *parts);

/*
 * Engines that joined later (join.c): link ranks base..base+n-1 (base at
 * or above comm's size) are ranks 1..n of comm from now on. Returns 0 or
 * IPMPI_ENOMEM. close_comm stops probing the communicator of base (its
 * job left); the caller frees the communicator.
 */
int ipmpi_mpilink_add_comm(ipmpi_mpilink_t *l, MPI_Comm comm, int base, int n);
void ipmpi_mpilink_close_comm(ipmpi_mpilink_t *l, int base);

/*
 * One round of progress: completes finished sends, starts receiving every
 * header that arrived, completes receives and calls cb for each complete
 * frame (after the internal lists are consistent, so cb may send or
 * abandon). Returns the number of events (0 = nothing happened) or a
 * negative code on an MPI failure.
 */
int ipmpi_mpilink_progress(ipmpi_mpilink_t *l, ipmpi_mpilink_cb cb, void *arg);

/*
 * Cut-through sends (doc/protocol.md section 3): a frame whose parts are
 * still arriving from a client. stream_start posts the header at once;
 * stream_feed posts the bytes that arrived since, in messages of
 * IPMPI_STREAM_CHUNK bytes (the tail of a part as soon as the part is
 * complete); stream_abort ends an unfinished frame with one empty message,
 * which the engine reads as "no request". parts must stay allocated until
 * the op completes: a reference is taken. The op belongs to the link; the
 * caller's handle is valid until stream_feed reported the frame complete
 * or stream_abort was called, and must be forgotten when the rank is
 * abandoned (the op is leaked with the rank's other sends then).
 */
#define IPMPI_STREAM_CHUNK ((uint64_t)4 << 20)

/* Posts the header of h + parts to rank. Returns 0 and *op, or
 * IPMPI_ENOMEM / IPMPI_EMPI (nothing posted). */
int ipmpi_mpilink_stream_start(ipmpi_mpilink_t *l, int rank, const ipmpi_hdr_t *h, ipmpi_parts_t *parts,
                               ipmpi_sendop_t **op);
/*
 * Bytes [0, filled) of part `part` have arrived, and every earlier part is
 * complete (part == parts->n: the whole frame). Returns 1 when the frame is
 * now completely posted (op is then no longer the caller's), 0 when more is
 * to come, or IPMPI_ENOMEM / IPMPI_EMPI (the link to that rank is then out
 * of step: the caller must treat the engine as lost).
 */
int ipmpi_mpilink_stream_feed(ipmpi_mpilink_t *l, ipmpi_sendop_t *op, uint32_t part, uint64_t filled);
/* The rest of the frame will never arrive: posts the empty message that
 * aborts it. op is no longer the caller's. Returns 0, IPMPI_ENOMEM or
 * IPMPI_EMPI (as for feed). */
int ipmpi_mpilink_stream_abort(ipmpi_mpilink_t *l, ipmpi_sendop_t *op);

/* Forgets every send and receive involving rank (it died): its requests
 * and buffers are leaked on purpose, since MPI may still own them. */
void ipmpi_mpilink_abandon(ipmpi_mpilink_t *l, int rank);

/*
 * Frames in flight (either way) with a part too large to go eagerly. Such
 * a transfer moves only while this rank calls into MPI (shared-memory
 * fragments need both sides), and its peer is always ready for it (an
 * engine gets a request only when idle; replies are received as soon as
 * their header is seen), so the loop keeps polling MPI while this is
 * non-zero instead of sleeping.
 */
static inline uint32_t ipmpi_mpilink_bulk(const ipmpi_mpilink_t *l) { return l->nbulk; }

/* Number of outstanding send requests. */
static inline uint32_t ipmpi_mpilink_sends(const ipmpi_mpilink_t *l) { return l->ns; }

#endif
