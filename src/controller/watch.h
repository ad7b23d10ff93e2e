/*
 * Dead-rank detection for the controller. PMIx death events never arrive
 * under Debian's Open MPI 4.1 (ENVIRONMENT.md), so the controller polls the
 * PMIx process table of its own namespace: a rank whose state is
 * PMIX_PROC_STATE_TERMINATED or later (error states included) is dead.
 * Polling is adaptive: the caller says when the next query is due.
 * When PMIx is missing or the query fails, one warning is logged and
 * detection is off from then on.
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
} ipmpi_ctl_watch_t;

/* Called for each dead rank found; state is PMIx's name for its state. */
typedef void (*ipmpi_ctl_watch_cb)(void *arg, int rank, const char *state);

/* have_pmix: PMIx_Init succeeded in this process; nspace: the job's namespace. */
void ipmpi_ctl_watch_init(ipmpi_ctl_watch_t *w, int have_pmix, const char *nspace);

/*
 * Queries the process table once and calls cb for every dead rank other
 * than 0 (also ranks already reported: the caller ignores repeats).
 * Returns 0, or IPMPI_EPMIX after disabling detection (warned once).
 */
int ipmpi_ctl_watch_poll(ipmpi_ctl_watch_t *w, ipmpi_ctl_watch_cb cb, void *arg);

#endif
