/*
 * The engine's side of the MPI link (doc/protocol.md section 3): a frame
 * is one IPMPI_TAG_HDR message with the header and length table, then each
 * part as IPMPI_TAG_PART messages of at most IPMPI_MPI_CHUNK bytes. Parts
 * go straight from and into the caller's buffers; nothing is joined or
 * copied. No Python here, so the engine calls these with the GIL released.
 * Main thread only (MPI_THREAD_FUNNELED).
 */
#include <stdlib.h>

#include "engine.h"
#include "ipmpi/errors.h"
#include "log.h"

int ipmpi_eng_link_send(MPI_Comm comm, int dest, const ipmpi_hdr_t *h, const uint64_t *lens,
                    const void *const *bufs)
{
    if (h->nparts > IPMPI_MAX_PARTS)
        return IPMPI_EINVAL;
    size_t hlen = ipmpi_hdr_wire_size(h->nparts);
    uint8_t *hbuf = malloc(hlen);
    if (!hbuf)
        return IPMPI_ENOMEM;
    int rc = IPMPI_EMPI;
    if (ipmpi_hdr_encode(h, lens, hbuf, hlen) < 0) {
        rc = IPMPI_EINVAL;
        goto free_hbuf;
    }
    if (MPI_Send(hbuf, (int)hlen, MPI_BYTE, dest, IPMPI_TAG_HDR, comm) != MPI_SUCCESS)
        goto free_hbuf;
    for (uint32_t i = 0; i < h->nparts; i++) {
        const char *p = bufs[i];
        uint64_t left = lens[i];
        do {
            int n = (int)(left < IPMPI_MPI_CHUNK ? left : IPMPI_MPI_CHUNK);
            /* MPI_Send takes a non-const buffer in MPI 3 bindings of old
             * implementations; it never writes to it. */
            if (MPI_Send((void *)p, n, MPI_BYTE, dest, IPMPI_TAG_PART, comm) != MPI_SUCCESS)
                goto free_hbuf;
            p += n;
            left -= (uint64_t)n;
        } while (left > 0);
    }
    rc = 0;

free_hbuf:
    free(hbuf);
    return rc;
}

int ipmpi_eng_link_recv_part(MPI_Comm comm, int src, void *buf, uint64_t len)
{
    char *scratch = NULL;
    char *p = buf;
    if (!buf) {
        size_t n = len < IPMPI_MPI_CHUNK ? (size_t)len : IPMPI_MPI_CHUNK;
        scratch = malloc(n ? n : 1);
        if (!scratch)
            return IPMPI_ENOMEM;
        p = scratch;
    }
    int rc = IPMPI_EMPI;
    uint64_t left = len;
    do {
        int n = (int)(left < IPMPI_MPI_CHUNK ? left : IPMPI_MPI_CHUNK);
        if (MPI_Recv(p, n, MPI_BYTE, src, IPMPI_TAG_PART, comm, MPI_STATUS_IGNORE) != MPI_SUCCESS)
            goto free_scratch;
        if (!scratch)
            p += n;
        left -= (uint64_t)n;
    } while (left > 0);
    rc = 0;

free_scratch:
    free(scratch);
    return rc;
}
