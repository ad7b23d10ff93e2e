/*
 * Doorbells in node-shared memory (doorbell.h).
 */
#include "doorbell.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "ipmpi/errors.h"
#include "log.h"

enum { AWAKE = 0, ASLEEP = 1 };

/* A slot: the doorbell word, then (8-aligned) the interrupt's request id
 * and the count of INTERRUPTs sent to this rank. */
#define INTR_OFFSET 8
#define INTR_SEQ_OFFSET 16

/* Each word on a cache line of its own: a ring must not make the other
 * sleepers' lines bounce. */
#define SLOT_BYTES 64

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
    MPI_Comm_size(comm, &d->world_size);
    d->word = calloc((size_t)d->world_size, sizeof *d->word);
    if (!d->word)
        return IPMPI_ENOMEM;
    /* Collective calls: every rank makes them, whatever happens after. */
    if (MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &d->node) != MPI_SUCCESS)
        goto off;
    void *base = NULL;
    int rc = MPI_Win_allocate_shared(SLOT_BYTES, 1, MPI_INFO_NULL, d->node, &base, &d->win);
    if (rc != MPI_SUCCESS)
        goto off;
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
            size < (MPI_Aint)(INTR_OFFSET + sizeof(uint64_t)) || !p)
            ok = 0;
        else
            d->word[wr] = p;
    }
    MPI_Group_free(&gnode);
    MPI_Group_free(&gworld);
    if (!ok)
        goto off;
    d->mine = base;
    atomic_store(d->mine, AWAKE);
    atomic_store((_Atomic uint64_t *)((char *)base + INTR_OFFSET), 0);
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
