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
 *
 * The same socket brings the controller's INTERRUPT and KILL (engine.h):
 * longer datagrams that also need an HMAC under a key never sent on the
 * network, so a stranger who saw the wake key still cannot interrupt.
 */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "doorbell.h"
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
        getrandom(&w->key, sizeof w->key, 0) != (ssize_t)sizeof w->key ||
        getrandom(w->ikey, sizeof w->ikey, 0) != (ssize_t)sizeof w->ikey) {
        close(fd);
        return IPMPI_EIO;
    }
    w->port = v6 ? ntohs(((struct sockaddr_in6 *)&ss)->sin6_port) : ntohs(((struct sockaddr_in *)&ss)->sin_port);
    w->fd = fd;
    return 0;
}

/* An INTERRUPT or KILL datagram (engine.h) with our key: taken if its
 * HMAC is right and it is newer than the last one taken. */
static void take_interrupt(ipmpi_eng_wake_t *w, const uint8_t *b)
{
    uint8_t mac[EVP_MAX_MD_SIZE];
    unsigned int ml = 0;
    if (!HMAC(EVP_sha256(), w->ikey, sizeof w->ikey, b + 8, 24, mac, &ml) || ml < 16 ||
        CRYPTO_memcmp(mac, b + 32, 16) != 0)
        return;
    uint32_t kind;
    uint64_t req, seq;
    memcpy(&kind, b + 8, sizeof kind);
    memcpy(&req, b + 16, sizeof req);
    memcpy(&seq, b + 24, sizeof seq);
    if (seq <= w->last_seq)
        return; /* a copy (the controller sends each more than once) or a replay */
    w->last_seq = seq;
    if (kind == IPMPI_WAKE_KILL) {
        ipmpi_log(IPMPI_LOG_INFO, "killed by request %llu while busy", (unsigned long long)req);
        kill(getpid(), SIGKILL);
        return;
    }
    if (kind != IPMPI_WAKE_INTERRUPT)
        return;
    atomic_store(&w->intr_req, req);
    atomic_store(&w->intr_seq, seq);
    if (w->on_intr)
        w->on_intr();
}

/* Reads every datagram waiting; 1 if one held the key (a wake-up). The
 * sender of one with the key is the controller: its address is kept for
 * rings. INTERRUPT and KILL datagrams are taken on the way. */
static int drain(ipmpi_eng_wake_t *w)
{
    int ours = 0;
    uint8_t b[IPMPI_WAKE_INTR_LEN];
    for (;;) {
        struct sockaddr_storage from;
        socklen_t fl = sizeof from;
        ssize_t n = recvfrom(w->fd, b, sizeof b, MSG_TRUNC, (struct sockaddr *)&from, &fl);
        if (n < 0)
            return ours;
        /* An interrupt or kill datagram begins with the wake key too
         * (take_interrupt checks its HMAC). */
        if (n == IPMPI_WAKE_INTR_LEN && ipmpi_wake_is_key(b, IPMPI_WAKE_SIZE, w->key)) {
            take_interrupt(w, b);
            continue;
        }
        if (ipmpi_wake_is_key(b, (size_t)n, w->key)) {
            ours = 1;
            if (fl <= sizeof w->ctl_addr) {
                memcpy(&w->ctl_addr, &from, fl);
                w->ctl_len = fl;
            }
        }
    }
}

/* The watcher thread: one engine per process, so one thread. */
static pthread_mutex_t watch_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t watch_cv = PTHREAD_COND_INITIALIZER;

static void *watcher(void *arg)
{
    ipmpi_eng_wake_t *w = arg;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL); /* SIGINT is the main thread's */
    for (;;) {
        pthread_mutex_lock(&watch_mu);
        while (!w->running)
            pthread_cond_wait(&watch_cv, &watch_mu);
        pthread_mutex_unlock(&watch_mu);
        struct pollfd pf = {.fd = w->fd, .events = POLLIN};
        if (poll(&pf, 1, 100) <= 0)
            continue;
        /* Read only while the request runs: idle, the main thread's
         * sleep must see the wake-ups itself. */
        pthread_mutex_lock(&watch_mu);
        if (w->running && drain(w))
            w->proven = 1;
        pthread_mutex_unlock(&watch_mu);
    }
    return NULL;
}

int ipmpi_eng_wake_watch_start(ipmpi_eng_wake_t *w, void (*on_intr)(void))
{
    w->on_intr = on_intr;
    pthread_t t;
    pthread_attr_t a;
    pthread_attr_init(&a);
    pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&a, 256 * 1024);
    int rc = pthread_create(&t, &a, watcher, w);
    pthread_attr_destroy(&a);
    if (rc != 0) {
        ipmpi_log(IPMPI_LOG_WARN, "no thread to watch for interrupts (%s): they reach this engine only "
                  "between requests", strerror(rc));
        return IPMPI_EIO;
    }
    w->watching = 1;
    return 0;
}

void ipmpi_eng_wake_watch(ipmpi_eng_wake_t *w, int running)
{
    if (!w->watching || w->running == running)
        return;
    pthread_mutex_lock(&watch_mu);
    w->running = running;
    if (running)
        pthread_cond_signal(&watch_cv);
    pthread_mutex_unlock(&watch_mu);
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
