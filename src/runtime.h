/*
 * What main() hands to the role it starts: the parsed options, the job
 * description from PMIx, and the runtime's private communicator (a
 * duplicate of MPI_COMM_WORLD, so user code can never receive the
 * runtime's messages). Read-only after start-up; loop thread only.
 */
#ifndef IPMPI_RUNTIME_H
#define IPMPI_RUNTIME_H

#include <stdint.h>

#include <mpi.h>

#include "codec.h"

typedef struct ipmpi_opts {
    char dir[1024];           /* profile dir: --ipmpi-dir, $IPMPI_DIR, or ~/.ipmpi */
    char client_ip[256];      /* --client-ip: listen address, written into furls ("" = default) */
    int client_port;          /* --client-port: 0 = random high port */
    int log_level;            /* --log-level 0..3 */
    int log_to_stderr;        /* --log-to-stderr: do not open files under dir/log */
    uint64_t wait_spin_us;    /* --wait-spin-us: spin window after activity */
    uint64_t wait_max_us;     /* --wait-max-us: longest idle sleep (0 = spin) */
    uint64_t busy_spin_us;    /* --busy-spin-us: controller's poll before it sleeps on its bell (UINT64_MAX: off) */
    char mpi_mode[16];        /* --mpi: "none" or "mpi4py" (engines' user comm) */
    char bind[16];            /* --bind: "auto", "core" or "none" */
    ipmpi_limits_t limits;    /* --max-message bytes per frame */
    double ready_timeout;     /* --ready-timeout: seconds the controller waits for engines */
    uint64_t task_memory;     /* --task-memory: bytes of queued tasks and kept results */
    uint64_t result_memory;   /* --result-memory: bytes of kept MultiEngine request results */
    uint32_t task_depth;      /* --task-depth: tasks waiting ahead on a busy engine */
    uint64_t client_queue_bytes; /* --client-queue-bytes: a client's requests held before its input pauses */
    uint64_t client_unread_bytes; /* --client-unread-bytes: a client's unread replies before its requests wait */
#define IPMPI_OUT_HOLD_DEFAULT ((uint64_t)128 << 20)
    char accept_joins[1024];  /* --accept-joins FILE: the controller writes its MPI port there ("" = no joins) */
    int max_engines;          /* --max-engines: engines at most, joined ones included */
    char join[1024];          /* --join FILE: every rank is an engine joining the controller of FILE's port */
    uint32_t tree_min;        /* --tree-min: requests for this many idle engines go as a broadcast tree (0: never) */
    int cpu_sections;         /* --cpu-sections: the controller accounts its CPU by section (controller/cpusec.h) */
} ipmpi_opts_t;

/* When main's start-up steps ended (ipmpi_log_clock(): wall seconds), for
 * the "start-up:" line each process logs once it is ready
 * (tools/startup_phases.py turns them into a table). */
typedef struct ipmpi_startup {
    double main;                /* main() entered (after exec and dynamic linking) */
    double mpi;                 /* MPI_Init_thread returned */
    double pmix;                /* PMIx asked about the job */
    double node;                /* private communicator and node doorbells made */
    double cpu_mpi, cpu_node;   /* this process's CPU time (ipmpi_log_cpu()) at mpi and node */
} ipmpi_startup_t;

typedef struct ipmpi_job {
    int world_rank, world_size; /* in MPI_COMM_WORLD */
    int local_rank, local_size; /* on this node (PMIx, else environment, else 0/1) */
    char hostname[256];
    char jobid[256];            /* PMIx namespace, or "singleton" */
    int have_pmix;              /* PMIx_Init succeeded: proc table queries possible */
    struct ipmpi_doorbell *bell; /* this node's doorbells (doorbell.h), set up by main */
    /* --join: this job's engines joined a running controller (join.h):
     * rank r is engine join_first + r, the controller is rank 0 of the
     * merged communicator, live_fd the TCP connection to it. */
    int joined, join_first, live_fd;
    MPI_Comm join_inter;
    ipmpi_startup_t t;          /* start-up stamps */
} ipmpi_job_t;

/* Each returns the process exit status. comm is the private duplicate. */
int ipmpi_controller_run(const ipmpi_opts_t *o, const ipmpi_job_t *job, MPI_Comm comm);
int ipmpi_engine_run(const ipmpi_opts_t *o, const ipmpi_job_t *job, MPI_Comm comm);

/*
 * --join (engine/join.c): connects this whole job to the controller whose
 * MPI port the file o->join holds, and opens the liveness connection
 * (join.h). Sets job->joined, join_first, join_inter, live_fd and *merged
 * (controller rank 0, this rank world_rank + 1). Collective over
 * MPI_COMM_WORLD. Returns 0, or an error after printing why to stderr.
 */
int ipmpi_eng_join(const ipmpi_opts_t *o, ipmpi_job_t *job, MPI_Comm *merged);

#endif
