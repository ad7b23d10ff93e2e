/* PMIx process-table query shared by controller and engines: see proctable.h. */
#include "proctable.h"

/* Walks one value of the answer. Open MPI returns a data array of
 * PMIX_INFO each holding a PMIX_PROC_INFO; the standard allows a data
 * array of pmix_proc_info_t (or of values); accept all, nested at most a
 * few levels deep. */
static void walk(const pmix_value_t *v, int depth, ipmpi_proctable_cb cb, void *arg)
{
    if (depth > 4 || !v)
        return;
    if (v->type == PMIX_PROC_INFO) {
        if (v->data.pinfo)
            cb(arg, v->data.pinfo->proc.rank, v->data.pinfo->state);
        return;
    }
    if (v->type != PMIX_DATA_ARRAY || !v->data.darray || !v->data.darray->array)
        return;
    const pmix_data_array_t *a = v->data.darray;
    for (size_t i = 0; i < a->size; i++) {
        if (a->type == PMIX_PROC_INFO) {
            const pmix_proc_info_t *pi = (const pmix_proc_info_t *)a->array + i;
            cb(arg, pi->proc.rank, pi->state);
        } else if (a->type == PMIX_INFO) {
            walk(&((const pmix_info_t *)a->array)[i].value, depth + 1, cb, arg);
        } else if (a->type == PMIX_VALUE) {
            walk((const pmix_value_t *)a->array + i, depth + 1, cb, arg);
        } else {
            return;
        }
    }
}

pmix_status_t ipmpi_proctable_query(const char *nspace, ipmpi_proctable_cb cb, void *arg)
{
    pmix_query_t *q = NULL;
    pmix_info_t *res = NULL;
    size_t nres = 0;
    pmix_status_t prc = PMIX_ERR_NOMEM;

    PMIX_QUERY_CREATE(q, 1);
    if (!q)
        return PMIX_ERR_NOMEM;
    PMIX_ARGV_APPEND(prc, q->keys, PMIX_QUERY_PROC_TABLE);
    if (prc != PMIX_SUCCESS)
        goto free_query;
    PMIX_QUERY_QUALIFIERS_CREATE(q, 1);
    if (!q->qualifiers) {
        prc = PMIX_ERR_NOMEM;
        goto free_query;
    }
    PMIX_INFO_LOAD(&q->qualifiers[0], PMIX_NSPACE, nspace, PMIX_STRING);

    prc = PMIx_Query_info(q, 1, &res, &nres);
    if (prc == PMIX_SUCCESS)
        for (size_t i = 0; i < nres; i++)
            walk(&res[i].value, 0, cb, arg);
    if (res)
        PMIX_INFO_FREE(res, nres);
free_query:
    PMIX_QUERY_FREE(q, 1);
    return prc;
}
