/*
 * Waking an idle engine on a node without the controller (engine.h).
 *
 * On the controller's node an idle engine sleeps on its doorbell, a futex
 * in node-shared memory that the controller rings (doorbell.h). Elsewhere
 * the controller cannot reach that memory, and an engine polling MPI with
 * back-off costs CPU (each poll looks at every local peer) and answers
 * the first request after an idle only at its next poll (up to
 * --wait-max-us, 25 ms). So such an engine opens a UDP socket, tells the
 * controller its port and a random key with READY, and sleeps in poll() on
 * the socket; the controller sends a datagram holding the key after it
 * posted a frame to the engine (ipmpi_ctl_wake in the controller).
 * Datagrams without the key are dropped (a stranger can wake the engine,
 * never make it do anything: it only looks for MPI messages). A datagram
 * lost on the way costs the engine at most its 2 s watch; the controller
 * sends again while the request is unanswered.
 */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <unistd.h>

#include "engine.h"
#include "ipmpi/errors.h"
#include "log.h"
#include "peermsg.h"

int ipmpi_eng_wake_open(ipmpi_eng_wake_t *w)
{
    memset(w, 0, sizeof *w);
    w->fd = -1;
    /* IPv6 with v4-mapped addresses: one socket answers both families. */
    int fd = socket(AF_INET6, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int v6 = fd >= 0;
    if (fd >= 0) {
        int off = 0;
        struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_addr = in6addr_any};
        if (setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof off) != 0 ||
            bind(fd, (struct sockaddr *)&a, sizeof a) != 0) {
            close(fd);
            fd = -1;
        }
    }
    if (fd < 0) {
        v6 = 0;
        fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_ANY)};
        if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) != 0) {
            ipmpi_log(IPMPI_LOG_WARN, "no UDP socket for wake-ups (%s): idle, this engine polls with back-off",
                      strerror(errno));
            if (fd >= 0)
                close(fd);
            return IPMPI_EIO;
        }
    }
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) != 0 ||
        getrandom(&w->key, sizeof w->key, 0) != (ssize_t)sizeof w->key) {
        close(fd);
        return IPMPI_EIO;
    }
    w->port = v6 ? ntohs(((struct sockaddr_in6 *)&ss)->sin6_port) : ntohs(((struct sockaddr_in *)&ss)->sin_port);
    w->fd = fd;
    return 0;
}

/* Reads every datagram waiting; 1 if one held the key. The sender of
 * one with the key is the controller: its address is kept for rings. */
static int drain(ipmpi_eng_wake_t *w)
{
    int ours = 0;
    uint8_t b[16];
    for (;;) {
        struct sockaddr_storage from;
        socklen_t fl = sizeof from;
        ssize_t n = recvfrom(w->fd, b, sizeof b, 0, (struct sockaddr *)&from, &fl);
        if (n < 0)
            return ours;
        if (ipmpi_wake_is_key(b, (size_t)n, w->key)) {
            ours = 1;
            if (fl <= sizeof w->ctl_addr) {
                memcpy(&w->ctl_addr, &from, fl);
                w->ctl_len = fl;
            }
        }
    }
}

void ipmpi_eng_wake_ring(const ipmpi_eng_wake_t *w)
{
    if (!w || w->fd < 0 || w->ctl_len == 0)
        return;
    uint8_t b[IPMPI_RING_SIZE];
    ipmpi_ring_encode(w->key, w->eid, b);
    /* Lost or refused: the controller's timer covers it. */
    (void)sendto(w->fd, b, sizeof b, MSG_DONTWAIT, (const struct sockaddr *)&w->ctl_addr, w->ctl_len);
}

int ipmpi_eng_wake_sleep(ipmpi_eng_wake_t *w, uint64_t timeout_ns, uint64_t unproven_ns, int (*pending)(void *arg),
                         void *arg)
{
    /* Datagrams from before are spent; then the last look for a frame. A
     * frame posted after it comes with a datagram, which ends the poll. */
    if (drain(w))
        w->proven = 1;
    if (pending(arg))
        return 1;
    if (!w->proven && unproven_ns < timeout_ns)
        timeout_ns = unproven_ns;
    struct pollfd pf = {.fd = w->fd, .events = POLLIN};
    int ms = (int)(timeout_ns / 1000000u);
    if (poll(&pf, 1, ms > 0 ? ms : 1) <= 0 || !drain(w))
        return 0;
    w->proven = 1;
    return 1;
}
