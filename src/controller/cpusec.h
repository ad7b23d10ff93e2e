/*
 * The controller loop's CPU time by section (--cpu-sections): what a
 * request costs the controller where, so that a curve of its CPU per
 * request against N can be taken apart (bench/bench_tree.py). Off by
 * default: each section then costs one predictable branch; on, two reads
 * of the thread's CPU clock (a system call, ~0.3 us here). SIGUSR1 makes
 * the loop log the totals so far (controller.c). Loop thread only.
 */
#ifndef IPMPI_CTL_CPUSEC_H
#define IPMPI_CTL_CPUSEC_H

#include <stdint.h>
#include <time.h>

enum {
    IPMPI_CS_CLIENTS,   /* sessions' turns: requests read and routed, replies written */
    IPMPI_CS_TREE_SEND, /*   of them: requests sent as trees (tree.c) */
    IPMPI_CS_MPI,       /* MPI progress and the engines' frames it delivers */
    IPMPI_CS_GATHERED,  /*   of them: trees' gathered replies (tree.c) */
    IPMPI_CS_SCANS,     /* the bell's count and the ring-again scan over engines */
    IPMPI_CS_WAIT,      /* ppoll() and the yield of a spinning turn */
    IPMPI_CS_N_
};

typedef struct ipmpi_cpusec {
    int on;
    uint64_t start;           /* the thread's CPU clock when the loop began */
    uint64_t ns[IPMPI_CS_N_];
    uint64_t turns;
} ipmpi_cpusec_t;

static inline uint64_t ipmpi_thread_cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* A section begins: its start, 0 when accounting is off. */
static inline uint64_t ipmpi_cpusec_begin(const ipmpi_cpusec_t *s)
{
    return s->on ? ipmpi_thread_cpu_ns() : 0;
}

static inline void ipmpi_cpusec_end(ipmpi_cpusec_t *s, int k, uint64_t t0)
{
    if (s->on)
        s->ns[k] += ipmpi_thread_cpu_ns() - t0;
}

#endif
