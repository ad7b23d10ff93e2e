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
 *   32  u64 aux        with IPMPI_F_SHM: the sender's pid; otherwise 0
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
#define IPMPI_F_REPLY 0x0001u  /* this frame is a reply */
/* Same-host shared memory (doc/protocol.md section 5): the last part is a
 * table of IPMPI_SHMREF_SIZE-byte entries naming parts whose bytes are in
 * a memfd of the sender (pid in aux) instead of on the wire. */
#define IPMPI_F_SHM 0x0002u
/* On a request: the replies may carry shared-memory parts (IPMPI_F_SHM);
 * the client releases each memfd they name with IPMPI_K_RELEASE. */
#define IPMPI_F_SHM_OK 0x0004u
/* On a request: shm table entries of the replies may name process memory
 * (IPMPI_SHM_VM), which the client reads with process_vm_readv. */
#define IPMPI_F_VM_OK 0x0008u
/* An shm table entry whose fd has this bit set names process memory, not
 * a memfd: its bytes are at address `offset` of the sender (read with
 * process_vm_readv); the whole u32 is the handle the client releases. */
#define IPMPI_SHM_VM 0x80000000u

/* One shm table entry: u32 part index, u32 fd, u64 offset, u64 length,
 * u64 reserved (0). */
#define IPMPI_SHMREF_SIZE 32u
/* Parts this large travel through shared memory when both ends allow it. */
#define IPMPI_SHM_MIN ((uint64_t)1 << 20)

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
    IPMPI_K_SHM_PROBE = 18,   /* controller: [nonce by shm] -> [the same bytes by shm] */
    IPMPI_K_RELEASE = 19,     /* controller: [u32 fds...]; no reply (see F_SHM_OK) */
    IPMPI_K_READY = 32,       /* engine -> controller once at start: [json properties] */
    IPMPI_K_EXIT = 33,        /* controller -> engine: leave the loop and exit */
    IPMPI_K_MAX_
};

#endif
