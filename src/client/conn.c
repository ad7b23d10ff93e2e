/*
 * Client transport: TCP + TLS 1.3 to the controller, frame writer,
 * incremental frame reader and result store. See conn.h for the API and
 * the locking theory; every function may be called from any thread.
 *
 * The socket is non-blocking. Waiting happens in poll() slices of
 * SLICE_MS with no lock held, so hooks->interrupted() can run between
 * slices (the Python module turns that into Ctrl-C handling) and close()
 * can wake every waiter by shutting the socket down.
 */
#include "hugemem.h"
#include "conn.h"
#include "shm.h"

#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#include "backoff.h"
#include "codec.h"
#include "ipmpi/errors.h"
#include "tls.h"

#define SLICE_MS 100
#define SLICE_NS ((uint64_t)SLICE_MS * 1000000u)
#define SMALL_PART (16u * 1024u) /* parts below this are gathered with the header */
#define WBUF_SIZE (64u * 1024u)
#define SCRATCH_SIZE (16u * 1024u)
#define MSG_MAX 512

enum { RX_HDR, RX_LENS, RX_PARTS };

/* Own memfds for large request parts, reused while the controller keeps
 * them mapped (a fresh memfd costs ~7x the copy into one in use). */
#define SHM_SLOTS 8
#define SHM_IDLE_NS (10ull * 1000000000ull)
#define SHM_CLAIMED UINT64_MAX /* busy for a request that has no id yet */
typedef struct shm_slot {
    int fd;        /* -1: empty */
    uint8_t *base;
    uint64_t cap;
    uint64_t busy; /* request id that uses it, 0: free */
    uint64_t t;    /* when it was last freed */
} shm_slot_t;

/* The frame being read. rep.parts/lens/data are allocated per frame and
 * handed to the store when the frame is complete. */
typedef struct rx_state {
    int stage;
    uint8_t hdr[IPMPI_HDR_SIZE];
    size_t have;
    ipmpi_hdr_t h;
    uint8_t *lensbuf;
    size_t lensbuf_cap;
    ipmpi_cl_reply_t rep;
    char **data;  /* memory of rep.parts[i], or NULL when discarding */
    int keep;     /* someone waits for this req_id */
    int nomem;    /* alloc failed: the parts are discarded, status ENOMEM */
    uint8_t *tab; /* IPMPI_F_SHM: the table, kept even when discarding */
    uint32_t cur;
    uint64_t off;
} rx_state_t;

struct ipmpi_cl {
    pthread_mutex_t send_mu; /* one frame at a time on the wire */
    pthread_mutex_t mu;      /* SSL, reader, store, error, users */
    pthread_cond_t cond;     /* broadcast on delivery, role release, error */
    int fd;
    SSL_CTX *ctx;
    SSL *ssl;
    int reading;  /* the reader role is taken */
    int users;    /* threads inside a function of c */
    int closed;
    int err;
    char errmsg[MSG_MAX];
    char addr[IPMPI_FURL_HOST_MAX + 16];
    uint64_t next_id;
    ipmpi_limits_t lim;
    ipmpi_cl_entry_t **buckets;
    size_t nbuckets, nentries;
    rx_state_t rx;
    uint8_t *wbuf; /* gather buffer for small writes; under send_mu */
    size_t wlen;
    uint8_t scratch[SCRATCH_SIZE];

    /* Same-host shared memory (doc/protocol.md section 5). */
    int shm;          /* the probe passed: big parts go by memfd both ways */
    int vm;           /* ... and by process memory (process_vm_readv) */
    pthread_mutex_t shm_mu; /* pool; a leaf lock (taken last) */
    shm_slot_t pool[SHM_SLOTS];
    uint32_t *relfds; /* the controller's memfds read and not yet released; under mu */
    uint32_t nrel, relcap;
};

/* ---- errors ---- */

/* Records the first error that broke the connection (mu held). */
static void set_broken(ipmpi_cl_t *c, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void set_broken(ipmpi_cl_t *c, int code, const char *fmt, ...)
{
    if (c->err)
        return;
    char why[160];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    c->err = code;
    snprintf(c->errmsg, sizeof c->errmsg, "connection to controller %s lost: %s", c->addr, why);
    pthread_cond_broadcast(&c->cond);
}

/* Translates a failed SSL_read/SSL_write once, where it happened. */
static void set_broken_ssl(ipmpi_cl_t *c, int sslerr, int sys_errno, const char *doing)
{
    unsigned long e = ERR_peek_error();
    if (sslerr == SSL_ERROR_ZERO_RETURN || (sslerr == SSL_ERROR_SYSCALL && sys_errno == 0 && e == 0))
        set_broken(c, IPMPI_ECLOSED, "the controller closed the connection (%s)", doing);
    else if (sslerr == SSL_ERROR_SYSCALL && e == 0)
        set_broken(c, IPMPI_ECLOSED, "%s: %s", doing, strerror(sys_errno));
    else {
        char buf[160];
        ERR_error_string_n(e, buf, sizeof buf);
        set_broken(c, IPMPI_ETLS, "TLS error %s: %s", doing, buf);
    }
    ERR_clear_error();
}

int ipmpi_cl_error(ipmpi_cl_t *c, char *msg, size_t msgcap)
{
    pthread_mutex_lock(&c->mu);
    int err = c->err;
    if (msgcap)
        snprintf(msg, msgcap, "%s", c->errmsg);
    pthread_mutex_unlock(&c->mu);
    return err;
}

/* ---- store: req_id -> entry, chained hash; ids are sequential, so the
 * low bits spread them evenly ---- */

static ipmpi_cl_entry_t **slot(ipmpi_cl_t *c, uint64_t id)
{
    ipmpi_cl_entry_t **pp = &c->buckets[id & (c->nbuckets - 1)];
    while (*pp && (*pp)->req_id != id)
        pp = &(*pp)->next;
    return pp;
}

static ipmpi_cl_entry_t *lookup(ipmpi_cl_t *c, uint64_t id)
{
    return *slot(c, id);
}

static int complete(const ipmpi_cl_entry_t *e)
{
    return e->total != 0 && e->nrep >= e->total;
}

static int grow(ipmpi_cl_t *c)
{
    size_t n = c->nbuckets * 2;
    ipmpi_cl_entry_t **nb = calloc(n, sizeof *nb);
    if (!nb)
        return IPMPI_ENOMEM;
    for (size_t i = 0; i < c->nbuckets; i++) {
        ipmpi_cl_entry_t *e = c->buckets[i];
        while (e) {
            ipmpi_cl_entry_t *next = e->next;
            e->next = nb[e->req_id & (n - 1)];
            nb[e->req_id & (n - 1)] = e;
            e = next;
        }
    }
    free(c->buckets);
    c->buckets = nb;
    c->nbuckets = n;
    return 0;
}

static int insert(ipmpi_cl_t *c, uint64_t id)
{
    if (c->nentries >= c->nbuckets && grow(c) != 0)
        return IPMPI_ENOMEM;
    ipmpi_cl_entry_t *e = calloc(1, sizeof *e);
    if (!e)
        return IPMPI_ENOMEM;
    e->req_id = id;
    ipmpi_cl_entry_t **pp = &c->buckets[id & (c->nbuckets - 1)];
    e->next = *pp;
    *pp = e;
    c->nentries++;
    return 0;
}

/* ---- own memfds for request parts ---- */

static void shm_slot_close(shm_slot_t *sl)
{
    munmap(sl->base, (size_t)sl->cap);
    close(sl->fd);
    sl->fd = -1;
    sl->base = NULL;
    sl->busy = 0;
}

/* A memfd of at least len bytes, marked busy (SHM_CLAIMED), or NULL when
 * every slot is busy or memory runs out (the part then goes inline). Free
 * slots idle for SHM_IDLE_NS are closed on the way. */
static shm_slot_t *shm_claim(ipmpi_cl_t *c, uint64_t len)
{
    uint64_t now = ipmpi_now_ns();
    uint64_t need = ipmpi_huge_round(len);
    shm_slot_t *best = NULL, *spare = NULL;
    pthread_mutex_lock(&c->shm_mu);
    for (int i = 0; i < SHM_SLOTS; i++) {
        shm_slot_t *sl = &c->pool[i];
        if (sl->fd >= 0 && !sl->busy && now - sl->t >= SHM_IDLE_NS)
            shm_slot_close(sl);
        if (sl->fd < 0) {
            spare = spare ? spare : sl;
            continue;
        }
        if (sl->busy)
            continue;
        if (sl->cap >= need && sl->cap - need <= sl->cap / 4 && (!best || sl->cap < best->cap))
            best = sl;
        else if (!spare || (spare->fd >= 0 && sl->t < spare->t))
            spare = sl; /* the oldest free one that does not fit */
    }
    if (!best && spare) {
        if (spare->fd >= 0)
            shm_slot_close(spare);
        int fd = ipmpi_shm_create("part", need);
        uint8_t *base = fd >= 0 ? ipmpi_shm_map(fd, need, 1, 0) : NULL;
        if (base) {
            ipmpi_advise_huge(base, need);
            *spare = (shm_slot_t){.fd = fd, .base = base, .cap = need};
            best = spare;
        } else if (fd >= 0) {
            close(fd);
        }
    }
    if (best)
        best->busy = SHM_CLAIMED;
    pthread_mutex_unlock(&c->shm_mu);
    return best;
}

/* The memfds of request id (SHM_CLAIMED: of the request being sent) are
 * free again (reuse) or, when the request was given up while the
 * controller may still read them, closed so nothing ever overwrites them. */
static void shm_unclaim(ipmpi_cl_t *c, uint64_t id, int reuse)
{
    uint64_t now = ipmpi_now_ns();
    pthread_mutex_lock(&c->shm_mu);
    for (int i = 0; i < SHM_SLOTS; i++) {
        shm_slot_t *sl = &c->pool[i];
        if (sl->fd < 0 || sl->busy != id)
            continue;
        if (reuse) {
            sl->busy = 0;
            sl->t = now;
        } else {
            shm_slot_close(sl);
        }
    }
    pthread_mutex_unlock(&c->shm_mu);
}

static void shm_mark(ipmpi_cl_t *c, uint64_t id)
{
    pthread_mutex_lock(&c->shm_mu);
    for (int i = 0; i < SHM_SLOTS; i++)
        if (c->pool[i].fd >= 0 && c->pool[i].busy == SHM_CLAIMED)
            c->pool[i].busy = id;
    pthread_mutex_unlock(&c->shm_mu);
}

static ipmpi_cl_entry_t *unlink_entry(ipmpi_cl_t *c, uint64_t id)
{
    ipmpi_cl_entry_t **pp = slot(c, id);
    ipmpi_cl_entry_t *e = *pp;
    if (e) {
        *pp = e->next;
        e->next = NULL;
        c->nentries--;
    }
    return e;
}

static void reply_release(ipmpi_cl_reply_t *r, const ipmpi_cl_hooks_t *hooks)
{
    for (uint32_t i = 0; r->parts && i < r->nparts; i++)
        if (r->parts[i])
            hooks->release(hooks->ctx, r->parts[i]);
    free(r->parts);
    free(r->lens);
    r->parts = NULL;
    r->lens = NULL;
    r->nparts = 0;
}

void ipmpi_cl_entry_free(ipmpi_cl_entry_t *e, const ipmpi_cl_hooks_t *hooks)
{
    if (!e)
        return;
    for (uint32_t i = 0; i < e->nrep; i++)
        reply_release(&e->reps[i], hooks);
    free(e->reps);
    for (uint32_t i = 0; i < e->nout; i++)
        reply_release(&e->outs[i], hooks);
    free(e->outs);
    free(e);
}

/* ---- reader: an incremental state machine over SSL_read, resumed by
 * whichever thread holds the reader role ---- */

static void rx_reset(rx_state_t *rx)
{
    free(rx->data);
    rx->data = NULL;
    free(rx->tab);
    rx->tab = NULL;
    memset(&rx->rep, 0, sizeof rx->rep);
    rx->stage = RX_HDR;
    rx->have = 0;
    rx->keep = 0;
    rx->nomem = 0;
    rx->cur = 0;
    rx->off = 0;
}

/* Memory for a received part of len bytes from the caller's hook, advised
 * into huge pages when large. NULL on failure. */
static void *rx_alloc(const ipmpi_cl_hooks_t *hooks, uint64_t len, char **data)
{
    void *obj = hooks->alloc(hooks->ctx, len, data);
    if (obj)
        ipmpi_advise_huge(*data, len);
    return obj;
}

/* Turns a reply with an error status that the client made up: one part,
 * the message. mu held. */
static void rx_fail(ipmpi_cl_t *c, const ipmpi_cl_hooks_t *hooks, int status, const char *msg)
{
    rx_state_t *rx = &c->rx;
    reply_release(&rx->rep, hooks);
    rx->rep.status = status;
    rx->rep.lens = calloc(1, sizeof(uint64_t));
    rx->rep.parts = calloc(1, sizeof(void *));
    char *d = NULL;
    if (rx->rep.lens && rx->rep.parts) {
        rx->rep.nparts = 1;
        rx->rep.lens[0] = strlen(msg);
        rx->rep.parts[0] = hooks->alloc(hooks->ctx, rx->rep.lens[0], &d);
        if (rx->rep.parts[0])
            memcpy(d, msg, rx->rep.lens[0]);
    }
    rx->h.status = status;
}

/* Remembers a memfd of the controller to release with the next frame. */
static void rx_release_later(ipmpi_cl_t *c, uint32_t fd)
{
    if (c->nrel == c->relcap) {
        uint32_t ncap = c->relcap ? c->relcap * 2 : 16;
        uint32_t *n = realloc(c->relfds, ncap * sizeof *n);
        if (!n)
            return; /* the controller frees it when we disconnect */
        c->relfds = n;
        c->relcap = ncap;
    }
    c->relfds[c->nrel++] = fd;
}

/* A reply with IPMPI_F_SHM: copies every part it names out of the
 * controller's memfd (pid in aux) into memory of our own, drops the table
 * and queues the memfds for RELEASE. On failure the reply becomes an error
 * saying why (nothing is silently lost). mu held. */
static void rx_shm_resolve(ipmpi_cl_t *c, const ipmpi_cl_hooks_t *hooks)
{
    rx_state_t *rx = &c->rx;
    uint32_t n = rx->rep.nparts;
    char why[256] = "";
    ipmpi_shmref_t *refs = n > 1 ? malloc((size_t)(n - 1) * sizeof *refs) : NULL;
    uint64_t wire = 0;
    for (uint32_t i = 0; i + 1 < n; i++)
        wire += rx->rep.lens[i];
    long k = refs && rx->tab ? ipmpi_shmref_decode(rx->tab, rx->rep.lens[n - 1], n - 1,
                                        rx->rep.lens, wire, &c->lim, refs, n - 1)
                  : IPMPI_EPROTO;
    if (k < 0) {
        free(refs);
        if (rx->keep && !rx->nomem)
            rx_fail(c, hooks, IPMPI_EPROTO, "malformed shared-memory table in a reply from the controller");
        return;
    }
    for (long i = 0; i < k; i++)
        rx_release_later(c, refs[i].fd);
    if (!rx->keep || rx->nomem) {
        free(refs);
        return;
    }
    hooks->release(hooks->ctx, rx->rep.parts[n - 1]);
    rx->rep.parts[n - 1] = NULL;
    rx->rep.nparts = n - 1;
    for (long i = 0; i < k; i++) {
        const ipmpi_shmref_t *r = &refs[i];
        char *dst = NULL;
        void *obj = rx_alloc(hooks, r->len, &dst);
        if (!obj) {
            snprintf(why, sizeof why, "out of memory for a %llu-byte part", (unsigned long long)r->len);
            break;
        }
        if (r->fd & IPMPI_SHM_VM) {
            if (ipmpi_vm_read((int)rx->h.aux, r->off, dst, r->len) != 0)
                snprintf(why, sizeof why, "cannot read the controller's memory: %s", strerror(errno));
        } else {
            uint64_t size = 0, ino = 0;
            int g = ipmpi_shm_open_peer((int)rx->h.aux, r->fd, r->off + r->len, &size, &ino, why, sizeof why);
            uint8_t *m = g >= 0 ? ipmpi_shm_map(g, size, 0, 0) : NULL;
            if (g >= 0)
                close(g);
            if (m) {
                memcpy(dst, m + r->off, (size_t)r->len);
                munmap(m, (size_t)size);
            } else if (g >= 0) {
                snprintf(why, sizeof why, "cannot map the controller's memfd");
            }
        }
        if (why[0]) {
            hooks->release(hooks->ctx, obj);
            break;
        }
        if (rx->rep.parts[r->part])
            hooks->release(hooks->ctx, rx->rep.parts[r->part]);
        rx->rep.parts[r->part] = obj;
        rx->rep.lens[r->part] = r->len;
    }
    free(refs);
    if (why[0]) {
        char msg[320];
        snprintf(msg, sizeof msg, "reply through shared memory lost: %s", why);
        rx_fail(c, hooks, IPMPI_EIO, msg);
    }
}

/* Appends rep to the array *arr of *n replies (capacity *cap, doubled
 * when full). Returns 0, or IPMPI_ENOMEM with nothing changed. */
static int append_reply(ipmpi_cl_reply_t **arr, uint32_t *n, uint32_t *cap, const ipmpi_cl_reply_t *rep)
{
    if (*n == *cap) {
        uint32_t ncap = *cap ? *cap * 2 : 4;
        ipmpi_cl_reply_t *a = realloc(*arr, ncap * sizeof *a);
        if (!a)
            return IPMPI_ENOMEM;
        *arr = a;
        *cap = ncap;
    }
    (*arr)[(*n)++] = *rep;
    return 0;
}

/* Keeps a non-final reply (streamed output) of e for
 * ipmpi_cl_wait_output, within IPMPI_CL_OUT_MAX bytes. mu held. */
static void store_output(ipmpi_cl_t *c, ipmpi_cl_entry_t *e, ipmpi_cl_reply_t *rep, const ipmpi_cl_hooks_t *hooks)
{
    uint64_t bytes = 0;
    for (uint32_t i = 0; i < rep->nparts; i++)
        bytes += rep->lens[i];
    if (e->out_bytes + bytes > IPMPI_CL_OUT_MAX || rep->status != 0 ||
        append_reply(&e->outs, &e->nout, &e->outcap, rep) != 0) {
        e->out_dropped += bytes;
        reply_release(rep, hooks);
        return;
    }
    e->out_bytes += bytes;
    pthread_cond_broadcast(&c->cond);
}

/*
 * A reply with IPMPI_F_GATHER (doc/protocol.md section 3): part 0 (data,
 * len bytes) holds several engines' final replies; each becomes a reply
 * of e of its own, as if it had come alone. Returns 0, or IPMPI_EPROTO /
 * IPMPI_ENOMEM (the connection is then broken: replies would be lost).
 * mu held.
 */
static int split_gathered(ipmpi_cl_t *c, const ipmpi_cl_hooks_t *hooks, ipmpi_cl_entry_t *e, const uint8_t *data,
                          uint64_t len, uint32_t total)
{
    /* Runs (IPMPI_F_SAME) stand for many replies each: never more than
     * the request's engines (total), so a few bytes cannot fill memory. */
    uint64_t got = 0;
    ipmpi_gather_each_t it;
    ipmpi_gather_each_init(&it, data, (size_t)len, &c->lim);
    ipmpi_hdr_t h;
    const uint8_t *f;
    int n;
    while ((n = ipmpi_gather_each_next(&it, &h, &f)) > 0) {
        if (++got > total) {
            n = IPMPI_EPROTO;
            break;
        }
        ipmpi_cl_reply_t rep = {.target = h.target, .status = h.status, .nparts = h.nparts};
        rep.lens = calloc(h.nparts ? h.nparts : 1, sizeof *rep.lens);
        rep.parts = calloc(h.nparts ? h.nparts : 1, sizeof *rep.parts);
        int ok = rep.lens && rep.parts;
        size_t at = ipmpi_hdr_wire_size(h.nparts);
        for (uint32_t i = 0; ok && i < h.nparts; i++) {
            char *d = NULL;
            rep.lens[i] = ipmpi_get_u64(f + IPMPI_HDR_SIZE + 8u * i);
            rep.parts[i] = rx_alloc(hooks, rep.lens[i], &d);
            if ((ok = rep.parts[i] != NULL))
                memcpy(d, f + at, (size_t)rep.lens[i]);
            at += (size_t)rep.lens[i];
        }
        if (!ok || append_reply(&e->reps, &e->nrep, &e->cap, &rep) != 0) {
            reply_release(&rep, hooks);
            set_broken(c, IPMPI_ENOMEM, "out of memory storing a reply");
            return IPMPI_ENOMEM;
        }
    }
    if (n < 0) {
        set_broken(c, IPMPI_EPROTO, "malformed gathered replies from the controller");
        return IPMPI_EPROTO;
    }
    return 0;
}

/* The frame is complete: hand it to its entry, or drop it. mu held. */
static void rx_deliver(ipmpi_cl_t *c, const ipmpi_cl_hooks_t *hooks)
{
    rx_state_t *rx = &c->rx;
    if (rx->h.kind == IPMPI_K_RELEASE) {
        /* An ack: the controller copied this request's process memory. */
        ipmpi_cl_entry_t *a = lookup(c, rx->h.req_id);
        if (a)
            a->acked = 1;
        pthread_cond_broadcast(&c->cond);
        reply_release(&rx->rep, hooks);
        rx_reset(rx);
        return;
    }
    if ((rx->h.flags & IPMPI_F_SHM) && rx->rep.nparts > 0)
        rx_shm_resolve(c, hooks);
    ipmpi_cl_entry_t *e = lookup(c, rx->h.req_id);
    ipmpi_cl_reply_t rep = rx->rep;
    rep.target = rx->h.target;
    rep.status = rx->h.status;
    /* Taken over by rep; rx_reset must not release them again. */
    memset(&rx->rep, 0, sizeof rx->rep);
    if (!e || !rx->keep) {
        reply_release(&rep, hooks);
        goto done;
    }
    if (rx->nomem) {
        reply_release(&rep, hooks);
        rep.status = IPMPI_ENOMEM;
    }
    if (rx->h.flags & IPMPI_F_MORE) {
        store_output(c, e, &rep, hooks);
        goto done;
    }
    if (rx->h.flags & IPMPI_F_GATHER) {
        /* Without its bytes (no memory for them) the replies it holds
         * cannot even be counted: the link breaks rather than hang. */
        int bad = rep.status != 0 || rep.nparts != 1 || (rx->h.flags & IPMPI_F_SHM) || !rx->data || !rx->data[0] ||
                  split_gathered(c, hooks, e, (const uint8_t *)rx->data[0], rep.lens[0],
                                 rx->h.total ? rx->h.total : 1) != 0;
        reply_release(&rep, hooks);
        if (bad) {
            if (!c->err)
                set_broken(c, IPMPI_EPROTO, "malformed gathered replies from the controller");
            goto done;
        }
    } else if (append_reply(&e->reps, &e->nrep, &e->cap, &rep) != 0) {
        reply_release(&rep, hooks);
        set_broken(c, IPMPI_ENOMEM, "out of memory storing a reply");
        goto done;
    }
    /* total comes with every reply; a controller reply says 1. */
    e->total = rx->h.total ? rx->h.total : 1;
    pthread_cond_broadcast(&c->cond);
done:
    rx_reset(rx);
}

/* Lengths are known: get memory for every part (or decide to discard). */
static int rx_start_parts(ipmpi_cl_t *c, const ipmpi_cl_hooks_t *hooks)
{
    rx_state_t *rx = &c->rx;
    uint32_t n = rx->h.nparts;
    uint64_t total = 0;
    rx->rep.nparts = n;
    rx->rep.lens = calloc(n, sizeof(uint64_t));
    rx->rep.parts = calloc(n, sizeof(void *));
    rx->data = calloc(n, sizeof(char *));
    if (!rx->rep.lens || !rx->rep.parts || !rx->data) {
        set_broken(c, IPMPI_ENOMEM, "out of memory reading a reply");
        return IPMPI_ENOMEM;
    }
    long r = ipmpi_lens_decode(rx->lensbuf, (size_t)n * 8u, n, &c->lim, rx->rep.lens, &total);
    if (r < 0) {
        set_broken(c, (int)r, "reply %llu from the controller is too large",
                   (unsigned long long)rx->h.req_id);
        return (int)r;
    }
    if ((rx->h.flags & IPMPI_F_SHM) && n > 0) {
        /* The table names memfds to release even if nobody wants the reply. */
        uint64_t tl = rx->rep.lens[n - 1];
        rx->tab = tl <= (uint64_t)n * IPMPI_SHMREF_SIZE ? malloc((size_t)tl + 1) : NULL;
        if (!rx->tab) {
            set_broken(c, IPMPI_EPROTO, "bad shared-memory table in reply %llu from the controller",
                       (unsigned long long)rx->h.req_id);
            return IPMPI_EPROTO;
        }
    }
    rx->keep = lookup(c, rx->h.req_id) != NULL;
    for (uint32_t i = 0; rx->keep && i < n; i++) {
        rx->rep.parts[i] = rx_alloc(hooks, rx->rep.lens[i], &rx->data[i]);
        if (!rx->rep.parts[i]) {
            rx->nomem = 1;
            break;
        }
    }
    if (rx->nomem) {
        for (uint32_t i = 0; i < n; i++) {
            if (rx->rep.parts[i])
                hooks->release(hooks->ctx, rx->rep.parts[i]);
            rx->rep.parts[i] = NULL;
            rx->data[i] = NULL;
        }
    }
    rx->stage = RX_PARTS;
    rx->cur = 0;
    rx->off = 0;
    return 0;
}

/* A header has been read in full. */
static int rx_got_header(ipmpi_cl_t *c, const ipmpi_cl_hooks_t *hooks)
{
    rx_state_t *rx = &c->rx;
    long r = ipmpi_hdr_decode(rx->hdr, IPMPI_HDR_SIZE, &c->lim, &rx->h);
    if (r <= 0 || !(rx->h.flags & IPMPI_F_REPLY)) {
        set_broken(c, IPMPI_EPROTO, "malformed frame from the controller");
        return IPMPI_EPROTO;
    }
    if (rx->h.nparts == 0) {
        /* A reply without parts is still a reply (rx_start_parts, which
         * decides this for the others, is not reached). */
        rx->keep = lookup(c, rx->h.req_id) != NULL;
        rx_deliver(c, hooks);
        return 0;
    }
    size_t need = (size_t)rx->h.nparts * 8u;
    if (need > rx->lensbuf_cap) {
        uint8_t *b = realloc(rx->lensbuf, need);
        if (!b) {
            set_broken(c, IPMPI_ENOMEM, "out of memory reading a reply");
            return IPMPI_ENOMEM;
        }
        rx->lensbuf = b;
        rx->lensbuf_cap = need;
    }
    rx->stage = RX_LENS;
    rx->have = 0;
    return 0;
}

/*
 * Reads everything readable now and delivers complete frames. Returns 0
 * when the socket has nothing more (SSL has nothing buffered either, so
 * poll() is then a valid wait), or the error that broke the connection.
 * mu held, reader role held.
 */
static int pump(ipmpi_cl_t *c, const ipmpi_cl_hooks_t *hooks)
{
    rx_state_t *rx = &c->rx;
    for (;;) {
        if (c->err)
            return c->err;
        uint8_t *dest;
        size_t want;
        if (rx->stage == RX_HDR) {
            dest = rx->hdr + rx->have;
            want = IPMPI_HDR_SIZE - rx->have;
        } else if (rx->stage == RX_LENS) {
            dest = rx->lensbuf + rx->have;
            want = (size_t)rx->h.nparts * 8u - rx->have;
        } else {
            if (rx->cur == rx->rep.nparts) {
                rx_deliver(c, hooks);
                continue;
            }
            uint64_t left = rx->rep.lens[rx->cur] - rx->off;
            if (left == 0) {
                rx->cur++;
                rx->off = 0;
                continue;
            }
            if (rx->tab && rx->cur == rx->rep.nparts - 1) {
                dest = rx->tab + rx->off;
                want = (size_t)left;
            } else if (rx->data[rx->cur]) {
                dest = (uint8_t *)rx->data[rx->cur] + rx->off;
                want = left > (1u << 30) ? (1u << 30) : (size_t)left;
            } else {
                dest = c->scratch;
                want = left > SCRATCH_SIZE ? SCRATCH_SIZE : (size_t)left;
            }
        }
        size_t got = 0;
        ERR_clear_error();
        errno = 0;
        if (!SSL_read_ex(c->ssl, dest, want, &got)) {
            int saved = errno;
            int e = SSL_get_error(c->ssl, 0);
            if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
                return 0;
            set_broken_ssl(c, e, saved, "reading");
            return c->err;
        }
        if (rx->stage == RX_HDR) {
            rx->have += got;
            if (rx->have == IPMPI_HDR_SIZE && rx_got_header(c, hooks) != 0)
                return c->err;
        } else if (rx->stage == RX_LENS) {
            rx->have += got;
            if (rx->have == (size_t)rx->h.nparts * 8u && rx_start_parts(c, hooks) != 0)
                return c->err;
        } else {
            rx->off += got;
        }
    }
}

/* ---- lifetime ---- */

/*
 * A close with unread bytes in our receive buffer makes the kernel reset
 * the connection, and a reset discards what the controller has received
 * but not yet read: the last requests sent before close() (a client that
 * submits 100,000 tasks and closes) would be lost. So a healthy link is
 * half-closed (our FIN follows the last request) and drained until the
 * controller, having read everything, closes too: at most this long.
 */
#define CLOSE_DRAIN_MS 5000

static void drain_and_close(int fd)
{
    shutdown(fd, SHUT_WR);
    uint64_t end = ipmpi_now_ns() + (uint64_t)CLOSE_DRAIN_MS * 1000000u;
    char buf[65536];
    for (;;) {
        ssize_t n = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR))
            break; /* the controller closed (or the link broke) */
        if (n > 0)
            continue;
        uint64_t now = ipmpi_now_ns();
        if (now >= end)
            break;
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        poll(&pfd, 1, (int)((end - now) / 1000000u) + 1);
    }
    close(fd);
}

static void release_socket(ipmpi_cl_t *c)
{
    /* Only a session that carried requests has any to lose. */
    int healthy = (!c->err || c->err == IPMPI_ECLOSED) && c->ssl && SSL_is_init_finished(c->ssl);
    if (c->ssl) {
        /* Best effort close_notify; the socket is non-blocking. */
        if (healthy)
            SSL_shutdown(c->ssl);
        SSL_free(c->ssl);
        c->ssl = NULL;
    }
    if (c->fd >= 0) {
        if (healthy)
            drain_and_close(c->fd);
        else
            close(c->fd);
        c->fd = -1;
    }
    ERR_clear_error();
}

static void enter(ipmpi_cl_t *c)
{
    pthread_mutex_lock(&c->mu);
    c->users++;
}

/* Leaves a function of c; the last thread out after close() frees the
 * socket. Unlocks mu. */
static void leave(ipmpi_cl_t *c)
{
    c->users--;
    if (c->closed && c->users == 0)
        release_socket(c);
    pthread_mutex_unlock(&c->mu);
}

void ipmpi_cl_close(ipmpi_cl_t *c)
{
    pthread_mutex_lock(&c->mu);
    if (!c->closed) {
        c->closed = 1;
        set_broken(c, IPMPI_ECLOSED, "closed by the client");
        if (c->users == 0)
            release_socket(c);
        else if (c->fd >= 0)
            shutdown(c->fd, SHUT_RDWR); /* wakes every poll() on it */
    }
    pthread_mutex_unlock(&c->mu);
}

void ipmpi_cl_free(ipmpi_cl_t *c, const ipmpi_cl_hooks_t *hooks)
{
    if (!c)
        return;
    c->closed = 1;
    release_socket(c);
    for (size_t i = 0; i < c->nbuckets; i++) {
        ipmpi_cl_entry_t *e = c->buckets[i];
        while (e) {
            ipmpi_cl_entry_t *next = e->next;
            ipmpi_cl_entry_free(e, hooks);
            e = next;
        }
    }
    free(c->buckets);
    reply_release(&c->rx.rep, hooks);
    free(c->rx.data);
    free(c->rx.lensbuf);
    free(c->wbuf);
    for (int i = 0; i < SHM_SLOTS; i++)
        if (c->pool[i].fd >= 0)
            shm_slot_close(&c->pool[i]);
    free(c->relfds);
    pthread_mutex_destroy(&c->shm_mu);
    SSL_CTX_free(c->ctx);
    pthread_cond_destroy(&c->cond);
    pthread_mutex_destroy(&c->mu);
    pthread_mutex_destroy(&c->send_mu);
    free(c);
}

/* ---- connecting ---- */

/* Waits for events on fd until deadline (0 = none), polling in slices and
 * asking hooks->interrupted between them. Returns 0, IPMPI_ETIMEDOUT or
 * IPMPI_CL_EINTR. No lock held. */
static int wait_fd(int fd, short events, uint64_t deadline, const ipmpi_cl_hooks_t *hooks)
{
    for (;;) {
        uint64_t now = ipmpi_now_ns();
        if (deadline && now >= deadline)
            return IPMPI_ETIMEDOUT;
        int ms = SLICE_MS;
        if (deadline && deadline - now < SLICE_NS)
            ms = (int)((deadline - now + 999999u) / 1000000u);
        struct pollfd p = {.fd = fd, .events = events};
        int r = poll(&p, 1, ms);
        if (r > 0)
            return 0;
        if (hooks->interrupted(hooks->ctx))
            return IPMPI_CL_EINTR;
    }
}

static int tcp_connect(const ipmpi_furl_t *f, const char *addr, uint64_t deadline, const ipmpi_cl_hooks_t *hooks,
                       int *fd_out, char *msg, size_t msgcap)
{
    char port[16];
    snprintf(port, sizeof port, "%d", f->port);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_ADDRCONFIG};
    struct addrinfo *res = NULL;
    int gai = getaddrinfo(f->host, port, &hints, &res);
    if (gai != 0) {
        snprintf(msg, msgcap, "cannot resolve controller host %s: %s", f->host, gai_strerror(gai));
        return IPMPI_EIO;
    }
    int rc = IPMPI_EIO, last_errno = 0;
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
        if (fd < 0) {
            last_errno = errno;
            continue;
        }
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) != 0) {
            if (errno != EINPROGRESS) {
                last_errno = errno;
                close(fd);
                continue;
            }
            int w = wait_fd(fd, POLLOUT, deadline, hooks);
            if (w != 0) {
                close(fd);
                rc = w;
                if (w == IPMPI_ETIMEDOUT)
                    snprintf(msg, msgcap, "timed out connecting to controller at %s", addr);
                goto free_res;
            }
            int soerr = 0;
            socklen_t sl = sizeof soerr;
            if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) != 0 || soerr != 0) {
                last_errno = soerr ? soerr : errno;
                close(fd);
                continue;
            }
        }
        /* A silent link (partition, sleeping laptop, lost node) becomes an
         * error within ~11 s instead of a wait without end. */
        ipmpi_tcp_tune(fd, 5);
        *fd_out = fd;
        rc = 0;
        goto free_res;
    }
    snprintf(msg, msgcap, "cannot connect to controller at %s: %s", addr,
             last_errno ? strerror(last_errno) : "no usable address");
free_res:
    freeaddrinfo(res);
    return rc;
}

/* The handshake on fd. On IPMPI_ETLS, *busy says whether the controller
 * refused the connection at once with the alert user_canceled (its
 * address has too many connections before HELLO; ipmpi_cl_connect). */
static int tls_handshake(SSL *ssl, int fd, const char *addr, uint64_t deadline, const ipmpi_cl_hooks_t *hooks,
                         int *busy, char *msg, size_t msgcap)
{
    *busy = 0;
    for (;;) {
        ERR_clear_error();
        errno = 0;
        int r = SSL_connect(ssl);
        if (r == 1)
            return 0;
        int saved = errno;
        int e = SSL_get_error(ssl, r);
        short ev = e == SSL_ERROR_WANT_READ ? POLLIN : e == SSL_ERROR_WANT_WRITE ? POLLOUT : 0;
        if (!ev) {
            char buf[160] = "";
            unsigned long le = ERR_peek_error();
            if (le)
                ERR_error_string_n(le, buf, sizeof buf);
            else
                snprintf(buf, sizeof buf, "%s", saved ? strerror(saved) : "connection closed");
            snprintf(msg, msgcap, "TLS 1.3 handshake with controller at %s failed: %s", addr, buf);
            *busy = e == SSL_ERROR_SSL && ERR_GET_REASON(le) == SSL_R_TLSV1_ALERT_USER_CANCELLED;
            ERR_clear_error();
            return IPMPI_ETLS;
        }
        int w = wait_fd(fd, ev, deadline, hooks);
        if (w == IPMPI_ETIMEDOUT)
            snprintf(msg, msgcap, "timed out in the TLS handshake with controller at %s", addr);
        if (w != 0)
            return w;
    }
}

/* Connecting again after the controller refused a new connection at
 * once: the first wait, the longest, and how long to keep trying without
 * a deadline. */
#define BUSY_PAUSE_FIRST_NS (5ull * 1000000ull)
#define BUSY_PAUSE_MAX_NS (200ull * 1000000ull)
#define BUSY_RETRY_NS (30ull * 1000000000ull)

int ipmpi_cl_connect(const ipmpi_furl_t *f, double timeout_s, const ipmpi_cl_hooks_t *hooks,
                     ipmpi_cl_t **out, char *msg, size_t msgcap)
{
    int rc = IPMPI_ENOMEM;
    uint64_t deadline = timeout_s > 0 ? ipmpi_now_ns() + (uint64_t)(timeout_s * 1e9) : 0;
    snprintf(msg, msgcap, "out of memory");
    ipmpi_cl_t *c = calloc(1, sizeof *c);
    if (!c)
        goto out;
    c->fd = -1;
    if (strchr(f->host, ':'))
        snprintf(c->addr, sizeof c->addr, "[%s]:%d", f->host, f->port);
    else
        snprintf(c->addr, sizeof c->addr, "%s:%d", f->host, f->port);
    ipmpi_limits_default(&c->lim);
    c->nbuckets = 64;
    c->buckets = calloc(c->nbuckets, sizeof *c->buckets);
    c->wbuf = malloc(WBUF_SIZE);
    if (!c->buckets || !c->wbuf)
        goto free_c;
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    int prc = pthread_cond_init(&c->cond, &ca);
    pthread_condattr_destroy(&ca);
    if (prc != 0)
        goto free_c;
    pthread_mutex_init(&c->mu, NULL);
    pthread_mutex_init(&c->send_mu, NULL);
    pthread_mutex_init(&c->shm_mu, NULL);
    for (int i = 0; i < SHM_SLOTS; i++)
        c->pool[i].fd = -1;
    rx_reset(&c->rx);

    c->ctx = ipmpi_tls_client_ctx();
    if (!c->ctx) {
        rc = IPMPI_ETLS;
        snprintf(msg, msgcap, "cannot create a TLS 1.3 client context");
        goto free_conn;
    }
    /* A controller refuses a new connection at once, with the TLS alert
     * user_canceled before any handshake, when the connection's address
     * has too many connections before HELLO (others on the same login
     * node, or behind the same ssh tunnel, flooding it; doc/protocol.md
     * section 1). Nothing was done, so connect again after a short wait,
     * until the deadline (or for BUSY_RETRY_NS without one). */
    uint64_t t_first = ipmpi_now_ns();
    uint64_t retry_end = deadline ? deadline : t_first + BUSY_RETRY_NS;
    uint64_t pause = BUSY_PAUSE_FIRST_NS;
    for (unsigned attempt = 1;; attempt++) {
        rc = tcp_connect(f, c->addr, deadline, hooks, &c->fd, msg, msgcap);
        if (rc != 0)
            goto free_conn;
        c->ssl = SSL_new(c->ctx);
        if (!c->ssl || SSL_set_fd(c->ssl, c->fd) != 1) {
            rc = IPMPI_ETLS;
            snprintf(msg, msgcap, "cannot set up TLS on the socket");
            goto free_conn;
        }
        int busy = 0;
        rc = tls_handshake(c->ssl, c->fd, c->addr, deadline, hooks, &busy, msg, msgcap);
        if (rc == 0)
            break;
        /* Up to a quarter of the pause again, so clients reset together
         * do not come back together. */
        uint64_t now = ipmpi_now_ns();
        uint64_t wait = pause + (now ^ (uint64_t)attempt * 0x9e3779b97f4a7c15ull) % (pause / 4 + 1);
        if (!busy)
            goto free_conn;
        if (now + wait >= retry_end) {
            snprintf(msg, msgcap,
                     "controller at %s refused %u new connection%s in %.1f s: too many connections from this "
                     "address have not said HELLO yet (someone on this host, or behind the same ssh tunnel, "
                     "is opening connections without the key)",
                     c->addr, attempt, attempt == 1 ? "" : "s", (double)(now - t_first) / 1e9);
            rc = IPMPI_EIO;
            goto free_conn;
        }
        SSL_free(c->ssl);
        c->ssl = NULL;
        close(c->fd);
        c->fd = -1;
        ERR_clear_error();
        int w = wait_fd(-1, 0, now + wait, hooks);
        if (w == IPMPI_CL_EINTR) {
            rc = w;
            goto free_conn;
        }
        pause = pause * 2 < BUSY_PAUSE_MAX_NS ? pause * 2 : BUSY_PAUSE_MAX_NS;
    }
    if (ipmpi_tls_check_peer(c->ssl, f->fingerprint) != 0) {
        rc = IPMPI_EACCES;
        snprintf(msg, msgcap,
                 "certificate fingerprint of %s does not match the furl: wrong controller, or someone in between",
                 c->addr);
        goto free_conn;
    }
    msg[0] = '\0';
    *out = c;
    return 0;
free_conn:
    ipmpi_cl_free(c, hooks);
    return rc;
free_c:
    free(c->buckets);
    free(c->wbuf);
    free(c);
out:
    return rc;
}

/* ---- writing ---- */

/* Writes len bytes with mu held, waiting for the socket (mu released while
 * waiting) and reading replies meanwhile when the reader role is free, so
 * a controller that is busy sending to us never deadlocks against us. */
static int write_raw(ipmpi_cl_t *c, const uint8_t *p, size_t len, const ipmpi_cl_hooks_t *hooks)
{
    while (len) {
        if (c->err)
            return c->err;
        size_t n = 0;
        ERR_clear_error();
        errno = 0;
        if (SSL_write_ex(c->ssl, p, len, &n)) {
            p += n;
            len -= n;
            continue;
        }
        int saved = errno;
        int e = SSL_get_error(c->ssl, 0);
        if (e != SSL_ERROR_WANT_WRITE && e != SSL_ERROR_WANT_READ) {
            set_broken_ssl(c, e, saved, "writing");
            return c->err;
        }
        int role = !c->reading;
        if (role)
            c->reading = 1;
        struct pollfd pf = {.fd = c->fd, .events = (short)(POLLOUT | (role ? POLLIN : 0))};
        pthread_mutex_unlock(&c->mu);
        poll(&pf, 1, SLICE_MS);
        pthread_mutex_lock(&c->mu);
        if (role) {
            if (!c->err && (pf.revents & POLLIN))
                pump(c, hooks);
            c->reading = 0;
            pthread_cond_broadcast(&c->cond);
        }
    }
    return 0;
}

static int flush_wbuf(ipmpi_cl_t *c, const ipmpi_cl_hooks_t *hooks)
{
    int rc = write_raw(c, c->wbuf, c->wlen, hooks);
    c->wlen = 0;
    return rc;
}

/* Small pieces are gathered in wbuf; large ones go out from their own
 * memory after what was gathered before them. */
static int write_piece(ipmpi_cl_t *c, const void *p, size_t len, const ipmpi_cl_hooks_t *hooks)
{
    if (len < SMALL_PART && len <= WBUF_SIZE - c->wlen) {
        memcpy(c->wbuf + c->wlen, p, len);
        c->wlen += len;
        return 0;
    }
    int rc = flush_wbuf(c, hooks);
    if (rc != 0)
        return rc;
    return write_raw(c, p, len, hooks);
}

/* What wait_entry waits for. */
enum { WAIT_ACK, WAIT_ALL, WAIT_OUTPUT };

static int wait_entry(ipmpi_cl_t *c, uint64_t req_id, uint64_t deadline_ns, const ipmpi_cl_hooks_t *hooks,
                      int mode, ipmpi_cl_entry_t **out);

#define ACK_NS (60ull * 1000000000ull)

static int never_interrupted(void *ctx)
{
    (void)ctx;
    return 0;
}

/* Writes a RELEASE frame for the controller's memfds copied out so far.
 * send_mu and mu held. */
static int write_release(ipmpi_cl_t *c, const ipmpi_cl_hooks_t *hooks)
{
    if (c->nrel == 0)
        return 0;
    uint64_t len = (uint64_t)c->nrel * 4u;
    uint8_t hb[IPMPI_HDR_SIZE + 8];
    ipmpi_hdr_t h = {.kind = IPMPI_K_RELEASE, .target = IPMPI_TARGET_CONTROLLER, .nparts = 1};
    ipmpi_hdr_encode(&h, &len, hb, sizeof hb);
    for (uint32_t i = 0; i < c->nrel; i++) /* in place: u32 LE over u32 */
        ipmpi_put_u32((uint8_t *)&c->relfds[i], c->relfds[i]);
    c->nrel = 0;
    int rc = write_piece(c, hb, sizeof hb, hooks);
    return rc ? rc : write_piece(c, c->relfds, (size_t)len, hooks);
}

/*
 * Sends one frame. With c->shm (or shm_all, for the probe) parts of
 * IPMPI_SHM_MIN bytes or more (shm_all: every part) are copied into own
 * memfds and named in a table instead of going over TLS, and the request
 * allows shared memory in its replies.
 */
static int send_frame(ipmpi_cl_t *c, int kind, int32_t target, uint16_t xflags, uint32_t nparts,
                      const struct iovec *parts, const ipmpi_cl_hooks_t *hooks, uint64_t *req_id, int shm_all)
{
    int rc;
    /* shm_all 2: the process-memory probe. */
    int vm = c->vm || shm_all == 2;
    uint32_t nvm = 0;
    if (nparts > c->lim.max_parts)
        return IPMPI_E2BIG;
    /* The table takes a part of its own. */
    int shm = (c->shm || shm_all) && nparts < c->lim.max_parts;
    uint32_t nwire = nparts + 1, k = 0;
    size_t hsize = ipmpi_hdr_wire_size(nwire);
    uint8_t *hbuf = malloc(hsize);
    uint64_t *lens = malloc(nwire * sizeof *lens);
    uint8_t *tab = shm ? malloc((size_t)nwire * IPMPI_SHMREF_SIZE) : NULL;
    if (!hbuf || !lens || (shm && !tab)) {
        rc = IPMPI_ENOMEM;
        goto free_bufs;
    }
    pthread_mutex_lock(&c->send_mu);
    /* Copies into memfds happen before mu is taken: replies keep flowing. */
    for (uint32_t i = 0; i < nparts; i++) {
        lens[i] = parts[i].iov_len;
        if (!shm || (!shm_all && parts[i].iov_len < IPMPI_SHM_MIN) || parts[i].iov_len == 0)
            continue;
        if (vm) {
            /* Read by the controller from where it is; we wait for its ack. */
            ipmpi_shmref_t r = {.part = i, .fd = IPMPI_SHM_VM, .off = (uint64_t)(uintptr_t)parts[i].iov_base,
                                .len = parts[i].iov_len};
            ipmpi_shmref_encode(&r, tab + (size_t)k++ * IPMPI_SHMREF_SIZE);
            nvm++;
            lens[i] = 0;
            continue;
        }
        shm_slot_t *sl = shm_claim(c, parts[i].iov_len);
        if (!sl)
            continue;
        memcpy(sl->base, parts[i].iov_base, parts[i].iov_len);
        ipmpi_shmref_t r = {.part = i, .fd = (uint32_t)sl->fd, .off = 0, .len = parts[i].iov_len};
        ipmpi_shmref_encode(&r, tab + (size_t)k++ * IPMPI_SHMREF_SIZE);
        lens[i] = 0;
    }
    if (k > 0)
        lens[nparts] = (uint64_t)k * IPMPI_SHMREF_SIZE;
    else
        nwire = nparts;
    enter(c);
    if (c->err) {
        rc = c->err;
        goto unlock;
    }
    uint64_t id = ++c->next_id;
    ipmpi_hdr_t h = {.kind = (uint8_t)kind, .req_id = id, .target = target, .nparts = nwire,
                     .flags = (uint16_t)((k ? IPMPI_F_SHM : 0) | (shm ? IPMPI_F_SHM_OK : 0) |
                                         (vm ? IPMPI_F_VM_OK : 0) | (xflags & IPMPI_F_STREAM) |
                                         IPMPI_F_GATHER_OK),
                     .aux = k ? (uint64_t)getpid() : 0};
    long hl = ipmpi_hdr_encode(&h, lens, hbuf, hsize);
    if (hl < 0) {
        rc = (int)hl;
        goto unlock;
    }
    rc = insert(c, id);
    if (rc != 0)
        goto unlock;
    shm_mark(c, id);
    c->wlen = 0;
    rc = write_release(c, hooks);
    if (rc == 0)
        rc = write_piece(c, hbuf, (size_t)hl, hooks);
    for (uint32_t i = 0; rc == 0 && i < nparts; i++)
        if (lens[i] || parts[i].iov_len == 0)
            rc = write_piece(c, parts[i].iov_base, parts[i].iov_len, hooks);
    if (rc == 0 && k > 0)
        rc = write_piece(c, tab, (size_t)k * IPMPI_SHMREF_SIZE, hooks);
    if (rc == 0)
        rc = flush_wbuf(c, hooks);
    if (rc != 0) {
        ipmpi_cl_entry_free(unlink_entry(c, id), hooks);
        shm_unclaim(c, id, 0);
        goto unlock;
    }
    *req_id = id;
unlock:
    leave(c);
    shm_unclaim(c, SHM_CLAIMED, 0); /* claimed but never sent */
    pthread_mutex_unlock(&c->send_mu);
    if (rc == 0 && nvm > 0) {
        /* The caller's memory must stay as it is until the controller
         * copied it: its ack (or a reply, or the end of the link). Ctrl-C
         * waits for that (the caller could free the memory otherwise);
         * a controller that does not ack within ACK_NS loses the link. */
        ipmpi_cl_hooks_t steady = *hooks;
        steady.interrupted = never_interrupted;
        int w = wait_entry(c, *req_id, ipmpi_now_ns() + ACK_NS, &steady, WAIT_ACK, NULL);
        if (w == IPMPI_ETIMEDOUT) {
            pthread_mutex_lock(&c->mu);
            set_broken(c, IPMPI_ETIMEDOUT, "the controller did not take a request's memory within %d s",
                       (int)(ACK_NS / 1000000000ull));
            pthread_mutex_unlock(&c->mu);
            ipmpi_cl_close(c);
        }
        if (w != 0 && w != IPMPI_ENOENT)
            rc = w;
    }
free_bufs:
    free(tab);
    free(lens);
    free(hbuf);
    return rc;
}

int ipmpi_cl_shm_on(ipmpi_cl_t *c)
{
    return c->vm ? 2 : c->shm;
}

int ipmpi_cl_send(ipmpi_cl_t *c, int kind, int32_t target, uint16_t flags, uint32_t nparts,
                  const struct iovec *parts, const ipmpi_cl_hooks_t *hooks, uint64_t *req_id)
{
    return send_frame(c, kind, target, flags, nparts, parts, hooks, req_id, 0);
}

/* Sends what is waiting for RELEASE, if anything (no lock held). */
static void flush_release(ipmpi_cl_t *c, const ipmpi_cl_hooks_t *hooks)
{
    pthread_mutex_lock(&c->send_mu);
    enter(c);
    if (c->nrel && !c->err) {
        c->wlen = 0;
        if (write_release(c, hooks) == 0)
            flush_wbuf(c, hooks);
    }
    leave(c);
    pthread_mutex_unlock(&c->send_mu);
}

/* One SHM_PROBE: a random nonce out through shared memory (mode 1: an
 * own memfd, 2: our process memory) and back through the controller's
 * (mode 2: a part of IPMPI_SHM_MIN bytes that starts with the nonce). */
static int probe_once(ipmpi_cl_t *c, int mode, const uint8_t nonce[32], uint64_t deadline_ns,
                      const ipmpi_cl_hooks_t *hooks, char *msg, size_t msgcap)
{
    ipmpi_cl_entry_t *e = NULL;
    uint64_t id = 0;
    struct iovec part = {.iov_base = (void *)nonce, .iov_len = 32};
    int rc = send_frame(c, IPMPI_K_SHM_PROBE, IPMPI_TARGET_CONTROLLER, 0, 1, &part, hooks, &id, mode);
    if (rc == 0)
        rc = ipmpi_cl_wait(c, id, deadline_ns, hooks, &e);
    if (rc != 0) {
        if (rc == IPMPI_ETIMEDOUT)
            ipmpi_cl_forget(c, id, hooks);
        snprintf(msg, msgcap, "probe not answered: %s", ipmpi_strerror(rc));
        return rc;
    }
    ipmpi_cl_reply_t *r = &e->reps[0];
    uint64_t want = mode == 2 ? IPMPI_SHM_MIN : 32;
    const char *got = r->nparts == 1 && r->parts[0] ? hooks->data(hooks->ctx, r->parts[0]) : NULL;
    if (r->status != 0) {
        const char *text = r->nparts >= 1 && r->parts[0] ? hooks->data(hooks->ctx, r->parts[0]) : "";
        snprintf(msg, msgcap, "%s: %.*s", ipmpi_errname(r->status), (int)(r->nparts >= 1 ? r->lens[0] : 0), text);
        rc = r->status;
    } else if (!got || r->lens[0] != want || memcmp(got, nonce, 32) != 0) {
        snprintf(msg, msgcap, "the probe came back wrong");
        rc = IPMPI_EPROTO;
    }
    ipmpi_cl_entry_free(e, hooks);
    return rc;
}

int ipmpi_cl_shm_probe(ipmpi_cl_t *c, const uint8_t nonce[32], int allow_vm, uint64_t deadline_ns,
                       const ipmpi_cl_hooks_t *hooks, char *msg, size_t msgcap)
{
    int rc = probe_once(c, 1, nonce, deadline_ns, hooks, msg, msgcap);
    if (rc != 0)
        return rc;
    c->shm = 1;
    if (!allow_vm) {
        snprintf(msg, msgcap, "process memory turned off by the caller (IPMPI_SHM=memfd): memfds in use");
        return 0;
    }
    /* Process memory needs ptrace rights both ways (Yama may forbid it):
     * without them the memfds serve. */
    char vmsg[256];
    if (probe_once(c, 2, nonce, deadline_ns, hooks, vmsg, sizeof vmsg) == 0)
        c->vm = 1;
    else
        snprintf(msg, msgcap, "process memory refused, memfds in use: %s", vmsg);
    return 0;
}

/* ---- waiting ---- */

static int waited_for(const ipmpi_cl_entry_t *e, int mode)
{
    if (mode == WAIT_ALL)
        return complete(e);
    if (mode == WAIT_OUTPUT)
        return e->nout > 0 || e->out_dropped > 0 || complete(e);
    return e->acked || e->nrep > 0;
}

/* Moves e's stored output into a new entry for the caller. mu held. */
static int take_output(ipmpi_cl_entry_t *e, ipmpi_cl_entry_t **out)
{
    ipmpi_cl_entry_t *n = calloc(1, sizeof *n);
    if (!n)
        return IPMPI_ENOMEM;
    n->req_id = e->req_id;
    n->reps = e->outs;
    n->nrep = e->nout;
    n->cap = e->outcap;
    n->total = (uint32_t)complete(e);
    n->out_dropped = e->out_dropped;
    e->outs = NULL;
    e->nout = e->outcap = 0;
    e->out_bytes = e->out_dropped = 0;
    *out = n;
    return 0;
}

/* Waits until the request is acked or has a reply (WAIT_ACK), until
 * every reply of req_id is in (WAIT_ALL: then takes the entry into *out),
 * or until it has output or is complete (WAIT_OUTPUT: take_output). */
static int wait_entry(ipmpi_cl_t *c, uint64_t req_id, uint64_t deadline_ns, const ipmpi_cl_hooks_t *hooks,
                      int mode, ipmpi_cl_entry_t **out)
{
    int rc;
    uint64_t last_check = ipmpi_now_ns();
    enter(c);
    for (;;) {
        ipmpi_cl_entry_t *e = lookup(c, req_id);
        if (!e) {
            rc = IPMPI_ENOENT;
            break;
        }
        if (waited_for(e, mode)) {
            rc = 0;
            if (mode == WAIT_ALL) {
                *out = unlink_entry(c, req_id);
                shm_unclaim(c, req_id, 1);
            } else if (mode == WAIT_OUTPUT) {
                rc = take_output(e, out);
            }
            break;
        }
        if (c->err) {
            rc = c->err;
            break;
        }
        uint64_t now = ipmpi_now_ns();
        if (deadline_ns && now >= deadline_ns) {
            rc = IPMPI_ETIMEDOUT;
            break;
        }
        if (now - last_check >= SLICE_NS) {
            pthread_mutex_unlock(&c->mu);
            int intr = hooks->interrupted(hooks->ctx);
            pthread_mutex_lock(&c->mu);
            last_check = now;
            if (intr) {
                rc = IPMPI_CL_EINTR;
                break;
            }
            continue;
        }
        int ms = SLICE_MS;
        if (deadline_ns && deadline_ns - now < SLICE_NS)
            ms = (int)((deadline_ns - now + 999999u) / 1000000u);
        if (!c->reading) {
            c->reading = 1;
            pump(c, hooks);
            e = lookup(c, req_id);
            if (!c->err && e && !waited_for(e, mode)) {
                struct pollfd pf = {.fd = c->fd, .events = POLLIN};
                pthread_mutex_unlock(&c->mu);
                poll(&pf, 1, ms);
                pthread_mutex_lock(&c->mu);
            }
            c->reading = 0;
            pthread_cond_broadcast(&c->cond);
        } else {
            struct timespec ts;
            clock_gettime(CLOCK_MONOTONIC, &ts);
            ts.tv_nsec += (long)ms * 1000000L;
            ts.tv_sec += ts.tv_nsec / 1000000000L;
            ts.tv_nsec %= 1000000000L;
            pthread_cond_timedwait(&c->cond, &c->mu, &ts);
        }
    }
    int rel = rc == 0 && mode == WAIT_ALL && c->nrel > 0;
    leave(c);
    if (rel)
        flush_release(c, hooks);
    return rc;
}

int ipmpi_cl_wait(ipmpi_cl_t *c, uint64_t req_id, uint64_t deadline_ns, const ipmpi_cl_hooks_t *hooks,
                  ipmpi_cl_entry_t **out)
{
    return wait_entry(c, req_id, deadline_ns, hooks, WAIT_ALL, out);
}

int ipmpi_cl_wait_output(ipmpi_cl_t *c, uint64_t req_id, uint64_t deadline_ns, const ipmpi_cl_hooks_t *hooks,
                         ipmpi_cl_entry_t **out)
{
    return wait_entry(c, req_id, deadline_ns, hooks, WAIT_OUTPUT, out);
}

int ipmpi_cl_ready(ipmpi_cl_t *c, uint64_t req_id, const ipmpi_cl_hooks_t *hooks)
{
    int rc;
    enter(c);
    ipmpi_cl_entry_t *e = lookup(c, req_id);
    if (e && !complete(e) && !c->err && !c->reading) {
        c->reading = 1;
        pump(c, hooks);
        c->reading = 0;
        pthread_cond_broadcast(&c->cond);
        e = lookup(c, req_id);
    }
    if (!e)
        rc = IPMPI_ENOENT;
    else if (complete(e))
        rc = 1;
    else
        rc = c->err ? c->err : 0;
    leave(c);
    return rc;
}

int ipmpi_cl_forget(ipmpi_cl_t *c, uint64_t req_id, const ipmpi_cl_hooks_t *hooks)
{
    enter(c);
    ipmpi_cl_entry_t *e = unlink_entry(c, req_id);
    ipmpi_cl_entry_free(e, hooks);
    leave(c);
    /* The controller may still read them for the request given up. */
    shm_unclaim(c, req_id, 0);
    return e ? 0 : IPMPI_ENOENT;
}
