/*
 * Wake-up datagrams for engines on other nodes (src/engine/wake.c): an
 * idle engine there sleeps in poll() on a UDP socket whose port and key
 * came with its READY; after posting a frame to it the controller sends
 * the key. While the engine's work is unanswered the datagram is sent
 * again after 2, 4, 8 ... ms (at most every second), since one may be lost
 * or come before the frame is where the engine looks.
 *
 * The other way, such an engine rings the controller's bell (doorbell.h)
 * by a datagram of its key and id after each frame it sends, to the
 * address the controller's datagrams came from (the same sockets): the
 * loop may then sleep while engines of other nodes work, once each of
 * them rang once (ipmpi_ctl_bell_count). Loop thread only.
 */
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "backoff.h"
#include "ctl.h"
#include "doorbell.h"
#include "log.h"
#include "peermsg.h"

#define WAKE_FIRST_GAP_NS (2000000ull)
#define WAKE_MAX_GAP_NS (1000000000ull)

static void send_key(ipmpi_engine_slot_t *e);

/* A nonzero key of the host of a (its address without the port). */
static uint64_t host_key(const struct sockaddr_storage *a)
{
    const uint8_t *b = NULL;
    size_t n = 0;
    if (a->ss_family == AF_INET) {
        b = (const uint8_t *)&((const struct sockaddr_in *)a)->sin_addr;
        n = 4;
    } else if (a->ss_family == AF_INET6) {
        b = (const uint8_t *)&((const struct sockaddr_in6 *)a)->sin6_addr;
        n = 16;
    }
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * 1099511628211ull;
    return h | 1;
}

void ipmpi_ctl_wake_register(ipmpi_ctl_t *c, ipmpi_engine_slot_t *e, const char *text, size_t len)
{
    char buf[320], host[256];
    unsigned port = 0;
    unsigned long long key = 0;
    if (len >= sizeof buf)
        goto bad;
    memcpy(buf, text, len);
    buf[len] = '\0';
    if (sscanf(buf, "wake %u %llx %255s", &port, &key, host) != 3 || port == 0 || port > 65535)
        goto bad;
    char service[8];
    snprintf(service, sizeof service, "%u", port);
    struct addrinfo hints = {.ai_socktype = SOCK_DGRAM, .ai_flags = AI_NUMERICSERV}, *res = NULL;
    int g = getaddrinfo(host, service, &hints, &res);
    if (g != 0 || !res) {
        ipmpi_log(IPMPI_LOG_WARN, "engine %d: cannot resolve its host %s (%s): it polls when idle", e->id, host,
                  gai_strerror(g));
        return;
    }
    int *fd = res->ai_family == AF_INET6 ? &c->wake_fd6 : &c->wake_fd4;
    if (*fd < 0)
        *fd = socket(res->ai_family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (*fd < 0 || res->ai_addrlen > sizeof e->wake_addr) {
        ipmpi_log(IPMPI_LOG_WARN, "engine %d: no UDP socket for its wake-ups (%s): it polls when idle", e->id,
                  strerror(errno));
        freeaddrinfo(res);
        return;
    }
    memcpy(&e->wake_addr, res->ai_addr, res->ai_addrlen);
    e->wake_len = (socklen_t)res->ai_addrlen;
    e->host_key = host_key(&e->wake_addr);
    e->wake_fd = *fd;
    e->wake_key = (uint64_t)key;
    freeaddrinfo(res);
    ipmpi_log(IPMPI_LOG_DEBUG, "engine %d wakes by UDP at %s:%u", e->id, host, port);
    /* A first datagram now: the engine learns where the controller's
     * come from, and rings its bell there after its frames. */
    send_key(e);
    return;
bad:
    ipmpi_log(IPMPI_LOG_WARN, "engine %d: malformed wake-up part in READY; it polls when idle", e->id);
}

static void send_key(ipmpi_engine_slot_t *e)
{
    /* The engine compares the bytes as they are in its memory: same node
     * architecture assumed, as for MPI itself. */
    (void)sendto(e->wake_fd, &e->wake_key, sizeof e->wake_key, MSG_DONTWAIT, (struct sockaddr *)&e->wake_addr,
                 e->wake_len);
}

void ipmpi_ctl_wake(ipmpi_ctl_t *c, int rank)
{
    if (rank < 1 || rank > c->nengines)
        return;
    ipmpi_engine_slot_t *e = &c->eng[rank - 1];
    if (e->dead)
        return;
    if (e->wake_fd >= 0)
        send_key(e);
    /* Work for e starts now: its wake-ups are due again after 2, 4, 8 ...
     * ms (at most 1 s apart: ipmpi_ctl_wake_again). */
    e->wake_gap = WAKE_FIRST_GAP_NS;
    e->wake_due = ipmpi_now_ns() + e->wake_gap;
}

void ipmpi_ctl_wake_later(ipmpi_ctl_t *c, ipmpi_engine_slot_t *e, uint64_t gap_ns)
{
    (void)c;
    if (gap_ns <= WAKE_FIRST_GAP_NS)
        return;
    e->wake_gap = gap_ns < WAKE_MAX_GAP_NS ? gap_ns : WAKE_MAX_GAP_NS;
    e->wake_due = ipmpi_now_ns() + e->wake_gap;
}

void ipmpi_ctl_wake_again(ipmpi_ctl_t *c, ipmpi_engine_slot_t *e, uint64_t now)
{
    if (now < e->wake_due)
        return;
    ipmpi_doorbell_ring(c->link.bell, e->rank);
    if (e->wake_fd >= 0)
        send_key(e);
    e->wake_gap = e->wake_gap * 2 < WAKE_MAX_GAP_NS ? e->wake_gap * 2 : WAKE_MAX_GAP_NS;
    e->wake_due = now + e->wake_gap;
}

/* A ring: the engine's key, then its id (engine/wake.c). */
static uint64_t read_rings(ipmpi_ctl_t *c, int fd)
{
    uint64_t n = 0;
    uint8_t b[16];
    for (;;) {
        ssize_t got = recv(fd, b, sizeof b, MSG_DONTWAIT);
        if (got < 0)
            return n;
        uint64_t key;
        int32_t id;
        if (ipmpi_ring_parse(b, (size_t)got, &key, &id) != 0)
            continue;
        if (id < 0 || id >= c->nengines || c->eng[id].wake_fd < 0 || c->eng[id].wake_key != key)
            continue; /* not from one of ours: it woke the loop, nothing more */
        if (!c->eng[id].rings && !c->eng[id].near)
            c->nmute_far--;
        c->eng[id].rings = 1;
        n++;
    }
}

uint64_t ipmpi_ctl_wake_rings(ipmpi_ctl_t *c)
{
    uint64_t n = 0;
    if (c->wake_fd4 >= 0)
        n += read_rings(c, c->wake_fd4);
    if (c->wake_fd6 >= 0)
        n += read_rings(c, c->wake_fd6);
    return n;
}

void ipmpi_ctl_wake_fini(ipmpi_ctl_t *c)
{
    if (c->wake_fd4 >= 0)
        close(c->wake_fd4);
    if (c->wake_fd6 >= 0)
        close(c->wake_fd6);
    c->wake_fd4 = c->wake_fd6 = -1;
}
