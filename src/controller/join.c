/*
 * Engines that join a running controller (ctl.h, join.h).
 *
 * MPI_Comm_accept blocks until a job connects, so a thread of its own
 * (MPI_THREAD_MULTIPLE on the controller, main.c) accepts, merges the
 * intercommunicator, reserves the next engine ids and broadcasts join.h's
 * record; the loop learns of it through an eventfd and adds the engines:
 * slots (allocated up front, --max-engines, so nothing moves), the
 * scheduler's entries and the link's communicator. From then on they are
 * engines like the others: READY, requests, the UDP wake-ups of engines
 * the doorbells do not reach. Their deaths show as the end of their TCP
 * liveness connection.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/rand.h>

#include "ctl.h"
#include "ipmpi/errors.h"
#include "join.h"
#include "log.h"
#include "backoff.h"
#include "codec.h"
#include "peermsg.h"

/* Liveness connections waiting for their first bytes, and how long. */
#define HELLO_MAX 64
#define HELLO_NS 2000000000ull

typedef struct pending_join {
    struct pending_join *next;
    MPI_Comm inter, comm;
    int first, n;
} pending_join_t;

struct ipmpi_join {
    char port[MPI_MAX_PORT_NAME];
    char path[1024];
    int evfd;              /* the thread tells the loop of a join */
    int lfd;               /* liveness connections come here */
    uint64_t key;
    ipmpi_join_info_t info; /* what joining jobs receive (first_id filled per job) */
    pthread_mutex_t mu;    /* guards next_id, pending, closed */
    int next_id;
    int cap;
    pending_join_t *pending;
    int closed;
    /* Liveness connections that have not sent key and id yet (loop only). */
    struct {
        int fd;
        uint64_t deadline;
    } hello[HELLO_MAX];
    uint32_t nhello;
};

/* The controller's IPv4 addresses, other than loopback first. */
static void own_addrs(ipmpi_join_info_t *in)
{
    struct ifaddrs *ifs = NULL, *i;
    int n = 0;
    if (getifaddrs(&ifs) == 0) {
        for (int loop = 0; loop < 2; loop++)
            for (i = ifs; i && n < IPMPI_JOIN_ADDRS - 1; i = i->ifa_next) {
                if (!i->ifa_addr || i->ifa_addr->sa_family != AF_INET)
                    continue;
                const struct sockaddr_in *a = (const struct sockaddr_in *)i->ifa_addr;
                int is_lo = (ntohl(a->sin_addr.s_addr) >> 24) == 127;
                if (is_lo != loop)
                    continue;
                inet_ntop(AF_INET, &a->sin_addr, in->addrs[n], sizeof in->addrs[n]);
                n++;
            }
        freeifaddrs(ifs);
    }
    if (n == 0)
        snprintf(in->addrs[n++], sizeof in->addrs[0], "127.0.0.1");
}

static void *accept_thread(void *arg)
{
    ipmpi_ctl_t *c = arg;
    struct ipmpi_join *j = c->join;
    for (;;) {
        MPI_Comm inter = MPI_COMM_NULL, comm = MPI_COMM_NULL;
        if (MPI_Comm_accept(j->port, MPI_INFO_NULL, 0, MPI_COMM_SELF, &inter) != MPI_SUCCESS) {
            ipmpi_log(IPMPI_LOG_ERROR, "MPI_Comm_accept failed: no more engines can join");
            return NULL;
        }
        MPI_Comm_set_errhandler(inter, MPI_ERRORS_RETURN);
        if (MPI_Intercomm_merge(inter, 0, &comm) != MPI_SUCCESS) {
            ipmpi_log(IPMPI_LOG_ERROR, "a joining job: MPI_Intercomm_merge failed");
            continue;
        }
        MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
        int size = 0;
        MPI_Comm_size(comm, &size);
        int n = size - 1;
        ipmpi_join_info_t info = j->info;
        pthread_mutex_lock(&j->mu);
        int closed = j->closed;
        if (!closed && n > 0 && n <= j->cap - j->next_id) {
            info.first_id = j->next_id;
            j->next_id += n;
        } else {
            info.first_id = -1;
            snprintf(info.why, sizeof info.why,
                     closed ? "the controller is shutting down"
                            : "no room for %d more engines (%d of --max-engines %d taken)",
                     n, j->next_id, j->cap);
        }
        pthread_mutex_unlock(&j->mu);
        if (MPI_Bcast(&info, (int)sizeof info, MPI_BYTE, 0, comm) != MPI_SUCCESS || info.first_id < 0) {
            if (info.first_id >= 0)
                ipmpi_log(IPMPI_LOG_ERROR, "a joining job of %d engines: MPI_Bcast failed", n);
            else
                ipmpi_log(IPMPI_LOG_WARN, "a job of %d engines was refused: %s", n, info.why);
            MPI_Comm_free(&comm);
            MPI_Comm_free(&inter);
            continue; /* their ids, if reserved, stay unused */
        }
        pending_join_t *pj = calloc(1, sizeof *pj);
        if (!pj) {
            ipmpi_log(IPMPI_LOG_ERROR, "out of memory: engines %d.. cannot join", info.first_id);
            continue;
        }
        *pj = (pending_join_t){NULL, inter, comm, info.first_id, n};
        pthread_mutex_lock(&j->mu);
        pj->next = j->pending;
        j->pending = pj;
        pthread_mutex_unlock(&j->mu);
        uint64_t one = 1;
        if (write(j->evfd, &one, sizeof one) < 0)
            ipmpi_log(IPMPI_LOG_WARN, "cannot wake the loop for a join: %s", strerror(errno));
    }
}

static int listen_live(struct ipmpi_join *j)
{
    j->lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (j->lfd < 0)
        return IPMPI_EIO;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_ANY)};
    socklen_t al = sizeof a;
    if (bind(j->lfd, (struct sockaddr *)&a, sizeof a) != 0 || listen(j->lfd, 128) != 0 ||
        getsockname(j->lfd, (struct sockaddr *)&a, &al) != 0)
        return IPMPI_EIO;
    j->info.live_port = ntohs(a.sin_port);
    return 0;
}

int ipmpi_ctl_join_start(ipmpi_ctl_t *c)
{
    if (!c->o->accept_joins[0])
        return 0;
    int provided = 0;
    MPI_Query_thread(&provided);
    if (provided < MPI_THREAD_MULTIPLE) {
        ipmpi_log(IPMPI_LOG_WARN, "MPI gave no MPI_THREAD_MULTIPLE: engines cannot join later");
        return 0;
    }
    struct ipmpi_join *j = calloc(1, sizeof *j);
    if (!j)
        return IPMPI_ENOMEM;
    j->evfd = j->lfd = -1;
    pthread_mutex_init(&j->mu, NULL);
    j->next_id = c->nengines;
    j->cap = c->cap_engines;
    c->join = j;
    if (RAND_bytes((unsigned char *)&j->key, sizeof j->key) != 1)
        return IPMPI_ETLS;
    j->info.key = j->key;
    own_addrs(&j->info);
    j->evfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (j->evfd < 0 || listen_live(j) != 0) {
        ipmpi_log(IPMPI_LOG_ERROR, "engines cannot join: %s", strerror(errno));
        return IPMPI_EIO;
    }
    if (MPI_Open_port(MPI_INFO_NULL, j->port) != MPI_SUCCESS) {
        ipmpi_log(IPMPI_LOG_ERROR, "MPI_Open_port failed: engines cannot join (is mpirun using --ompi-server?)");
        return IPMPI_EMPI;
    }
    /* Written whole, then renamed: a reader never sees half a port. */
    snprintf(j->path, sizeof j->path, "%s", c->o->accept_joins);
    char tmp[1100];
    snprintf(tmp, sizeof tmp, "%s.tmp", j->path);
    FILE *f = fopen(tmp, "w");
    if (!f || fprintf(f, "%s\n", j->port) < 0 || fclose(f) != 0 || rename(tmp, j->path) != 0) {
        ipmpi_log(IPMPI_LOG_ERROR, "cannot write the join port to %s: %s", j->path, strerror(errno));
        return IPMPI_EIO;
    }
    pthread_t t;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int rc = pthread_create(&t, &attr, accept_thread, c);
    pthread_attr_destroy(&attr);
    if (rc != 0) {
        ipmpi_log(IPMPI_LOG_ERROR, "cannot start the join thread: %s", strerror(rc));
        return IPMPI_ENOMEM;
    }
    ipmpi_log(IPMPI_LOG_INFO, "engines may join: port in %s, ids from %d, room for %d more", j->path, j->next_id,
              j->cap - j->next_id);
    return 0;
}

void ipmpi_ctl_join_stop(ipmpi_ctl_t *c)
{
    struct ipmpi_join *j = c->join;
    if (!j)
        return;
    pthread_mutex_lock(&j->mu);
    j->closed = 1;
    pthread_mutex_unlock(&j->mu);
    if (j->path[0])
        unlink(j->path);
    /* The thread may sit in MPI_Comm_accept for good: it is never joined
     * or freed, and neither is what it uses (the process ends soon). */
}

/* The loop takes a joined job's engines in. */
static void add_job(ipmpi_ctl_t *c, pending_join_t *pj)
{
    if (pj->first != c->nengines) {
        /* Ids are handed out in order and every reservation arrives here,
         * except when a broadcast failed: those ids stay unused. */
        for (int i = c->nengines; i < pj->first; i++) {
            ipmpi_engine_slot_t *e = &c->eng[i];
            e->id = i;
            e->rank = i + 1;
            e->wake_fd = e->live_fd = -1;
            e->dead = 1;
            snprintf(e->why, sizeof e->why, "its job never joined");
        }
        ipmpi_sched_add_engines(&c->sched, pj->first - c->nengines);
        c->nengines = pj->first;
    }
    if (ipmpi_sched_add_engines(&c->sched, pj->n) != 0 ||
        ipmpi_mpilink_add_comm(&c->link, pj->comm, pj->first + 1, pj->n) != 0) {
        ipmpi_log(IPMPI_LOG_ERROR, "out of memory: engines %d..%d cannot join", pj->first, pj->first + pj->n - 1);
        return;
    }
    for (int i = 0; i < pj->n; i++) {
        ipmpi_engine_slot_t *e = &c->eng[pj->first + i];
        memset(e, 0, sizeof *e);
        e->id = pj->first + i;
        e->rank = e->id + 1;
        e->wake_fd = e->live_fd = -1;
        e->join_first = pj->first;
        c->nmute_far++;
    }
    c->nengines += pj->n;
    c->nlive += pj->n;
    ipmpi_log(IPMPI_LOG_INFO, "a job of %d engines joined: ids %d..%d", pj->n, pj->first, pj->first + pj->n - 1);
}

uint32_t ipmpi_ctl_join_nfds(const ipmpi_ctl_t *c)
{
    if (!c->join)
        return 0;
    return 2 + HELLO_MAX + (uint32_t)(c->cap_engines > 0 ? c->cap_engines : 0);
}

uint32_t ipmpi_ctl_join_fds(ipmpi_ctl_t *c, struct pollfd *pfd, uint32_t cap)
{
    struct ipmpi_join *j = c->join;
    uint32_t n = 0;
    if (!j || cap < 2)
        return 0;
    pfd[n++] = (struct pollfd){.fd = j->evfd, .events = POLLIN};
    pfd[n++] = (struct pollfd){.fd = j->lfd, .events = POLLIN};
    for (uint32_t i = 0; i < j->nhello && n < cap; i++)
        pfd[n++] = (struct pollfd){.fd = j->hello[i].fd, .events = POLLIN};
    /* Only joined engines have liveness connections: the job's own
     * engines are not scanned on every turn of the loop. */
    for (int i = c->job->world_size - 1; i < c->nengines && n < cap; i++)
        if (c->eng[i].live_fd >= 0)
            pfd[n++] = (struct pollfd){.fd = c->eng[i].live_fd, .events = POLLIN};
    return n;
}

/* New liveness connections wait (without blocking the loop) for key and
 * id, at most HELLO_NS; the oldest gives way when HELLO_MAX wait. */
static void take_live(ipmpi_ctl_t *c, uint64_t now)
{
    struct ipmpi_join *j = c->join;
    for (;;) {
        int fd = accept4(j->lfd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (fd < 0)
            return;
        if (j->nhello == HELLO_MAX) {
            close(j->hello[0].fd);
            memmove(&j->hello[0], &j->hello[1], (HELLO_MAX - 1) * sizeof j->hello[0]);
            j->nhello--;
        }
        j->hello[j->nhello].fd = fd;
        j->hello[j->nhello].deadline = now + HELLO_NS;
        j->nhello++;
    }
}

/* Key and id arrived on fd (1: taken or refused, fd is no longer ours),
 * or not yet (0). */
static int greet_live(ipmpi_ctl_t *c, int fd)
{
    struct ipmpi_join *j = c->join;
    uint8_t b[IPMPI_JOIN_HELLO];
    ssize_t got = recv(fd, b, sizeof b, MSG_PEEK | MSG_DONTWAIT);
    if (got < 0 && (errno == EAGAIN || errno == EINTR))
        return 0;
    if (got > 0 && got < (ssize_t)sizeof b)
        return 0;
    int32_t id = -1;
    uint64_t key = 0;
    if (got > 0)
        (void)ipmpi_join_hello_parse(b, (size_t)got, &key, &id);
    ipmpi_engine_slot_t *e = id >= c->job->world_size - 1 && id < c->nengines ? &c->eng[id] : NULL;
    if (!e || CRYPTO_memcmp(&key, &j->key, sizeof key) != 0 || e->live_fd >= 0 || e->dead) {
        ipmpi_log(IPMPI_LOG_WARN, "a liveness connection without a valid key and engine id: closed");
        close(fd);
        return 1;
    }
    if (recv(fd, b, sizeof b, MSG_DONTWAIT) != (ssize_t)sizeof b) {
        close(fd);
        return 1;
    }
    e->live_fd = fd;
    return 1;
}

void ipmpi_ctl_join_events(ipmpi_ctl_t *c, const struct pollfd *pfd, uint32_t n)
{
    struct ipmpi_join *j = c->join;
    if (!j || n < 2)
        return;
    if (pfd[0].revents & POLLIN) {
        uint64_t v;
        if (read(j->evfd, &v, sizeof v) < 0 && errno != EAGAIN)
            ipmpi_log(IPMPI_LOG_WARN, "join eventfd: %s", strerror(errno));
        pthread_mutex_lock(&j->mu);
        pending_join_t *list = j->pending;
        j->pending = NULL;
        pthread_mutex_unlock(&j->mu);
        /* Oldest first: the list is newest first. */
        pending_join_t *rev = NULL;
        while (list) {
            pending_join_t *next = list->next;
            list->next = rev;
            rev = list;
            list = next;
        }
        while (rev) {
            pending_join_t *next = rev->next;
            add_job(c, rev);
            free(rev);
            rev = next;
        }
    }
    uint64_t now = ipmpi_now_ns();
    /* Greetings first (pfd[2 .. 2 + nhello) are theirs, in order). */
    uint32_t nh = j->nhello < n - 2 ? j->nhello : n - 2, keep = 0;
    for (uint32_t i = 0; i < j->nhello; i++) {
        int done = 0;
        if (i < nh && pfd[2 + i].revents)
            done = greet_live(c, j->hello[i].fd);
        if (!done && now >= j->hello[i].deadline) {
            close(j->hello[i].fd);
            done = 1;
        }
        if (!done)
            j->hello[keep++] = j->hello[i];
    }
    j->nhello = keep;
    if (pfd[1].revents & POLLIN)
        take_live(c, now);
    for (uint32_t k = 2 + nh; k < n; k++) {
        if (!pfd[k].revents)
            continue;
        char b[64];
        ssize_t r = recv(pfd[k].fd, b, sizeof b, MSG_DONTWAIT);
        if (r > 0 || (r < 0 && (errno == EAGAIN || errno == EINTR)))
            continue;
        for (int i = 0; i < c->nengines; i++) {
            ipmpi_engine_slot_t *e = &c->eng[i];
            if (e->live_fd != pfd[k].fd)
                continue;
            close(e->live_fd);
            e->live_fd = -1;
            ipmpi_ctl_engine_died(c, e, "its process is gone (liveness connection closed)");
            break;
        }
    }
}

void ipmpi_ctl_join_engine_gone(ipmpi_ctl_t *c, const ipmpi_engine_slot_t *e)
{
    if (e->join_first <= 0)
        return;
    /* Once every engine of its job is gone, its communicator is not
     * probed any more on each turn of the loop. */
    int base = e->join_first + 1;
    for (uint32_t k = 0; k < c->link.nextra; k++) {
        const ipmpi_mpilink_comm_t *x = &c->link.extra[k];
        if (x->base != base || !x->open)
            continue;
        for (int i = 0; i < x->n; i++)
            if (!c->eng[e->join_first + i].dead)
                return;
        ipmpi_mpilink_close_comm(&c->link, base);
        ipmpi_log(IPMPI_LOG_INFO, "every engine of the job that joined as %d..%d is gone", e->join_first,
                  e->join_first + x->n - 1);
        return;
    }
}
