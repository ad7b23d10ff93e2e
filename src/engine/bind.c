/*
 * Engine placement with hwloc (see engine.h, ipmpi_eng_bind). An engine
 * that the launcher already pinned (mpirun -n 2 binds to cores by default)
 * is left where it is under --bind auto; an unbound one (oversubscribed
 * runs, --bind-to none, srun with task/none) is pinned to one core so
 * engines on a node do not migrate over each other's caches. Called once,
 * from the engine's main thread, before Python starts (so every thread
 * Python or user code creates inherits the binding).
 */
#include <stdlib.h>
#include <string.h>

#include <hwloc.h>

#include "engine.h"
#include "ipmpi/errors.h"
#include "log.h"

int ipmpi_eng_bind(const char *mode, int local_rank, char **cpuset, int *bound)
{
    hwloc_topology_t topo;
    hwloc_bitmap_t cur = NULL;
    char *str = NULL;
    int did_bind = 0;
    int rc = IPMPI_EIO;

    if (hwloc_topology_init(&topo) != 0)
        return IPMPI_ENOMEM;
    if (hwloc_topology_load(topo) != 0) {
        ipmpi_log(IPMPI_LOG_WARN, "hwloc cannot load the machine's topology; engine left unbound");
        goto destroy_topo;
    }
    cur = hwloc_bitmap_alloc();
    if (!cur) {
        rc = IPMPI_ENOMEM;
        goto destroy_topo;
    }
    if (hwloc_get_cpubind(topo, cur, HWLOC_CPUBIND_PROCESS) != 0) {
        ipmpi_log(IPMPI_LOG_WARN, "hwloc cannot read this process's binding");
        hwloc_bitmap_copy(cur, hwloc_topology_get_topology_cpuset(topo));
    }

    hwloc_const_cpuset_t machine = hwloc_topology_get_topology_cpuset(topo);
    int already = hwloc_bitmap_isincluded(cur, machine) && !hwloc_bitmap_isequal(cur, machine);
    int want = strcmp(mode, "core") == 0 || (strcmp(mode, "auto") == 0 && !already);
    int ncores = hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_CORE);
    if (want && ncores > 0) {
        hwloc_obj_t core = hwloc_get_obj_by_type(topo, HWLOC_OBJ_CORE, (unsigned)(local_rank % ncores));
        if (core && hwloc_set_cpubind(topo, core->cpuset, HWLOC_CPUBIND_PROCESS) == 0) {
            did_bind = 1;
            hwloc_bitmap_copy(cur, core->cpuset);
        } else {
            ipmpi_log(IPMPI_LOG_WARN, "cannot bind to core %d; engine left unbound", local_rank % ncores);
        }
    }

    if (hwloc_bitmap_list_asprintf(&str, cur) < 0 || !str) {
        rc = IPMPI_ENOMEM;
        goto free_cur;
    }
    ipmpi_log(IPMPI_LOG_DEBUG, "cpuset %s (%s)", str,
              did_bind ? "bound by ipmpi" : already ? "bound by the launcher" : "unbound");
    *cpuset = str;
    *bound = did_bind;
    rc = 0;

free_cur:
    hwloc_bitmap_free(cur);
destroy_topo:
    hwloc_topology_destroy(topo);
    return rc;
}
