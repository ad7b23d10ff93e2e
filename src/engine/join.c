/*
 * An engine job joining a running controller (join.h; main.c calls this
 * for `ipmpi --join FILE`). Collective over this job's MPI_COMM_WORLD.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "codec.h"
#include "engine.h"
#include "ipmpi/errors.h"
#include "join.h"
#include "log.h"

/* MPI_Comm_connect has no timeout: a port whose controller is gone (a
 * stale file) would hold the job for good. The watchdog ends it. */
static volatile int g_connected;
static int g_connect_timeout = 120;

static void *watchdog(void *arg)
{
    (void)arg;
    for (int i = 0; i < g_connect_timeout * 10 && !g_connected; i++)
        usleep(100000);
    if (!g_connected) {
        fprintf(stderr, "ipmpi: --join: the controller did not accept this job within %d s "
                        "(is it running, and do both mpiruns share one --ompi-server?)\n",
                g_connect_timeout);
        fflush(NULL);
        _exit(3);
    }
    return NULL;
}

static int read_port(const char *path, char *port, size_t cap)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "ipmpi: --join: cannot read %s: %s (is the controller running with "
                        "--accept-joins?)\n", path, strerror(errno));
        return IPMPI_EIO;
    }
    char *ok = fgets(port, (int)cap, f);
    fclose(f);
    if (!ok || !*port) {
        fprintf(stderr, "ipmpi: --join: %s holds no port\n", path);
        return IPMPI_EIO;
    }
    port[strcspn(port, "\r\n")] = '\0';
    return 0;
}

/* A TCP connection to addr:port within 5 s, or -1. */
static int dial(const char *addr, int port)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, addr, &a.sin_addr) != 1)
        return -1;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return -1;
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        struct pollfd p = {.fd = fd, .events = POLLOUT};
        int err = 0;
        socklen_t el = sizeof err;
        if (errno != EINPROGRESS || poll(&p, 1, 5000) != 1 ||
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el) != 0 || err != 0) {
            close(fd);
            return -1;
        }
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
    return fd;
}

int ipmpi_eng_join(const ipmpi_opts_t *o, ipmpi_job_t *job, MPI_Comm *merged)
{
    char port[MPI_MAX_PORT_NAME + 2];
    int rc = read_port(o->join, port, sizeof port);
    /* Every rank must agree before the collective connect. */
    int all_ok = 0;
    int mine = rc == 0;
    MPI_Allreduce(&mine, &all_ok, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    if (!all_ok)
        return IPMPI_EIO;
    const char *t = getenv("IPMPI_JOIN_TIMEOUT");
    if (t && atoi(t) > 0)
        g_connect_timeout = atoi(t);
    pthread_t wd;
    if (pthread_create(&wd, NULL, watchdog, NULL) == 0)
        pthread_detach(wd);

    MPI_Comm inter = MPI_COMM_NULL;
    if (MPI_Comm_connect(port, MPI_INFO_NULL, 0, MPI_COMM_WORLD, &inter) != MPI_SUCCESS) {
        fprintf(stderr, "ipmpi: --join: MPI_Comm_connect to the controller failed\n");
        return IPMPI_EMPI;
    }
    if (MPI_Intercomm_merge(inter, 1, merged) != MPI_SUCCESS) {
        fprintf(stderr, "ipmpi: --join: MPI_Intercomm_merge failed\n");
        return IPMPI_EMPI;
    }
    MPI_Comm_set_errhandler(*merged, MPI_ERRORS_RETURN);
    ipmpi_join_info_t info;
    memset(&info, 0, sizeof info);
    if (MPI_Bcast(&info, (int)sizeof info, MPI_BYTE, 0, *merged) != MPI_SUCCESS) {
        fprintf(stderr, "ipmpi: --join: no answer from the controller\n");
        return IPMPI_EMPI;
    }
    g_connected = 1;
    info.why[sizeof info.why - 1] = '\0';
    if (info.first_id < 0) {
        if (job->world_rank == 0)
            fprintf(stderr, "ipmpi: --join: the controller refused this job: %s\n", info.why);
        MPI_Comm_free(merged);
        MPI_Comm_free(&inter);
        return IPMPI_EACCES;
    }
    job->joined = 1;
    job->join_first = info.first_id;
    job->join_inter = inter;
    int id = info.first_id + job->world_rank;
    job->live_fd = -1;
    for (int i = 0; i < IPMPI_JOIN_ADDRS && info.addrs[i][0] && job->live_fd < 0; i++) {
        info.addrs[i][sizeof info.addrs[i] - 1] = '\0';
        job->live_fd = dial(info.addrs[i], info.live_port);
    }
    if (job->live_fd < 0) {
        fprintf(stderr, "ipmpi: engine %d: cannot reach the controller's liveness port %d at %s%s%s\n", id,
                info.live_port, info.addrs[0], info.addrs[1][0] ? " or " : "", info.addrs[1]);
        return IPMPI_EIO;
    }
    uint8_t hello[IPMPI_JOIN_HELLO];
    ipmpi_put_u64(hello, info.key);
    ipmpi_put_u32(hello + 8, (uint32_t)id);
    if (send(job->live_fd, hello, sizeof hello, MSG_NOSIGNAL) != (ssize_t)sizeof hello) {
        fprintf(stderr, "ipmpi: engine %d: cannot greet the controller: %s\n", id, strerror(errno));
        return IPMPI_EIO;
    }
    return 0;
}

int ipmpi_eng_join_gone(int fd)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    if (poll(&p, 1, 0) != 1)
        return 0;
    char b[16];
    ssize_t r = recv(fd, b, sizeof b, MSG_DONTWAIT);
    return r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR);
}
