/*
 * Frame codec: encodes and decodes the fixed header and the part-length
 * table of include/ipmpi/protocol.h. Plain C, no I/O, no allocation: the
 * decoder reads from the caller's buffer and writes only to out-params.
 * Every field is checked against the limits before it is reported, so a
 * caller may allocate from decoded lengths without further checks.
 * Thread safety: all functions are reentrant.
 */
#ifndef IPMPI_CODEC_H
#define IPMPI_CODEC_H

#include <stddef.h>
#include <stdint.h>

#include "ipmpi/protocol.h"

typedef struct ipmpi_hdr {
    uint8_t version;
    uint8_t kind;
    uint16_t flags;
    uint64_t req_id;
    int32_t target;
    int32_t status;
    uint32_t total;
    uint32_t nparts;
    uint64_t aux;
} ipmpi_hdr_t;

typedef struct ipmpi_limits {
    uint32_t max_parts;  /* at most IPMPI_MAX_PARTS */
    uint64_t max_part;   /* bytes in one part */
    uint64_t max_frame;  /* bytes in all parts of one frame */
} ipmpi_limits_t;

/* Defaults: 4096 parts, 4 GiB a part, 8 GiB a frame. */
void ipmpi_limits_default(ipmpi_limits_t *lim);

/* Bytes of header plus length table for nparts parts. */
static inline size_t ipmpi_hdr_wire_size(uint32_t nparts)
{
    return IPMPI_HDR_SIZE + (size_t)nparts * 8u;
}

/*
 * Writes the 40-byte header for h (magic and version are filled in; h->version
 * is ignored) followed by h->nparts lengths from lens into out. Returns the
 * bytes written, or IPMPI_EINVAL if cap is too small or nparts exceeds
 * IPMPI_MAX_PARTS.
 */
long ipmpi_hdr_encode(const ipmpi_hdr_t *h, const uint64_t *lens, uint8_t *out, size_t cap);

/*
 * Decodes the fixed 40-byte header from buf. Returns IPMPI_HDR_SIZE on
 * success, 0 if len < IPMPI_HDR_SIZE (need more), IPMPI_EPROTO on a bad
 * magic, version or kind, IPMPI_E2BIG if nparts exceeds lim->max_parts.
 * *out is written only on success.
 */
long ipmpi_hdr_decode(const uint8_t *buf, size_t len, const ipmpi_limits_t *lim, ipmpi_hdr_t *out);

/*
 * Decodes the nparts lengths that follow the header (buf points at the
 * first length). Returns nparts*8 on success, 0 if len is too short (need
 * more), IPMPI_E2BIG if a part exceeds lim->max_part or their sum exceeds
 * lim->max_frame. lens (room for nparts) and *total are written only on
 * success.
 */
long ipmpi_lens_decode(const uint8_t *buf, size_t len, uint32_t nparts, const ipmpi_limits_t *lim,
                       uint64_t *lens, uint64_t *total);

/*
 * One engine's reply inside a gathered frame (IPMPI_F_GATHER: part 0
 * holds whole reply frames back to back, doc/protocol.md section 3), at
 * p with left bytes of the part remaining. Decodes its header into *h;
 * its part lengths are the u64s at p + IPMPI_HDR_SIZE (ipmpi_get_u64)
 * and its parts follow them back to back. Checks: the whole frame lies
 * within left; it is one engine's final reply (IPMPI_F_REPLY and none of
 * IPMPI_F_MORE, IPMPI_F_SHM, IPMPI_F_GATHER, IPMPI_F_PACKED), or a run
 * (IPMPI_F_SAME, nparts 0: see ipmpi_gather_each); its lengths respect
 * lim. Returns the frame's bytes (header, lengths and parts), 0
 * when left is 0 (no more), or IPMPI_EPROTO / IPMPI_E2BIG. No allocation.
 */
long ipmpi_gather_next(const uint8_t *p, size_t left, const ipmpi_limits_t *lim, ipmpi_hdr_t *h);

/*
 * The engines' replies of a gathered part one by one, runs
 * (IPMPI_F_SAME) expanded: ipmpi_gather_each_next gives each engine's
 * header (its own target; for a run, the header of the whole frame it
 * repeats) and in *frame the whole inner frame whose lengths (at
 * *frame + IPMPI_HDR_SIZE) and parts are its reply. Besides what
 * ipmpi_gather_next checks: a run has nparts 0, a count (aux) of 1 to
 * IPMPI_GATHER_RUN_MAX and targets that stay below INT32_MAX, and follows
 * a whole frame; a whole frame has aux 0. *whole_frames (if not NULL)
 * counts the whole frames seen. Returns 1 (one reply), 0 at the end, or
 * IPMPI_EPROTO / IPMPI_E2BIG. No allocation.
 */
#define IPMPI_GATHER_RUN_MAX (1u << 24)
typedef struct ipmpi_gather_each {
    const uint8_t *p;
    size_t left;
    const ipmpi_limits_t *lim;
    const uint8_t *ref; /* the last whole frame, or NULL */
    ipmpi_hdr_t refh;
    uint64_t run_left;  /* engines of the current run still to give */
    int64_t run_next;   /* (wide: a whole frame's target may be INT32_MAX) */
} ipmpi_gather_each_t;
void ipmpi_gather_each_init(ipmpi_gather_each_t *it, const uint8_t *p, size_t left, const ipmpi_limits_t *lim);
int ipmpi_gather_each_next(ipmpi_gather_each_t *it, ipmpi_hdr_t *h, const uint8_t **frame);
/*
 * The same a run at a time: *count engines from h->target on (a whole
 * frame is a run of 1; an engine's reply and the run that repeats it come
 * as two), with the same checks. The two calls may be mixed: a run that
 * ipmpi_gather_each_next began comes with the engines it has not given.
 */
int ipmpi_gather_each_run(ipmpi_gather_each_t *it, ipmpi_hdr_t *h, const uint8_t **frame, uint32_t *count);

/*
 * Folds the gathered replies buf[0..len) in place: a whole frame that
 * repeats the last whole one kept (all but its target) becomes part of a
 * run (IPMPI_F_SAME), and runs of consecutive targets merge. The result
 * gives the same replies in the same order through ipmpi_gather_each and
 * is never longer. Returns the new length, or IPMPI_EPROTO /
 * IPMPI_E2BIG (buf unchanged) when buf is malformed.
 */
long ipmpi_gather_fold(uint8_t *buf, size_t len, const ipmpi_limits_t *lim);

/*
 * Before HELLO (doc/protocol.md section 1) a connection may send one
 * frame only: HELLO, not a reply, with one part, the key of
 * IPMPI_KEY_HEX_LEN bytes, so a peer without a key never makes the
 * controller allocate more than that. ipmpi_hello_hdr_ok says whether a
 * decoded header may be read on, ipmpi_hello_len_ok whether the decoded
 * length of its part may (1 yes, 0 refuse).
 */
int ipmpi_hello_hdr_ok(const ipmpi_hdr_t *h);
int ipmpi_hello_len_ok(uint64_t len);

/*
 * One entry of a shared-memory table (doc/protocol.md section 5): part
 * `part` of the frame is `len` bytes at `off` in the sender's memfd `fd`.
 */
typedef struct ipmpi_shmref {
    uint32_t part;
    uint32_t fd;
    uint64_t off;
    uint64_t len;
} ipmpi_shmref_t;

/* Writes the IPMPI_SHMREF_SIZE bytes of entry r to out. */
void ipmpi_shmref_encode(const ipmpi_shmref_t *r, uint8_t *out);

/*
 * Decodes the shm table tab (tlen bytes), the last part of a frame whose
 * other nparts parts have wire lengths lens. Checks: tlen is a non-zero
 * multiple of IPMPI_SHMREF_SIZE with at most nparts entries; indices
 * strictly ascending and below nparts; every part named has wire length 0;
 * reserved fields 0; len > 0; off + len does not overflow; each len within
 * lim->max_part and all named lens plus wire bytes (wire_total) within
 * lim->max_frame. Returns the number of entries (written to out, room for
 * cap) or IPMPI_EPROTO / IPMPI_E2BIG (IPMPI_EINVAL if cap is too small).
 */
long ipmpi_shmref_decode(const uint8_t *tab, uint64_t tlen, uint32_t nparts, const uint64_t *lens,
                         uint64_t wire_total, const ipmpi_limits_t *lim, ipmpi_shmref_t *out, uint32_t cap);

/*
 * A TASK_SUBMIT descriptor (doc/protocol.md section 6): u64 taskid, u32
 * nstages, u32 0, then u32 nparts and u32 retries per stage.
 */
#define IPMPI_TASK_STAGES_MAX 16u
#define IPMPI_TASK_RETRIES_MAX 1000u
typedef struct ipmpi_taskdesc {
    uint64_t id;
    uint32_t nstages;
    uint32_t nparts[IPMPI_TASK_STAGES_MAX];
    uint32_t retries[IPMPI_TASK_STAGES_MAX];
} ipmpi_taskdesc_t;

/*
 * Decodes the descriptor d (len bytes) of a frame with nparts parts in
 * all (the descriptor included). Checks: 1..IPMPI_TASK_STAGES_MAX stages,
 * len exactly 16 + 8 * nstages, the reserved word 0, every stage at least
 * one part, retries at most IPMPI_TASK_RETRIES_MAX, and the stages' parts
 * adding up to nparts - 1. Returns 0 with *out filled, IPMPI_EPROTO (the
 * layout is wrong) or IPMPI_EINVAL (a stage's values are out of bounds);
 * *out is written only on success. No allocation, no I/O.
 */
int ipmpi_taskdesc_decode(const uint8_t *d, uint64_t len, uint32_t nparts, ipmpi_taskdesc_t *out);

/* Little-endian helpers, also used for target lists (i32 arrays). */
static inline void ipmpi_put_u32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)(v >> 16); p[3] = (uint8_t)(v >> 24);
}
static inline uint32_t ipmpi_get_u32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static inline void ipmpi_put_u64(uint8_t *p, uint64_t v)
{
    ipmpi_put_u32(p, (uint32_t)v);
    ipmpi_put_u32(p + 4, (uint32_t)(v >> 32));
}
static inline uint64_t ipmpi_get_u64(const uint8_t *p)
{
    return (uint64_t)ipmpi_get_u32(p) | ((uint64_t)ipmpi_get_u32(p + 4) << 32);
}

#endif
