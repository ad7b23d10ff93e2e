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
#include "proctable.h"

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
    pmix_status_t prc = ipmpi_proctable_query(w->nspace, report, &r);
    if (prc != PMIX_SUCCESS) {
        disable(w, PMIx_Error_string(prc));
        return IPMPI_EPMIX;
    }
    return 0;
}
