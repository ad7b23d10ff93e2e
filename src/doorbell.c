/*
 * Doorbells in node-shared memory (doorbell.h).
 */
#include "doorbell.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "ipmpi/errors.h"
#include "log.h"

enum { AWAKE = 0, ASLEEP = 1 };

/* A slot: the doorbell word, then (8-aligned) the interrupt's request id
 * and the count of INTERRUPTs sent to this rank. */
#define INTR_OFFSET 8
#define INTR_SEQ_OFFSET 16
/* Rank 0's slot only (the controller's bell): frames announced by the
 * node's engines, the count to wake the controller at, its socket's name. */
#define CTL_ANNOUNCED_OFFSET 24
#define CTL_WAKE_AT_OFFSET 32
#define CTL_NAME_OFFSET 40
#define CTL_BROKEN_OFFSET 48

/* Each word on a cache line of its own: a ring must not make the other
 * sleepers' lines bounce. */
#define SLOT_BYTES 64
/* Rank 0's slot is followed by the ring of announcers: (idx + 1) << 24 |
 * rank per entry, so a reader tells a current entry from an old one. */
#define RING_BYTES (IPMPI_DOORBELL_RING * 8u)
#define RING_RANK_BITS 24

static long futex(_Atomic uint32_t *w, int op, uint32_t val, const struct timespec *ts)
{
    /* Shared futexes (no FUTEX_PRIVATE_FLAG): the word is in memory
     * mapped by several processes. */
    return syscall(SYS_futex, (uint32_t *)w, op, val, ts, NULL, 0);
}

int ipmpi_doorbell_init(ipmpi_doorbell_t *d, MPI_Comm comm)
{
    memset(d, 0, sizeof *d);
    d->node = MPI_COMM_NULL;
    d->win = MPI_WIN_NULL;
    d->ctl_fd = -1;
    MPI_Comm_size(comm, &d->world_size);
    MPI_Comm_rank(comm, &d->rank);
    d->word = calloc((size_t)d->world_size, sizeof *d->word);
    if (!d->word)
        return IPMPI_ENOMEM;
    /* Collective calls: every rank makes them, whatever happens after. */
    if (MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &d->node) != MPI_SUCCESS)
        goto off;
    void *base = NULL;
    MPI_Aint mine = d->rank == 0 ? SLOT_BYTES + RING_BYTES : SLOT_BYTES;
    int rc = MPI_Win_allocate_shared(mine, 1, MPI_INFO_NULL, d->node, &base, &d->win);
    if (rc != MPI_SUCCESS)
        goto off;
    /* The window's memory starts zeroed on every MPI we know, but nothing
     * promises it: each rank clears its own slot (AWAKE, no interrupt, the
     * controller's counters at 0) before any rank may use another's. */
    memset(base, 0, (size_t)mine);
    MPI_Barrier(d->node);
    int nnode = 0;
    MPI_Comm_size(d->node, &nnode);
    MPI_Group gnode, gworld;
    MPI_Comm_group(d->node, &gnode);
    MPI_Comm_group(comm, &gworld);
    int ok = 1;
    for (int i = 0; i < nnode && ok; i++) {
        int wr = MPI_UNDEFINED;
        MPI_Aint size = 0;
        int disp = 0;
        void *p = NULL;
        MPI_Group_translate_ranks(gnode, 1, &i, gworld, &wr);
        if (wr == MPI_UNDEFINED || MPI_Win_shared_query(d->win, i, &size, &disp, &p) != MPI_SUCCESS ||
            size < (MPI_Aint)SLOT_BYTES || !p)
            ok = 0;
        else {
            d->word[wr] = p;
            if (wr == 0 && size >= (MPI_Aint)(SLOT_BYTES + RING_BYTES))
                d->ring = (_Atomic uint64_t *)((char *)p + SLOT_BYTES);
        }
    }
    MPI_Group_free(&gnode);
    MPI_Group_free(&gworld);
    if (!ok)
        goto off;
    d->mine = base;
    d->ok = 1;
    return 0;

off:
    /* Without shared windows engines keep the back-off; nothing else changes. */
    ipmpi_log(IPMPI_LOG_WARN, "no MPI shared-memory window on this node: idle engines poll with back-off");
    memset(d->word, 0, (size_t)d->world_size * sizeof *d->word);
    d->ok = 0;
    return 0;
}

void ipmpi_doorbell_fini(ipmpi_doorbell_t *d)
{
    ipmpi_doorbell_ctl_close(d);
    if (d->win != MPI_WIN_NULL)
        MPI_Win_free(&d->win);
    if (d->node != MPI_COMM_NULL)
        MPI_Comm_free(&d->node);
    free(d->word);
    memset(d, 0, sizeof *d);
}

int ipmpi_doorbell_reaches(const ipmpi_doorbell_t *d, int rank)
{
    return d && d->ok && rank >= 0 && rank < d->world_size && d->word[rank] != NULL;
}

void ipmpi_doorbell_ring(const ipmpi_doorbell_t *d, int rank)
{
    if (!ipmpi_doorbell_reaches(d, rank))
        return;
    _Atomic uint32_t *w = d->word[rank];
    /* The message's stores must be visible before the word is read (the
     * engine's side is the mirror image: its store of ASLEEP, then its
     * look for messages): a full fence, then a plain load, so a ring of
     * an awake engine writes nothing to its line. */
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load_explicit(w, memory_order_relaxed) == AWAKE)
        return;
    if (atomic_exchange(w, AWAKE) == ASLEEP)
        futex(w, FUTEX_WAKE, 1, NULL);
}

int ipmpi_doorbell_sleep(ipmpi_doorbell_t *d, uint64_t timeout_ns, int (*pending)(void *arg), void *arg)
{
    if (!d || !d->ok)
        return 0;
    atomic_store(d->mine, ASLEEP);
    /* The last look, after the announcement: a message posted before the
     * controller read ASLEEP is seen here, one posted after comes with a
     * ring. */
    if (pending(arg)) {
        atomic_store(d->mine, AWAKE);
        return 1;
    }
    struct timespec ts = {(time_t)(timeout_ns / 1000000000u), (long)(timeout_ns % 1000000000u)};
    long r = futex(d->mine, FUTEX_WAIT, ASLEEP, &ts);
    int woken = atomic_exchange(d->mine, AWAKE) == AWAKE; /* the ringer set it */
    (void)r;
    return woken;
}

void ipmpi_doorbell_set_interrupt(const ipmpi_doorbell_t *d, int rank, uint64_t req_id)
{
    if (!ipmpi_doorbell_reaches(d, rank))
        return;
    char *slot = (char *)d->word[rank];
    /* The id first: a reader that sees the new count sees this id. */
    atomic_store((_Atomic uint64_t *)(slot + INTR_OFFSET), req_id);
    atomic_fetch_add((_Atomic uint64_t *)(slot + INTR_SEQ_OFFSET), 1);
}

uint64_t ipmpi_doorbell_interrupt(const ipmpi_doorbell_t *d, uint64_t *seq)
{
    if (seq)
        *seq = 0;
    if (!d || !d->ok)
        return 0;
    const char *slot = (const char *)d->mine;
    if (seq)
        *seq = atomic_load((_Atomic uint64_t *)(slot + INTR_SEQ_OFFSET));
    return atomic_load((_Atomic uint64_t *)(slot + INTR_OFFSET));
}

/* ---- the controller's bell ---- */

static _Atomic uint64_t *ctl_u64(const ipmpi_doorbell_t *d, size_t off)
{
    return (_Atomic uint64_t *)((char *)d->word[0] + off);
}

/* The abstract socket name of a nonce ("\0ipmpi-ctl-<hex>"). */
static socklen_t ctl_addr(uint64_t nonce, struct sockaddr_un *a)
{
    memset(a, 0, sizeof *a);
    a->sun_family = AF_UNIX;
    int n = snprintf(a->sun_path + 1, sizeof a->sun_path - 1, "ipmpi-ctl-%016llx", (unsigned long long)nonce);
    return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + (size_t)n);
}

int ipmpi_doorbell_ctl_open(ipmpi_doorbell_t *d)
{
    if (!ipmpi_doorbell_reaches(d, 0) || d->mine != d->word[0])
        return -1;
    if (d->ctl_fd >= 0)
        return d->ctl_fd;
    uint64_t nonce = 0;
    while (nonce == 0)
        if (getrandom(&nonce, sizeof nonce, 0) != (ssize_t)sizeof nonce)
            return -1;
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    struct sockaddr_un a;
    socklen_t al = ctl_addr(nonce, &a);
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, al) != 0) {
        ipmpi_log(IPMPI_LOG_WARN, "no socket for the controller's bell (%s): it polls while engines work",
                  strerror(errno));
        if (fd >= 0)
            close(fd);
        return -1;
    }
    d->ctl_fd = fd;
    atomic_store(ctl_u64(d, CTL_NAME_OFFSET), nonce);
    return fd;
}

void ipmpi_doorbell_ctl_close(ipmpi_doorbell_t *d)
{
    if (!d || d->ctl_fd < 0)
        return;
    if (d->ok && d->word[0] && d->mine == d->word[0])
        atomic_store(ctl_u64(d, CTL_NAME_OFFSET), 0);
    close(d->ctl_fd);
    d->ctl_fd = -1;
}

uint64_t ipmpi_doorbell_ctl_announced(const ipmpi_doorbell_t *d)
{
    return atomic_load(ctl_u64(d, CTL_ANNOUNCED_OFFSET));
}

int ipmpi_doorbell_ctl_announcer(const ipmpi_doorbell_t *d, uint64_t idx)
{
    if (!d || !d->ring)
        return -1;
    uint64_t v = atomic_load_explicit(&d->ring[idx % IPMPI_DOORBELL_RING], memory_order_acquire);
    if (v >> RING_RANK_BITS != idx + 1)
        return -1;
    return (int)(v & ((1u << RING_RANK_BITS) - 1));
}

int ipmpi_doorbell_ctl_sleep(ipmpi_doorbell_t *d, uint64_t seen, uint64_t k)
{
    if (d->ctl_fd < 0 || k == 0)
        return 0;
    if (atomic_load(ctl_u64(d, CTL_BROKEN_OFFSET))) {
        /* An engine could not reach the socket (another network
         * namespace on the same node?): poll as before. */
        ipmpi_log(IPMPI_LOG_WARN, "an engine of this node cannot ring the controller's bell: the controller polls "
                  "while engines work");
        ipmpi_doorbell_ctl_close(d);
        return 0;
    }
    atomic_store(ctl_u64(d, CTL_WAKE_AT_OFFSET), seen + k);
    atomic_store(d->mine, ASLEEP);
    if (atomic_load(ctl_u64(d, CTL_ANNOUNCED_OFFSET)) != seen) {
        atomic_store(d->mine, AWAKE);
        return 0;
    }
    return 1;
}

int ipmpi_doorbell_ctl_woke(ipmpi_doorbell_t *d)
{
    atomic_store(d->mine, AWAKE);
    int rung = 0;
    char b[16];
    while (d->ctl_fd >= 0 && recv(d->ctl_fd, b, sizeof b, 0) >= 0)
        rung = 1;
    return rung;
}

void ipmpi_doorbell_announce(ipmpi_doorbell_t *d, int urgent)
{
    if (!ipmpi_doorbell_reaches(d, 0) || d->mine == d->word[0])
        return;
    uint64_t n = atomic_fetch_add(ctl_u64(d, CTL_ANNOUNCED_OFFSET), 1) + 1;
    /* Who made announcement n - 1, before the frame goes. */
    if (d->ring && d->rank > 0 && d->rank < (1 << RING_RANK_BITS))
        atomic_store_explicit(&d->ring[(n - 1) % IPMPI_DOORBELL_RING], n << RING_RANK_BITS | (uint64_t)d->rank,
                              memory_order_release);
    _Atomic uint32_t *w = d->word[0];
    if (atomic_load(w) != ASLEEP)
        return;
    if (!urgent && n < atomic_load(ctl_u64(d, CTL_WAKE_AT_OFFSET)))
        return;
    if (atomic_exchange(w, AWAKE) != ASLEEP)
        return; /* another engine rang */
    uint64_t nonce = atomic_load(ctl_u64(d, CTL_NAME_OFFSET));
    if (nonce == 0)
        return;
    if (d->ctl_fd < 0)
        d->ctl_fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    struct sockaddr_un a;
    socklen_t al = ctl_addr(nonce, &a);
    /* A full socket buffer means datagrams are already waiting there.
     * Any other failure: the bell cannot work from here; the controller
     * learns it at its next sleep (its timeout wakes it this time). */
    if (d->ctl_fd < 0 || (sendto(d->ctl_fd, "", 1, MSG_DONTWAIT, (struct sockaddr *)&a, al) < 0 && errno != EAGAIN &&
                          errno != EWOULDBLOCK))
        atomic_store(ctl_u64(d, CTL_BROKEN_OFFSET), 1);
}
