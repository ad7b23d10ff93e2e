/*
 * Engines must never outlive their controller (see engine.h,
 * ipmpi_eng_watch_controller_gone). PMIx death events do not arrive under
 * Debian's Open MPI 4.1, so an idle engine polls the process table
 * (PMIx_Query_info, PMIX_QUERY_PROC_TABLE, ~1 ms at 65 ranks) every ~2 s
 * for rank 0's state (ENVIRONMENT.md). Under srun the query answers
 * UNREACHABLE from the start; then only the parent check is left, and
 * Slurm kills the step anyway when a task dies. Main thread only.
 */
#include <string.h>
#include <unistd.h>

#include <pmix.h>

#include "engine.h"
#include "log.h"
#include "proctable.h"

void ipmpi_eng_watch_init(ipmpi_eng_watch_t *w, const ipmpi_job_t *job, uint64_t now)
{
    memset(w, 0, sizeof *w);
    w->job = job;
    w->ppid = getppid();
    w->last_check = now;
}

/* Picks rank 0's state out of the table. */
static void find_rank0(void *arg, pmix_rank_t rank, pmix_proc_state_t st)
{
    if (rank == 0)
        *(pmix_proc_state_t *)arg = st;
}

/* 1: rank 0 terminated or the PMIx server vanished; 0: alive or unknown. */
static int pmix_says_gone(ipmpi_eng_watch_t *w)
{
    pmix_proc_state_t st = PMIX_PROC_STATE_UNDEF;
    pmix_status_t prc = ipmpi_proctable_query(w->job->jobid, find_rank0, &st);
    if (prc != PMIX_SUCCESS) {
        if (w->pmix_state == 1 && (prc == PMIX_ERR_UNREACH || prc == PMIX_ERR_LOST_CONNECTION)) {
            ipmpi_log(IPMPI_LOG_ERROR, "the PMIx server stopped answering (%s): the job is gone",
                      PMIx_Error_string(prc));
            return 1;
        }
        if (w->pmix_state == 0) {
            ipmpi_log(IPMPI_LOG_INFO, "PMIx process table not available here (%s); "
                      "relying on the launcher to end this engine", PMIx_Error_string(prc));
            w->pmix_state = -1;
        }
        return 0;
    }
    w->pmix_state = 1;
    if (ipmpi_proc_state_dead(st)) {
        ipmpi_log(IPMPI_LOG_ERROR, "the controller (rank 0) is gone: %s", PMIx_Proc_state_string(st));
        return 1;
    }
    return 0;
}

int ipmpi_eng_watch_controller_gone(ipmpi_eng_watch_t *w, uint64_t now)
{
    w->last_check = now;
    if (getppid() != w->ppid) {
        ipmpi_log(IPMPI_LOG_ERROR, "the launcher (pid %d) is gone", (int)w->ppid);
        return 1;
    }
    if (w->job->joined) {
        /* Rank 0 of this job is an engine: the controller's liveness
         * connection tells instead (join.h). */
        if (ipmpi_eng_join_gone(w->job->live_fd)) {
            ipmpi_log(IPMPI_LOG_ERROR, "the controller is gone (its liveness connection closed)");
            return 1;
        }
        return 0;
    }
    if (!w->job->have_pmix || w->pmix_state < 0)
        return 0;
    return pmix_says_gone(w);
}
