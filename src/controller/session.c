/*
 * A client connection of the controller (see session.h): non-blocking
 * TLS, frame input state machine, output queue with partial writes.
 * Loop thread only.
 */
#include "session.h"

#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/err.h>

#include "backoff.h"
#include "ipmpi/errors.h"
#include "log.h"

/* Frames up to this size are copied into one buffer: one TLS record
 * instead of one per part, and copying that little costs nothing. */
#define SMALL_FRAME 16384u
/* Small frames packed into one TLS write at most this many bytes (a TLS
 * record holds 16 KiB; OpenSSL splits larger writes into records). */
#define PACK_MAX 65536u
/* Bytes read from one session per call, so one busy client cannot starve
 * the others or the MPI side. */
#define READ_BUDGET (16u << 20)
/* OpenSSL's read buffer per session with read-ahead: a few TLS records. */
#define READ_AHEAD_BUF (128u << 10)
/* Largest single SSL_read/SSL_write (their length is an int). */
#define IO_MAX (1u << 30)

struct ipmpi_outframe {
    ipmpi_outframe_t *next;
    uint8_t *hdr;          /* header + lengths (+ parts, when coalesced) */
    size_t hlen;
    ipmpi_parts_t *parts;  /* NULL when coalesced or partless */
    uint32_t idx;          /* 0 = header, i + 1 = part i */
    uint64_t off;          /* bytes of the current piece already written */
};

/*
 * A refusal or failure of s worth a warning. Before HELLO anyone may cause
 * it at will, so it goes through the gate's rate limit, counted under
 * reason; after HELLO it is a key holder's and always logged.
 */
static void refusal(const ipmpi_session_t *s, const char *reason, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void refusal(const ipmpi_session_t *s, const char *reason, const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (s->cap == IPMPI_CAP_NONE && s->gate)
        ipmpi_gate_refused(s->gate, ipmpi_now_ns(), s->peer, reason, "%s", line);
    else
        ipmpi_log(IPMPI_LOG_WARN, "%s", line);
}

static void log_ssl_errors(const ipmpi_session_t *s, const char *what)
{
    unsigned long e;
    char buf[256];
    int any = 0;
    while ((e = ERR_get_error()) != 0) {
        ERR_error_string_n(e, buf, sizeof buf);
        /* Before HELLO, one line per failure: the first error names it. */
        if (!any || s->cap != IPMPI_CAP_NONE)
            refusal(s, what, "client %s: %s: %s", s->peer, what, buf);
        any = 1;
    }
    if (!any)
        refusal(s, what, "client %s: %s: %s", s->peer, what, errno ? strerror(errno) : "connection lost");
}

ipmpi_session_t *ipmpi_session_new(int fd, SSL_CTX *ctx, const char *peer, uint64_t id, uint64_t now)
{
    ipmpi_session_t *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->ssl = SSL_new(ctx);
    s->charge = ipmpi_charge_new();
    if (!s->ssl || !s->charge || SSL_set_fd(s->ssl, fd) != 1) {
        ipmpi_charge_unref(s->charge);
        SSL_free(s->ssl);
        free(s);
        return NULL;
    }
    SSL_set_accept_state(s->ssl);
    /* A client that just closes its socket is a normal disconnect, not a
     * TLS error worth a warning. */
    SSL_set_options(s->ssl, SSL_OP_IGNORE_UNEXPECTED_EOF);
    /* Without read-ahead OpenSSL makes two read() calls per 16 KiB record
     * (header, then body): measured, 32 784 reads for one 256 MiB push.
     * Reading ahead into a larger buffer takes several records per call.
     * Safe with poll(): do_input reads until SSL_read wants more (which
     * drains what was read ahead) or marks read_more. */
    SSL_set_read_ahead(s->ssl, 1);
    SSL_set_default_read_buffer_len(s->ssl, READ_AHEAD_BUF);
    s->fd = fd;
    s->id = id;
    snprintf(s->peer, sizeof s->peer, "%s", peer);
    s->state = IPMPI_SESS_HANDSHAKE;
    s->t_open = now;
    s->t_progress = now;
    s->rd_want = POLLIN;
    s->wr_want = POLLOUT;
    s->hs_want = POLLIN;
    return s;
}

short ipmpi_session_events(const ipmpi_session_t *s)
{
    if (s->state == IPMPI_SESS_HANDSHAKE)
        return s->hs_want;
    short ev = 0;
    /* Paused for back-pressure: the socket's input stays in the kernel
     * (the client's sends block) and must not wake the loop. */
    if (s->state == IPMPI_SESS_OPEN && !s->q_paused)
        ev |= s->rd_want;
    if (ipmpi_session_has_output(s))
        ev |= s->wr_want;
    /* A closing session with nothing to write still wants to notice a hang-up. */
    return ev ? ev : s->q_paused ? 0 : POLLIN;
}

/* Bytes of frames the session completed that the controller still holds
 * (the frame being read is not counted: it is always read to its end). */
static uint64_t q_held(const ipmpi_session_t *s)
{
    uint64_t cur = s->in_stage == 2 && s->in_parts && s->in_parts->charge ? s->in_parts->charged : 0;
    return s->charge->bytes - cur;
}

int ipmpi_session_q_resume(ipmpi_session_t *s, uint64_t now)
{
    if (!s->q_paused)
        return 0;
    if (q_held(s) <= s->q_max)
        s->q_allow = 0;
    else if (now - s->t_trickle >= IPMPI_Q_TRICKLE_NS)
        s->q_allow = IPMPI_Q_TRICKLE_BYTES;
    else
        return 0;
    s->t_trickle = now;
    s->q_paused = 0;
    s->read_more = 1;
    return 1;
}

static void free_frame(ipmpi_outframe_t *f)
{
    ipmpi_parts_unref(f->parts);
    free(f->hdr);
    free(f);
}

static void reset_input(ipmpi_session_t *s)
{
    /* A streamed frame that stops here never completes: its receiver
     * must learn that it will get no more bytes. */
    if (s->in_stream) {
        ipmpi_session_stream_t *st = s->in_stream;
        s->in_stream = NULL;
        st->end(st, 1);
    }
    free(s->in_lenbuf);
    free(s->in_lens);
    ipmpi_parts_unref(s->in_parts);
    s->in_lenbuf = NULL;
    s->in_lens = NULL;
    s->in_parts = NULL;
    s->in_stage = 0;
    s->in_off = 0;
    s->in_part = 0;
}

int ipmpi_session_send(ipmpi_session_t *s, const ipmpi_hdr_t *h, ipmpi_parts_t *parts)
{
    ipmpi_hdr_t hh = *h;
    hh.nparts = parts ? parts->n : 0;
    size_t hl = ipmpi_hdr_wire_size(hh.nparts);
    uint64_t body = parts ? ipmpi_parts_bytes(parts) : 0;
    int small = hl + body <= SMALL_FRAME;
    ipmpi_outframe_t *f = calloc(1, sizeof *f);
    if (!f)
        return IPMPI_ENOMEM;
    f->hlen = small ? hl + (size_t)body : hl;
    f->hdr = malloc(f->hlen);
    if (!f->hdr) {
        free(f);
        return IPMPI_ENOMEM;
    }
    ipmpi_hdr_encode(&hh, parts ? parts->lens : NULL, f->hdr, hl);
    if (small) {
        size_t o = hl;
        for (uint32_t i = 0; parts && i < parts->n; i++) {
            memcpy(f->hdr + o, parts->bufs[i], (size_t)parts->lens[i]);
            o += (size_t)parts->lens[i];
        }
    } else {
        f->parts = ipmpi_parts_ref(parts);
    }
    if (s->out_tail)
        s->out_tail->next = f;
    else
        s->out_head = f;
    s->out_tail = f;
    if (s->out_bytes == 0)
        s->t_out_progress = ipmpi_now_ns();
    s->out_bytes += hl + body;
    return 0;
}

int ipmpi_session_send_error(ipmpi_session_t *s, uint8_t kind, uint64_t req_id, int32_t target,
                             uint32_t total, int status, const char *msg)
{
    ipmpi_parts_t *p = ipmpi_parts_from(msg, strlen(msg));
    if (!p)
        return IPMPI_ENOMEM;
    ipmpi_hdr_t h = {.kind = kind, .flags = IPMPI_F_REPLY, .req_id = req_id, .target = target,
                     .status = status, .total = total};
    int rc = ipmpi_session_send(s, &h, p);
    ipmpi_parts_unref(p);
    return rc;
}

int ipmpi_session_lend(ipmpi_session_t *s, uint32_t handle, ipmpi_backing_t *b, uint64_t bytes)
{
    if (s->nlent == s->lentcap) {
        uint32_t ncap = s->lentcap ? s->lentcap * 2 : 8;
        struct ipmpi_lent *n = realloc(s->lent, ncap * sizeof *n);
        if (!n)
            return IPMPI_ENOMEM;
        s->lent = n;
        s->lentcap = ncap;
    }
    s->lent[s->nlent++] = (struct ipmpi_lent){.handle = handle, .b = ipmpi_backing_ref(b), .bytes = bytes};
    s->lent_bytes += bytes;
    return 0;
}

int ipmpi_session_release(ipmpi_session_t *s, uint32_t handle)
{
    for (uint32_t i = 0; i < s->nlent; i++) {
        if (s->lent[i].handle == handle) {
            struct ipmpi_lent l = s->lent[i];
            s->lent[i] = s->lent[--s->nlent];
            s->lent_bytes -= l.bytes;
            ipmpi_backing_unref(l.b);
            return 0;
        }
    }
    return IPMPI_ENOENT;
}

void ipmpi_session_close_after_flush(ipmpi_session_t *s, uint64_t now)
{
    if (s->state == IPMPI_SESS_CLOSING)
        return;
    s->state = IPMPI_SESS_CLOSING;
    s->t_close = now;
    s->read_more = 0;
    s->q_paused = 0;
    reset_input(s);
}

/* A frame the stream cannot carry on after: answer if possible, then close. */
static void bad_frame(ipmpi_session_t *s, int status, const char *why)
{
    uint8_t kind = s->in_hdr[5];
    if (kind == 0 || kind >= IPMPI_K_MAX_)
        kind = IPMPI_K_HELLO;
    uint64_t req = s->in_off >= 16 || s->in_stage > 0 ? ipmpi_get_u64(s->in_hdr + 8) : 0;
    refusal(s, "bad frame", "client %s: bad frame (%s): %s; closing the connection", s->peer,
            ipmpi_errname(status), why);
    ipmpi_session_send_error(s, kind, req, IPMPI_TARGET_CONTROLLER, 1, status, why);
    ipmpi_session_close_after_flush(s, ipmpi_now_ns());
}

/* Reads up to n bytes; returns bytes read, 0 when the socket has nothing
 * now (wants recorded), or a negative code when the session is finished. */
static long sread(ipmpi_session_t *s, void *buf, size_t n)
{
    if (n > IO_MAX)
        n = IO_MAX;
    ERR_clear_error();
    errno = 0;
    int r = SSL_read(s->ssl, buf, (int)n);
    if (r > 0)
        return r;
    switch (SSL_get_error(s->ssl, r)) {
    case SSL_ERROR_WANT_READ:
        s->rd_want = POLLIN;
        return 0;
    case SSL_ERROR_WANT_WRITE:
        s->rd_want = POLLOUT;
        return 0;
    case SSL_ERROR_ZERO_RETURN:
        return IPMPI_ECLOSED;
    case SSL_ERROR_SYSCALL:
        if (errno == 0)
            return IPMPI_ECLOSED; /* EOF without close_notify */
        log_ssl_errors(s, "read failed");
        return IPMPI_EIO;
    default:
        log_ssl_errors(s, "TLS read failed");
        return IPMPI_ETLS;
    }
}

/* Header complete: validate it, then move to the length table. */
static int got_header(ipmpi_session_t *s, const ipmpi_limits_t *lim)
{
    long r = ipmpi_hdr_decode(s->in_hdr, IPMPI_HDR_SIZE, lim, &s->in_h);
    if (r == IPMPI_EPROTO) {
        char why[128];
        snprintf(why, sizeof why, "bad frame header (magic %08x, version %u, kind %u)",
                 ipmpi_get_u32(s->in_hdr), s->in_hdr[4], s->in_hdr[5]);
        bad_frame(s, IPMPI_EPROTO, why);
        return -1;
    }
    if (r == IPMPI_E2BIG) {
        char why[128];
        snprintf(why, sizeof why, "too many parts: %u (limit %u)", ipmpi_get_u32(s->in_hdr + 28),
                 lim->max_parts);
        bad_frame(s, IPMPI_E2BIG, why);
        return -1;
    }
    if (s->cap == IPMPI_CAP_NONE && !ipmpi_hello_hdr_ok(&s->in_h)) {
        refusal(s, "frame before HELLO", "client %s: refused: frame of kind %u before HELLO", s->peer,
                s->in_h.kind);
        ipmpi_session_send_error(s, s->in_h.kind, s->in_h.req_id, IPMPI_TARGET_CONTROLLER, 1, IPMPI_EACCES,
                                 "access denied: the first frame must be HELLO with the key from the furl");
        ipmpi_session_close_after_flush(s, ipmpi_now_ns());
        return -1;
    }
    s->in_stage = 1;
    s->in_off = 0;
    if (s->in_h.nparts == 0)
        return 0;
    s->in_lenbuf = malloc((size_t)s->in_h.nparts * 8u);
    s->in_lens = malloc((size_t)s->in_h.nparts * sizeof *s->in_lens);
    if (!s->in_lenbuf || !s->in_lens) {
        bad_frame(s, IPMPI_ENOMEM, "out of memory for the length table");
        return -1;
    }
    return 0;
}

/* Length table complete: check it and allocate every part. */
static int got_lens(ipmpi_session_t *s, const ipmpi_limits_t *lim, void *arg)
{
    uint64_t total = 0;
    uint32_t n = s->in_h.nparts;
    if (n > 0) {
        long r = ipmpi_lens_decode(s->in_lenbuf, (size_t)n * 8u, n, lim, s->in_lens, &total);
        if (r < 0) {
            char why[160];
            snprintf(why, sizeof why, "frame too large (limits: %llu bytes a part, %llu a frame)",
                     (unsigned long long)lim->max_part, (unsigned long long)lim->max_frame);
            bad_frame(s, IPMPI_E2BIG, why);
            return -1;
        }
    }
    if (s->cap == IPMPI_CAP_NONE && !ipmpi_hello_len_ok(s->in_lens[0])) {
        refusal(s, "wrong key", "client %s: refused: HELLO key of %llu bytes", s->peer,
                (unsigned long long)s->in_lens[0]);
        ipmpi_session_send_error(s, IPMPI_K_HELLO, s->in_h.req_id, IPMPI_TARGET_CONTROLLER, 1, IPMPI_EACCES,
                                 "access denied: wrong key");
        ipmpi_session_close_after_flush(s, ipmpi_now_ns());
        return -1;
    }
    s->in_parts = ipmpi_parts_new(n, s->in_lens);
    if (!s->in_parts) {
        bad_frame(s, IPMPI_ENOMEM, "out of memory for the frame's parts");
        return -1;
    }
    /* Counted from here, before its bytes arrive: the frame is read to its
     * end whatever the count (pausing mid-frame could never resume), but
     * the next one waits while the count is over the bound. */
    if (s->cap == IPMPI_CAP_MEC)
        ipmpi_parts_charge(s->in_parts, s->charge);
    s->in_stage = 2;
    s->in_part = 0;
    s->in_off = 0;
    if (s->stream_begin && n > 0)
        s->in_stream = s->stream_begin(arg, s, &s->in_h, s->in_parts);
    return 0;
}

static void deliver(ipmpi_session_t *s, ipmpi_session_frame_cb cb, void *arg)
{
    if (s->in_stream) {
        /* Its last bytes were fed when its last part completed. */
        ipmpi_session_stream_t *st = s->in_stream;
        s->in_stream = NULL;
        if (st->end(st, 0)) {
            reset_input(s);
            return;
        }
    }
    ipmpi_hdr_t h = s->in_h;
    ipmpi_parts_t *p = s->in_parts;
    s->in_parts = NULL;
    reset_input(s);
    cb(arg, s, &h, p);
}

static int do_input(ipmpi_session_t *s, const ipmpi_limits_t *lim, ipmpi_session_frame_cb cb, void *arg)
{
    uint64_t budget = READ_BUDGET;
    s->read_more = 0;
    while (s->state == IPMPI_SESS_OPEN) {
        if (s->in_paused)
            return 0; /* resumed by the owner, with read_more set */
        int over = s->q_max && q_held(s) > s->q_max;
        if (over && s->q_allow == 0) {
            if (!s->q_paused)
                s->t_trickle = ipmpi_now_ns();
            s->q_paused = 1; /* resumed by ipmpi_session_q_resume */
            return 0;
        }
        if (budget == 0) {
            s->read_more = 1;
            return 0;
        }
        uint8_t *dst;
        size_t want;
        if (s->in_stage == 0) {
            dst = s->in_hdr + s->in_off;
            want = IPMPI_HDR_SIZE - s->in_off;
        } else if (s->in_stage == 1) {
            dst = s->in_lenbuf + s->in_off;
            want = (size_t)s->in_h.nparts * 8u - s->in_off;
        } else {
            if (s->in_part == s->in_parts->n) {
                deliver(s, cb, arg);
                continue;
            }
            dst = s->in_parts->bufs[s->in_part] + s->in_off;
            want = (size_t)(s->in_parts->lens[s->in_part] - s->in_off);
        }
        if (want > 0) {
            /* The piece is complete only when all of want arrived; the
             * budget may cut this read shorter than that. */
            size_t chunk = want > budget ? (size_t)budget : want;
            if (over && chunk > s->q_allow)
                chunk = (size_t)s->q_allow;
            long r = sread(s, dst, chunk);
            if (r < 0) {
                if (r == IPMPI_ECLOSED && (s->in_stage > 0 || s->in_off > 0))
                    refusal(s, "disconnected in the middle of a frame",
                            "client %s disconnected in the middle of a frame", s->peer);
                else if (r == IPMPI_ECLOSED)
                    ipmpi_log(s->cap == IPMPI_CAP_NONE ? IPMPI_LOG_DEBUG : IPMPI_LOG_INFO,
                              "client %s disconnected", s->peer);
                return (int)r;
            }
            if (r == 0)
                return 0;
            s->in_off += (size_t)r;
            budget -= (uint64_t)r;
            if (over)
                s->q_allow -= (uint64_t)r;
            if ((size_t)r < want) {
                if (s->in_stream && s->in_stage == 2)
                    s->in_stream->feed(s->in_stream, s->in_part, s->in_off);
                continue;
            }
        }
        /* The current piece is complete. */
        if (s->in_stage == 0) {
            if (got_header(s, lim) != 0)
                return 0;
        } else if (s->in_stage == 1) {
            if (got_lens(s, lim, arg) != 0)
                return 0;
        } else {
            s->in_part++;
            s->in_off = 0;
            if (s->in_stream)
                s->in_stream->feed(s->in_stream, s->in_part, 0);
        }
    }
    return 0;
}

/* Moves whole small frames from the head of the queue into s->pack, as
 * many as fit (at least two, or nothing is packed). */
static void pack_small(ipmpi_session_t *s)
{
    ipmpi_outframe_t *f = s->out_head;
    if (!f || f->parts || f->off || !f->next || f->next->parts)
        return;
    if (!s->pack && !(s->pack = malloc(PACK_MAX)))
        return;
    uint32_t n = 0;
    while ((f = s->out_head) && !f->parts && f->off == 0 && n + f->hlen <= PACK_MAX) {
        memcpy(s->pack + n, f->hdr, f->hlen);
        n += (uint32_t)f->hlen;
        s->out_head = f->next;
        if (!s->out_head)
            s->out_tail = NULL;
        free_frame(f);
    }
    s->pack_len = n;
    s->pack_off = 0;
}

/* One SSL_write of at most n bytes (sread's twin): the bytes written, 0
 * when the socket cannot take more now (wr_want says what to wait for),
 * or IPMPI_EIO. Counts what went out. */
static long swrite(ipmpi_session_t *s, const void *buf, uint64_t n)
{
    if (n > IO_MAX)
        n = IO_MAX;
    ERR_clear_error();
    errno = 0;
    int r = SSL_write(s->ssl, buf, (int)n);
    if (r <= 0) {
        switch (SSL_get_error(s->ssl, r)) {
        case SSL_ERROR_WANT_WRITE:
            s->wr_want = POLLOUT;
            return 0;
        case SSL_ERROR_WANT_READ:
            s->wr_want = POLLIN;
            return 0;
        default:
            log_ssl_errors(s, "write failed");
            return IPMPI_EIO;
        }
    }
    s->out_bytes -= (uint64_t)r;
    s->t_out_progress = ipmpi_now_ns();
    return r;
}

/* Writes the packed frames; 1 when all went, 0 when the socket is full,
 * or IPMPI_EIO. */
static int write_pack(ipmpi_session_t *s)
{
    while (s->pack_off < s->pack_len) {
        long r = swrite(s, s->pack + s->pack_off, s->pack_len - s->pack_off);
        if (r <= 0)
            return (int)r;
        s->pack_off += (uint32_t)r;
    }
    s->pack_len = s->pack_off = 0;
    return 1;
}

static int do_output(ipmpi_session_t *s)
{
    for (;;) {
        if (s->pack_len == 0)
            pack_small(s);
        if (s->pack_len > 0) {
            int rc = write_pack(s);
            if (rc <= 0)
                return rc;
            continue;
        }
        if (!s->out_head)
            break;
        ipmpi_outframe_t *f = s->out_head;
        const uint8_t *src;
        uint64_t len;
        if (f->idx == 0) {
            src = f->hdr;
            len = f->hlen;
        } else {
            src = f->parts->bufs[f->idx - 1];
            len = f->parts->lens[f->idx - 1];
        }
        if (f->off < len) {
            long r = swrite(s, src + f->off, len - f->off);
            if (r <= 0)
                return (int)r;
            f->off += (uint64_t)r;
            if (f->off < len)
                continue;
        }
        f->idx++;
        f->off = 0;
        if (!f->parts || f->idx > f->parts->n) {
            s->out_head = f->next;
            if (!s->out_head)
                s->out_tail = NULL;
            free_frame(f);
        }
    }
    s->wr_want = POLLOUT;
    return 0;
}

int ipmpi_session_io(ipmpi_session_t *s, const ipmpi_limits_t *lim, ipmpi_session_frame_cb cb, void *arg)
{
    if (s->state == IPMPI_SESS_HANDSHAKE) {
        ERR_clear_error();
        errno = 0;
        int r = SSL_accept(s->ssl);
        if (r != 1) {
            int e = SSL_get_error(s->ssl, r);
            if (e == SSL_ERROR_WANT_READ) {
                s->hs_want = POLLIN;
                return 0;
            }
            if (e == SSL_ERROR_WANT_WRITE) {
                s->hs_want = POLLOUT;
                return 0;
            }
            log_ssl_errors(s, "TLS handshake failed (only TLS 1.3 is accepted)");
            return IPMPI_ETLS;
        }
        s->state = IPMPI_SESS_OPEN;
        ipmpi_log(IPMPI_LOG_DEBUG, "client %s: TLS handshake done (%s)", s->peer, SSL_get_version(s->ssl));
    }
    if (s->state == IPMPI_SESS_OPEN) {
        int rc = do_input(s, lim, cb, arg);
        if (rc < 0)
            return rc;
    }
    int rc = do_output(s);
    if (rc < 0)
        return rc;
    if (s->state == IPMPI_SESS_CLOSING && !ipmpi_session_has_output(s))
        return IPMPI_ECLOSED;
    return 0;
}

void ipmpi_session_free(ipmpi_session_t *s)
{
    if (!s)
        return;
    if (s->state != IPMPI_SESS_HANDSHAKE) {
        ERR_clear_error();
        SSL_shutdown(s->ssl);
    }
    ERR_clear_error();
    SSL_free(s->ssl);
    close(s->fd);
    reset_input(s);
    while (s->out_head) {
        ipmpi_outframe_t *f = s->out_head;
        s->out_head = f->next;
        free_frame(f);
    }
    free(s->pack);
    for (uint32_t i = 0; i < s->nlent; i++)
        ipmpi_backing_unref(s->lent[i].b);
    free(s->lent);
    ipmpi_shmcache_clear(&s->shm_peer);
    ipmpi_charge_unref(s->charge);
    free(s);
}
