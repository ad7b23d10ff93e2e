/*
 * Client transport: one TLS 1.3 connection to the controller, the frame
 * writer, the incremental frame reader and the result store (replies kept
 * per request id until their owner collects them). No Python here: the
 * memory that received parts land in comes from the caller's hooks, so the
 * Python module can receive straight into bytearrays.
 *
 * Locking theory. Two mutexes: send_mu serialises whole frames (a frame is
 * never interleaved with another thread's frame) and mu guards the SSL
 * object, the reader state and the store. Lock order: send_mu, then mu,
 * then (inside hooks) the caller's own lock, e.g. the GIL; so a caller must
 * never hold its lock while calling in here. One thread at a time holds the
 * reader role: it alone reads the socket (under mu) and polls it (without
 * mu); the others wait on a condition variable that the reader broadcasts
 * whenever a frame is delivered or it gives the role up. Every function
 * below may be called from any thread, concurrently, except
 * ipmpi_cl_free().
 */
#ifndef IPMPI_CLIENT_CONN_H
#define IPMPI_CLIENT_CONN_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "furl.h"

/* Returned when hooks->interrupted() asked to stop waiting. Private to the
 * client: never on the wire. */
#define IPMPI_CL_EINTR (-1000)

/*
 * How the transport gets memory for received parts and lets the caller
 * react to signals. alloc returns an opaque handle for a buffer of len
 * bytes and its memory in *data, or NULL (the part is then discarded and
 * the reply reported with status IPMPI_ENOMEM); it and release may be
 * called with mu held. interrupted is called with no lock held, about
 * every 100 ms of waiting; nonzero stops the wait with IPMPI_CL_EINTR.
 */
typedef struct ipmpi_cl_hooks {
    void *(*alloc)(void *ctx, uint64_t len, char **data);
    void (*release)(void *ctx, void *obj);
    int (*interrupted)(void *ctx);
    const char *(*data)(void *ctx, void *obj); /* the memory of a handle from alloc */
    void *ctx;
} ipmpi_cl_hooks_t;

typedef struct ipmpi_cl_reply {
    int32_t target;
    int32_t status;
    uint32_t nparts;
    void **parts;   /* handles from hooks->alloc; NULL entries are allowed */
    uint64_t *lens;
} ipmpi_cl_reply_t;

/* The replies of one request, in order of arrival. */
typedef struct ipmpi_cl_entry {
    uint64_t req_id;
    uint32_t total;  /* from the first reply; 0 until then */
    uint32_t nrep, cap;
    int acked;       /* the controller copied the request's process memory */
    ipmpi_cl_reply_t *reps;
    /* Non-final replies (IPMPI_F_MORE: streamed output) not yet taken by
     * ipmpi_cl_wait_output, at most IPMPI_CL_OUT_MAX bytes; what did not
     * fit is counted in out_dropped. */
    uint32_t nout, outcap;
    ipmpi_cl_reply_t *outs;
    uint64_t out_bytes, out_dropped;
    struct ipmpi_cl_entry *next; /* hash chain */
} ipmpi_cl_entry_t;

typedef struct ipmpi_cl ipmpi_cl_t;

/*
 * Connects to f's host and port (every address getaddrinfo gives, IPv4 and
 * IPv6), runs the TLS 1.3 handshake and pins the certificate to f's
 * fingerprint; a connection the controller refuses at once because its
 * address has too many connections before HELLO is made again after a
 * short wait (backoff). Waits at most timeout_s seconds (<= 0: no limit,
 * but such refusals end it after 30 s). Returns 0 and the
 * connection in *out (caller owns: ipmpi_cl_free), or IPMPI_EIO (resolve
 * or connect failed, or refused as busy until the end), IPMPI_ETIMEDOUT, IPMPI_ETLS, IPMPI_EACCES (the
 * fingerprint does not match), IPMPI_ENOMEM or IPMPI_CL_EINTR; msg gets a
 * sentence saying what happened.
 */
int ipmpi_cl_connect(const ipmpi_furl_t *f, double timeout_s, const ipmpi_cl_hooks_t *hooks,
                     ipmpi_cl_t **out, char *msg, size_t msgcap);

/*
 * Sends one request frame (flags: IPMPI_F_STREAM or 0): header, then each part straight from its
 * memory (parts of 16 KiB or more are written in place; smaller ones are
 * gathered with the header so a small request is one TLS record). The
 * request id is registered before the first byte goes out, so a reply can
 * never arrive unclaimed. Returns 0 and the id in *req_id, or the code
 * that broke the connection (see ipmpi_cl_error).
 */
int ipmpi_cl_send(ipmpi_cl_t *c, int kind, int32_t target, uint16_t flags, uint32_t nparts,
                  const struct iovec *parts, const ipmpi_cl_hooks_t *hooks, uint64_t *req_id);

/* Streamed output a request may keep waiting in the client, in bytes. */
#define IPMPI_CL_OUT_MAX ((uint64_t)16 << 20)

/*
 * Waits until req_id has non-final replies (streamed output) stored or
 * every reply is in, and takes the non-final ones: *out gets a new entry
 * whose reps are those replies in order of arrival (maybe none), total 1
 * if every final reply is in (0 if not) and out_dropped the bytes of
 * output dropped since the last call (free with ipmpi_cl_entry_free). The
 * request's own entry stays for ipmpi_cl_wait. Returns as ipmpi_cl_wait.
 */
int ipmpi_cl_wait_output(ipmpi_cl_t *c, uint64_t req_id, uint64_t deadline_ns, const ipmpi_cl_hooks_t *hooks,
                         ipmpi_cl_entry_t **out);

/*
 * Waits until every reply of req_id is in, then removes the entry from
 * the store and gives it to the caller (*out; free with ipmpi_cl_entry_free).
 * deadline_ns is on ipmpi_now_ns()'s clock, or 0 for no deadline.
 * Returns 0, IPMPI_ETIMEDOUT (nothing lost: the entry stays), IPMPI_ENOENT
 * (no such pending request), IPMPI_CL_EINTR, or the code that broke the
 * connection.
 */
int ipmpi_cl_wait(ipmpi_cl_t *c, uint64_t req_id, uint64_t deadline_ns, const ipmpi_cl_hooks_t *hooks,
                  ipmpi_cl_entry_t **out);

/*
 * Same-host shared memory (doc/protocol.md section 5): sends SHM_PROBE
 * with the session's nonce (HELLO's shm_nonce, which proves to the
 * controller that the memory is ours) through an own memfd and checks that it comes back
 * through one of the controller's, then the same through process memory
 * (process_vm_readv, which needs ptrace rights over each other). On
 * success every later request moves
 * its parts of IPMPI_SHM_MIN bytes or more through memfds and lets the
 * controller do the same for its replies. Call only after HELLO said the
 * controller runs on this host under our uid; allow_vm 0 skips process
 * memory (memfds only). Returns 0 (msg says why process memory is not
 * used, if it is not), or a code with a
 * sentence in msg (the connection stays usable, over TLS alone).
 */
int ipmpi_cl_shm_probe(ipmpi_cl_t *c, const uint8_t nonce[32], int allow_vm, uint64_t deadline_ns,
                       const ipmpi_cl_hooks_t *hooks, char *msg, size_t msgcap);

/* 0: TLS only; 1: memfds; 2: process memory (process_vm_readv both
 * ways, no copy on the client's side for requests). */
int ipmpi_cl_shm_on(ipmpi_cl_t *c);

/* Reads what is readable now without blocking; returns 1 if every reply of
 * req_id is in, 0 if not, IPMPI_ENOENT, or the connection's error. */
int ipmpi_cl_ready(ipmpi_cl_t *c, uint64_t req_id, const ipmpi_cl_hooks_t *hooks);

/* Drops what is stored for req_id; later replies for it are discarded.
 * Returns 0 or IPMPI_ENOENT. */
int ipmpi_cl_forget(ipmpi_cl_t *c, uint64_t req_id, const ipmpi_cl_hooks_t *hooks);

/* The code and message that broke the connection (0 and "" while healthy).
 * The message is copied into msg. */
int ipmpi_cl_error(ipmpi_cl_t *c, char *msg, size_t msgcap);

/* Closes the connection: waiters fail at once with IPMPI_ECLOSED. The
 * socket is released when the last thread using it has left. Idempotent. */
void ipmpi_cl_close(ipmpi_cl_t *c);

/* Frees c and everything stored in it. No other thread may be inside a
 * function of c. */
void ipmpi_cl_free(ipmpi_cl_t *c, const ipmpi_cl_hooks_t *hooks);

/* Frees an entry returned by ipmpi_cl_wait; non-NULL part handles are
 * passed to hooks->release. */
void ipmpi_cl_entry_free(ipmpi_cl_entry_t *e, const ipmpi_cl_hooks_t *hooks);

#endif
