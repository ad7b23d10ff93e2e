/*
 * Engine placement with hwloc (see engine.h, ipmpi_eng_bind). Called once,
 * from the engine's main thread, before Python starts (so every thread
 * Python or user code creates inherits the binding, and OMP_NUM_THREADS
 * and friends can be set from the result).
 *
 * The node's local ranks are slots: slot r is local rank r, the controller
 * included when it shares the node (it is world rank 0, local rank 0 under
 * mpirun and srun). Slots are dealt round robin over the NUMA nodes, the
 * NUMA nodes ordered so that consecutive ones lie in different packages:
 * 4 engines on 2 packages land 2 and 2, not 4 on the first. Within a NUMA
 * node each slot gets an equal share of its cores (at least one), so slot
 * 0's cores, the controller's, are left to it whenever the node has a core
 * per local rank. More local ranks than cores: one core each, round robin,
 * and a warning (the node is oversubscribed).
 *
 * Modes: "core" binds as above; "numa" binds to the slot's whole NUMA node;
 * "auto" is "core" unless the launcher already bound the process to a
 * strict subset of the machine (mpirun -n 2 binds to cores by default),
 * which is then kept; "none" leaves the process where it is.
 */
#include <stdlib.h>
#include <string.h>

#include <hwloc.h>

#include "engine.h"
#include "ipmpi/errors.h"
#include "log.h"

#define MAX_NUMA 256

/* NUMA nodes in spread order: by position within their package first, then
 * by package, so that consecutive entries alternate packages. */
static int numa_order(hwloc_topology_t topo, hwloc_obj_t *out, int max)
{
    int n = hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_NUMANODE);
    int pos[MAX_NUMA], pkg[MAX_NUMA];

    if (n > max)
        n = max;
    for (int i = 0; i < n; i++) {
        out[i] = hwloc_get_obj_by_type(topo, HWLOC_OBJ_NUMANODE, (unsigned)i);
        hwloc_obj_t p = hwloc_get_ancestor_obj_by_type(topo, HWLOC_OBJ_PACKAGE, out[i]);
        pkg[i] = p ? (int)p->logical_index : 0;
        pos[i] = 0;
        for (int j = 0; j < i; j++)
            if (pkg[j] == pkg[i])
                pos[i]++;
    }
    /* insertion sort by (pos, pkg): n is small */
    for (int i = 1; i < n; i++) {
        hwloc_obj_t o = out[i];
        int ps = pos[i], pk = pkg[i], j = i - 1;
        while (j >= 0 && (pos[j] > ps || (pos[j] == ps && pkg[j] > pk))) {
            out[j + 1] = out[j];
            pos[j + 1] = pos[j];
            pkg[j + 1] = pkg[j];
            j--;
        }
        out[j + 1] = o;
        pos[j + 1] = ps;
        pkg[j + 1] = pk;
    }
    return n;
}

/* The cpuset for slot `slot` of `slots` (into set); 0, or -1 if none. */
static int slot_cpuset(hwloc_topology_t topo, const char *mode, int slot, int slots,
                       hwloc_bitmap_t set, int *oversubscribed)
{
    hwloc_obj_t numa[MAX_NUMA];
    int nnuma = numa_order(topo, numa, MAX_NUMA);
    int ncores = hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_CORE);

    *oversubscribed = slots > ncores;
    if (nnuma <= 0 || ncores <= 0)
        return -1;
    if (strcmp(mode, "numa") == 0) {
        hwloc_bitmap_copy(set, numa[slot % nnuma]->cpuset);
        return 0;
    }
    if (*oversubscribed) {
        /* One core each, round robin over the NUMA nodes' cores in spread order. */
        int k = slot % ncores, seen = 0;
        for (int round = 0;; round++) {
            int any = 0;
            for (int i = 0; i < nnuma; i++) {
                hwloc_obj_t c = hwloc_get_obj_inside_cpuset_by_type(topo, numa[i]->cpuset,
                                                                    HWLOC_OBJ_CORE, (unsigned)round);
                if (!c)
                    continue;
                any = 1;
                if (seen++ == k) {
                    hwloc_bitmap_copy(set, c->cpuset);
                    return 0;
                }
            }
            if (!any)
                return -1;
        }
    }
    int node = slot % nnuma, pos = slot / nnuma;
    int on_node = slots / nnuma + (node < slots % nnuma ? 1 : 0);
    int cores = hwloc_get_nbobjs_inside_cpuset_by_type(topo, numa[node]->cpuset, HWLOC_OBJ_CORE);
    if (cores <= 0)
        return -1;
    int share = cores / (on_node > 0 ? on_node : 1);
    if (share < 1)
        share = 1;
    hwloc_bitmap_zero(set);
    for (int i = 0; i < share; i++) {
        hwloc_obj_t c = hwloc_get_obj_inside_cpuset_by_type(topo, numa[node]->cpuset, HWLOC_OBJ_CORE,
                                                            (unsigned)((pos * share + i) % cores));
        if (c)
            hwloc_bitmap_or(set, set, c->cpuset);
    }
    return hwloc_bitmap_iszero(set) ? -1 : 0;
}

/* "0,1": the logical indexes of the NUMA nodes set touches (caller frees). */
static char *numa_list(hwloc_topology_t topo, hwloc_const_bitmap_t set)
{
    size_t cap = 8 * MAX_NUMA, len = 0;
    char *s = malloc(cap);
    if (!s)
        return NULL;
    s[0] = 0;
    int n = hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_NUMANODE);
    for (int i = 0; i < n && len + 16 < cap; i++) {
        hwloc_obj_t o = hwloc_get_obj_by_type(topo, HWLOC_OBJ_NUMANODE, (unsigned)i);
        if (o && hwloc_bitmap_intersects(o->cpuset, set))
            len += (size_t)snprintf(s + len, cap - len, "%s%u", len ? "," : "", o->logical_index);
    }
    return s;
}

int ipmpi_eng_bind(const char *mode, int local_rank, int local_size, ipmpi_eng_place_t *pl)
{
    hwloc_topology_t topo;
    hwloc_bitmap_t cur = NULL, want_set = NULL;
    int rc = IPMPI_EIO;

    memset(pl, 0, sizeof *pl);
    pl->cores = 1;
    pl->local_size = local_size;
    if (hwloc_topology_init(&topo) != 0)
        return IPMPI_ENOMEM;
    if (hwloc_topology_load(topo) != 0) {
        ipmpi_log(IPMPI_LOG_WARN, "hwloc cannot load the machine's topology; engine left unbound");
        goto destroy_topo;
    }
    cur = hwloc_bitmap_alloc();
    want_set = hwloc_bitmap_alloc();
    if (!cur || !want_set) {
        rc = IPMPI_ENOMEM;
        goto free_sets;
    }
    if (hwloc_get_cpubind(topo, cur, HWLOC_CPUBIND_PROCESS) != 0) {
        ipmpi_log(IPMPI_LOG_WARN, "hwloc cannot read this process's binding");
        hwloc_bitmap_copy(cur, hwloc_topology_get_topology_cpuset(topo));
    }

    hwloc_const_cpuset_t machine = hwloc_topology_get_topology_cpuset(topo);
    int already = hwloc_bitmap_isincluded(cur, machine) && !hwloc_bitmap_isequal(cur, machine);
    int want = strcmp(mode, "core") == 0 || strcmp(mode, "numa") == 0 ||
               (strcmp(mode, "auto") == 0 && !already);
    int slots = local_size > 0 ? local_size : 1, over = 0;
    if (want) {
        if (slot_cpuset(topo, strcmp(mode, "numa") == 0 ? "numa" : "core", local_rank % slots, slots,
                        want_set, &over) != 0) {
            ipmpi_log(IPMPI_LOG_WARN, "hwloc finds no core for local rank %d; engine left unbound", local_rank);
        } else if (hwloc_set_cpubind(topo, want_set, HWLOC_CPUBIND_PROCESS) == 0) {
            pl->bound = 1;
            hwloc_bitmap_copy(cur, want_set);
        } else {
            ipmpi_log(IPMPI_LOG_WARN, "cannot bind local rank %d; engine left unbound", local_rank);
        }
        if (over)
            ipmpi_log(IPMPI_LOG_WARN, "oversubscribed node: %d local ranks on %d cores; engines share cores",
                      slots, hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_CORE));
    }
    pl->oversubscribed = slots > hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_CORE);
    int cores = hwloc_get_nbobjs_inside_cpuset_by_type(topo, cur, HWLOC_OBJ_CORE);
    pl->cores = cores > 0 ? cores : 1;

    if (hwloc_bitmap_list_asprintf(&pl->cpuset, cur) < 0 || !pl->cpuset) {
        pl->cpuset = NULL;
        rc = IPMPI_ENOMEM;
        goto free_sets;
    }
    pl->numa = numa_list(topo, cur);
    if (!pl->numa) {
        free(pl->cpuset);
        pl->cpuset = NULL;
        rc = IPMPI_ENOMEM;
        goto free_sets;
    }
    ipmpi_log(IPMPI_LOG_DEBUG, "cpuset %s, %d cores, NUMA %s (%s)", pl->cpuset, pl->cores, pl->numa,
              pl->bound ? "bound by ipmpi" : already ? "bound by the launcher" : "unbound");
    rc = 0;

free_sets:
    hwloc_bitmap_free(want_set);
    hwloc_bitmap_free(cur);
destroy_topo:
    hwloc_topology_destroy(topo);
    return rc;
}
