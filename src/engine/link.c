/*
 * The engine's side of the MPI link (doc/protocol.md section 3): a frame
 * is one IPMPI_TAG_HDR message with the header and length table, then each
 * part as IPMPI_TAG_PART messages of at most IPMPI_MPI_CHUNK bytes (a
 * received part may come in messages of any size, as the controller
 * forwards it while it arrives; an empty one inside aborts the frame). Parts
 * go straight from and into the caller's buffers; nothing is joined or
 * copied. No Python here, so the engine calls these with the GIL released.
 * Main thread only (MPI_THREAD_FUNNELED).
 */
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine.h"
#include "backoff.h"
#include "doorbell.h"
#include "ipmpi/errors.h"
#include "log.h"

/* Completes one send: spins (yielding) for a while, then sleeps up to
 * 1 ms between tests, asking gone() once a second. */
#define SEND_SPIN_NS 10000000ull
#define SEND_ASK_NS 1000000000ull
static int send_wait(MPI_Request *req, int (*gone)(void *arg), void *arg)
{
    uint64_t start = ipmpi_now_ns(), ask = start + SEND_ASK_NS;
    long sleep_ns = 1000;
    for (;;) {
        int flag = 0;
        if (MPI_Test(req, &flag, MPI_STATUS_IGNORE) != MPI_SUCCESS)
            return IPMPI_EMPI;
        if (flag)
            return 0;
        uint64_t now = ipmpi_now_ns();
        if (now >= ask) {
            if (gone && gone(arg))
                return IPMPI_ECLOSED; /* the request is abandoned with the process */
            ask = now + SEND_ASK_NS;
        }
        if (now - start < SEND_SPIN_NS) {
            sched_yield();
            continue;
        }
        struct timespec ts = {0, sleep_ns};
        nanosleep(&ts, NULL);
        if (sleep_ns < 1000000)
            sleep_ns *= 2;
    }
}

/* The node's doorbells when the controller shares this node: every frame
 * to it is announced first (doorbell.h, the controller's bell). */
static ipmpi_doorbell_t *g_ctl_bell;

void ipmpi_eng_link_set_bell(struct ipmpi_doorbell *bell)
{
    g_ctl_bell = bell;
}

/* Off the controller's node: its bell is rung by datagram (wake.c). */
static const ipmpi_eng_wake_t *g_ctl_wake;

void ipmpi_eng_link_set_wake(const ipmpi_eng_wake_t *w)
{
    g_ctl_wake = w;
}

static int send_msg(const void *buf, int n, int dest, int tag, MPI_Comm comm, int (*gone)(void *arg), void *arg)
{
    MPI_Request req;
    /* MPI_Isend takes a non-const buffer in MPI 3 bindings of old
     * implementations; it never writes to it. */
    if (MPI_Isend((void *)buf, n, MPI_BYTE, dest, tag, comm, &req) != MPI_SUCCESS)
        return IPMPI_EMPI;
    return send_wait(&req, gone, arg);
}

int ipmpi_eng_link_send(MPI_Comm comm, int dest, const ipmpi_hdr_t *h, const uint64_t *lens,
                    const void *const *bufs, int (*gone)(void *arg), void *arg)
{
    if (h->nparts > IPMPI_MAX_PARTS)
        return IPMPI_EINVAL;
    size_t hlen = ipmpi_hdr_wire_size(h->nparts);
    uint64_t total = 0;
    for (uint32_t i = 0; i < h->nparts; i++)
        total += lens[i];
    /* A small frame goes as one message (IPMPI_F_PACKED): one send here,
     * one receive at the controller, instead of 1 + nparts. */
    int packed = dest == 0 && hlen + total <= IPMPI_PACK_MAX;
    uint8_t *hbuf = malloc(packed ? hlen + (size_t)total : hlen);
    if (!hbuf)
        return IPMPI_ENOMEM;
    int rc = IPMPI_EMPI;
    /* Announced before the header goes, so a sleeping controller is
     * woken also for a frame whose send needs it (a rendezvous). Streamed
     * output is urgent: the client reads it as it comes. */
    if (dest == 0 && g_ctl_bell)
        ipmpi_doorbell_announce(g_ctl_bell, (h->flags & IPMPI_F_MORE) != 0);
    ipmpi_hdr_t hh = *h;
    /* From another node a frame cannot be counted in the controller's
     * memory: a datagram follows it (the data may need the controller's
     * progress to be read), and one goes before a frame whose send needs
     * the controller (a rendezvous). */
    const ipmpi_eng_wake_t *ring = dest == 0 ? g_ctl_wake : NULL;
    if (ring && !packed)
        ipmpi_eng_wake_ring(ring);
    if (packed)
        hh.flags |= IPMPI_F_PACKED;
    if (ipmpi_hdr_encode(&hh, lens, hbuf, hlen) < 0) {
        rc = IPMPI_EINVAL;
        goto free_hbuf;
    }
    if (packed) {
        size_t at = hlen;
        for (uint32_t i = 0; i < h->nparts; i++) {
            memcpy(hbuf + at, bufs[i], (size_t)lens[i]);
            at += (size_t)lens[i];
        }
        rc = send_msg(hbuf, (int)at, dest, IPMPI_TAG_HDR, comm, gone, arg);
        goto rung;
    }
    if ((rc = send_msg(hbuf, (int)hlen, dest, IPMPI_TAG_HDR, comm, gone, arg)) != 0)
        goto free_hbuf;
    for (uint32_t i = 0; i < h->nparts; i++) {
        const char *p = bufs[i];
        uint64_t left = lens[i];
        do {
            int n = (int)(left < IPMPI_MPI_CHUNK ? left : IPMPI_MPI_CHUNK);
            if ((rc = send_msg(p, n, dest, IPMPI_TAG_PART, comm, gone, arg)) != 0)
                goto free_hbuf;
            p += n;
            left -= (uint64_t)n;
        } while (left > 0);
    }
    rc = 0;

rung:
    if (ring && rc == 0)
        ipmpi_eng_wake_ring(ring);
free_hbuf:
    free(hbuf);
    return rc;
}

int ipmpi_eng_link_recv_part(MPI_Comm comm, int src, void *buf, uint64_t len, ipmpi_eng_link_wait_cb wait,
                             void *warg)
{
    char *scratch = NULL;
    size_t scap = 0;
    if (!buf) {
        scap = len < IPMPI_MPI_CHUNK ? (size_t)len : IPMPI_MPI_CHUNK;
        scratch = malloc(scap ? scap : 1);
        if (!scratch)
            return IPMPI_ENOMEM;
    }
    int rc = 0, first = 1;
    uint64_t got = 0;
    /* Every part is at least one message, an empty part exactly one: the
     * loop ends only after a message was taken, also when the first
     * probe of an empty part found nothing yet (ending on got >= len
     * alone left that part's message on the wire, where the next frame
     * read it as an abort, and every later frame was off by one). */
    int msgs = 0;
    do {
        int flag = 0, n = 0;
        MPI_Message msg;
        MPI_Status st;
        /* Probe, not a blocking receive: a blocked MPI_Recv spins a core
         * for as long as the client takes to send the rest, and on a
         * shared node that core is the client's or the controller's. */
        if (MPI_Improbe(src, IPMPI_TAG_PART, comm, &flag, &msg, &st) != MPI_SUCCESS) {
            rc = IPMPI_EMPI;
            break;
        }
        if (!flag) {
            rc = wait(warg, first);
            first = 0;
            if (rc != 0)
                break;
            continue;
        }
        first = 1;
        MPI_Get_count(&st, MPI_BYTE, &n);
        if (n < 0 || (uint64_t)n > len - got || (scratch && (size_t)n > scap)) {
            /* Cannot be taken off the wire whole: the link is out of step. */
            rc = IPMPI_EPROTO;
            break;
        }
        char *dst = scratch ? scratch : (char *)buf + got;
        if (MPI_Mrecv(dst, n, MPI_BYTE, &msg, MPI_STATUS_IGNORE) != MPI_SUCCESS) {
            rc = IPMPI_EMPI;
            break;
        }
        msgs++;
        if (n == 0 && len > 0) {
            rc = IPMPI_EABORTED;
            break;
        }
        got += (uint64_t)n;
    } while (got < len || msgs == 0);
    free(scratch);
    return rc;
}
