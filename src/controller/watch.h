/*
 * Dead-rank detection for the controller. PMIx death events never arrive
 * under Debian's Open MPI 4.1 (ENVIRONMENT.md), so the controller polls the
 * PMIx process table of its own namespace: a rank whose state is
 * PMIX_PROC_STATE_TERMINATED or later (error states included) is dead.
 * Polling is adaptive: the caller says when the next query is due.
 * When PMIx is missing or the query fails, one warning is logged and
 * detection is off from then on.
 *
 * Engines on the controller's own host are also watched by pidfd
 * (ipmpi_ctl_watch_pid): their end wakes the loop at once (an epoll of
 * their pidfds is one of its file descriptors), at no cost while they
 * live. A query of the process table costs O(ranks) (PMIx copies every
 * row: about 0.5 ms at 256 ranks, 12% of the controller's CPU per request
 * to all of them when it came every 250 ms); once every live engine of
 * the job is watched by pidfd it only backs them up, every 10 s
 * (ipmpi_ctl_watch_pids_cover; controller.c).
 *
 * Thread safety: none; the controller's loop thread only.
 */
#ifndef IPMPI_CTL_WATCH_H
#define IPMPI_CTL_WATCH_H

#include <stdint.h>

typedef struct ipmpi_ctl_watch {
    int enabled;
    char nspace[256];
    uint64_t next_ns; /* clock of the next query */
    uint64_t queries; /* process-table queries made (logged at the end) */
    /* pidfds: the epoll of them (-1: none yet), one per rank or -1, and
     * how many of the job's engines are alive without one. */
    int ep;
    int *pidfd;
    long *pid;
    int nranks;
    int unwatched;
} ipmpi_ctl_watch_t;

/* Called for each dead rank found; state is PMIx's name for its state. */
typedef void (*ipmpi_ctl_watch_cb)(void *arg, int rank, const char *state);

/* have_pmix: PMIx_Init succeeded in this process; nspace: the job's
 * namespace; nranks: the job's ranks (the controller is rank 0). */
void ipmpi_ctl_watch_init(ipmpi_ctl_watch_t *w, int have_pmix, const char *nspace, int nranks);
/* Closes the pidfds and their epoll. */
void ipmpi_ctl_watch_fini(ipmpi_ctl_watch_t *w);

/* 1 when process pid is a sibling of this one (the same parent: mpirun's
 * or srun's daemon on this host), as /proc/PID/stat tells. */
int ipmpi_ctl_watch_sibling(long pid);

/*
 * Watches rank's process pid by pidfd from now on, if it is a sibling of
 * this process (the same parent: mpirun's or srun's daemon on this host,
 * as ipmpi_ctl_signal_engine checks). Returns 1 if watched, else 0 (the
 * process table still covers it).
 */
int ipmpi_ctl_watch_pid(ipmpi_ctl_watch_t *w, int rank, long pid);
/* rank is dead, whoever saw it: its pidfd (if any) is closed, and it no
 * longer counts among the unwatched. Once per rank. */
void ipmpi_ctl_watch_forget(ipmpi_ctl_watch_t *w, int rank);
/* The descriptor to poll for readability (-1: none). */
static inline int ipmpi_ctl_watch_fd(const ipmpi_ctl_watch_t *w) { return w->ep; }
/* How many engines are watched by pidfd now. */
int ipmpi_ctl_watch_npids(const ipmpi_ctl_watch_t *w);
/* 1 when every live engine of the job is watched by pidfd. */
static inline int ipmpi_ctl_watch_pids_cover(const ipmpi_ctl_watch_t *w) { return w->ep >= 0 && w->unwatched == 0; }
/* The watch's descriptor was readable: cb for every watched rank whose
 * process ended, with what is known of how ("its process was killed by
 * signal 9 (Killed)", "its process exited with status 3", or "its process
 * ended"). */
void ipmpi_ctl_watch_reap(ipmpi_ctl_watch_t *w, ipmpi_ctl_watch_cb cb, void *arg);

/*
 * Queries the process table once and calls cb for every dead rank other
 * than 0 (also ranks already reported: the caller ignores repeats).
 * Returns 0, or IPMPI_EPMIX after disabling detection (warned once).
 */
int ipmpi_ctl_watch_poll(ipmpi_ctl_watch_t *w, ipmpi_ctl_watch_cb cb, void *arg);

#endif
