/*
 * Broadcast trees (doc/protocol.md section 3): a request for many idle
 * engines reaches them through each other instead of one send each from
 * the controller, and their replies come back gathered, one message per
 * subtree. An engine that gets an IPMPI_F_TREE request receives its
 * subtree's ranks (IPMPI_TAG_TREE), forwards the request to its children
 * before it runs it, then collects its children's gathered replies
 * (IPMPI_TAG_GATHER) and sends them with its own to its parent.
 *
 * Nothing may wait for a dead rank: every wait here asks, about once a
 * second, whether the ranks it waits for are gone (the PMIx process
 * table of this job, or the controller watch for rank 0). A child that
 * died is skipped (the controller sends its subtree the request again,
 * IPMPI_F_RETRY); a parent that died makes the caller send to the
 * controller instead. No GIL here; main thread only.
 */
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <pmix.h>

#include "backoff.h"
#include "doorbell.h"
#include "engine.h"
#include "ipmpi/errors.h"
#include "log.h"
#include "proctable.h"
#include "tree.h"

/* Spin (yielding) this long, then sleep in steps growing to 1 ms. */
#define TREE_SPIN_NS 2000000ull
/* While a child's replies are awaited, its doorbell is rung again this
 * often (probe_from). */
#define TREE_RERING_NS 200000ull
#define TREE_ASK_NS 1000000000ull

/* ---- deaths of this job's ranks ---- */

static void mark_dead(void *arg, pmix_rank_t rank, pmix_proc_state_t st)
{
    ipmpi_eng_deaths_t *d = arg;
    if (rank < (pmix_rank_t)d->size && ipmpi_proc_state_dead(st))
        d->dead[rank] = 1;
}

int ipmpi_eng_rank_dead(ipmpi_eng_deaths_t *d, int rank, uint64_t now)
{
    if (rank < 0 || rank >= d->size || !d->dead)
        return 0;
    if (now >= d->next && d->have_pmix) {
        d->next = now + TREE_ASK_NS;
        ipmpi_proctable_query(d->nspace, mark_dead, d);
    }
    return d->dead[rank];
}

/* ---- waiting ---- */

typedef struct waiter {
    uint64_t start, ask;
    long sleep_ns;
} waiter_t;

static void waiter_init(waiter_t *w)
{
    w->start = ipmpi_now_ns();
    w->ask = w->start + TREE_ASK_NS;
    w->sleep_ns = 1000;
}

/* One pause of a wait; returns 1 when it is time to ask who is gone. */
static int waiter_pause(waiter_t *w)
{
    uint64_t now = ipmpi_now_ns();
    int ask = now >= w->ask;
    if (ask)
        w->ask = now + TREE_ASK_NS;
    if (now - w->start < TREE_SPIN_NS) {
        sched_yield();
        return ask;
    }
    struct timespec ts = {0, w->sleep_ns};
    nanosleep(&ts, NULL);
    if (w->sleep_ns < 1000000)
        w->sleep_ns *= 2;
    return ask;
}

/* Waits until every request of reqs[0..n) completed or its rank (rank[i])
 * is gone; returns 0, or IPMPI_EMPI. Requests to gone ranks are left. */
static int wait_all(MPI_Request *reqs, const int *rank, int n, ipmpi_eng_rank_gone_cb gone, void *arg)
{
    waiter_t w;
    waiter_init(&w);
    for (;;) {
        int left = 0;
        for (int i = 0; i < n; i++) {
            if (reqs[i] == MPI_REQUEST_NULL)
                continue;
            int flag = 0;
            if (MPI_Test(&reqs[i], &flag, MPI_STATUS_IGNORE) != MPI_SUCCESS)
                return IPMPI_EMPI;
            left += !flag;
        }
        if (!left)
            return 0;
        if (waiter_pause(&w))
            for (int i = 0; i < n; i++)
                if (reqs[i] != MPI_REQUEST_NULL && gone(arg, rank[i])) {
                    ipmpi_log(IPMPI_LOG_WARN, "rank %d is gone: a tree send to it is left", rank[i]);
                    reqs[i] = MPI_REQUEST_NULL; /* leaked with the dead rank */
                }
    }
}

/* ---- receiving ---- */

/* Waits for a message of tag from src: 0 and *msg, *count (elements of
 * type); IPMPI_EDEAD if src is gone first; IPMPI_EMPI. With a bell, src's
 * doorbell is rung again every TREE_RERING_NS (a fence and a load when src
 * is awake, as it is while it works; a wake-up when its ring was lost). */
static int probe_from(MPI_Comm comm, int src, int tag, MPI_Datatype type, MPI_Message *msg, int *count,
                      const ipmpi_doorbell_t *bell, ipmpi_eng_rank_gone_cb gone, void *arg)
{
    waiter_t w;
    waiter_init(&w);
    uint64_t ring_at = w.start + TREE_RERING_NS;
    for (;;) {
        if (bell) {
            uint64_t now = ipmpi_now_ns();
            if (now >= ring_at) {
                ipmpi_doorbell_ring(bell, src);
                ring_at = now + TREE_RERING_NS;
            }
        }
        int flag = 0;
        MPI_Status st;
        if (MPI_Improbe(src, tag, comm, &flag, msg, &st) != MPI_SUCCESS)
            return IPMPI_EMPI;
        if (flag) {
            MPI_Get_count(&st, type, count);
            return 0;
        }
        if (waiter_pause(&w) && gone(arg, src))
            return IPMPI_EDEAD;
    }
}

int ipmpi_eng_tree_recv(MPI_Comm comm, int src, int32_t **ranks, uint32_t *n, ipmpi_eng_rank_gone_cb gone,
                        void *arg)
{
    MPI_Message msg;
    int count = 0;
    int rc = probe_from(comm, src, IPMPI_TAG_TREE, MPI_INT32_T, &msg, &count, NULL, gone, arg);
    if (rc != 0)
        return rc;
    int32_t *r = malloc((size_t)(count > 0 ? count : 1) * sizeof *r);
    if (!r)
        return IPMPI_ENOMEM; /* the matched message is left with MPI */
    if (MPI_Mrecv(r, count, MPI_INT32_T, &msg, MPI_STATUS_IGNORE) != MPI_SUCCESS) {
        free(r);
        return IPMPI_EMPI;
    }
    if (count < 1) {
        free(r);
        return IPMPI_EPROTO;
    }
    *ranks = r;
    *n = (uint32_t)count;
    return 0;
}

/* ---- forwarding ---- */

int ipmpi_eng_tree_forward(MPI_Comm comm, const ipmpi_hdr_t *h, const uint64_t *lens, char *const *bufs,
                           const int32_t *ranks, uint32_t n, const ipmpi_doorbell_t *bell,
                           ipmpi_eng_rank_gone_cb gone, void *arg)
{
    uint32_t start[IPMPI_TREE_FANOUT], len[IPMPI_TREE_FANOUT];
    uint32_t k = ipmpi_tree_children(n, start, len);
    if (k == 0)
        return 0;
    uint32_t per = 2; /* header and subtree, then each part's chunks */
    for (uint32_t p = 0; p < h->nparts; p++)
        per += lens[p] == 0 ? 1 : (uint32_t)((lens[p] + IPMPI_MPI_CHUNK - 1) / IPMPI_MPI_CHUNK);
    size_t hl = ipmpi_hdr_wire_size(h->nparts);
    uint8_t *hbuf = malloc(hl * k);
    MPI_Request *reqs = malloc(sizeof *reqs * per * k);
    int *owner = malloc(sizeof *owner * per * k);
    int rc = IPMPI_ENOMEM, nreq = 0;
    if (!hbuf || !reqs || !owner)
        goto out;
    rc = IPMPI_EMPI;
    for (uint32_t c = 0; c < k; c++) {
        int child = ranks[start[c]];
        ipmpi_hdr_t ch = *h;
        ch.flags |= IPMPI_F_TREE;
        ch.target = child - 1;
        uint8_t *hb = hbuf + hl * c;
        ipmpi_hdr_encode(&ch, lens, hb, hl);
        /* The subtree first (another tag): the child takes it as soon as
         * it has read the header. */
        if (MPI_Isend((void *)(ranks + start[c]), (int)len[c], MPI_INT32_T, child, IPMPI_TAG_TREE, comm,
                      &reqs[nreq]) != MPI_SUCCESS)
            goto out;
        owner[nreq++] = child;
        if (MPI_Isend(hb, (int)hl, MPI_BYTE, child, IPMPI_TAG_HDR, comm, &reqs[nreq]) != MPI_SUCCESS)
            goto out;
        owner[nreq++] = child;
        for (uint32_t p = 0; p < h->nparts; p++) {
            uint64_t off = 0;
            do {
                uint64_t m = lens[p] - off < IPMPI_MPI_CHUNK ? lens[p] - off : IPMPI_MPI_CHUNK;
                if (MPI_Isend(bufs[p] + off, (int)m, MPI_BYTE, child, IPMPI_TAG_PART, comm, &reqs[nreq]) !=
                    MPI_SUCCESS)
                    goto out;
                owner[nreq++] = child;
                off += m;
            } while (off < lens[p]);
        }
        ipmpi_doorbell_ring(bell, child);
    }
    rc = wait_all(reqs, owner, nreq, gone, arg);
    nreq = 0;
out:
    if (nreq > 0)
        wait_all(reqs, owner, nreq, gone, arg); /* what was posted must finish before bufs go */
    free(hbuf);
    free(reqs);
    free(owner);
    return rc;
}

/* ---- gathering ---- */

int ipmpi_eng_tree_reserve(uint8_t **buf, size_t *cap, size_t need)
{
    if (need <= *cap)
        return 0;
    size_t ncap = *cap ? *cap : 4096;
    while (ncap < need)
        ncap *= 2;
    uint8_t *nb = realloc(*buf, ncap);
    if (!nb)
        return IPMPI_ENOMEM;
    *buf = nb;
    *cap = ncap;
    return 0;
}

int ipmpi_eng_tree_gather(MPI_Comm comm, const ipmpi_doorbell_t *bell, const int32_t *ranks, uint32_t n,
                          uint8_t **buf, size_t *len, size_t *cap, ipmpi_eng_rank_gone_cb gone, void *arg)
{
    uint32_t start[IPMPI_TREE_FANOUT], clen[IPMPI_TREE_FANOUT];
    uint32_t k = ipmpi_tree_children(n, start, clen);
    for (uint32_t c = 0; c < k; c++) {
        int child = ranks[start[c]], count = 0;
        MPI_Message msg;
        int rc = probe_from(comm, child, IPMPI_TAG_GATHER, MPI_BYTE, &msg, &count, bell, gone, arg);
        if (rc == IPMPI_EDEAD) {
            /* Its subtree's replies come to the controller directly (they
             * find their parent gone) or after a retry. */
            ipmpi_log(IPMPI_LOG_WARN, "rank %d died before it sent its subtree's replies", child);
            continue;
        }
        if (rc != 0)
            return rc;
        if (count < 0 || ipmpi_eng_tree_reserve(buf, cap, *len + (size_t)count + 1) != 0)
            return IPMPI_ENOMEM; /* the matched message is left with MPI */
        if (MPI_Mrecv(*buf + *len, count, MPI_BYTE, &msg, MPI_STATUS_IGNORE) != MPI_SUCCESS)
            return IPMPI_EMPI;
        *len += (size_t)count;
    }
    return 0;
}

int ipmpi_eng_tree_send_up(MPI_Comm comm, int parent, const uint8_t *buf, size_t len,
                           ipmpi_eng_rank_gone_cb gone, void *arg)
{
    MPI_Request req;
    if (MPI_Isend((void *)buf, (int)len, MPI_BYTE, parent, IPMPI_TAG_GATHER, comm, &req) != MPI_SUCCESS)
        return IPMPI_EMPI;
    waiter_t w;
    waiter_init(&w);
    for (;;) {
        int flag = 0;
        if (MPI_Test(&req, &flag, MPI_STATUS_IGNORE) != MPI_SUCCESS)
            return IPMPI_EMPI;
        if (flag)
            return 0;
        if (waiter_pause(&w) && gone(arg, parent))
            return IPMPI_EDEAD; /* the send is left with the dead parent */
    }
}
