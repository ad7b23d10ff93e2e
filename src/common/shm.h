/*
 * Same-host shared memory for bulk parts (doc/protocol.md section 5):
 * memfds that one process fills and the other maps through
 * /proc/<pid>/fd/<fd>. Used by the client and the controller.
 *
 * Every memfd made here is named "ipmpi-..." and sealed against shrinking
 * (F_SEAL_SHRINK), and ipmpi_shm_open_peer accepts only such memfds: a
 * peer that truncated a memfd the other side has mapped would make that
 * side crash with SIGBUS on its next read.
 *
 * Thread safety: all functions are reentrant.
 */
#ifndef IPMPI_SHM_H
#define IPMPI_SHM_H

#include <stddef.h>
#include <stdint.h>

/* "<boot id>/<pid namespace inode>": equal for two processes that can see
 * each other's /proc/<pid>. */
#define IPMPI_HOST_ID_MAX 96
int ipmpi_host_id(char *buf, size_t cap);

/*
 * A new memfd of len bytes (name "ipmpi-<what>", close-on-exec, sealed
 * against shrinking). Returns the fd or a negative IPMPI_E* code.
 */
int ipmpi_shm_create(const char *what, uint64_t len);

/*
 * Opens fd `fd` of process pid read-only and checks that it is an ipmpi
 * memfd: a regular file owned by our effective uid, named "/memfd:ipmpi",
 * sealed against shrinking, at least need bytes long. Returns a new fd
 * (size and inode in *size, *ino) or IPMPI_EACCES with the reason in why.
 */
int ipmpi_shm_open_peer(int pid, uint32_t fd, uint64_t need, uint64_t *size, uint64_t *ino, char *why,
                        size_t whycap);

/* Maps len bytes of fd shared (read-only unless writable), populated when
 * populate is set. NULL on failure. */
void *ipmpi_shm_map(int fd, uint64_t len, int writable, int populate);

/* Copies len bytes at address addr of process pid into dst
 * (process_vm_readv, in pieces as the kernel allows). Returns 0, or -1 with
 * errno set (EPERM/ESRCH/EFAULT...). */
int ipmpi_vm_read(int pid, uint64_t addr, void *dst, uint64_t len);

#endif
