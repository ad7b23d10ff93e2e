/*
 * ipmpi: one executable, role by rank. Rank 0 is the controller, ranks
 * 1..N are engines 0..N-1. Invoked as `ipcontroller` or `ipengine` the role
 * is fixed instead, for the MPMD form
 *   mpirun -n 1 ipcontroller : -n 4 ipengine
 * main() parses options, initialises MPI (threads: funneled is enough; the
 * loop is single-threaded), duplicates the world communicator for the
 * runtime's own traffic, asks PMIx about the job, opens this process's log
 * and hands over to the role.
 */
#include <errno.h>
#include <getopt.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <mpi.h>
#include <pmix.h>

#include "doorbell.h"
#include "ipmpi/errors.h"
#include "log.h"
#include "runtime.h"

enum role { ROLE_BY_RANK, ROLE_CONTROLLER, ROLE_ENGINE };

static void usage(FILE *f, const char *prog)
{
    fprintf(f,
            "usage: mpirun -n N+1 %s [options]   (rank 0 controller, ranks 1..N engines)\n"
            "       mpirun -n 1 ipcontroller [options] : -n N ipengine [options]\n"
            "options:\n"
            "  --ipmpi-dir DIR      profile directory (default $IPMPI_DIR or ~/.ipmpi)\n"
            "  --client-ip ADDR     address to listen on and write into the furls\n"
            "                       (default: this host's name; 127.0.0.1 if it resolves nowhere else)\n"
            "  --client-port N      fixed client port; key and certificate then persist (default random)\n"
            "  --wait-spin-us N     spin (yielding the core) this long after activity (default 10000)\n"
            "  --wait-max-us N      longest idle sleep; 0 = always spin (default 25000)\n"
            "  --busy-spin-us US    while only engines of its node work, the controller polls US\n"
            "                       microseconds after the last event, then sleeps until they ring\n"
            "                       it; off: it polls until they answer (default 200)\n"
            "  --mpi MODE           none | mpi4py: give engines `comm`, an engines-only communicator\n"
            "  --bind MODE          auto | core | none: pin engines to cores with hwloc (default auto)\n"
            "  --max-message BYTES  largest frame a client may send (default 8 GiB)\n"
            "  --ready-timeout SEC  how long the controller waits for engines (default 300)\n"
            "  --task-memory BYTES  memory for queued tasks and kept task results (default 1 GiB)\n"
            "  --task-depth N       short tasks that may wait ahead on a busy engine (default 4)\n"
            "  --result-memory BYTES  memory for kept MultiEngine results, fetched by request id\n"
            "                       after a reconnect (default 1 GiB; delivered ones use 1/64 of it)\n"
            "  --client-queue-bytes BYTES  bytes of one client's requests the controller holds\n"
            "                       before it stops reading that client (default 1 GiB)\n"
            "  --client-unread-bytes BYTES  replies one client has not read before its next\n"
            "                       requests and tasks wait (default 128 MiB)\n"
            "  --accept-joins FILE  engines of later jobs may join: the controller writes its MPI\n"
            "                       port to FILE (both mpiruns need the same --ompi-server)\n"
            "  --max-engines N      engines at most, joined ones included (default: the job's + 1024)\n"
            "  --join FILE          every rank of this job is an engine joining the running\n"
            "                       controller whose port FILE holds (ipcluster engines)\n"
            "  --tree-min N         a request for N or more idle engines travels as a broadcast\n"
            "                       tree, one per node, replies gathered (default 0: never)\n"
            "  --cpu-sections       the controller accounts its CPU time by section (clients,\n"
            "                       MPI, trees, waiting) and logs it at exit and on SIGUSR1\n"
            "  --log-level N        0 error, 1 warn, 2 info, 3 debug (default 2)\n"
            "  --log-to-stderr      log to stderr instead of DIR/log/\n"
            "  -h, --help           this text\n"
            "See ipmpi(1) and the user guide.\n",
            prog);
}

static int parse_u64(const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || *s == '\0' || *end != '\0' || *s == '-')
        return -1;
    *out = v;
    return 0;
}

static int parse_opts(int argc, char **argv, ipmpi_opts_t *o)
{
    static const struct option longopts[] = {
        {"ipmpi-dir", required_argument, 0, 'd'},  {"client-ip", required_argument, 0, 'i'},
        {"client-port", required_argument, 0, 'p'}, {"wait-spin-us", required_argument, 0, 's'},
        {"wait-max-us", required_argument, 0, 'w'}, {"mpi", required_argument, 0, 'm'},
        {"bind", required_argument, 0, 'b'},        {"max-message", required_argument, 0, 'M'},
        {"ready-timeout", required_argument, 0, 'r'}, {"log-level", required_argument, 0, 'l'},
        {"log-to-stderr", no_argument, 0, 'e'},     {"help", no_argument, 0, 'h'},
        {"task-memory", required_argument, 0, 'T'}, {"task-depth", required_argument, 0, 'D'},
        {"result-memory", required_argument, 0, 'R'},
        {"client-queue-bytes", required_argument, 0, 'Q'},
        {"client-unread-bytes", required_argument, 0, 'U'},
        {"accept-joins", required_argument, 0, 'J'}, {"join", required_argument, 0, 'j'},
        {"max-engines", required_argument, 0, 'N'}, {"tree-min", required_argument, 0, 't'},
        {"busy-spin-us", required_argument, 0, 'B'}, {"cpu-sections", no_argument, 0, 'C'}, {0, 0, 0, 0}};
    memset(o, 0, sizeof *o);
    const char *env = getenv("IPMPI_DIR"), *home = getenv("HOME");
    if (env && *env)
        snprintf(o->dir, sizeof o->dir, "%s", env);
    else
        snprintf(o->dir, sizeof o->dir, "%s/.ipmpi", home ? home : "/tmp");
    o->log_level = IPMPI_LOG_INFO;
    o->wait_spin_us = 10000;
    o->busy_spin_us = 200;
    o->wait_max_us = 25000;
    snprintf(o->mpi_mode, sizeof o->mpi_mode, "none");
    snprintf(o->bind, sizeof o->bind, "auto");
    ipmpi_limits_default(&o->limits);
    o->ready_timeout = 300;
    o->task_memory = (uint64_t)1 << 30;
    o->task_depth = 4;
    o->result_memory = (uint64_t)1 << 30;
    o->client_queue_bytes = (uint64_t)1 << 30;
    o->client_unread_bytes = IPMPI_OUT_HOLD_DEFAULT;
    o->tree_min = 0;

    int c;
    uint64_t v;
    while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        switch (c) {
        case 'd':
            snprintf(o->dir, sizeof o->dir, "%s", optarg);
            break;
        case 'i':
            snprintf(o->client_ip, sizeof o->client_ip, "%s", optarg);
            break;
        case 'p':
            if (parse_u64(optarg, &v) || v > 65535)
                return fprintf(stderr, "ipmpi: --client-port must be 0..65535\n"), -1;
            o->client_port = (int)v;
            break;
        case 's':
            if (parse_u64(optarg, &o->wait_spin_us))
                return fprintf(stderr, "ipmpi: --wait-spin-us needs a number\n"), -1;
            break;
        case 'B':
            if (!strcmp(optarg, "off"))
                o->busy_spin_us = UINT64_MAX;
            else if (parse_u64(optarg, &o->busy_spin_us) || o->busy_spin_us > 10000000)
                return fprintf(stderr, "ipmpi: --busy-spin-us must be 0..10000000 or off\n"), -1;
            break;
        case 'w':
            if (parse_u64(optarg, &o->wait_max_us) || o->wait_max_us > 1000000)
                return fprintf(stderr, "ipmpi: --wait-max-us must be 0..1000000\n"), -1;
            break;
        case 'm':
            if (strcmp(optarg, "none") && strcmp(optarg, "mpi4py"))
                return fprintf(stderr, "ipmpi: --mpi must be none or mpi4py\n"), -1;
            snprintf(o->mpi_mode, sizeof o->mpi_mode, "%s", optarg);
            break;
        case 'b':
            if (strcmp(optarg, "auto") && strcmp(optarg, "core") && strcmp(optarg, "numa") && strcmp(optarg, "none"))
                return fprintf(stderr, "ipmpi: --bind must be auto, core, numa or none\n"), -1;
            snprintf(o->bind, sizeof o->bind, "%s", optarg);
            break;
        case 'M':
            if (parse_u64(optarg, &v) || v < 1024)
                return fprintf(stderr, "ipmpi: --max-message must be at least 1024\n"), -1;
            o->limits.max_frame = v;
            if (o->limits.max_part > v)
                o->limits.max_part = v;
            break;
        case 'r':
            if (parse_u64(optarg, &v) || v == 0)
                return fprintf(stderr, "ipmpi: --ready-timeout must be a positive number\n"), -1;
            o->ready_timeout = (double)v;
            break;
        case 'T':
            if (parse_u64(optarg, &v) || v < (1u << 20))
                return fprintf(stderr, "ipmpi: --task-memory must be at least 1048576 bytes\n"), -1;
            o->task_memory = v;
            break;
        case 'R':
            if (parse_u64(optarg, &v) || v < (1u << 20))
                return fprintf(stderr, "ipmpi: --result-memory must be at least 1048576 bytes\n"), -1;
            o->result_memory = v;
            break;
        case 'Q':
            if (parse_u64(optarg, &v) || v < (1u << 20))
                return fprintf(stderr, "ipmpi: --client-queue-bytes must be at least 1048576 bytes\n"), -1;
            o->client_queue_bytes = v;
            break;
        case 'U':
            if (parse_u64(optarg, &v) || v < (1u << 20))
                return fprintf(stderr, "ipmpi: --client-unread-bytes must be at least 1048576 bytes\n"), -1;
            o->client_unread_bytes = v;
            break;
        case 'D':
            if (parse_u64(optarg, &v) || v > 64)
                return fprintf(stderr, "ipmpi: --task-depth must be 0..64\n"), -1;
            o->task_depth = (uint32_t)v;
            break;
        case 'l':
            if (parse_u64(optarg, &v) || v > 3)
                return fprintf(stderr, "ipmpi: --log-level must be 0..3\n"), -1;
            o->log_level = (int)v;
            break;
        case 'e':
            o->log_to_stderr = 1;
            break;
        case 'J':
            if (snprintf(o->accept_joins, sizeof o->accept_joins, "%s", optarg) >= (int)sizeof o->accept_joins)
                return fprintf(stderr, "ipmpi: --accept-joins: path too long\n"), -1;
            break;
        case 'j':
            if (snprintf(o->join, sizeof o->join, "%s", optarg) >= (int)sizeof o->join)
                return fprintf(stderr, "ipmpi: --join: path too long\n"), -1;
            break;
        case 'C':
            o->cpu_sections = 1;
            break;
        case 't':
            if (parse_u64(optarg, &v) || v > 1000000)
                return fprintf(stderr, "ipmpi: --tree-min must be 0..1000000\n"), -1;
            o->tree_min = (uint32_t)v;
            break;
        case 'N':
            if (parse_u64(optarg, &v) || v < 1 || v > 1000000)
                return fprintf(stderr, "ipmpi: --max-engines must be 1..1000000\n"), -1;
            o->max_engines = (int)v;
            break;
        case 'h':
            usage(stdout, argv[0]);
            exit(0);
        default:
            usage(stderr, argv[0]);
            return -1;
        }
    }
    if (optind < argc)
        return fprintf(stderr, "ipmpi: unexpected argument '%s'\n", argv[optind]), -1;
    return 0;
}

/* mkdir -p with the given mode for the last component (0700 for our dirs). */
static int make_dir(const char *path)
{
    char tmp[PATH_MAX];
    snprintf(tmp, sizeof tmp, "%s", path);
    for (char *p = tmp + 1; *p; p++) {
        if (*p == '/') {
            *p = '\0';
            if (mkdir(tmp, 0700) != 0 && errno != EEXIST)
                return -1;
            *p = '/';
        }
    }
    if (mkdir(tmp, 0700) != 0 && errno != EEXIST)
        return -1;
    return 0;
}

/* Fills job from PMIx; falls back to Open MPI's environment, then to a singleton. */
static void describe_job(ipmpi_job_t *job)
{
    pmix_proc_t me, wild;
    pmix_value_t *val = NULL;
    const char *e;

    job->local_rank = 0;
    job->local_size = 1;
    gethostname(job->hostname, sizeof job->hostname - 1);
    snprintf(job->jobid, sizeof job->jobid, "singleton");
    if ((e = getenv("OMPI_COMM_WORLD_LOCAL_RANK")))
        job->local_rank = atoi(e);
    if ((e = getenv("OMPI_COMM_WORLD_LOCAL_SIZE")))
        job->local_size = atoi(e);

    if (PMIx_Init(&me, NULL, 0) != PMIX_SUCCESS)
        return;
    job->have_pmix = 1;
    snprintf(job->jobid, sizeof job->jobid, "%s", me.nspace);
    PMIX_PROC_CONSTRUCT(&wild);
    PMIX_LOAD_PROCID(&wild, me.nspace, PMIX_RANK_WILDCARD);
    if (PMIx_Get(&me, PMIX_LOCAL_RANK, NULL, 0, &val) == PMIX_SUCCESS && val) {
        if (val->type == PMIX_UINT16)
            job->local_rank = val->data.uint16;
        PMIX_VALUE_RELEASE(val);
    }
    val = NULL;
    if (PMIx_Get(&wild, PMIX_LOCAL_SIZE, NULL, 0, &val) == PMIX_SUCCESS && val) {
        if (val->type == PMIX_UINT32)
            job->local_size = (int)val->data.uint32;
        PMIX_VALUE_RELEASE(val);
    }
    val = NULL;
    if (PMIx_Get(&me, PMIX_HOSTNAME, NULL, 0, &val) == PMIX_SUCCESS && val) {
        if (val->type == PMIX_STRING && val->data.string)
            snprintf(job->hostname, sizeof job->hostname, "%s", val->data.string);
        PMIX_VALUE_RELEASE(val);
    }
}

/* Rank 0 of its job, as the launcher says before MPI_Init (unknown: yes). */
static int rank_zero_by_env(void)
{
    static const char *const vars[] = {"PMIX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"};
    for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++) {
        const char *v = getenv(vars[i]);
        if (v && *v)
            return strcmp(v, "0") == 0;
    }
    return 1;
}

/* Opens this process's log under dir/log (role_name, file name part). */
static void open_log(const ipmpi_opts_t *o, const char *role_name, const char *file)
{
    char path[PATH_MAX];
    ipmpi_log_setup(role_name, o->log_level);
    snprintf(path, sizeof path, "%s/log", o->dir);
    if (make_dir(o->dir) != 0 || make_dir(path) != 0) {
        fprintf(stderr, "ipmpi: cannot create %s: %s\n", path, strerror(errno));
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    if (!o->log_to_stderr) {
        snprintf(path, sizeof path, "%s/log/%s-%d.log", o->dir, file, (int)getpid());
        if (ipmpi_log_open(path, 1) != 0)
            fprintf(stderr, "ipmpi: cannot open log %s; logging to stderr\n", path);
    }
}

/* `ipmpi --join FILE`: every rank is an engine of a running controller
 * (engine/join.c), with the next ids; no doorbells (the controller is not
 * in this job: it wakes these engines by datagram). */
static int join_main(const ipmpi_opts_t *o, ipmpi_job_t *job, enum role role)
{
    if (role == ROLE_CONTROLLER) {
        fprintf(stderr, "ipmpi: ipcontroller cannot --join: only engines join a running controller\n");
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    MPI_Comm comm = MPI_COMM_NULL;
    int rc = ipmpi_eng_join(o, job, &comm);
    if (rc != 0) {
        fflush(NULL);
        MPI_Finalize();
        return rc == IPMPI_EACCES ? 4 : 3;
    }
    int id = job->join_first + job->world_rank;
    char role_name[48], file[64];
    snprintf(role_name, sizeof role_name, "engine %d", id);
    snprintf(file, sizeof file, "ipengine-%d", id);
    open_log(o, role_name, file);
    ipmpi_log(IPMPI_LOG_INFO, "rank %d of %d on %s (local rank %d of %d), job %s, pid %d: joined the controller as "
              "engine %d", job->world_rank, job->world_size, job->hostname, job->local_rank, job->local_size,
              job->jobid, (int)getpid(), id);
    ipmpi_doorbell_t bell;
    memset(&bell, 0, sizeof bell);
    bell.node = MPI_COMM_NULL;
    bell.win = MPI_WIN_NULL;
    bell.ctl_fd = -1;
    job->bell = &bell;
    job->t.node = ipmpi_log_clock();
    job->t.cpu_node = ipmpi_log_cpu();
    prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);
    rc = ipmpi_engine_run(o, job, comm);
    /* The controller never disconnects (a blocking call its loop cannot
     * make): free, then finalize. */
    MPI_Comm_free(&comm);
    MPI_Comm_free(&job->join_inter);
    if (job->live_fd >= 0)
        close(job->live_fd);
    if (job->have_pmix)
        PMIx_Finalize(NULL, 0);
    MPI_Finalize();
    return rc;
}

int main(int argc, char **argv)
{
    ipmpi_opts_t opts;
    ipmpi_job_t job;
    memset(&job, 0, sizeof job);
    job.t.main = ipmpi_log_clock();

    char prog[PATH_MAX];
    snprintf(prog, sizeof prog, "%s", argv[0]);
    const char *base = basename(prog);
    enum role role = ROLE_BY_RANK;
    if (strcmp(base, "ipcontroller") == 0)
        role = ROLE_CONTROLLER;
    else if (strcmp(base, "ipengine") == 0)
        role = ROLE_ENGINE;

    if (parse_opts(argc, argv, &opts) != 0)
        return 2;

    if (opts.accept_joins[0] && opts.join[0]) {
        fprintf(stderr, "ipmpi: --accept-joins is for the controller's job, --join for a later engines' job: "
                        "not both\n");
        return 2;
    }
    /* The controller accepts joining jobs on a thread of its own
     * (controller/join.c); engines call MPI from their main thread only. */
    int provided, want = MPI_THREAD_FUNNELED;
    if (opts.accept_joins[0] && rank_zero_by_env())
        want = MPI_THREAD_MULTIPLE;
    if (MPI_Init_thread(&argc, &argv, want, &provided) != MPI_SUCCESS) {
        fprintf(stderr, "ipmpi: MPI_Init_thread failed\n");
        return 1;
    }
    MPI_Comm_rank(MPI_COMM_WORLD, &job.world_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &job.world_size);
    job.t.mpi = ipmpi_log_clock();
    job.t.cpu_mpi = ipmpi_log_cpu();
    describe_job(&job);
    job.t.pmix = ipmpi_log_clock();

    if (opts.join[0])
        return join_main(&opts, &job, role);
    if ((role == ROLE_CONTROLLER && job.world_rank != 0) || (role == ROLE_ENGINE && job.world_rank == 0)) {
        fprintf(stderr,
                "ipmpi: %s started as rank %d; the controller must be rank 0 "
                "(mpirun -n 1 ipcontroller : -n N ipengine)\n",
                base, job.world_rank);
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    int is_controller = job.world_rank == 0;
    if (job.world_size < 2) {
        fprintf(stderr, "ipmpi: needs at least 2 ranks (a controller and one engine); "
                        "try: mpirun -n 5 ipmpi\n");
        MPI_Finalize();
        return 2;
    }

    char role_name[48], file[64];
    if (is_controller) {
        snprintf(role_name, sizeof role_name, "controller");
        snprintf(file, sizeof file, "ipcontroller");
    } else {
        snprintf(role_name, sizeof role_name, "engine %d", job.world_rank - 1);
        snprintf(file, sizeof file, "ipengine-%d", job.world_rank - 1);
    }
    open_log(&opts, role_name, file);
    ipmpi_log(IPMPI_LOG_INFO, "rank %d of %d on %s (local rank %d of %d), job %s, pid %d", job.world_rank,
              job.world_size, job.hostname, job.local_rank, job.local_size, job.jobid, (int)getpid());

    MPI_Comm comm;
    MPI_Comm_dup(MPI_COMM_WORLD, &comm);
    ipmpi_doorbell_t bell;
    if (ipmpi_doorbell_init(&bell, comm) != 0) {
        fprintf(stderr, "ipmpi: out of memory\n");
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    job.bell = &bell;
    /* The node communicator is the truth about this node's ranks (PMIx's
     * PMIX_LOCAL_SIZE answered 1 on the second node of an mpirun job). */
    if (bell.node != MPI_COMM_NULL) {
        MPI_Comm_rank(bell.node, &job.local_rank);
        MPI_Comm_size(bell.node, &job.local_size);
    }
    job.t.node = ipmpi_log_clock();
    job.t.cpu_node = ipmpi_log_cpu();
    /* Sleeps in the wait loops must be short when they are asked to be;
     * only now, after start-up's collectives: Open MPI's waits inside them
     * are usleep(100) loops, and with 1 us slack every rank woke twice as
     * often (65 ranks' MPI_Init took 2x the CPU here: 6 s instead of 3). */
    prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);
    int rc = is_controller ? ipmpi_controller_run(&opts, &job, comm) : ipmpi_engine_run(&opts, &job, comm);
    /* The roles never return when a rank died: they _exit() instead of
     * trusting MPI_Finalize (ENVIRONMENT.md: it can hang after a death). */
    ipmpi_doorbell_fini(&bell);
    MPI_Comm_free(&comm);
    if (job.have_pmix)
        PMIx_Finalize(NULL, 0);
    MPI_Finalize();
    return rc;
}
