/*
 * The controller's gate: what it keeps about connections that have not
 * (yet) proved they hold a key. Anyone who reaches the port can open
 * connections, so nothing they do may cost key holders much (issue 13):
 *
 * - Pending counts per source address: how many connections from each
 *   address are still before HELLO. The controller bounds them
 *   (IPMPI_GATE_PENDING_PER_SOURCE; a stalled one of that address gives
 *   way, or else the new one is refused: controller.c),
 *   so one host cannot take the whole session table or the loop's budget
 *   for TLS handshakes.
 * - Refusal logs, rate-limited: each refusal of an unauthenticated peer
 *   goes through ipmpi_gate_refused(). Per source address and reason, the
 *   first IPMPI_GATE_LOG_FULL refusals of an interval
 *   (IPMPI_GATE_INTERVAL_NS) are logged in full; the rest are counted and
 *   one summary line per interval says how many ("37 more connections from
 *   10.0.0.7 refused in the last 10 s: wrong key"). A flood of wrong keys
 *   thus writes a few lines per source every 10 s instead of one per
 *   connection. At most IPMPI_GATE_MAX_SOURCES addresses are tracked at
 *   once; refusals from more are counted together as "other addresses".
 *
 * Sources are the address part of a peer string "addr:port" (the port
 * differs for every connection). Keys are hashed with a per-gate random
 * seed, so chosen addresses cannot pile into one bucket.
 *
 * Thread safety: none; the controller's loop thread only.
 */
#ifndef IPMPI_CTL_GATE_H
#define IPMPI_CTL_GATE_H

#include <stdint.h>

#define IPMPI_GATE_INTERVAL_NS (10ull * 1000000000ull)
#define IPMPI_GATE_LOG_FULL 3u
#define IPMPI_GATE_MAX_SOURCES 1024u
/* Connections before HELLO one address may have at once. A key holder's
 * handshake and HELLO take milliseconds, so legitimate connections from
 * one host (a login node, an ssh tunnel's 127.0.0.1) stay far below. */
#define IPMPI_GATE_PENDING_PER_SOURCE 64u

typedef struct ipmpi_gate ipmpi_gate_t;

/* Returns a new gate, or NULL when out of memory. Caller owns it. */
ipmpi_gate_t *ipmpi_gate_new(void);
/* Emits the summaries still due (as at shutdown) and frees g (NULL is ignored). */
void ipmpi_gate_free(ipmpi_gate_t *g);

/* Copies the address part of peer ("addr:port", IPv6 "a:b::c:port") into
 * src (cap bytes, NUL-terminated, cut if longer). */
void ipmpi_gate_source(const char *peer, char *src, unsigned cap);

/* One more connection before HELLO from peer's address. Returns the count
 * of that address including this one, or IPMPI_ENOMEM (nothing counted). */
int ipmpi_gate_pending_add(ipmpi_gate_t *g, const char *peer);
/* Connections before HELLO counted for peer's address. */
uint32_t ipmpi_gate_pending(const ipmpi_gate_t *g, const char *peer);
/* A connection of peer's address said HELLO or went away. */
void ipmpi_gate_pending_del(ipmpi_gate_t *g, const char *peer);

/*
 * peer was refused for reason (a short fixed phrase that names the kind
 * of refusal in the summary line, e.g. "wrong key"; borrowed: a string
 * literal, as it is kept until the summary). Logs fmt at IPMPI_LOG_WARN if it is among the first few of
 * its address and reason in this interval, else counts it for the
 * summary.
 */
void ipmpi_gate_refused(ipmpi_gate_t *g, uint64_t now, const char *peer, const char *reason, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

/* Logs the summaries of intervals that ended by now and forgets their
 * counts. Returns when it must be called again (UINT64_MAX: nothing is
 * counted). Cheap when nothing is due. */
uint64_t ipmpi_gate_tick(ipmpi_gate_t *g, uint64_t now);

#endif
