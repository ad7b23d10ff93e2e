/*
 * Doorbells: an idle engine sleeps in the kernel instead of polling MPI.
 *
 * MPI has no wait that does not spin, so an idle rank polls with a
 * back-off (backoff.h); the back-off that keeps idle engines cheap also
 * makes a request to an engine that has been idle a while wait for the
 * end of its sleep (measured here: execute('pass') round robin over 4
 * engines on 2 cores, p50 44 ms, against 0.1 ms for one engine). So each
 * rank has a 32-bit word in an MPI shared-memory window of its node
 * (MPI_Win_allocate_shared over MPI_COMM_TYPE_SHARED): an engine that has
 * been idle for its spin window announces that it sleeps in its word,
 * looks for work once more, and then futex-waits on the word; the
 * controller, after posting a frame to an engine on its node, swaps the
 * word to awake and wakes the futex if the engine slept. No wake-up is
 * lost: the engine announces before its last look and the controller
 * rings after posting, so either the engine sees the message or the
 * futex wait returns at once.
 *
 * Engines on nodes without the controller cannot be rung this way and
 * keep the back-off (ipmpi_doorbell_for() returns NULL for them).
 *
 * The window lives for the process: it is freed with ipmpi_doorbell_fini
 * only on the normal way out (a collective over the node), never after a
 * rank died.
 *
 * Thread safety: ring and sleep may be called from any thread (atomics
 * and futexes); init and fini from the main thread only.
 */
#ifndef IPMPI_DOORBELL_H
#define IPMPI_DOORBELL_H

#include <stdatomic.h>
#include <stdint.h>

#include <mpi.h>

typedef struct ipmpi_doorbell {
    int ok;                    /* the window exists: doorbells work on this node */
    MPI_Comm node;             /* the ranks of this node */
    MPI_Win win;
    int world_size;
    _Atomic uint32_t **word;   /* per rank of comm: its word if on this node, else NULL */
    _Atomic uint32_t *mine;    /* this rank's word */
    int ctl_fd;                /* the controller's bell socket: its own (controller), for sending (engine); -1 */
    int rank;                  /* this rank in comm */
    /* After rank 0's slot: who made the controller's last
     * IPMPI_DOORBELL_RING announcements (NULL: none; doorbell_ctl_announcer). */
    _Atomic uint64_t *ring;
} ipmpi_doorbell_t;

/* Announcements whose maker the controller can look up. */
#define IPMPI_DOORBELL_RING 64u

/*
 * Next to each word, the request id an INTERRUPT is for (0: none) and the
 * number of INTERRUPTs sent: the controller writes both before it sends
 * SIGINT, and the engine raises KeyboardInterrupt only in that request,
 * also when the signal came before the engine picked the request up,
 * never in a later one, and once per INTERRUPT (the count tells a signal
 * already acted on at the request's start from a new one).
 */
void ipmpi_doorbell_set_interrupt(const ipmpi_doorbell_t *d, int rank, uint64_t req_id);
/* An engine on another node has no slot the controller reaches: its
 * INTERRUPT (or KILL) comes as a datagram of IPMPI_WAKE_INTR_LEN bytes to
 * its wake-up socket: the wake key, the kind (u32, then 4 zero bytes),
 * the request id, the count (u64s), then the first 16 bytes of the
 * HMAC-SHA256 of bytes 8..31 under the engine's key (src/engine/wake.c). */
#define IPMPI_WAKE_INTERRUPT 1u
#define IPMPI_WAKE_KILL 2u
#define IPMPI_WAKE_INTR_LEN 48
/* The request id this rank's slot names (0: none), and in *seq (if not
 * NULL) the INTERRUPTs sent so far. Async-signal-safe. */
uint64_t ipmpi_doorbell_interrupt(const ipmpi_doorbell_t *d, uint64_t *seq);

/*
 * Sets up the doorbells of this node; collective over comm (every rank
 * calls it at the same point). On failure (no shared-memory windows here)
 * d->ok is 0 and everything below does nothing; returns 0 either way, or
 * IPMPI_ENOMEM.
 */
int ipmpi_doorbell_init(ipmpi_doorbell_t *d, MPI_Comm comm);
/* Frees the window: collective over the node, so only when every rank of
 * the node ends normally. */
void ipmpi_doorbell_fini(ipmpi_doorbell_t *d);

/* 1 when rank (of comm) can be rung from here (same node, doorbells on). */
int ipmpi_doorbell_reaches(const ipmpi_doorbell_t *d, int rank);

/*
 * Wakes rank if it sleeps on its doorbell; call after posting the message
 * it is to find. Cheap (one atomic swap) when it does not sleep.
 */
void ipmpi_doorbell_ring(const ipmpi_doorbell_t *d, int rank);

/*
 * Sleeps on this rank's doorbell for at most timeout_ns, unless work is
 * there: pending(arg) is asked after the sleep was announced and must
 * return nonzero when a message waits. Returns 1 if woken by a ring (or
 * pending work), 0 on timeout or a signal.
 */
int ipmpi_doorbell_sleep(ipmpi_doorbell_t *d, uint64_t timeout_ns, int (*pending)(void *arg), void *arg);

/*
 * The controller's bell: while engines on its node run its work, the
 * controller may sleep in ppoll() instead of polling MPI (each poll wakes
 * a halted core, ~40 us here, and polling for the whole of a request to
 * N engines grows with N). Rank 0's slot holds the count of frames the
 * node's engines announced (each engine adds one before it sends a frame
 * to the controller), the count at which the sleeping controller wants to
 * be woken, and the name of the controller's datagram socket. An engine
 * that announces the frame reaching that count (or an urgent one:
 * streamed output) while the controller sleeps sends it a datagram.
 *
 * No wake-up is lost: the controller stores ASLEEP, then reads the count;
 * an engine adds to the count, then reads the word (both sequentially
 * consistent), so either the controller sees the frame announced and does
 * not sleep, or the engine sees ASLEEP and rings. The engine announces
 * before it sends, so a frame too large to be sent without the
 * controller's help never waits for a sleeping controller.
 *
 * A frame announced but never sent (its engine died in between) keeps
 * the announced count ahead of the frames seen: the controller then does
 * not sleep by count until it is idle and resynchronises
 * (ipmpi_doorbell_ctl_resync).
 */

/* Controller: opens its datagram socket (abstract Unix name, published in
 * its slot). Returns the socket to poll, or -1 (no shared window or no
 * socket: the controller keeps polling). */
int ipmpi_doorbell_ctl_open(ipmpi_doorbell_t *d);
void ipmpi_doorbell_ctl_close(ipmpi_doorbell_t *d);
/* Frames the node's engines announced so far. */
uint64_t ipmpi_doorbell_ctl_announced(const ipmpi_doorbell_t *d);
/*
 * Controller, before it sleeps: seen is the frames from the node's engines
 * it took off the wire; it wants to wake after k more. Announces the sleep
 * and returns 1 when every announced frame was seen (then ppoll() on the
 * socket, and call ipmpi_doorbell_ctl_woke after), else 0 (do not sleep).
 */
int ipmpi_doorbell_ctl_sleep(ipmpi_doorbell_t *d, uint64_t seen, uint64_t k);
/* After the ppoll(): awake again; reads every datagram waiting. Returns 1
 * when one came (the ring works: the controller may trust it). */
int ipmpi_doorbell_ctl_woke(ipmpi_doorbell_t *d);
/* Engine on the controller's node, before it sends a frame to it. */
void ipmpi_doorbell_announce(ipmpi_doorbell_t *d, int urgent);
/*
 * The rank (in comm) that made announcement idx (0 = the first ever), or
 * -1 when that is not known (not written yet: its engine has not sent
 * that frame either; or overwritten: more than IPMPI_DOORBELL_RING
 * announcements since). The engine records itself after it counted, and
 * before it sends: so the controller can probe MPI for that rank alone
 * (a probe for any source walks every peer of the communicator).
 */
int ipmpi_doorbell_ctl_announcer(const ipmpi_doorbell_t *d, uint64_t idx);

#endif
