/*
 * One client connection of the controller: a non-blocking TCP socket with
 * its own SSL object (TLS 1.3 only), an input state machine that reads a
 * frame header, its length table and then every part straight into its own
 * buffer, and an output queue of frames written with partial-write offsets,
 * so a client that stops reading never stalls the controller's loop.
 *
 * WANT_READ/WANT_WRITE are tracked per direction: ipmpi_session_events()
 * says what to poll() for, ipmpi_session_io() makes whatever progress the
 * socket allows. Complete frames go to the caller's callback, which takes
 * ownership of the parts.
 *
 * Access rule enforced here (doc/protocol.md section 1): before the session
 * is authorised, the only frame accepted is HELLO with one 64-byte part;
 * anything else is answered with IPMPI_EACCES and the session closes, so an
 * unauthenticated peer can never make the controller allocate a payload.
 *
 * Thread safety: none; the controller's loop thread only.
 */
#ifndef IPMPI_CTL_SESSION_H
#define IPMPI_CTL_SESSION_H

#include <stdint.h>

#include <openssl/ssl.h>

#include "codec.h"
#include "equeue.h"
#include "gate.h"
#include "shmbuf.h"

enum ipmpi_sess_state {
    IPMPI_SESS_HANDSHAKE, /* TLS handshake running */
    IPMPI_SESS_OPEN,      /* frames flow (cap says whether HELLO passed) */
    IPMPI_SESS_CLOSING    /* no more input; flush output, then close */
};

enum ipmpi_cap { IPMPI_CAP_NONE = 0, IPMPI_CAP_MEC = 1, IPMPI_CAP_TC = 2 };

typedef struct ipmpi_outframe ipmpi_outframe_t;
typedef struct ipmpi_session ipmpi_session_t;

/*
 * Cut-through of a frame that is still arriving (doc/protocol.md section
 * 3): the session's owner may take a frame over once its header and
 * length table are checked and its parts allocated, and then forwards the
 * bytes while they are read. The session owns the stream object until it
 * calls end, exactly once.
 */
typedef struct ipmpi_session_stream ipmpi_session_stream_t;
struct ipmpi_session_stream {
    /* Bytes [0, filled) of part `part` are in the parts buffers and every
     * earlier part is complete (part == nparts: the whole frame). */
    void (*feed)(ipmpi_session_stream_t *st, uint32_t part, uint64_t filled);
    /* The frame is complete (aborted = 0, after the feed for the whole
     * frame) or will never be (aborted = 1: the session closes mid-frame).
     * st is the callee's to free. For a complete frame, returns 1 if the
     * stream delivered it, or 0 if the stream was withdrawn on the way and
     * the frame goes to the frame callback like any other. */
    int (*end)(ipmpi_session_stream_t *st, int aborted);
};

/* Offered each frame before its parts are read; h and parts are borrowed
 * (take a reference to keep parts). Returns a stream, which then gets the
 * frame in place of the frame callback, or NULL to receive it whole. */
typedef ipmpi_session_stream_t *(*ipmpi_session_stream_cb)(void *arg, ipmpi_session_t *s, const ipmpi_hdr_t *h,
                                                            ipmpi_parts_t *parts);

/* Task id blocks a session may submit from at once (the newest ones). */
#define IPMPI_TASK_RES_SLOTS 4

struct ipmpi_session {
    uint64_t id;        /* unique for the controller's life; requests keep it */
    uint32_t sno;       /* session number HELLO reported (request ids, results.h); 0: none */
    int fd;
    SSL *ssl;
    char peer[80];      /* "addr:port", for logs */
    int state;
    int cap;            /* enum ipmpi_cap */
    uint64_t t_open;    /* accept time (ns), for the HELLO deadline */
    uint64_t t_close;   /* when CLOSING began (ns), for the flush deadline */
    int read_more;      /* the read budget ran out with input possibly left */

    /* Before HELLO (controller.c): refusals are logged through the gate
     * (borrowed, may be NULL), and the session is on the controller's
     * list of connections before HELLO, oldest first. t_progress is when
     * bytes last came in from it (accept time until then), rd_seen how
     * many had come in by then: a connection whose handshake progresses
     * is never closed to make room for a newer one of its address. */
    ipmpi_gate_t *gate;
    int pending;
    ipmpi_session_t *pend_prev, *pend_next;
    uint64_t t_progress;
    uint64_t rd_seen;

    /* Back-pressure on requests (doc/protocol.md section 1): the bytes of
     * this session's frames the controller still holds (queued for
     * engines, being sent, running) are charged to `charge` (MultiEngine
     * sessions only). While the frames it completed hold more than q_max,
     * input stops (q_paused) until the owner sees the charge fall back,
     * except for IPMPI_Q_TRICKLE_BYTES every IPMPI_Q_TRICKLE_NS (q_allow):
     * a client's kernel ends a connection whose receive window stays shut
     * for its TCP_USER_TIMEOUT (~11 s, ipmpi_tcp_tune), also when the
     * peer is alive and answers the probes. */
    ipmpi_charge_t *charge;
    uint64_t q_max;
    int q_paused;
    uint64_t q_allow;    /* bytes that may still be read while over */
    uint64_t t_trickle;  /* when the last allowance was given (ns) */

    /* input */
    int in_stage;       /* 0 header, 1 lengths, 2 parts */
    uint8_t in_hdr[IPMPI_HDR_SIZE];
    size_t in_off;
    ipmpi_hdr_t in_h;
    uint8_t *in_lenbuf; /* nparts*8 raw lengths */
    uint64_t *in_lens;
    ipmpi_parts_t *in_parts;
    uint32_t in_part;
    /* Set by the owner when frames of this session may be cut through
     * (with the same arg as ipmpi_session_io's); NULL: never. */
    ipmpi_session_stream_cb stream_begin;
    ipmpi_session_stream_t *in_stream; /* the frame being read is streamed */

    /* per-direction wants: POLLIN or POLLOUT */
    short rd_want, wr_want, hs_want;

    /* output */
    ipmpi_outframe_t *out_head, *out_tail;
    uint64_t out_bytes; /* bytes queued and not yet written */
    /* Small frames packed to go out in one TLS record (do_output): a
     * request to N engines answers with N small replies in one turn. */
    uint8_t *pack;
    uint32_t pack_len, pack_off;
    uint64_t t_out_progress; /* last time output was written, or queued onto an empty queue (ns) */

    /* same-host shared memory (doc/protocol.md section 5) */
    ipmpi_shmcache_t shm_peer;  /* the client's memfds mapped lately */
    struct ipmpi_lent *lent;    /* memory named in replies, not yet released */
    uint32_t nlent, lentcap;
    uint64_t lent_bytes;
    uint32_t next_vm;           /* for handles of process memory (IPMPI_SHM_VM) */
    int shm_pid;                /* the pid SHM_PROBE proved is the client's; 0: none yet */
    uint8_t shm_nonce[32];      /* random, from HELLO; SHM_PROBE must show it from the client's memory */

    /* tasks (tasks.c): the scheduler's record of this client (one
     * reference, dropped when the session goes; its tasks keep their
     * own), and the blocks of task ids it reserved lately */
    struct ipmpi_sched_client *tclient;

    /* A request whose parts are copied out of the client's memory over
     * several loop turns (stream.c): while it runs, no further frame of
     * this session is read, so requests keep their order. */
    struct ipmpi_ctl_vmjob *vmjob;
    int in_paused;
    uint64_t tres_first[IPMPI_TASK_RES_SLOTS], tres_count[IPMPI_TASK_RES_SLOTS];
    uint32_t tres_next;
};

/* Most bytes of own memfds a session may hold unreleased; replies beyond
 * that go inline over TLS. */
#define IPMPI_SHM_LEND_MAX ((uint64_t)2 << 30)

/* Called for each complete frame; takes ownership of parts. */
typedef void (*ipmpi_session_frame_cb)(void *arg, ipmpi_session_t *s, const ipmpi_hdr_t *h,
                                       ipmpi_parts_t *parts);

/*
 * Wraps an accepted non-blocking socket (ownership of fd passes to the
 * session on success; stays with the caller on failure). Returns NULL on
 * failure.
 */
ipmpi_session_t *ipmpi_session_new(int fd, SSL_CTX *ctx, const char *peer, uint64_t id, uint64_t now);

/* Frames queued or packed and not yet written. */
static inline int ipmpi_session_has_output(const ipmpi_session_t *s)
{
    return s->out_head != NULL || s->pack_len > s->pack_off;
}

/* Events to poll() for. */
short ipmpi_session_events(const ipmpi_session_t *s);

#define IPMPI_Q_TRICKLE_BYTES ((uint64_t)1 << 20)
#define IPMPI_Q_TRICKLE_NS (3ull * 1000000000ull)

/* For a session paused for back-pressure: resumes its input (read_more is
 * set) when its charge has fallen to q_max or below, or for one allowance
 * when the last one is IPMPI_Q_TRICKLE_NS old. Returns 1 if it resumed.
 * Loop thread. */
int ipmpi_session_q_resume(ipmpi_session_t *s, uint64_t now);

/*
 * Makes progress: handshake, then input (frames to cb, at most a bounded
 * number of bytes per call), then output. Returns 0 to keep the session, or
 * a negative code when it must be closed now (peer gone, TLS failure, or
 * CLOSING with everything flushed); the reason is logged.
 */
int ipmpi_session_io(ipmpi_session_t *s, const ipmpi_limits_t *lim, ipmpi_session_frame_cb cb, void *arg);

/*
 * Queues a frame: the header h (magic, version and nparts filled in from
 * parts) and the parts (a reference is taken; parts may be NULL for none).
 * Small frames are copied into one buffer; large parts are written from
 * the shared buffers. Returns 0 or IPMPI_ENOMEM.
 */
int ipmpi_session_send(ipmpi_session_t *s, const ipmpi_hdr_t *h, ipmpi_parts_t *parts);

/* Queues an error reply (status < 0) whose part 0 is msg. Returns 0 or IPMPI_ENOMEM. */
int ipmpi_session_send_error(ipmpi_session_t *s, uint8_t kind, uint64_t req_id, int32_t target,
                             uint32_t total, int status, const char *msg);

/* Records that a reply names memory under handle, kept by b (a reference
 * is taken), until the client releases it. Returns 0 or IPMPI_ENOMEM. */
int ipmpi_session_lend(ipmpi_session_t *s, uint32_t handle, ipmpi_backing_t *b, uint64_t bytes);
/* The client released handle: drops the session's reference. Returns 0,
 * or IPMPI_ENOENT when the session never lent it (ignored). */
int ipmpi_session_release(ipmpi_session_t *s, uint32_t handle);

/* Stops input; the session closes once its output is flushed. */
void ipmpi_session_close_after_flush(ipmpi_session_t *s, uint64_t now);

/* Frees everything, closing the socket (sends close_notify best-effort). */
void ipmpi_session_free(ipmpi_session_t *s);

#endif
