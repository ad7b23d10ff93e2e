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

void ipmpi_eng_watch_init(ipmpi_eng_watch_t *w, const ipmpi_job_t *job, uint64_t now)
{
    memset(w, 0, sizeof *w);
    w->job = job;
    w->ppid = getppid();
    w->last_check = now;
}

/* Finds rank 0 anywhere in a query answer: Open MPI returns an array of
 * PMIX_INFO each holding a PMIX_PROC_INFO, the standard says an array of
 * pmix_proc_info_t; accept both. Returns 1 and *state when found. */
static int find_rank0(const pmix_value_t *v, int depth, pmix_proc_state_t *state)
{
    if (depth > 4 || !v)
        return 0;
    if (v->type == PMIX_PROC_INFO && v->data.pinfo) {
        if (v->data.pinfo->proc.rank != 0)
            return 0;
        *state = v->data.pinfo->state;
        return 1;
    }
    if (v->type != PMIX_DATA_ARRAY || !v->data.darray || !v->data.darray->array)
        return 0;
    const pmix_data_array_t *a = v->data.darray;
    for (size_t i = 0; i < a->size; i++) {
        if (a->type == PMIX_PROC_INFO) {
            const pmix_proc_info_t *pi = (const pmix_proc_info_t *)a->array + i;
            if (pi->proc.rank == 0) {
                *state = pi->state;
                return 1;
            }
        } else if (a->type == PMIX_INFO) {
            if (find_rank0(&((const pmix_info_t *)a->array)[i].value, depth + 1, state))
                return 1;
        } else if (a->type == PMIX_VALUE) {
            if (find_rank0((const pmix_value_t *)a->array + i, depth + 1, state))
                return 1;
        } else {
            return 0;
        }
    }
    return 0;
}

/* 1: rank 0 terminated or the PMIx server vanished; 0: alive or unknown. */
static int pmix_says_gone(ipmpi_eng_watch_t *w)
{
    pmix_query_t *q = NULL;
    pmix_info_t *results = NULL;
    size_t nres = 0;
    pmix_status_t prc;
    int gone = 0;

    PMIX_QUERY_CREATE(q, 1);
    if (!q)
        return 0;
    PMIX_ARGV_APPEND(prc, q->keys, PMIX_QUERY_PROC_TABLE);
    if (prc != PMIX_SUCCESS)
        goto free_query;
    PMIX_QUERY_QUALIFIERS_CREATE(q, 1);
    if (!q->qualifiers)
        goto free_query;
    PMIX_INFO_LOAD(&q->qualifiers[0], PMIX_NSPACE, w->job->jobid, PMIX_STRING);

    prc = PMIx_Query_info(q, 1, &results, &nres);
    if (prc != PMIX_SUCCESS) {
        if (w->pmix_state == 1 && (prc == PMIX_ERR_UNREACH || prc == PMIX_ERR_LOST_CONNECTION)) {
            ipmpi_log(IPMPI_LOG_ERROR, "the PMIx server stopped answering (%s): the job is gone",
                      PMIx_Error_string(prc));
            gone = 1;
        } else if (w->pmix_state == 0) {
            ipmpi_log(IPMPI_LOG_INFO, "PMIx process table not available here (%s); "
                      "relying on the launcher to end this engine", PMIx_Error_string(prc));
            w->pmix_state = -1;
        }
        goto free_query;
    }
    w->pmix_state = 1;
    for (size_t i = 0; i < nres; i++) {
        pmix_proc_state_t st = PMIX_PROC_STATE_UNDEF;
        if (find_rank0(&results[i].value, 0, &st)) {
            if (st > PMIX_PROC_STATE_UNTERMINATED) {
                ipmpi_log(IPMPI_LOG_ERROR, "the controller (rank 0) is gone: %s",
                          PMIx_Proc_state_string(st));
                gone = 1;
            }
            break;
        }
    }
    if (results)
        PMIX_INFO_FREE(results, nres);

free_query:
    PMIX_QUERY_FREE(q, 1);
    return gone;
}

int ipmpi_eng_watch_controller_gone(ipmpi_eng_watch_t *w, uint64_t now)
{
    w->last_check = now;
    if (getppid() != w->ppid) {
        ipmpi_log(IPMPI_LOG_ERROR, "the launcher (pid %d) is gone", (int)w->ppid);
        return 1;
    }
    if (!w->job->have_pmix || w->pmix_state < 0)
        return 0;
    return pmix_says_gone(w);
}
