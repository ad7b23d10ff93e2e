/*
 * Dead-rank detection by polling the PMIx process table: see watch.h.
 * Loop thread only.
 */
#include "watch.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/pidfd.h>
#include <unistd.h>

#include <pmix.h>

#include "ipmpi/errors.h"
#include "log.h"
#include "proctable.h"

void ipmpi_ctl_watch_init(ipmpi_ctl_watch_t *w, int have_pmix, const char *nspace, int nranks)
{
    memset(w, 0, sizeof *w);
    snprintf(w->nspace, sizeof w->nspace, "%s", nspace);
    w->enabled = have_pmix;
    w->ep = -1;
    w->nranks = nranks > 0 ? nranks : 0;
    w->unwatched = nranks > 1 ? nranks - 1 : 0;
    if (!have_pmix)
        ipmpi_log(IPMPI_LOG_WARN, "no PMIx: dead engines cannot be detected; requests to a dead engine "
                                  "will never be answered");
}

void ipmpi_ctl_watch_fini(ipmpi_ctl_watch_t *w)
{
    for (int r = 0; w->pidfd && r < w->nranks; r++)
        if (w->pidfd[r] >= 0)
            close(w->pidfd[r]);
    free(w->pidfd);
    free(w->pid);
    w->pidfd = NULL;
    w->pid = NULL;
    if (w->ep >= 0)
        close(w->ep);
    w->ep = -1;
}

/* The fields of /proc/PID/stat after "(comm)" (comm may hold spaces and
 * parentheses): field k of proc(5) is out[k - 3]. Returns how many were
 * read, 0 if the process is gone. */
static int stat_fields(long pid, long long *out, int max)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%ld/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return 0;
    size_t got = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[got] = '\0';
    char *p = strrchr(buf, ')');
    if (!p || p[1] != ' ')
        return 0;
    p += 2;
    int n = 0;
    if (n < max) {
        out[n++] = (unsigned char)*p; /* the state letter */
        p = strchr(p, ' ');
    }
    while (p && n < max) {
        char *end;
        out[n++] = strtoll(p, &end, 10);
        p = end != p && *end == ' ' ? end : NULL;
    }
    return n;
}

int ipmpi_ctl_watch_sibling(long pid)
{
    long long f[2];
    return stat_fields(pid, f, 2) == 2 && f[1] == (long long)getppid();
}

int ipmpi_ctl_watch_pid(ipmpi_ctl_watch_t *w, int rank, long pid)
{
    if (!w->enabled || rank < 1 || rank >= w->nranks || pid <= 1)
        return 0;
    if (!w->pidfd) {
        w->pidfd = malloc((size_t)w->nranks * sizeof *w->pidfd);
        w->pid = calloc((size_t)w->nranks, sizeof *w->pid);
        if (!w->pidfd || !w->pid) {
            free(w->pidfd);
            free(w->pid);
            w->pidfd = NULL;
            w->pid = NULL;
            return 0;
        }
        for (int r = 0; r < w->nranks; r++)
            w->pidfd[r] = -1;
    }
    if (w->pidfd[rank] >= 0)
        return 1;
    if (w->ep < 0 && (w->ep = epoll_create1(EPOLL_CLOEXEC)) < 0)
        return 0;
    int fd = pidfd_open((pid_t)pid, 0);
    if (fd < 0)
        return 0;
    /* Opened first, checked second: the process checked is the one the
     * pidfd holds (had it ended in between, the pidfd says so). */
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)rank};
    if (!ipmpi_ctl_watch_sibling(pid) || epoll_ctl(w->ep, EPOLL_CTL_ADD, fd, &ev) != 0) {
        close(fd);
        return 0;
    }
    w->pidfd[rank] = fd;
    w->pid[rank] = pid;
    w->unwatched--;
    return 1;
}

int ipmpi_ctl_watch_npids(const ipmpi_ctl_watch_t *w)
{
    int n = 0;
    for (int r = 0; w->pidfd && r < w->nranks; r++)
        n += w->pidfd[r] >= 0;
    return n;
}

void ipmpi_ctl_watch_forget(ipmpi_ctl_watch_t *w, int rank)
{
    if (rank < 1 || rank >= w->nranks)
        return;
    if (w->pidfd && w->pidfd[rank] >= 0) {
        close(w->pidfd[rank]); /* leaves the epoll with it */
        w->pidfd[rank] = -1;
    } else if (w->unwatched > 0) {
        w->unwatched--;
    }
}

void ipmpi_ctl_watch_reap(ipmpi_ctl_watch_t *w, ipmpi_ctl_watch_cb cb, void *arg)
{
    struct epoll_event ev[64];
    int n = w->ep >= 0 ? epoll_wait(w->ep, ev, 64, 0) : 0;
    for (int i = 0; i < n; i++) {
        int rank = (int)ev[i].data.u32;
        if (rank < 1 || rank >= w->nranks || !w->pidfd || w->pidfd[rank] < 0)
            continue;
        /* How it ended, while its parent has not reaped it yet (a zombie
         * keeps its exit code: proc(5) field 52); it may have. */
        char why[128] = "its process ended";
        long long f[50];
        if (stat_fields(w->pid[rank], f, 50) == 50 && f[0] == 'Z' && f[1] == (long long)getppid()) {
            int st = (int)f[49];
            if ((st & 0x7f) != 0 && (st & 0x7f) != 0x7f)
                snprintf(why, sizeof why, "its process was killed by signal %d (%s)", st & 0x7f,
                         strsignal(st & 0x7f));
            else if ((st & 0x7f) == 0)
                snprintf(why, sizeof why, "its process exited with status %d", (st >> 8) & 0xff);
        }
        ipmpi_log(IPMPI_LOG_DEBUG, "rank %d: %s (its pidfd)", rank, why);
        /* cb marks it dead (ipmpi_ctl_watch_forget closes the pidfd); if
         * it does not, the pidfd goes here, once. */
        cb(arg, rank, why);
        if (w->pidfd[rank] >= 0) {
            close(w->pidfd[rank]);
            w->pidfd[rank] = -1;
        }
    }
}

static void disable(ipmpi_ctl_watch_t *w, const char *why)
{
    ipmpi_log(IPMPI_LOG_WARN, "PMIx process table query failed (%s): dead engines cannot be detected "
                              "from now on",
              why);
    w->enabled = 0;
}

/* Adapts one row of the table to the watch's callback: engines only. */
struct report_ctx {
    ipmpi_ctl_watch_cb cb;
    void *arg;
};

static void report(void *arg, pmix_rank_t rank, pmix_proc_state_t st)
{
    struct report_ctx *r = arg;
    if (rank == PMIX_RANK_WILDCARD || rank == 0 || rank > (pmix_rank_t)INT32_MAX)
        return;
    if (ipmpi_proc_state_dead(st))
        r->cb(r->arg, (int)rank, PMIx_Proc_state_string(st));
}

int ipmpi_ctl_watch_poll(ipmpi_ctl_watch_t *w, ipmpi_ctl_watch_cb cb, void *arg)
{
    if (!w->enabled)
        return IPMPI_EPMIX;
    struct report_ctx r = {cb, arg};
    w->queries++;
    pmix_status_t prc = ipmpi_proctable_query(w->nspace, report, &r);
    if (prc != PMIX_SUCCESS) {
        disable(w, PMIx_Error_string(prc));
        return IPMPI_EPMIX;
    }
    return 0;
}
