/*
 * Dead-rank detection by polling the PMIx process table: see watch.h.
 * Loop thread only.
 */
#include "watch.h"

#include <stdio.h>
#include <string.h>

#include <pmix.h>

#include "ipmpi/errors.h"
#include "log.h"

void ipmpi_ctl_watch_init(ipmpi_ctl_watch_t *w, int have_pmix, const char *nspace)
{
    memset(w, 0, sizeof *w);
    snprintf(w->nspace, sizeof w->nspace, "%s", nspace);
    w->enabled = have_pmix;
    if (!have_pmix)
        ipmpi_log(IPMPI_LOG_WARN, "no PMIx: dead engines cannot be detected; requests to a dead engine "
                                  "will never be answered");
}

static void disable(ipmpi_ctl_watch_t *w, const char *why)
{
    ipmpi_log(IPMPI_LOG_WARN, "PMIx process table query failed (%s): dead engines cannot be detected "
                              "from now on",
              why);
    w->enabled = 0;
}

static int is_dead(pmix_proc_state_t st)
{
    return st >= PMIX_PROC_STATE_TERMINATED;
}

static void report(const pmix_proc_info_t *pi, ipmpi_ctl_watch_cb cb, void *arg)
{
    if (pi->proc.rank == PMIX_RANK_WILDCARD || pi->proc.rank == 0 || pi->proc.rank > (pmix_rank_t)INT32_MAX)
        return;
    if (is_dead(pi->state))
        cb(arg, (int)pi->proc.rank, PMIx_Proc_state_string(pi->state));
}

int ipmpi_ctl_watch_poll(ipmpi_ctl_watch_t *w, ipmpi_ctl_watch_cb cb, void *arg)
{
    if (!w->enabled)
        return IPMPI_EPMIX;
    pmix_query_t *q;
    pmix_info_t *res = NULL;
    size_t nres = 0;
    int rc = IPMPI_EPMIX;
    pmix_status_t prc;

    PMIX_QUERY_CREATE(q, 1);
    if (!q) {
        disable(w, "out of memory");
        return IPMPI_EPMIX;
    }
    PMIX_ARGV_APPEND(prc, q[0].keys, PMIX_QUERY_PROC_TABLE);
    PMIX_INFO_CREATE(q[0].qualifiers, 1);
    q[0].nqual = 1;
    PMIX_INFO_LOAD(&q[0].qualifiers[0], PMIX_NSPACE, w->nspace, PMIX_STRING);

    prc = PMIx_Query_info(q, 1, &res, &nres);
    if (prc != PMIX_SUCCESS) {
        disable(w, PMIx_Error_string(prc));
        goto free_query;
    }
    /* Open MPI answers with a data array of PMIX_INFO each holding a
     * PMIX_PROC_INFO; the standard also allows a data array of
     * PMIX_PROC_INFO directly. Accept both. */
    for (size_t i = 0; i < nres; i++) {
        if (res[i].value.type != PMIX_DATA_ARRAY || !res[i].value.data.darray)
            continue;
        pmix_data_array_t *da = res[i].value.data.darray;
        if (da->type == PMIX_PROC_INFO) {
            pmix_proc_info_t *pa = da->array;
            for (size_t j = 0; j < da->size; j++)
                report(&pa[j], cb, arg);
        } else if (da->type == PMIX_INFO) {
            pmix_info_t *ia = da->array;
            for (size_t j = 0; j < da->size; j++)
                if (ia[j].value.type == PMIX_PROC_INFO && ia[j].value.data.pinfo)
                    report(ia[j].value.data.pinfo, cb, arg);
        }
    }
    rc = 0;
    if (res)
        PMIX_INFO_FREE(res, nres);
free_query:
    PMIX_QUERY_FREE(q, 1);
    return rc;
}
