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

/* On an engine's reply: its properties changed while it ran the request
 * (doc/protocol.md section 6); the scheduler reconsiders refused tasks. */
#define IPMPI_F_PROPS 0x0020u

/* On a request to engines: stream the output of the code it runs (the
 * controller passes the flag on to each engine). */
#define IPMPI_F_STREAM 0x0040u
/* On a reply: not the last one for this target. An engine's non-final
 * replies carry output of the running request (part 0 the stream name,
 * "stdout" or "stderr"; part 1 UTF-8 text, whole lines); the final reply
 * follows and still counts as the target's one reply. */
#define IPMPI_F_MORE 0x0080u
/* MPI link only, engine to controller: the parts follow the length table
 * in the same IPMPI_TAG_HDR message (a frame of at most IPMPI_PACK_MAX
 * bytes: one message instead of 1 + nparts). Never on the TLS link. */
#define IPMPI_F_PACKED 0x0100u
#define IPMPI_PACK_MAX 4096u
/* MPI link only (doc/protocol.md section 3, broadcast trees). On a request:
 * an IPMPI_TAG_TREE message of i32 ranks follows the header (this engine,
 * then the ranks of its subtree); the engine forwards the request to its
 * children and answers with one IPMPI_TAG_GATHER message to its parent
 * (the sender of the request) holding its own and its subtree's replies. */
#define IPMPI_F_TREE 0x0200u
/* On a reply: part 0 holds whole final reply frames of several engines
 * back to back (header, lengths, parts each). Engine to controller at the
 * end of a tree; controller to client, forwarded whole, only for a
 * request that carried IPMPI_F_GATHER_OK: the client reads each inner
 * frame's target, status and parts, and takes req_id and total from the
 * enclosing frame (the inner ones are the controller's own). */
#define IPMPI_F_GATHER 0x0400u
/* On a request: sent again because an engine relaying it died; run it
 * only if this engine has not seen this request id, and answer directly. */
#define IPMPI_F_RETRY 0x0800u
/* On a client's request: its replies may come as IPMPI_F_GATHER frames. */
#define IPMPI_F_GATHER_OK 0x1000u
/* On an inner frame of an IPMPI_F_GATHER part: a run. Engines target,
 * target + 1, ..., target + aux - 1 each answered exactly as the nearest
 * whole inner frame before it in the part (same kind, flags, req_id,
 * status, total, lengths and parts); the run has no parts of its own
 * (nparts 0). Relays fold identical replies into runs (ipmpi_gather_fold),
 * so the replies of N engines that agree cost O(subtrees) bytes. */
#define IPMPI_F_SAME 0x2000u
#define IPMPI_TAG_TREE 3
#define IPMPI_TAG_GATHER 4

/*
 * Kinds: one table makes the enum, the names, who may send each kind and
 * the constants the Python layers read (the client module and the engine
 * get them from this table at start-up). Part layouts are in
 * doc/protocol.md; "meta" is a pickled dict built by the engine;
 * controller replies carry JSON or, on error, a UTF-8 message in part 0,
 * never a pickle.
 *
 * XX(NAME, value, "name", who): who is a mask of
 *   IPMPI_KW_MEC     the mec capability may send it
 *   IPMPI_KW_TC      the tc capability may send it
 *   IPMPI_KW_ENGINE  it goes to engines' queues and an engine runs it
 *                    (otherwise the controller answers it)
 *   IPMPI_KW_INTERNAL between controller and engines only
 * Values are part of the wire protocol and never change.
 */
#define IPMPI_KW_MEC 0x1u
#define IPMPI_KW_TC 0x2u
#define IPMPI_KW_ENGINE 0x4u
#define IPMPI_KW_INTERNAL 0x8u
#define IPMPI_KW_BOTH (IPMPI_KW_MEC | IPMPI_KW_TC)
#define IPMPI_KW_MEC_ENGINE (IPMPI_KW_MEC | IPMPI_KW_ENGINE)

#define IPMPI_KIND_MAP(XX)                                           \
    XX(HELLO, 1, "hello", IPMPI_KW_BOTH)                             \
    XX(EXECUTE, 2, "execute", IPMPI_KW_MEC_ENGINE)                   \
    XX(PUSH, 3, "push", IPMPI_KW_MEC_ENGINE)                         \
    XX(PULL, 4, "pull", IPMPI_KW_MEC_ENGINE)                         \
    XX(APPLY, 5, "apply", IPMPI_KW_MEC_ENGINE)                       \
    XX(RESET, 6, "reset", IPMPI_KW_MEC_ENGINE)                       \
    XX(KEYS, 7, "keys", IPMPI_KW_MEC_ENGINE)                         \
    XX(KILL, 8, "kill", IPMPI_KW_MEC_ENGINE)                         \
    XX(QUEUE_STATUS, 9, "queue_status", IPMPI_KW_BOTH)               \
    XX(CLEAR_QUEUE, 10, "clear_queue", IPMPI_KW_MEC)                 \
    XX(GET_RESULT, 11, "get_result", IPMPI_KW_MEC_ENGINE)            \
    XX(GET_IDS, 12, "get_ids", IPMPI_KW_BOTH)                        \
    XX(SHUTDOWN, 13, "shutdown", IPMPI_KW_MEC)                       \
    XX(TASK_SUBMIT, 14, "task_submit", IPMPI_KW_TC)                  \
    XX(TASK_ABORT, 15, "task_abort", IPMPI_KW_TC)                    \
    XX(TASK_BARRIER, 16, "task_barrier", IPMPI_KW_TC)                \
    XX(PROPERTIES, 17, "properties", IPMPI_KW_BOTH)                  \
    XX(SHM_PROBE, 18, "shm_probe", IPMPI_KW_BOTH)                    \
    XX(RELEASE, 19, "release", IPMPI_KW_BOTH)                        \
    XX(TASK_RESULT, 20, "task_result", IPMPI_KW_TC)                  \
    XX(TASK_STATUS, 21, "task_status", IPMPI_KW_TC)                  \
    XX(TASK_CLEAR, 22, "task_clear", IPMPI_KW_TC)                    \
    XX(TASK_SPIN, 23, "task_spin", IPMPI_KW_TC)                      \
    XX(TASK_RESERVE, 24, "task_reserve", IPMPI_KW_TC)                \
    XX(PROPS, 25, "props", IPMPI_KW_MEC_ENGINE)                      \
    XX(INTERRUPT, 26, "interrupt", IPMPI_KW_MEC)                     \
    XX(RESULT_FETCH, 27, "result_fetch", IPMPI_KW_MEC)               \
    XX(RESULT_CLEAR, 28, "result_clear", IPMPI_KW_MEC)               \
    XX(READY, 32, "ready", IPMPI_KW_INTERNAL)                        \
    XX(EXIT, 33, "exit", IPMPI_KW_INTERNAL)

enum ipmpi_kind {
#define IPMPI_XX_(name, val, str, who) IPMPI_K_##name = (val),
    IPMPI_KIND_MAP(IPMPI_XX_)
#undef IPMPI_XX_
    IPMPI_K_MAX_ = 34
};

/* The name of kind k ("execute"; "unknown" for none), never NULL. */
const char *ipmpi_kind_name(unsigned k);
/* The IPMPI_KW_* mask of kind k; 0 for an unknown kind. */
unsigned ipmpi_kind_who(unsigned k);

#endif
