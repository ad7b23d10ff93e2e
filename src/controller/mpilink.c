/*
 * Controller side of the MPI framing: see mpilink.h. Loop thread only.
 */
#include "mpilink.h"

#include "backoff.h"
#include "doorbell.h"

#include <stdlib.h>
#include <string.h>

#include "ipmpi/errors.h"
#include "log.h"

/* Parts above this size are not sent eagerly by Open MPI's shared-memory
 * and TCP transports (their eager limits are 4 KiB and 64 KiB). */
#define EAGER_MAX 4096u

struct ipmpi_sendop {
    int rank;
    uint8_t *hdr;
    ipmpi_parts_t *parts;
    uint32_t left; /* requests not yet complete */
    int bulk;      /* counted in nbulk */
    /* Cut-through (stream_*): open while the caller still feeds bytes;
     * the next byte to post is at offset off of part `part`. An open op
     * outlives its requests; a stream counts as bulk only while some of
     * its messages are outstanding, so a client that pauses mid-frame
     * does not keep the loop polling. */
    int open;
    uint32_t part;
    uint64_t off;
};

struct ipmpi_recvop {
    ipmpi_recvop_t *next;
    int rank;
    ipmpi_hdr_t h;
    ipmpi_parts_t *parts;
    MPI_Request *reqs;
    int nreq;
    int bulk; /* counted in nbulk */
};

void ipmpi_mpilink_init(ipmpi_mpilink_t *l, MPI_Comm comm)
{
    memset(l, 0, sizeof *l);
    l->comm = comm;
    MPI_Comm_size(comm, &l->comm_size);
    /* Engines are ranks of this job, not strangers: the bounds only catch
     * a corrupted header before it turns into a huge allocation. */
    l->lim.max_parts = IPMPI_MAX_PARTS;
    l->lim.max_part = UINT64_MAX / 2;
    l->lim.max_frame = UINT64_MAX / 2;
}

void ipmpi_mpilink_fini(ipmpi_mpilink_t *l)
{
    free(l->pend); /* pend_list with it */
    free(l->extra);
    free(l->sreq);
    free(l->sop);
    free(l->sidx);
    memset(l, 0, sizeof *l);
}

static int has_bulk(uint32_t n, const uint64_t *lens)
{
    for (uint32_t i = 0; i < n; i++)
        if (lens[i] > EAGER_MAX)
            return 1;
    return 0;
}

static uint32_t nchunks(uint64_t len)
{
    return len == 0 ? 1 : (uint32_t)((len + IPMPI_MPI_CHUNK - 1) / IPMPI_MPI_CHUNK);
}

/* The communicator and rank in it that reach link rank `rank`. */
static MPI_Comm peer(const ipmpi_mpilink_t *l, int rank, int *r)
{
    if (rank < l->comm_size) {
        *r = rank;
        return l->comm;
    }
    for (uint32_t i = 0; i < l->nextra; i++)
        if (rank >= l->extra[i].base && rank < l->extra[i].base + l->extra[i].n) {
            *r = rank - l->extra[i].base + 1;
            return l->extra[i].comm;
        }
    *r = MPI_PROC_NULL;
    return l->comm;
}

int ipmpi_mpilink_add_comm(ipmpi_mpilink_t *l, MPI_Comm comm, int base, int n)
{
    if (l->nextra == l->extra_cap) {
        uint32_t ncap = l->extra_cap ? 2 * l->extra_cap : 4;
        ipmpi_mpilink_comm_t *ne = realloc(l->extra, ncap * sizeof *ne);
        if (!ne)
            return IPMPI_ENOMEM;
        l->extra = ne;
        l->extra_cap = ncap;
    }
    l->extra[l->nextra++] = (ipmpi_mpilink_comm_t){comm, base, n, 1};
    return 0;
}

void ipmpi_mpilink_close_comm(ipmpi_mpilink_t *l, int base)
{
    for (uint32_t i = 0; i < l->nextra; i++)
        if (l->extra[i].base == base)
            l->extra[i].open = 0;
}

static int grow_sends(ipmpi_mpilink_t *l, uint32_t more)
{
    if (l->ns + more <= l->scap)
        return 0;
    uint32_t ncap = l->scap ? l->scap : 64;
    while (ncap < l->ns + more)
        ncap *= 2;
    MPI_Request *r = realloc(l->sreq, (size_t)ncap * sizeof *r);
    if (!r)
        return IPMPI_ENOMEM;
    l->sreq = r;
    ipmpi_sendop_t **o = realloc(l->sop, (size_t)ncap * sizeof *o);
    if (!o)
        return IPMPI_ENOMEM;
    l->sop = o;
    int *x = realloc(l->sidx, (size_t)ncap * sizeof *x);
    if (!x)
        return IPMPI_ENOMEM;
    l->sidx = x;
    l->scap = ncap;
    return 0;
}

/*
 * Posts the header of a frame of parts to rank, with room reserved for
 * `more` further sends. Returns 0 and the new operation (registered in the
 * link, holding a reference to parts, left = 1), or an error with nothing
 * posted or held.
 */
static int post_header(ipmpi_mpilink_t *l, int rank, const ipmpi_hdr_t *h, ipmpi_parts_t *parts, uint32_t more,
                       ipmpi_sendop_t **out)
{
    ipmpi_hdr_t hh = *h;
    hh.nparts = parts ? parts->n : 0;
    int rc = grow_sends(l, 1 + more);
    if (rc)
        return rc;
    ipmpi_sendop_t *op = calloc(1, sizeof *op);
    if (!op)
        return IPMPI_ENOMEM;
    size_t hl = ipmpi_hdr_wire_size(hh.nparts);
    op->hdr = malloc(hl);
    if (!op->hdr) {
        free(op);
        return IPMPI_ENOMEM;
    }
    ipmpi_hdr_encode(&hh, parts ? parts->lens : NULL, op->hdr, hl);
    int pr;
    MPI_Comm pc = peer(l, rank, &pr);
    if (MPI_Isend(op->hdr, (int)hl, MPI_BYTE, pr, IPMPI_TAG_HDR, pc, &l->sreq[l->ns]) != MPI_SUCCESS) {
        free(op->hdr);
        free(op);
        return IPMPI_EMPI;
    }
    l->sop[l->ns++] = op;
    op->rank = rank;
    op->parts = parts ? ipmpi_parts_ref(parts) : NULL;
    op->left = 1;
    /* An idle engine on this node sleeps on its doorbell: wake it now
     * that its header is posted. */
    ipmpi_doorbell_ring(l->bell, rank);
    if (l->wake)
        l->wake(l->wake_arg, rank);
    *out = op;
    return 0;
}

int ipmpi_mpilink_send_msg(ipmpi_mpilink_t *l, int rank, int tag, ipmpi_parts_t *parts)
{
    if (!parts || parts->n < 1 || parts->lens[0] > IPMPI_MPI_CHUNK)
        return IPMPI_EINVAL;
    int rc = grow_sends(l, 1);
    if (rc)
        return rc;
    ipmpi_sendop_t *op = calloc(1, sizeof *op);
    if (!op)
        return IPMPI_ENOMEM;
    int pr;
    MPI_Comm pc = peer(l, rank, &pr);
    if (MPI_Isend(parts->bufs[0], (int)parts->lens[0], MPI_BYTE, pr, tag, pc, &l->sreq[l->ns]) != MPI_SUCCESS) {
        free(op);
        return IPMPI_EMPI;
    }
    l->sop[l->ns++] = op;
    op->rank = rank;
    op->parts = ipmpi_parts_ref(parts);
    op->left = 1;
    return 0;
}

int ipmpi_mpilink_send(ipmpi_mpilink_t *l, int rank, const ipmpi_hdr_t *h, ipmpi_parts_t *parts)
{
    uint32_t more = 0;
    for (uint32_t i = 0; parts && i < parts->n; i++)
        more += nchunks(parts->lens[i]);
    /* Once the header is posted the frame must go out whole, or the engine
     * would read a later frame's parts as this one's: from here on a failed
     * post is fatal for the link (reported as IPMPI_EMPI). */
    ipmpi_sendop_t *op;
    int rc = post_header(l, rank, h, parts, more, &op);
    if (rc)
        return rc;
    op->bulk = parts && has_bulk(parts->n, parts->lens);
    l->nbulk += (uint32_t)op->bulk;
    int pr;
    MPI_Comm pc = peer(l, rank, &pr);
    for (uint32_t i = 0; parts && i < parts->n; i++) {
        uint64_t len = parts->lens[i], off = 0;
        do {
            uint64_t n = len - off < IPMPI_MPI_CHUNK ? len - off : IPMPI_MPI_CHUNK;
            if (MPI_Isend(parts->bufs[i] + off, (int)n, MPI_BYTE, pr, IPMPI_TAG_PART, pc,
                          &l->sreq[l->ns]) != MPI_SUCCESS)
                return IPMPI_EMPI;
            l->sop[l->ns++] = op;
            op->left++;
            off += n;
        } while (off < len);
    }
    return 0;
}

static void sendop_done(ipmpi_mpilink_t *l, ipmpi_sendop_t *op)
{
    l->nbulk -= (uint32_t)op->bulk;
    ipmpi_parts_unref(op->parts);
    free(op->hdr);
    free(op);
}

/* Drops the entries whose request is MPI_REQUEST_NULL, keeping order. */
static void compact_sends(ipmpi_mpilink_t *l)
{
    uint32_t j = 0;
    for (uint32_t i = 0; i < l->ns; i++) {
        if (l->sreq[i] == MPI_REQUEST_NULL)
            continue;
        l->sreq[j] = l->sreq[i];
        l->sop[j] = l->sop[i];
        j++;
    }
    l->ns = j;
}

static int progress_sends(ipmpi_mpilink_t *l)
{
    if (l->ns == 0)
        return 0;
    int outcount = 0;
    if (MPI_Testsome((int)l->ns, l->sreq, &outcount, l->sidx, MPI_STATUSES_IGNORE) != MPI_SUCCESS)
        return IPMPI_EMPI;
    if (outcount == MPI_UNDEFINED || outcount == 0)
        return 0;
    for (int k = 0; k < outcount; k++) {
        ipmpi_sendop_t *op = l->sop[l->sidx[k]];
        /* A send completes once its bytes are in the engine's reach; one
         * that MPI queued (the peer's shared-memory queue was full) got
         * there after post_header's ring, maybe after the engine's last
         * look before it fell asleep: ring again now. Cheap when awake. */
        ipmpi_doorbell_ring(l->bell, op->rank);
        if (--op->left > 0)
            continue;
        if (!op->open) {
            sendop_done(l, op);
        } else if (op->bulk) {
            op->bulk = 0;
            l->nbulk--;
        }
    }
    compact_sends(l);
    return outcount;
}

/* ---- cut-through sends ---- */

/* Posts n bytes at buf as one message of op's frame. */
static int stream_post(ipmpi_mpilink_t *l, ipmpi_sendop_t *op, const void *buf, uint64_t n)
{
    int rc = grow_sends(l, 1);
    if (rc)
        return rc;
    int pr;
    MPI_Comm pc = peer(l, op->rank, &pr);
    if (MPI_Isend((void *)buf, (int)n, MPI_BYTE, pr, IPMPI_TAG_PART, pc, &l->sreq[l->ns]) != MPI_SUCCESS)
        return IPMPI_EMPI;
    l->sop[l->ns++] = op;
    op->left++;
    if (!op->bulk && n > EAGER_MAX) {
        op->bulk = 1;
        l->nbulk++;
    }
    return 0;
}

int ipmpi_mpilink_stream_start(ipmpi_mpilink_t *l, int rank, const ipmpi_hdr_t *h, ipmpi_parts_t *parts,
                               ipmpi_sendop_t **out)
{
    ipmpi_sendop_t *op;
    int rc = post_header(l, rank, h, parts, 0, &op);
    if (rc)
        return rc;
    op->open = 1;
    *out = op;
    return 0;
}

int ipmpi_mpilink_stream_feed(ipmpi_mpilink_t *l, ipmpi_sendop_t *op, uint32_t part, uint64_t filled)
{
    const ipmpi_parts_t *p = op->parts;
    while (op->part < p->n) {
        uint64_t len = p->lens[op->part];
        /* An empty part is complete as soon as the parts before it are:
         * posting it at once keeps `part` on a part with bytes still to
         * send, which is where an abort's empty message must land. */
        if (len == 0) {
            int rc = stream_post(l, op, p->bufs[op->part], 0);
            if (rc)
                return rc;
            op->part++;
            continue;
        }
        if (op->part > part)
            break;
        uint64_t avail = op->part < part ? len : filled;
        /* Whole chunks as they fill, then the tail once the part is
         * complete; bytes that came in a burst go as one message. */
        while (op->off < avail && (avail - op->off >= IPMPI_STREAM_CHUNK || avail == len)) {
            uint64_t n = avail - op->off < IPMPI_MPI_CHUNK ? avail - op->off : IPMPI_MPI_CHUNK;
            int rc = stream_post(l, op, p->bufs[op->part] + op->off, n);
            if (rc)
                return rc;
            op->off += n;
        }
        if (op->off < len)
            break;
        op->part++;
        op->off = 0;
    }
    if (op->part < p->n)
        return 0;
    op->open = 0;
    if (op->left == 0)
        sendop_done(l, op);
    return 1;
}

int ipmpi_mpilink_stream_abort(ipmpi_mpilink_t *l, ipmpi_sendop_t *op)
{
    /* feed leaves `part` on a part with bytes unsent, so the engine reads
     * this empty message as an abort, never as an empty part. */
    int rc = op->part < op->parts->n ? stream_post(l, op, op->parts->bufs[op->part], 0) : 0;
    op->open = 0;
    if (op->left == 0)
        sendop_done(l, op);
    return rc;
}

/* A header arrived: take it and post receives for all its parts. */
static int start_recv(ipmpi_mpilink_t *l, MPI_Message *msg, MPI_Status *st, MPI_Comm comm, int base)
{
    int count = 0, src = st->MPI_SOURCE; /* in comm: ranks 1.. are link ranks base.. */
    MPI_Get_count(st, MPI_BYTE, &count);
    uint8_t *buf = malloc(count > 0 ? (size_t)count : 1);
    if (!buf)
        return IPMPI_ENOMEM;
    if (MPI_Mrecv(buf, count, MPI_BYTE, msg, MPI_STATUS_IGNORE) != MPI_SUCCESS) {
        free(buf);
        return IPMPI_EMPI;
    }
    int rc = IPMPI_EPROTO;
    ipmpi_hdr_t h;
    uint64_t *lens = NULL, total = 0;
    ipmpi_recvop_t *op = NULL;
    if (ipmpi_hdr_decode(buf, (size_t)count, &l->lim, &h) != IPMPI_HDR_SIZE ||
        (size_t)count < ipmpi_hdr_wire_size(h.nparts) ||
        (!(h.flags & IPMPI_F_PACKED) && (size_t)count != ipmpi_hdr_wire_size(h.nparts)))
        goto bad;
    lens = malloc(((size_t)h.nparts + 1) * sizeof *lens);
    rc = IPMPI_ENOMEM;
    if (!lens)
        goto bad;
    rc = IPMPI_EPROTO;
    if (h.nparts && ipmpi_lens_decode(buf + IPMPI_HDR_SIZE, (size_t)count - IPMPI_HDR_SIZE, h.nparts, &l->lim,
                                      lens, &total) <= 0)
        goto bad;
    rc = IPMPI_ENOMEM;
    op = calloc(1, sizeof *op);
    if (!op)
        goto bad;
    op->parts = l->alloc ? l->alloc(l->alloc_arg, base + src - 1, &h, lens) : ipmpi_parts_new(h.nparts, lens);
    if (!op->parts)
        goto bad;
    uint32_t nreq = 0;
    for (uint32_t i = 0; i < h.nparts; i++)
        nreq += nchunks(lens[i]);
    op->reqs = malloc(((size_t)nreq + 1) * sizeof *op->reqs);
    if (!op->reqs)
        goto bad;
    op->rank = base + src - 1;
    op->h = h;
    if (h.flags & IPMPI_F_PACKED) {
        /* A small frame whose parts came in this message: done now. */
        size_t at = ipmpi_hdr_wire_size(h.nparts);
        rc = IPMPI_EPROTO;
        if ((size_t)count - at != total)
            goto bad;
        for (uint32_t i = 0; i < h.nparts; i++) {
            memcpy(op->parts->bufs[i], buf + at, (size_t)lens[i]);
            at += (size_t)lens[i];
        }
        op->h.flags &= (uint16_t)~IPMPI_F_PACKED;
        op->next = l->recv_head;
        l->recv_head = op;
        free(lens);
        free(buf);
        return 0;
    }
    op->bulk = has_bulk(h.nparts, lens);
    for (uint32_t i = 0; i < h.nparts; i++) {
        uint64_t off = 0;
        do {
            uint64_t n = lens[i] - off < IPMPI_MPI_CHUNK ? lens[i] - off : IPMPI_MPI_CHUNK;
            if (MPI_Irecv(op->parts->bufs[i] + off, (int)n, MPI_BYTE, src, IPMPI_TAG_PART, comm,
                          &op->reqs[op->nreq]) != MPI_SUCCESS) {
                rc = IPMPI_EMPI;
                goto bad;
            }
            op->nreq++;
            off += n;
        } while (off < lens[i]);
    }
    op->next = l->recv_head;
    l->recv_head = op;
    l->nbulk += (uint32_t)op->bulk;
    free(lens);
    free(buf);
    return 0;
bad:
    /* Receives already posted keep their buffers: leak them with the op. */
    if (op && op->nreq == 0) {
        ipmpi_parts_unref(op->parts);
        free(op->reqs);
        free(op);
    }
    ipmpi_log(IPMPI_LOG_ERROR, "bad frame from rank %d (%d bytes of header): %s", base + src - 1, count,
              ipmpi_strerror(rc));
    free(lens);
    free(buf);
    return rc;
}

/* Every announced frame was taken: nobody is owed. */
static void pend_clear(ipmpi_mpilink_t *l, uint64_t announced)
{
    for (uint32_t i = 0; i < l->npend; i++)
        l->pend[l->pend_list[i]] = 0;
    l->npend = 0;
    l->ann_cur = announced;
    l->ann_lost = 0;
}

/* Reads the makers of the announcements up to `announced` into pend.
 * Returns 1 when every frame owed is from a known rank, else 0 (probe any
 * source this time). */
static int pend_read(ipmpi_mpilink_t *l, uint64_t announced)
{
    if (!l->pend) {
        /* One block: the counts, then the list (both 4 bytes a rank). */
        l->pend = calloc(2 * (size_t)l->comm_size, sizeof *l->pend);
        if (!l->pend)
            return 0;
        l->pend_list = (int *)(l->pend + l->comm_size);
    }
    if (l->ann_lost)
        return 0;
    if (announced - l->ann_cur > IPMPI_DOORBELL_RING) {
        l->ann_lost = 1; /* overwritten: any source until all are taken */
        return 0;
    }
    while (l->ann_cur < announced) {
        int r = ipmpi_doorbell_ctl_announcer(l->bell, l->ann_cur);
        if (r <= 0 || r >= l->comm_size)
            return 0; /* not recorded yet: its frame is not sent either, but later ones may be */
        if (l->pend[r]++ == 0)
            l->pend_list[l->npend++] = r;
        l->ann_cur++;
    }
    return 1;
}

/* A frame from rank r of comm was taken. */
static void pend_took(ipmpi_mpilink_t *l, int r)
{
    if (!l->pend || r <= 0 || r >= l->comm_size || l->pend[r] == 0 || --l->pend[r] > 0)
        return;
    for (uint32_t i = 0; i < l->npend; i++)
        if (l->pend_list[i] == r) {
            l->pend_list[i] = l->pend_list[--l->npend];
            break;
        }
}

int ipmpi_mpilink_progress(ipmpi_mpilink_t *l, ipmpi_mpilink_cb cb, void *arg)
{
    int events = progress_sends(l);
    if (events < 0)
        return events;

    /* The job's own engines, then those that joined later (each job on
     * its communicator, ranks 1.. there). */
    for (uint32_t c = 0; c <= l->nextra; c++) {
        MPI_Comm comm = c == 0 ? l->comm : l->extra[c - 1].comm;
        int base = c == 0 ? 1 : l->extra[c - 1].base;
        if (c > 0 && !l->extra[c - 1].open)
            continue;
        /* named: the ranks that owe frames are known (the bell's ring):
         * probe them alone. */
        int named = 0;
        if (c == 0 && l->bell_tells) {
            uint64_t now = ipmpi_now_ns();
            uint64_t ann = ipmpi_doorbell_ctl_announced(l->bell);
            if (ann == l->near_hdrs)
                pend_clear(l, ann);
            if (now < l->probe_due && ann == l->near_hdrs) {
                l->probes_skipped++;
                continue;
            }
            l->probe_due = now + IPMPI_PROBE_MAX_NS;
            named = ann != l->near_hdrs && pend_read(l, ann) && now < l->wild_due;
            if (!named)
                l->wild_due = now + IPMPI_PROBE_MAX_NS;
        }
        for (;;) {
            int flag = 0;
            MPI_Message msg;
            MPI_Status st;
            for (uint32_t k = 0; named && !flag && k < l->npend; k++) {
                l->probes_named++;
                if (MPI_Improbe(l->pend_list[k], IPMPI_TAG_HDR, comm, &flag, &msg, &st) != MPI_SUCCESS)
                    return IPMPI_EMPI;
            }
            if (!named) {
                l->probes_any++;
                if (MPI_Improbe(MPI_ANY_SOURCE, IPMPI_TAG_HDR, comm, &flag, &msg, &st) != MPI_SUCCESS)
                    return IPMPI_EMPI;
            }
            if (!flag)
                break;
            if (c == 0 && ipmpi_doorbell_reaches(l->bell, st.MPI_SOURCE)) {
                l->near_hdrs++;
                pend_took(l, st.MPI_SOURCE);
            }
            int rc = start_recv(l, &msg, &st, comm, base);
            if (rc == IPMPI_EMPI)
                return rc;
            events++;
            /* Every frame the bell announced is in: a last probe would
             * only fail, walking every peer (the skip above, decided in
             * advance). */
            if (c == 0 && l->bell_tells && ipmpi_doorbell_ctl_announced(l->bell) == l->near_hdrs)
                break;
        }
    }

    /* Unlink the complete frames first, then hand them over, so the
     * callback may send or abandon freely. */
    ipmpi_recvop_t *done = NULL, **pp = &l->recv_head;
    while (*pp) {
        ipmpi_recvop_t *op = *pp;
        int flag = 1;
        if (op->nreq > 0 && MPI_Testall(op->nreq, op->reqs, &flag, MPI_STATUSES_IGNORE) != MPI_SUCCESS)
            return IPMPI_EMPI;
        if (!flag) {
            pp = &op->next;
            continue;
        }
        *pp = op->next;
        op->next = done;
        done = op;
        l->nbulk -= (uint32_t)op->bulk;
    }
    /* recv_head holds the newest first and prepending reversed it again:
     * done is in arrival order, which keeps each rank's frames in order. */
    while (done) {
        ipmpi_recvop_t *op = done;
        done = op->next;
        events++;
        cb(arg, op->rank, &op->h, op->parts);
        free(op->reqs);
        free(op);
    }
    return events;
}

void ipmpi_mpilink_abandon(ipmpi_mpilink_t *l, int rank)
{
    uint32_t j = 0;
    for (uint32_t i = 0; i < l->ns; i++) {
        ipmpi_sendop_t *op = l->sop[i];
        if (op->rank == rank) {
            /* The op and its buffers stay allocated on purpose; its bulk
             * count goes once, with its first request seen here. */
            l->nbulk -= (uint32_t)op->bulk;
            op->bulk = 0;
            continue;
        }
        l->sreq[j] = l->sreq[i];
        l->sop[j] = l->sop[i];
        j++;
    }
    l->ns = j;
    ipmpi_recvop_t **pp = &l->recv_head;
    while (*pp) {
        if ((*pp)->rank == rank) {
            l->nbulk -= (uint32_t)(*pp)->bulk;
            *pp = (*pp)->next; /* leaked: MPI may still write into it */
        }
        else
            pp = &(*pp)->next;
    }
}
