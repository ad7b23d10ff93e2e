/*
 * The controller's task store (doc/protocol.md section 6): every task a
 * client submitted, from submission to its result, kept until a client
 * clears it or the memory budget evicts it. The scheduler (sched.h)
 * decides where tasks run; this file keeps what they are and what came
 * of them, and answers the TASK_* kinds (tasks.c).
 *
 * Memory: queued stage payloads and kept results count against the
 * budget (--task-memory). When a submission or a result would exceed it,
 * finished results are evicted in rstore.h's order (those already
 * delivered to a client first, oldest first); the ids of evicted results
 * are remembered (up to IPMPI_EVICTED_MAX) so a later request for one
 * says "evicted", not "unknown".
 *
 * Thread safety: none; the controller's loop thread only.
 */
#ifndef IPMPI_CTL_TASKS_H
#define IPMPI_CTL_TASKS_H

#include <stdint.h>

#include "codec.h"
#include "equeue.h"
#include "rstore.h"
#include "sched.h"

#define IPMPI_TASK_RESERVE_MAX 65536u

enum ipmpi_task_state {
    IPMPI_TASK_SCHEDULED = 1, /* waiting in the scheduler */
    IPMPI_TASK_PENDING,       /* sent to an engine */
    IPMPI_TASK_DONE,          /* finished: result (or its error) kept */
};

typedef struct ipmpi_task {
    ipmpi_stask_t s;          /* the scheduler's part; s.id is the task id */
    uint64_t session;         /* the submitting session (may be gone) */
    uint64_t client_req;      /* its TASK_SUBMIT req_id: the result's reply goes there */
    uint64_t disp;            /* dispatch id of the attempt in flight */
    ipmpi_parts_t **stage;    /* nstages payloads, owned; freed when done */
    uint32_t *retries;        /* retries of each stage */
    uint32_t nstages, cur;    /* stages; the one running or next */
    uint32_t left;            /* retries left in stage cur */
    int state;
    int abort_req;            /* aborted while pending: the result is discarded */
    int32_t engine;           /* the engine of the last attempt, or -2 */
    int32_t status;           /* when done: 0, EREMOTE, EABORTED, EDEAD... */
    ipmpi_parts_t *result;    /* when done: owned */
    ipmpi_rentry_t done;      /* once finished: its result in the store (bytes, delivered) */
    ipmpi_qlink_t waiters;    /* struct ipmpi_twait_link: blocked TASK_RESULT / BARRIER */
} ipmpi_task_t;

typedef struct ipmpi_tasks {
    ipmpi_idtab_t tab;        /* the tasks by id */
    uint64_t next_id;         /* the low 32 bits of the next id to reserve (ipmpi_task_tag gives the high ones) */
    /* --task-memory: queued stage payloads (counted) and finished
     * results (entries), evicted in rstore.h's order */
    ipmpi_rstore_t st;
    uint32_t nsched, npending, nsucceeded, nfailed;
} ipmpi_tasks_t;

#endif
