/*
 * ipmpi wire protocol: one frame format for the TLS client link and for the
 * MPI link between controller and engines.
 *
 * A frame is a fixed 40-byte little-endian header, then a table of nparts
 * u64 part lengths, then the parts themselves. Over TLS everything follows
 * in one byte stream; over MPI the header plus length table is one message
 * (tag IPMPI_TAG_HDR) and every part is its own message (tag IPMPI_TAG_PART,
 * split in chunks of at most IPMPI_MPI_CHUNK bytes), so a large buffer is
 * never joined with the others.
 *
 * Header layout (offsets in bytes, all little-endian):
 *    0  u32 magic      IPMPI_MAGIC
 *    4  u8  version    IPMPI_PROTO_VERSION
 *    5  u8  kind       enum ipmpi_kind
 *    6  u16 flags      IPMPI_F_*
 *    8  u64 req_id     chosen by the sender of the request, echoed in replies
 *   16  i32 target     request: engine id, IPMPI_TARGET_ALL or
 *                      IPMPI_TARGET_LIST (part 0 is then an array of i32 LE
 *                      engine ids, stripped by the controller);
 *                      reply: the engine id, or IPMPI_TARGET_CONTROLLER
 *   20  i32 status     0, or a negative IPMPI_E* code (see errors.h)
 *   24  u32 total      reply: how many replies this request produces in all
 *                      (one per target engine); 0 in requests
 *   28  u32 nparts     number of parts that follow
 *   32  u64 aux        kind-specific (unused: 0)
 *   40  u64 len[nparts]
 *
 * Thread safety: everything here is constants; see codec.h for the codec.
 */
#ifndef IPMPI_PROTOCOL_H
#define IPMPI_PROTOCOL_H

#include <stdint.h>

#define IPMPI_MAGIC 0x504d5049u /* "IPMP" */
#define IPMPI_PROTO_VERSION 1
#define IPMPI_HDR_SIZE 40

/* Hard bounds; runtime limits (ipmpi_limits_t) may be lower. */
#define IPMPI_MAX_PARTS 65536u
#define IPMPI_KEY_HEX_LEN 64 /* 256-bit capability key as lowercase hex */
#define IPMPI_FP_HEX_LEN 64  /* SHA-256 certificate fingerprint as hex */

#define IPMPI_TARGET_ALL (-1)
#define IPMPI_TARGET_CONTROLLER (-2)
#define IPMPI_TARGET_LIST (-3)

/* MPI tags on the runtime's private communicator. */
#define IPMPI_TAG_HDR 1
#define IPMPI_TAG_PART 2
#define IPMPI_MPI_CHUNK (1u << 30)

/* Flags. */
#define IPMPI_F_REPLY 0x0001u /* this frame is a reply */

/*
 * Kinds. Part layouts (requests -> replies). "meta" is a pickled dict built
 * by the engine (keys: id, number, input, stdout, stderr, and on error
 * etype, evalue, traceback); controller replies carry JSON or, on error, a
 * UTF-8 message in part 0 and never a pickle.
 */
enum ipmpi_kind {
    IPMPI_K_HELLO = 1,        /* [key hex] -> [json {"capability","engines","version"}] */
    IPMPI_K_EXECUTE = 2,      /* [code utf-8] -> [meta] */
    IPMPI_K_PUSH = 3,         /* [pickle dict, oob bufs...] -> [meta] */
    IPMPI_K_PULL = 4,         /* [pickle list of names] -> [meta, pickle values, oob bufs...] */
    IPMPI_K_APPLY = 5,        /* [cloudpickle (f,args,kwargs), bufs...] -> [meta, pickle result, bufs...] */
    IPMPI_K_RESET = 6,        /* [] -> [meta] */
    IPMPI_K_KEYS = 7,         /* [] -> [meta, pickle list] */
    IPMPI_K_KILL = 8,         /* [] -> [meta]; the engine exits after replying */
    IPMPI_K_QUEUE_STATUS = 9, /* controller: [] -> [json] */
    IPMPI_K_CLEAR_QUEUE = 10, /* controller: [] -> [json] */
    IPMPI_K_GET_RESULT = 11,  /* [pickle int or None] -> [meta of that earlier command] */
    IPMPI_K_GET_IDS = 12,     /* controller: [] -> [json list of ids] */
    IPMPI_K_SHUTDOWN = 13,    /* controller: [] -> [json]; then the whole job stops */
    IPMPI_K_TASK_SUBMIT = 14, /* tc: reserved for the task interface */
    IPMPI_K_TASK_ABORT = 15,
    IPMPI_K_TASK_BARRIER = 16,
    IPMPI_K_PROPERTIES = 17,  /* controller: [] -> [json list of engine properties] */
    IPMPI_K_READY = 32,       /* engine -> controller once at start: [json properties] */
    IPMPI_K_EXIT = 33,        /* controller -> engine: leave the loop and exit */
    IPMPI_K_MAX_
};

#endif
