/*
 * One query of the PMIx process table (PMIX_QUERY_PROC_TABLE), the way both
 * the controller (which engines died?) and the engines (is the controller
 * still there?) learn of dead ranks: PMIx death events never arrive under
 * Debian's Open MPI 4.1 (ENVIRONMENT.md), the table does. Costs ~0.2 ms at 9
 * ranks, ~34 ms at 257: callers poll it on a timer, never in a hot loop.
 * Thread safety: any thread, after PMIx_Init.
 */
#ifndef IPMPI_PROCTABLE_H
#define IPMPI_PROCTABLE_H

#include <pmix.h>

/* Called once per rank listed in the answer. */
typedef void (*ipmpi_proctable_cb)(void *arg, pmix_rank_t rank, pmix_proc_state_t state);

/*
 * Queries the table of namespace nspace and calls cb for every process in
 * the answer. Returns PMIX_SUCCESS, or the PMIx error of the query (cb is
 * then never called).
 */
pmix_status_t ipmpi_proctable_query(const char *nspace, ipmpi_proctable_cb cb, void *arg);

/* A process in this state has ended (exited, aborted, killed, or failed). */
static inline int ipmpi_proc_state_dead(pmix_proc_state_t st)
{
    return st >= PMIX_PROC_STATE_TERMINATED;
}

#endif
