/*
 * Engines joining a running controller (IPython 0.10's "start ipengine as
 * many times as you like"): a later MPI job started with `ipmpi --join
 * FILE` connects to the port the controller opened (--accept-joins FILE;
 * both jobs' mpiruns share an ompi-server), merges the intercommunicator
 * (controller rank 0, the job's ranks 1..n), and receives this record by
 * MPI_Bcast. Then each engine opens a TCP connection to the controller
 * and sends key and its id: the end of that connection tells either side
 * that the other is gone (PMIx knows nothing about the other job).
 */
#ifndef IPMPI_JOIN_H
#define IPMPI_JOIN_H

#include <stdint.h>

#define IPMPI_JOIN_ADDRS 4
#define IPMPI_JOIN_HELLO 12 /* key (8 bytes) and id (4), little-endian */

typedef struct ipmpi_join_info {
    int32_t first_id;  /* id of the joining job's rank 0; -1: refused (why) */
    int32_t live_port; /* the controller's TCP port for liveness connections */
    uint64_t key;      /* every engine sends it on that connection */
    char addrs[IPMPI_JOIN_ADDRS][48]; /* the controller's addresses, to try in order ("" ends) */
    char why[160];
} ipmpi_join_info_t;

#endif
