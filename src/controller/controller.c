/*
 * The controller (rank 0): start-up, the event loop and shutdown.
 *
 * Start-up makes the security directory, certificate and keys, opens the
 * listening socket, waits until every live engine sent READY and only then
 * writes the furl files. The loop is single-threaded and never blocks on
 * one client or one engine: each round runs MPI progress (sends, header
 * probes, part receives), the death watch when it is due, then ppoll()
 * over the listening socket and every client socket. While an engine has
 * work the ppoll() timeout follows the spin-then-back-off policy (capped at
 * 5 ms). With no work anywhere it keeps polling (yielding the core) for
 * the spin window after the last event, so a client's next request finds
 * it awake, then blocks until a socket event or the next death-watch tick,
 * so idle engines cost the controller nothing.
 *
 * Thread safety: everything runs on the thread that called
 * ipmpi_controller_run(); the signal handler only sets a flag.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <malloc.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "backoff.h"
#include "ctl.h"
#include "doorbell.h"
#include "shm.h"
#include "shmbuf.h"
#include "ipmpi/errors.h"
#include "log.h"
#include "tls.h"
#include "tree.h"

#define HELLO_TIMEOUT_NS (10ull * 1000000000ull)
#define FLUSH_TIMEOUT_NS (2ull * 1000000000ull)
#define WATCH_BUSY_NS (250ull * 1000000ull)
#define WATCH_IDLE_NS (2000ull * 1000000ull)
/* Every live engine of the job watched by pidfd (watch.h): the table is
 * only a backstop, and a query copies every rank's row (at 256 engines
 * ~8 million instructions, measured under callgrind). */
#define WATCH_COVERED_NS (10000ull * 1000000ull)
#define MAX_SESSIONS 4096u
/* Connections accepted per loop turn at most: a connect flood waits in the
 * kernel's accept queue instead of holding the loop. */
#define ACCEPT_PER_TURN 64
/* Time per loop turn for connections before HELLO (TLS handshakes cost
 * ~0.1-0.5 ms of CPU each): key holders' sessions are served first each
 * turn, and then strangers' for at most this long, so a key holder's
 * request waits at most about this plus one handshake, however many
 * handshakes are under way. */
#define PREAUTH_BUDGET_NS (1000000ull)
/* A connection before HELLO that sent nothing for this long (and has
 * nothing waiting to be read) is stalled: it may give way to a newer one.
 * A key holder's TLS handshake and HELLO take milliseconds. */
#define PREAUTH_STALL_NS (1000ull * 1000000ull)
/* Why a connection is closed or refused when its address is at
 * IPMPI_GATE_PENDING_PER_SOURCE (one phrase: the gate sums them up). */
#define PER_SOURCE_REASON "too many connections before HELLO from this address"
/* Out of file descriptors with nothing to evict: accepting pauses this long. */
#define ACCEPT_PAUSE_NS (100ull * 1000000ull)
/* Longest sleep on the bell (doorbell.h) while engines work: the loop
 * still looks at MPI this often, since a small send MPI reported complete
 * may reach its engine only at a later progress call (dispatch.c). Once
 * trees came back, about as long as their subtrees take (c->tree_ns), up
 * to BELL_TREE_MAX_NS: a request to hundreds of engines on a few cores
 * takes tens of ms, and a wake-up every 10 ms cost the loop a context
 * switch each for nothing. Engines answering directly still bound the
 * sleep by their ring-again (ipmpi_ctl_rering), 2 ms after their send. */
#define BELL_MAX_NS (10000000ull)
#define BELL_TREE_MAX_NS (100000000ull)

/* Set by SIGTERM/SIGINT, and by SIGUSR1 with --cpu-sections; the only
 * state a signal handler may touch. */
static volatile sig_atomic_t stop_signal, cpu_log_signal;

static void on_signal(int sig)
{
    stop_signal = sig;
}

static void on_cpu_log_signal(int sig)
{
    (void)sig;
    cpu_log_signal = 1;
}

/* --cpu-sections: the totals so far, in ms (cpusec.h). */
static void log_cpu_sections(const ipmpi_ctl_t *c)
{
    const ipmpi_cpusec_t *s = &c->cpu;
    if (!s->on)
        return;
    const uint64_t *t = s->ns;
    ipmpi_log(IPMPI_LOG_INFO, "CPU by section so far (ms): turns %llu clients %.3f tree-sends %.3f mpi %.3f "
              "gathered %.3f scans %.3f waiting %.3f loop %.3f gathered-frames %llu",
              (unsigned long long)s->turns, t[IPMPI_CS_CLIENTS] / 1e6, t[IPMPI_CS_TREE_SEND] / 1e6,
              t[IPMPI_CS_MPI] / 1e6, t[IPMPI_CS_GATHERED] / 1e6, t[IPMPI_CS_SCANS] / 1e6, t[IPMPI_CS_WAIT] / 1e6,
              (ipmpi_thread_cpu_ns() - s->start) / 1e6, (unsigned long long)c->gathered);
}

/* ---- waiting ---- */

/* Waits for fds (may be NULL/0) at most timeout_ns (UINT64_MAX: forever),
 * with SIGTERM/SIGINT deliverable only here (they stay blocked elsewhere,
 * so a signal cannot slip in between the flag check and the wait). */
static int wait_fds(struct pollfd *fds, nfds_t n, uint64_t timeout_ns, const sigset_t *waitmask)
{
    struct timespec ts, *tsp = NULL;
    if (timeout_ns != UINT64_MAX) {
        ts.tv_sec = (time_t)(timeout_ns / 1000000000ull);
        ts.tv_nsec = (long)(timeout_ns % 1000000000ull);
        tsp = &ts;
    }
    if (stop_signal)
        return 0;
    int r = ppoll(fds, n, tsp, waitmask);
    /* Spinning (timeout 0) must not starve the other processes of a
     * shared node, the client among them: give the core away each turn. */
    if (r == 0 && timeout_ns == 0)
        sched_yield();
    return r < 0 ? 0 : r;
}

/* ---- sessions table ---- */

/* ---- connections before HELLO ---- */

static void pend_add(ipmpi_ctl_t *c, ipmpi_session_t *s)
{
    s->pending = 1;
    s->pend_next = NULL;
    s->pend_prev = c->pend_tail;
    if (c->pend_tail)
        c->pend_tail->pend_next = s;
    else
        c->pend_head = s;
    c->pend_tail = s;
}

/* s said HELLO or goes away: no longer counted before HELLO. */
static void pend_del(ipmpi_ctl_t *c, ipmpi_session_t *s)
{
    if (!s->pending)
        return;
    s->pending = 0;
    if (s->pend_prev)
        s->pend_prev->pend_next = s->pend_next;
    else
        c->pend_head = s->pend_next;
    if (s->pend_next)
        s->pend_next->pend_prev = s->pend_prev;
    else
        c->pend_tail = s->pend_prev;
    s->pend_prev = s->pend_next = NULL;
    ipmpi_gate_pending_del(c->gate, s->peer);
}

/* 1 if peers a and b ("addr:port") have the same address. */
static int same_source(const char *a, const char *b)
{
    const char *ca = strrchr(a, ':'), *cb = strrchr(b, ':');
    size_t na = ca ? (size_t)(ca - a) : strlen(a), nb = cb ? (size_t)(cb - b) : strlen(b);
    return na == nb && memcmp(a, b, na) == 0;
}

static uint32_t session_slot(const ipmpi_session_t *s)
{
    return (uint32_t)s->id;
}

/* ---- sessions table ---- */

static int add_session(ipmpi_ctl_t *c, int fd, const char *peer, uint64_t now)
{
    uint32_t slot = c->sfree;
    while (slot < c->scap && c->sess[slot])
        slot++;
    if (slot == c->scap) {
        if (c->scap >= MAX_SESSIONS)
            return IPMPI_EAGAIN;
        uint32_t ncap = c->scap ? c->scap * 2 : 16;
        ipmpi_session_t **ns = realloc(c->sess, ncap * sizeof *ns);
        if (!ns)
            return IPMPI_ENOMEM;
        c->sess = ns;
        uint32_t *ng = realloc(c->sgen, ncap * sizeof *ng);
        if (!ng)
            return IPMPI_ENOMEM;
        c->sgen = ng;
        for (uint32_t i = c->scap; i < ncap; i++) {
            c->sess[i] = NULL;
            c->sgen[i] = 0;
        }
        c->scap = ncap;
    }
    uint64_t id = ((uint64_t)c->sgen[slot] << 32) | slot;
    ipmpi_session_t *s = ipmpi_session_new(fd, c->ssl, peer, id, now);
    if (!s)
        return IPMPI_ENOMEM;
    if (ipmpi_gate_pending_add(c->gate, peer) < 0) {
        s->fd = -1; /* stays the caller's */
        ipmpi_session_free(s);
        return IPMPI_ENOMEM;
    }
    s->gate = c->gate;
    s->q_max = c->o->client_queue_bytes;
    pend_add(c, s);
    c->sess[slot] = s;
    c->sfree = slot + 1;
    c->nsess++;
    return 0;
}

static void drop_session(ipmpi_ctl_t *c, uint32_t slot)
{
    pend_del(c, c->sess[slot]);
    if (slot < c->sfree)
        c->sfree = slot;
    ipmpi_ctl_vmjob_drop(c->sess[slot]);
    ipmpi_ctl_tasks_session_closed(c, c->sess[slot]);
    ipmpi_session_free(c->sess[slot]);
    c->sess[slot] = NULL;
    c->sgen[slot]++; /* replies still on their way for it find nothing */
    c->nsess--;
}

/* 1 if s (before HELLO) may be closed to make room for a newer
 * connection: it was refused already and only flushes the refusal, or
 * nothing came in from it for PREAUTH_STALL_NS and nothing of it waits to
 * be read (the loop may just not have served it yet). */
static int preauth_stalled(const ipmpi_session_t *s, uint64_t now)
{
    if (s->state == IPMPI_SESS_CLOSING)
        return 1;
    if (now < s->t_progress + PREAUTH_STALL_NS || s->read_more || SSL_has_pending(s->ssl))
        return 0;
    int unread = 0;
    return ioctl(s->fd, FIONREAD, &unread) != 0 || unread == 0;
}

/*
 * Makes room by closing the oldest stalled connection that has not said
 * HELLO (preauth_stalled), or, unless stalled_only, the oldest one at all;
 * of peer's address when peer is not NULL. Anyone who can reach the port
 * can open connections, but only key holders get past HELLO; without
 * this, a flood of silent connections would lock every key holder out for
 * as long as it lasts. A connection whose handshake progresses is not
 * closed for a newer one of its address (stalled_only): a flood of wrong
 * keys from the address of a login node or an ssh tunnel would otherwise
 * cut the handshakes of the key holders behind it. Returns 1 if one was
 * closed.
 */
static int evict_unauthenticated(ipmpi_ctl_t *c, const char *peer, const char *reason, uint64_t now,
                                 int stalled_only)
{
    ipmpi_session_t *v = c->pend_head, *oldest = NULL;
    for (; v; v = v->pend_next) {
        if (peer && !same_source(v->peer, peer))
            continue;
        if (!oldest)
            oldest = v;
        if (preauth_stalled(v, now))
            break;
    }
    if (!v && !stalled_only)
        v = oldest;
    if (!v)
        return 0;
    ipmpi_gate_refused(c->gate, now, v->peer, reason, "client %s closed before HELLO: %s", v->peer, reason);
    drop_session(c, session_slot(v));
    return 1;
}

/*
 * Refuses a new connection at once, before any TLS work: a TLS alert
 * record, fatal user_canceled ("canceling the handshake for some reason
 * unrelated to a protocol failure", RFC 8446), tells the client to come
 * back later, also through an ssh tunnel (doc/protocol.md section 1). What
 * the client sent already is read away first, so the close sends a FIN
 * after the alert rather than a reset that could overtake it.
 */
static void refuse_busy(int fd)
{
    static const uint8_t alert[7] = {21, 3, 3, 0, 2, 2, 90};
    (void)send(fd, alert, sizeof alert, MSG_NOSIGNAL | MSG_DONTWAIT);
    char scratch[4096];
    for (int k = 0; k < 4 && recv(fd, scratch, sizeof scratch, MSG_DONTWAIT) > 0; k++)
        ;
    close(fd);
}

/* The address:port of ss in peer. */
static void peer_name(const struct sockaddr_storage *ss, char *peer, size_t cap)
{
    char addr[INET6_ADDRSTRLEN] = "?";
    int port = 0;
    if (ss->ss_family == AF_INET) {
        inet_ntop(AF_INET, &((const struct sockaddr_in *)ss)->sin_addr, addr, sizeof addr);
        port = ntohs(((const struct sockaddr_in *)ss)->sin_port);
    } else if (ss->ss_family == AF_INET6) {
        inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)ss)->sin6_addr, addr, sizeof addr);
        port = ntohs(((const struct sockaddr_in6 *)ss)->sin6_port);
    }
    snprintf(peer, cap, "%s:%d", addr, port);
}

static void accept_clients(ipmpi_ctl_t *c, uint64_t now)
{
    for (int k = 0; k < ACCEPT_PER_TURN; k++) {
        struct sockaddr_storage ss;
        socklen_t sl = sizeof ss;
        int fd = accept4(c->lfd, (struct sockaddr *)&ss, &sl, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE) {
                /* The pending connection stays in the kernel's queue (and
                 * keeps the socket readable): free a descriptor, or stop
                 * looking at the socket for a while. */
                if (evict_unauthenticated(c, NULL, "out of file descriptors", now, 0))
                    continue;
                ipmpi_gate_refused(c->gate, now, "(accept):0", "out of file descriptors",
                                   "cannot accept connections: %s; %u sessions open", strerror(errno), c->nsess);
                c->accept_resume = now + ACCEPT_PAUSE_NS;
            } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR && errno != ECONNABORTED) {
                ipmpi_log(IPMPI_LOG_WARN, "accept failed: %s", strerror(errno));
            }
            return;
        }
        char peer[80];
        peer_name(&ss, peer, sizeof peer);
        /* A client whose link silently died is dropped within ~30 s
         * (its results stay in the controller). */
        ipmpi_tcp_tune(fd, 24);
        /* One address may hold only so many connections before HELLO: a
         * stalled one gives way to the new one, else the new one is
         * refused at once (a TLS alert before any TLS work; the client
         * tries again within its connect timeout). */
        if (ipmpi_gate_pending(c->gate, peer) >= IPMPI_GATE_PENDING_PER_SOURCE &&
            !evict_unauthenticated(c, peer, PER_SOURCE_REASON, now, 1)) {
            ipmpi_gate_refused(c->gate, now, peer, PER_SOURCE_REASON, "connection from %s refused: %s", peer,
                               PER_SOURCE_REASON);
            refuse_busy(fd);
            continue;
        }
        int rc = add_session(c, fd, peer, now);
        if (rc == IPMPI_EAGAIN && evict_unauthenticated(c, NULL, "session table full", now, 0))
            rc = add_session(c, fd, peer, now);
        if (rc != 0) {
            ipmpi_gate_refused(c->gate, now, peer, "too many sessions", "connection from %s refused: %s", peer,
                               rc == IPMPI_EAGAIN ? "too many sessions" : ipmpi_strerror(rc));
            close(fd);
            continue;
        }
        ipmpi_log(IPMPI_LOG_DEBUG, "connection from %s", peer);
    }
}

/* Runs one session's I/O and closes it when it is finished. */
static void session_step(ipmpi_ctl_t *c, uint32_t slot)
{
    ipmpi_session_t *s = c->sess[slot];
    int rc = ipmpi_session_io(s, &c->o->limits, ipmpi_ctl_client_frame, c);
    if (s->pending) {
        /* Bytes came in: its handshake or HELLO progresses. */
        uint64_t rd = BIO_number_read(SSL_get_rbio(s->ssl));
        if (rd != s->rd_seen) {
            s->rd_seen = rd;
            s->t_progress = ipmpi_now_ns();
        }
    }
    if (s->pending && s->cap != IPMPI_CAP_NONE)
        pend_del(c, s); /* it said HELLO with a key */
    if (rc < 0) {
        if (rc != IPMPI_ECLOSED || s->state != IPMPI_SESS_CLOSING)
            ipmpi_log(s->cap == IPMPI_CAP_NONE ? IPMPI_LOG_DEBUG : IPMPI_LOG_INFO, "client %s: connection closed",
                      s->peer);
        drop_session(c, slot);
    }
}

/* Hello and flush deadlines. Returns the earliest future deadline. */
static uint64_t session_deadlines(ipmpi_ctl_t *c, uint64_t now)
{
    uint64_t next = UINT64_MAX;
    for (uint32_t i = 0; i < c->scap; i++) {
        ipmpi_session_t *s = c->sess[i];
        if (!s)
            continue;
        uint64_t d = UINT64_MAX;
        if (s->state == IPMPI_SESS_CLOSING) {
            d = s->t_close + FLUSH_TIMEOUT_NS;
            if (now >= d) {
                ipmpi_log(IPMPI_LOG_WARN, "client %s: output not flushed within 2 s; closing", s->peer);
                drop_session(c, i);
                continue;
            }
        } else if (s->cap == IPMPI_CAP_NONE) {
            d = s->t_open + HELLO_TIMEOUT_NS;
            if (now >= d) {
                ipmpi_gate_refused(c->gate, now, s->peer, "no HELLO within 10 s", "client %s refused: no HELLO within 10 s",
                                   s->peer);
                if (s->state == IPMPI_SESS_OPEN) {
                    ipmpi_session_send_error(s, IPMPI_K_HELLO, 0, IPMPI_TARGET_CONTROLLER, 1, IPMPI_EACCES,
                                             "access denied: no HELLO within 10 s");
                    ipmpi_session_close_after_flush(s, now);
                    d = now + FLUSH_TIMEOUT_NS;
                } else {
                    drop_session(c, i);
                    continue;
                }
            }
        }
        /* Paused for back-pressure: its next allowance is due then. */
        if (s->q_paused && s->t_trickle + IPMPI_Q_TRICKLE_NS < d)
            d = s->t_trickle + IPMPI_Q_TRICKLE_NS;
        /* Mappings of the client's memfds are let go after a while unused,
         * so the memory the client freed is not kept alive here. */
        uint64_t e = ipmpi_shmcache_trim(&s->shm_peer, now);
        if (e != UINT64_MAX && now + e < d)
            d = now + e;
        if (d < next)
            next = d;
    }
    return next;
}

/* ---- MPI side ---- */

static int mpi_progress(ipmpi_ctl_t *c)
{
    int ev = ipmpi_mpilink_progress(&c->link, ipmpi_ctl_engine_frame, c);
    if (ev < 0) {
        ipmpi_log(IPMPI_LOG_ERROR, "MPI progress failed: %s", ipmpi_strerror(ev));
        return 0;
    }
    return ev;
}

static void watch_tick(ipmpi_ctl_t *c, uint64_t now, int busy)
{
    if (!c->watch.enabled)
        return;
    /* Engines watched by pidfd show their end at once: the table then
     * only backs them up (watch.h). */
    uint64_t every = ipmpi_ctl_watch_pids_cover(&c->watch) ? WATCH_COVERED_NS : busy ? WATCH_BUSY_NS : WATCH_IDLE_NS;
    if (now >= c->watch.next_ns) {
        ipmpi_ctl_watch_poll(&c->watch, ipmpi_ctl_rank_dead, c);
        c->watch.next_ns = now + every;
    } else if (c->watch.next_ns > now + every) {
        /* Work just arrived: deaths must now show within `every` (250 ms
         * while some live engine of the job has no pidfd). */
        c->watch.next_ns = now + every;
    }
}

/* Sends EXIT to every live engine; aux = 1 tells them to _exit. */
static void send_exit(ipmpi_ctl_t *c, int aux)
{
    if (!c->eng)
        return;
    for (int i = 0; i < c->nengines; i++) {
        if (c->eng[i].dead)
            continue;
        ipmpi_hdr_t h = {.kind = IPMPI_K_EXIT, .target = i, .aux = (uint64_t)aux};
        int rc = ipmpi_mpilink_send(&c->link, c->eng[i].rank, &h, NULL);
        if (rc != 0)
            ipmpi_log(IPMPI_LOG_ERROR, "cannot send EXIT to engine %d: %s", i, ipmpi_strerror(rc));
    }
}

/* Waits (at most limit_ns) until every send completed; engine frames
 * that still arrive are dropped (c->stopping is set). */
static int drain_sends(ipmpi_ctl_t *c, uint64_t limit_ns, const sigset_t *waitmask)
{
    uint64_t end = ipmpi_now_ns() + limit_ns;
    while (ipmpi_mpilink_sends(&c->link) > 0 && ipmpi_now_ns() < end) {
        mpi_progress(c);
        watch_tick(c, ipmpi_now_ns(), 1);
        if (ipmpi_mpilink_bulk(&c->link) == 0)
            wait_fds(NULL, 0, 200000, waitmask);
    }
    return ipmpi_mpilink_sends(&c->link) == 0 ? 0 : IPMPI_ETIMEDOUT;
}

/* Ends the job at once (start-up failures): EXIT with aux = 1, then _exit. */
static void abort_job(ipmpi_ctl_t *c, int code, const sigset_t *waitmask)
{
    c->stopping = 1;
    send_exit(c, 1);
    drain_sends(c, 1000000000ull, waitmask);
    ipmpi_furls_remove(&c->sec);
    ipmpi_log(IPMPI_LOG_ERROR, "controller stops the job (exit status %d)", code);
    _exit(code);
}

/* ---- start-up ---- */

/* Waits until every live engine sent READY; *t_first and *t_last are when
 * the first and the last READY were seen (ipmpi_log_clock()). */
static int wait_ready(ipmpi_ctl_t *c, const sigset_t *waitmask, double *t_first, double *t_last)
{
    ipmpi_backoff_t bo;
    uint64_t now = ipmpi_now_ns();
    uint64_t deadline = now + (uint64_t)(c->o->ready_timeout * 1e9);
    /* No spin window here: READYs come one by one while the other ranks
     * still start, and a controller spinning for 10 ms after each took
     * their cores; sleeps of at most 2 ms let the last READY be seen
     * within 2 ms at a cost of ~1% of a core. */
    uint64_t cap = c->o->wait_max_us < 2000 ? c->o->wait_max_us : 2000;
    ipmpi_backoff_init(&bo, 0, cap, now);
    int seen = 0;
    for (;;) {
        if (mpi_progress(c) > 0)
            ipmpi_backoff_busy(&bo, ipmpi_now_ns());
        now = ipmpi_now_ns();
        watch_tick(c, now, 0);
        int ready = 0;
        for (int i = 0; i < c->nengines; i++)
            ready += c->eng[i].ready && !c->eng[i].dead;
        if (ready > seen) {
            double t = ipmpi_log_clock();
            if (seen == 0)
                *t_first = t;
            *t_last = t;
            seen = ready;
        }
        if (c->nlive == 0) {
            ipmpi_log(IPMPI_LOG_ERROR, "every engine died during start-up");
            return IPMPI_EDEAD;
        }
        if (ready == c->nlive)
            return 0;
        if (stop_signal) {
            ipmpi_log(IPMPI_LOG_INFO, "signal %d during start-up", (int)stop_signal);
            return IPMPI_ESHUTDOWN;
        }
        if (now >= deadline) {
            ipmpi_log(IPMPI_LOG_ERROR, "only %d of %d engines ready after %.0f s (--ready-timeout)", ready,
                      c->nlive, c->o->ready_timeout);
            return IPMPI_ETIMEDOUT;
        }
        wait_fds(NULL, 0, ipmpi_backoff_next(&bo, now), waitmask);
    }
}

/*
 * Every session holds a descriptor, and strangers can open sessions: with
 * the common soft limit of 1024, a thousand silent connections would leave
 * no descriptor for a key holder (accept fails with EMFILE). The hard
 * limit is the user's to have, so the soft one goes up to it (bounded:
 * the session table holds MAX_SESSIONS; the rest is for MPI and memfds).
 */
static void raise_fd_limit(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
        return;
    rlim_t want = 2 * MAX_SESSIONS + 1024;
    if (rl.rlim_max != RLIM_INFINITY && want > rl.rlim_max)
        want = rl.rlim_max;
    if (rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < want) {
        rl.rlim_cur = want;
        if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
            ipmpi_log(IPMPI_LOG_WARN, "cannot raise the open file limit to %llu: %s", (unsigned long long)want,
                      strerror(errno));
    }
}

/* mpilink's wake hook: a frame was posted to rank (wake.c). */
static void wake_hook(void *arg, int rank)
{
    ipmpi_ctl_wake(arg, rank);
}

/* The loop allocates and frees the same few hundred KiB per request to
 * many engines (gathered replies, reply frames); glibc gave the freed top
 * of the heap back at 128 KiB and took fresh pages again for the next
 * request, whose faults (clear_page) were 15% of the controller's CPU per
 * tree request at 256 engines. Keep up to CTL_HEAP_KEEP of freed heap, and
 * malloc from it up to 1 MiB (larger parts have their own cache: equeue.h). */
#define CTL_HEAP_KEEP (32 << 20)

static void tune_malloc(void)
{
    if (!mallopt(M_MMAP_THRESHOLD, 1 << 20) || !mallopt(M_TRIM_THRESHOLD, CTL_HEAP_KEEP) ||
        !mallopt(M_TOP_PAD, 1 << 20))
        ipmpi_log(IPMPI_LOG_WARN, "mallopt refused a setting: the controller's heap keeps glibc's defaults");
}

static int setup(ipmpi_ctl_t *c, const ipmpi_opts_t *o, const ipmpi_job_t *job, MPI_Comm comm)
{
    memset(c, 0, sizeof *c);
    tune_malloc();
    c->o = o;
    c->job = job;
    c->comm = comm;
    c->lfd = -1;
    c->nengines = job->world_size - 1;
    c->nlive = c->nengines;
    /* Room for engines that join later, allocated now so that no slot
     * moves (calloc'd pages cost nothing until used). */
    c->cap_engines = c->nengines;
    if (o->accept_joins[0])
        c->cap_engines = o->max_engines == 0 ? c->nengines + 1024
                         : o->max_engines > c->nengines ? o->max_engines : c->nengines;
    c->eng = calloc((size_t)c->cap_engines, sizeof *c->eng);
    c->mark = calloc((size_t)c->cap_engines, sizeof *c->mark);
    c->targets = calloc((size_t)c->cap_engines, sizeof *c->targets);
    c->tree_ids = calloc((size_t)c->cap_engines, sizeof *c->tree_ids);
    c->gather_ids = calloc((size_t)c->cap_engines, sizeof *c->gather_ids);
    c->tree_keys = calloc((size_t)c->cap_engines, sizeof *c->tree_keys);
    c->tree_slices = calloc(2 * ((size_t)c->cap_engines + 1), sizeof *c->tree_slices);
    c->gang_runs = calloc(2 * (size_t)c->cap_engines, sizeof *c->gang_runs);
    if (!c->eng || !c->mark || !c->targets || !c->tree_ids || !c->gather_ids || !c->tree_keys || !c->tree_slices ||
        !c->gang_runs)
        return IPMPI_ENOMEM;
    for (int i = 0; i < c->nengines; i++) {
        c->eng[i].id = i;
        c->eng[i].rank = i + 1;
        c->eng[i].near = ipmpi_doorbell_reaches(job->bell, i + 1);
        c->nmute_far += !c->eng[i].near;
        c->eng[i].wake_fd = -1;
        c->eng[i].live_fd = -1;
    }
    c->wake_fd4 = c->wake_fd6 = -1;
    if (ipmpi_sched_init_cap(&c->sched, c->nengines, c->cap_engines, o->task_depth) != 0 || ipmpi_ctl_tasks_init(c) != 0 ||
        ipmpi_ctl_results_init(c) != 0)
        return IPMPI_ENOMEM;
    ipmpi_reqtab_init(&c->reqs);
    /* A send to a dead rank must come back as an error, not abort rank 0. */
    MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
    ipmpi_mpilink_init(&c->link, comm);
    c->link.alloc = ipmpi_ctl_engine_alloc;
    c->link.alloc_arg = c;
    c->link.bell = job->bell;
    c->link.wake = wake_hook;
    c->link.wake_arg = c;
    if (ipmpi_host_id(c->host_id, sizeof c->host_id) != 0)
        c->host_id[0] = '\0'; /* no /proc: clients use TLS only */
    ipmpi_ctl_watch_init(&c->watch, job->have_pmix, job->jobid, job->world_size);
    c->watch.next_ns = ipmpi_now_ns() + WATCH_IDLE_NS;

    c->gate = ipmpi_gate_new();
    if (!c->gate)
        return IPMPI_ENOMEM;
    raise_fd_limit();

    int rc = ipmpi_security_setup(&c->sec, o->dir, job->hostname, o->client_port != 0);
    if (rc != 0)
        return rc;
    c->ssl = ipmpi_tls_server_ctx(c->sec.key, c->sec.cert);
    if (!c->ssl) {
        ipmpi_log(IPMPI_LOG_ERROR, "cannot make the TLS server context");
        return IPMPI_ETLS;
    }
    return ipmpi_listen_open(o->client_ip, o->client_port, &c->lfd, c->host, &c->port);
}

/* ---- the loop ---- */

/* 1 when the loop may sleep on its bell now (doorbell.h): spun enough
 * since the last event, every engine at work can ring it, and no ring
 * from another node is waiting (its frame may still need reading: look
 * again first). Announces the sleep to this node's engines. */
static int bell_may_sleep(ipmpi_ctl_t *c, int spun)
{
    if (!spun || c->job->bell->ctl_fd < 0)
        return 0;
    uint64_t far = c->nbusy_far ? ipmpi_ctl_wake_rings(c) : 0;
    c->far_rings += far;
    if (far)
        return 0;
    uint64_t t = ipmpi_cpusec_begin(&c->cpu);
    uint64_t k = ipmpi_ctl_bell_count(c);
    ipmpi_cpusec_end(&c->cpu, IPMPI_CS_SCANS, t);
    return ipmpi_doorbell_ctl_sleep(c->job->bell, c->link.near_hdrs, k);
}

/* 1 while frames announced on the bell are on their way (MPI has not
 * delivered them yet) and were first seen so for less than ANN_POLL_NS:
 * the loop polls for them at once instead of backing off. A replied
 * tree's roots often announce before the loop looks, and a backed-off
 * ppoll() cost a context switch per request; past ANN_POLL_NS (an
 * engine that died between its announcement and its send) the usual
 * back-off resumes. */
#define ANN_POLL_NS (200000ull)

static int announced_on_the_way(ipmpi_ctl_t *c, uint64_t now)
{
    if (c->job->bell->ctl_fd < 0)
        return 0;
    uint64_t ann = ipmpi_doorbell_ctl_announced(c->job->bell);
    if (ann == c->link.near_hdrs)
        return 0;
    if (ann != c->ann_ahead) {
        c->ann_ahead = ann;
        c->ann_since = now;
    }
    return now - c->ann_since < ANN_POLL_NS;
}

static void run_loop(ipmpi_ctl_t *c, const sigset_t *waitmask)
{
    ipmpi_backoff_t bo;
    uint64_t cap = c->o->wait_max_us < 5000 ? c->o->wait_max_us : 5000;
    ipmpi_backoff_init(&bo, c->o->wait_spin_us, cap, ipmpi_now_ns());
    struct pollfd *pfd = NULL;
    uint32_t *pslot = NULL;
    uint32_t pcap = 0;
    /* The controller's bell: only once the engines are ready (their
     * READYs were announced and seen by then). */
    if (c->o->busy_spin_us != UINT64_MAX)
        (void)ipmpi_doorbell_ctl_open(c->job->bell);
    uint64_t bell_spin_ns = c->o->busy_spin_us * 1000u;
    c->cpu.on = c->o->cpu_sections;
    c->cpu.start = c->cpu.on ? ipmpi_thread_cpu_ns() : 0;
    int bell_counts = ipmpi_doorbell_reaches(c->job->bell, 0);

    while (!c->stopping && !stop_signal) {
        if (cpu_log_signal) {
            cpu_log_signal = 0;
            log_cpu_sections(c);
        }
        c->cpu.turns++;
        /* Copies out of clients' memory advance a step per turn, between
         * everyone else's work (stream.c). */
        int jobs = ipmpi_ctl_vmjobs_step(c);
        uint64_t t_mpi = ipmpi_cpusec_begin(&c->cpu);
        /* This node's engines announce each frame on the bell before
         * they send it; another node's engine sends only while it works:
         * until then a quiet bell spares MPI's probe (mpilink.h). */
        c->link.bell_tells = bell_counts && c->nbusy_far == 0;
        int ev = mpi_progress(c);
        ipmpi_cpusec_end(&c->cpu, IPMPI_CS_MPI, t_mpi);
        uint64_t now = ipmpi_now_ns();
        if (ev > 0)
            ipmpi_backoff_busy(&bo, now);
        int busy = c->nbusy > 0 || ipmpi_mpilink_sends(&c->link) > 0;
        watch_tick(c, now, busy);
        if (c->stopping)
            break;
        uint64_t next_deadline = session_deadlines(c, now);
        /* Engines held back for a client that does not read its replies:
         * resume them once it catches up, and look again each second for
         * one that stalled for good. */
        ipmpi_ctl_release_held(c, now);
        if (busy) {
            uint64_t t = ipmpi_cpusec_begin(&c->cpu);
            ipmpi_ctl_rering(c, now);
            ipmpi_cpusec_end(&c->cpu, IPMPI_CS_SCANS, t);
        }
        if ((c->nheld || c->nheld_tc) && now + 1000000000ull < next_deadline)
            next_deadline = now + 1000000000ull;
        /* Cached payload buffers go back to the system after a while
         * unused: wake up for that too. */
        uint64_t trim_in = ipmpi_parts_cache_trim();
        uint64_t shm_in = ipmpi_shmbuf_trim();
        trim_in = shm_in < trim_in ? shm_in : trim_in;
        if (trim_in != UINT64_MAX && now + trim_in < next_deadline)
            next_deadline = now + trim_in;
        /* Summaries of refusals whose interval ended. */
        uint64_t gate_due = ipmpi_gate_tick(c->gate, now);
        if (gate_due < next_deadline)
            next_deadline = gate_due;
        if (c->accept_resume > now && c->accept_resume < next_deadline)
            next_deadline = c->accept_resume;

        uint32_t jcap = ipmpi_ctl_join_nfds(c);
        if (pcap < c->scap + 5 + jcap) {
            pcap = c->scap + 5 + jcap;
            struct pollfd *np = realloc(pfd, pcap * sizeof *np);
            uint32_t *ns = realloc(pslot, pcap * sizeof *ns);
            if (np)
                pfd = np;
            if (ns)
                pslot = ns;
            if (!np || !ns) {
                ipmpi_log(IPMPI_LOG_ERROR, "out of memory in the event loop; stopping");
                c->stopping = 1;
                break;
            }
        }
        nfds_t n = 0;
        pfd[n].fd = c->accept_resume > now ? -1 : c->lfd;
        pfd[n].events = POLLIN;
        pfd[n].revents = 0;
        n++;
        int more = 0;
        for (uint32_t i = 0; i < c->scap; i++) {
            ipmpi_session_t *s = c->sess[i];
            if (!s)
                continue;
            /* Back-pressure ends once its requests went below the bound. */
            ipmpi_session_q_resume(s, now);
            more |= s->read_more;
            pfd[n].fd = s->fd;
            pfd[n].events = ipmpi_session_events(s);
            pfd[n].revents = 0;
            pslot[n] = i;
            n++;
        }

        /* Joins and joined engines' liveness after the sessions, then
         * the pidfds of this host's engines (watch.h). */
        nfds_t nsfd = n;
        n += ipmpi_ctl_join_fds(c, pfd + n, pcap - (uint32_t)n);
        nfds_t njfd = n;
        if (ipmpi_ctl_watch_fd(&c->watch) >= 0) {
            pfd[n].fd = ipmpi_ctl_watch_fd(&c->watch);
            pfd[n].events = POLLIN;
            pfd[n].revents = 0;
            n++;
        }

        uint64_t timeout;
        int bell = 0;
        busy = c->nbusy > 0 || ipmpi_mpilink_sends(&c->link) > 0;
        if (more || jobs || ipmpi_mpilink_bulk(&c->link) > 0) {
            timeout = 0;
            ipmpi_backoff_busy(&bo, now);
        }
        else if (busy && bell_may_sleep(c, now - bo.last_busy >= bell_spin_ns)) {
            /* Sleep until the engine whose frame the loop needs rings (or
             * a client or timer wakes it). */
            uint64_t most = c->tree_ns < BELL_MAX_NS        ? BELL_MAX_NS
                            : c->tree_ns < BELL_TREE_MAX_NS ? c->tree_ns
                                                            : BELL_TREE_MAX_NS;
            uint64_t d = now + most;
            if (c->watch.enabled && c->watch.next_ns < d)
                d = c->watch.next_ns;
            if (next_deadline < d)
                d = next_deadline;
            /* Engines whose wake-up is due again (ipmpi_ctl_rering): in a
             * tree, one whose ring from its parent was lost waits for it. */
            if (c->rering_at < d)
                d = c->rering_at;
            timeout = d > now ? d - now : 0;
            /* Rings from other nodes come on the wake-up sockets. */
            int bfd[3] = {c->job->bell->ctl_fd, c->nbusy_far ? c->wake_fd4 : -1, c->nbusy_far ? c->wake_fd6 : -1};
            for (int j = 0; j < 3; j++) {
                pfd[n + (nfds_t)bell].fd = bfd[j];
                pfd[n + (nfds_t)bell].events = POLLIN;
                pfd[n + (nfds_t)bell].revents = 0;
                bell++;
            }
        }
        else if (busy && announced_on_the_way(c, now))
            timeout = 0;
        else if (busy)
            timeout = ipmpi_backoff_next(&bo, now);
        else if (now - bo.last_busy < bo.spin_ns)
            /* Nothing in flight, but a client was just answered: its next
             * request usually follows within microseconds, and a process
             * woken from ppoll() costs ~40 us here (a halted vCPU). Poll
             * for the spin window, yielding the core each turn. */
            timeout = 0;
        else {
            /* Frames announced on the bell but never sent (an engine died
             * in between) would keep the loop from sleeping on it: with
             * nothing in flight every frame announced was seen. */
            if (c->job->bell->ctl_fd >= 0 && !c->link.recv_head)
                c->link.near_hdrs = ipmpi_doorbell_ctl_announced(c->job->bell);
            /* Nothing in flight for a while: sleep until a socket wakes
             * us or a timer is due, so an idle controller costs nothing. */
            uint64_t d = c->watch.enabled ? c->watch.next_ns : UINT64_MAX;
            if (next_deadline < d)
                d = next_deadline;
            timeout = d == UINT64_MAX ? UINT64_MAX : (d > now ? d - now : 0);
        }
        uint64_t t_wait = ipmpi_cpusec_begin(&c->cpu);
        int nev = wait_fds(pfd, n + (nfds_t)bell, timeout, waitmask);
        ipmpi_cpusec_end(&c->cpu, IPMPI_CS_WAIT, t_wait);
        now = ipmpi_now_ns();
        if (bell) {
            c->bell_sleeps++;
            uint64_t far = ipmpi_ctl_wake_rings(c);
            c->far_rings += far;
            if (ipmpi_doorbell_ctl_woke(c->job->bell) || (far && (pfd[n + 1].revents | pfd[n + 2].revents)))
                c->bell_rings++;
        }
        if (nev > 0)
            ipmpi_backoff_busy(&bo, now);
        if (nsfd < njfd)
            ipmpi_ctl_join_events(c, pfd + nsfd, (uint32_t)(njfd - nsfd));
        if (njfd < n && pfd[njfd].revents) {
            /* What an engine sent before it ended (the answer to its own
             * KILL, say) is taken first: its end, seen at once by its
             * pidfd, must not overtake its last frames. */
            for (int k = 0; k < 3; k++)
                (void)mpi_progress(c);
            ipmpi_ctl_watch_reap(&c->watch, ipmpi_ctl_rank_dead, c);
        }
        n = nsfd;
        if (pfd[0].revents & POLLIN)
            accept_clients(c, now);
        uint64_t t_clients = ipmpi_cpusec_begin(&c->cpu);
        /* Key holders first, every one of them each turn. */
        for (nfds_t k = 1; k < n; k++) {
            ipmpi_session_t *s = c->sess[pslot[k]];
            if (!s || s->cap == IPMPI_CAP_NONE || (!pfd[k].revents && !s->read_more))
                continue;
            if (s->q_paused && (pfd[k].revents & (POLLHUP | POLLERR)) && !ipmpi_session_has_output(s)) {
                /* Not reading it, so its socket's end shows only here. */
                ipmpi_log(IPMPI_LOG_INFO, "client %s: connection closed while its input was paused", s->peer);
                drop_session(c, pslot[k]);
                continue;
            }
            session_step(c, pslot[k]);
        }
        /* Then connections before HELLO, within the turn's budget,
         * starting where the last turn stopped so each gets its turn;
         * those left out are still ready at the next ppoll(). */
        uint64_t budget_end = ipmpi_now_ns() + PREAUTH_BUDGET_NS;
        for (nfds_t j = 0; j + 1 < n; j++) {
            nfds_t k = 1 + (c->hs_rot + j) % (n - 1);
            ipmpi_session_t *s = c->sess[pslot[k]];
            if (!s || s->cap != IPMPI_CAP_NONE || s->fd != pfd[k].fd || (!pfd[k].revents && !s->read_more))
                continue;
            if (ipmpi_now_ns() >= budget_end) {
                c->hs_rot = (uint32_t)(k - 1);
                break;
            }
            session_step(c, pslot[k]);
        }
        ipmpi_cpusec_end(&c->cpu, IPMPI_CS_CLIENTS, t_clients);
    }
    /* From here on (shutdown) every progress probes. */
    c->link.bell_tells = 0;
    free(pfd);
    free(pslot);
}

/* Clean stop: fail what is queued, EXIT the engines, flush clients. */
static int shutdown_job(ipmpi_ctl_t *c, const sigset_t *waitmask)
{
    c->stopping = 1;
    ipmpi_ctl_join_stop(c);
    if (stop_signal)
        ipmpi_log(IPMPI_LOG_INFO, "signal %d: shutting down", (int)stop_signal);
    ipmpi_log(IPMPI_LOG_INFO, "shutting down: %u request(s) still queued or running", c->reqs.len);
    ipmpi_log(IPMPI_LOG_INFO, "slept on its bell %llu times while engines worked, woken by a ring %llu times; "
              "%llu rings from other nodes; %llu probes of MPI spared by a quiet bell; probes of MPI for the "
              "engines that announced a frame %llu, for any source %llu",
              (unsigned long long)c->bell_sleeps, (unsigned long long)c->bell_rings,
              (unsigned long long)c->far_rings, (unsigned long long)c->link.probes_skipped,
              (unsigned long long)c->link.probes_named, (unsigned long long)c->link.probes_any);
    ipmpi_log(IPMPI_LOG_INFO, "dead engines: %llu queries of the PMIx process table; %d engines watched by pidfd "
              "at the end", (unsigned long long)c->watch.queries, ipmpi_ctl_watch_npids(&c->watch));
    if (c->gathered)
        ipmpi_log(IPMPI_LOG_INFO, "trees: %llu gathered reply frames, %llu of them forwarded to the client whole; "
                  "%llu requests to all engines sent as a gang, %llu frames settled as runs of engines",
                  (unsigned long long)c->gathered, (unsigned long long)c->gathered_whole,
                  (unsigned long long)c->gangs, (unsigned long long)c->gang_frames);
    log_cpu_sections(c);
    ipmpi_ctl_fail_all(c);
    int died = c->any_died;
    send_exit(c, died);

    uint64_t now = ipmpi_now_ns();
    for (uint32_t i = 0; i < c->scap; i++)
        if (c->sess[i])
            ipmpi_session_close_after_flush(c->sess[i], now);
    /* Flush client output and finish the EXIT sends, at most 2 s. */
    uint64_t end = now + FLUSH_TIMEOUT_NS;
    struct pollfd *pfd = calloc(c->scap + 1, sizeof *pfd);
    uint32_t *pslot = calloc(c->scap + 1, sizeof *pslot);
    while (pfd && pslot && (c->nsess > 0 || ipmpi_mpilink_sends(&c->link) > 0) && ipmpi_now_ns() < end) {
        mpi_progress(c);
        nfds_t n = 0;
        for (uint32_t i = 0; i < c->scap; i++) {
            if (!c->sess[i])
                continue;
            pfd[n].fd = c->sess[i]->fd;
            pfd[n].events = ipmpi_session_events(c->sess[i]);
            pfd[n].revents = 0;
            pslot[n++] = i;
        }
        /* Every session is stepped, not only those with events: one that
         * has nothing left to write closes right here. */
        for (nfds_t k = 0; k < n; k++)
            if (c->sess[pslot[k]])
                session_step(c, pslot[k]);
        if ((c->nsess > 0 || ipmpi_mpilink_sends(&c->link) > 0) && ipmpi_mpilink_bulk(&c->link) == 0)
            wait_fds(pfd, 0, 1000000, waitmask);
    }
    free(pfd);
    free(pslot);
    int sends_left = ipmpi_mpilink_sends(&c->link) > 0;

    for (uint32_t i = 0; i < c->scap; i++)
        if (c->sess[i])
            drop_session(c, i);
    ipmpi_furls_remove(&c->sec);
    if (c->lfd >= 0)
        close(c->lfd);
    c->lfd = -1;
    if (died || sends_left) {
        ipmpi_log(IPMPI_LOG_INFO, "controller stopped (%s): exiting without MPI_Finalize",
                  died ? "a rank died" : "EXIT not delivered to every engine");
        _exit(0);
    }
    ipmpi_log(IPMPI_LOG_INFO, "controller stopped");
    return 0;
}

static void teardown(ipmpi_ctl_t *c)
{
    ipmpi_ctl_tasks_fini(c);
    ipmpi_ctl_results_fini(c);
    ipmpi_ctl_wake_fini(c);
    ipmpi_sched_fini(&c->sched);
    ipmpi_ctl_watch_fini(&c->watch);
    for (int i = 0; c->eng && i < c->nengines; i++)
        free(c->eng[i].props);
    free(c->eng);
    free(c->mark);
    free(c->targets);
    free(c->tree_ids);
    free(c->gather_ids);
    free(c->tree_keys);
    free(c->tree_slices);
    free(c->gang_runs);
    ipmpi_ctl_tree_all_free(c);
    free(c->sess);
    free(c->sgen);
    ipmpi_reqtab_fini(&c->reqs);
    ipmpi_mpilink_fini(&c->link);
    SSL_CTX_free(c->ssl);
    ipmpi_security_fini(&c->sec);
    ipmpi_gate_free(c->gate);
}

int ipmpi_controller_run(const ipmpi_opts_t *o, const ipmpi_job_t *job, MPI_Comm comm)
{
    ipmpi_ctl_t c;
    sigset_t block, waitmask;
    struct sigaction sa;

    /* A client that vanishes must not kill us through SIGPIPE. */
    signal(SIGPIPE, SIG_IGN);
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigemptyset(&block);
    sigaddset(&block, SIGTERM);
    sigaddset(&block, SIGINT);
    if (o->cpu_sections) {
        /* Only then: SIGUSR1's default action would end the controller. */
        sa.sa_handler = on_cpu_log_signal;
        sigaction(SIGUSR1, &sa, NULL);
        sigaddset(&block, SIGUSR1);
    }
    pthread_sigmask(SIG_BLOCK, &block, &waitmask);
    sigdelset(&waitmask, SIGTERM);
    sigdelset(&waitmask, SIGINT);
    sigdelset(&waitmask, SIGUSR1);

    ipmpi_log(IPMPI_LOG_INFO, "controller starting: %d engine(s), profile %s", job->world_size - 1, o->dir);
    int rc = setup(&c, o, job, comm);
    if (rc != 0) {
        /* IPMPI_EACCES here is a profile directory refused (logged above). */
        ipmpi_log(IPMPI_LOG_ERROR, "controller start-up failed: %s",
                  rc == IPMPI_EACCES ? "profile directory refused" : ipmpi_strerror(rc));
        abort_job(&c, 1, &waitmask);
    }
    double t_setup = ipmpi_log_clock(), t_first = 0, t_last = 0;
    rc = wait_ready(&c, &waitmask, &t_first, &t_last);
    if (rc == IPMPI_ESHUTDOWN) {
        rc = shutdown_job(&c, &waitmask);
        teardown(&c);
        return rc;
    }
    if (rc != 0)
        abort_job(&c, 1, &waitmask);
    if (ipmpi_furls_write(&c.sec, c.host, c.port) != 0)
        abort_job(&c, 1, &waitmask);
    ipmpi_log(IPMPI_LOG_INFO, "%d engines ready", c.nlive);
    /* Only now: a later job's engines join a cluster that is ready. */
    if (ipmpi_ctl_join_start(&c) != 0)
        ipmpi_log(IPMPI_LOG_ERROR, "engines cannot join this cluster later");
    /* Where the controller's start-up went (tools/startup_phases.py). */
    ipmpi_log(IPMPI_LOG_INFO, "start-up: main=%.6f mpi=%.6f pmix=%.6f node=%.6f setup=%.6f first_ready=%.6f "
              "last_ready=%.6f furl=%.6f cpu=%.3f", job->t.main, job->t.mpi, job->t.pmix, job->t.node,
              t_setup, t_first, t_last, ipmpi_log_clock(), ipmpi_log_cpu());

    run_loop(&c, &waitmask);
    rc = shutdown_job(&c, &waitmask);
    teardown(&c);
    return rc;
}
