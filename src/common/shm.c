/* Same-host shared memory helpers: see shm.h. */
#include "shm.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "ipmpi/errors.h"

int ipmpi_host_id(char *buf, size_t cap)
{
    char boot[64] = "";
    FILE *f = fopen("/proc/sys/kernel/random/boot_id", "r");
    if (!f)
        return IPMPI_EIO;
    int ok = fgets(boot, sizeof boot, f) != NULL;
    fclose(f);
    if (!ok)
        return IPMPI_EIO;
    boot[strcspn(boot, "\n")] = '\0';
    struct stat st;
    if (stat("/proc/self/ns/pid", &st) != 0)
        return IPMPI_EIO;
    int n = snprintf(buf, cap, "%s/%llu", boot, (unsigned long long)st.st_ino);
    return n > 0 && (size_t)n < cap ? 0 : IPMPI_EINVAL;
}

int ipmpi_shm_create(const char *what, uint64_t len)
{
    char name[64];
    snprintf(name, sizeof name, "ipmpi-%s", what);
    if (len > (uint64_t)INT64_MAX)
        return IPMPI_EINVAL;
    int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0)
        return errno == ENOMEM || errno == EMFILE || errno == ENFILE ? IPMPI_ENOMEM : IPMPI_EIO;
    if (ftruncate(fd, (off_t)len) != 0 || fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_SEAL) != 0) {
        close(fd);
        return IPMPI_ENOMEM;
    }
    return fd;
}

int ipmpi_shm_open_peer(int pid, uint32_t fd, uint64_t need, uint64_t *size, uint64_t *ino, char *why,
                        size_t whycap)
{
    char path[64], link[128];
    snprintf(path, sizeof path, "/proc/%d/fd/%u", pid, fd);
    if (pid <= 0) {
        snprintf(why, whycap, "bad pid %d", pid);
        return IPMPI_EACCES;
    }
    /* Look before opening (no device or FIFO of the peer is ever opened),
     * and check again what was opened. */
    ssize_t pre = readlink(path, link, sizeof link - 1);
    link[pre > 0 ? pre : 0] = '\0';
    if (pre <= 0 || strncmp(link, "/memfd:ipmpi", 12) != 0) {
        snprintf(why, whycap, "fd %u of pid %d is not an ipmpi memfd (%s)", fd, pid,
                 pre > 0 ? link : strerror(errno));
        return IPMPI_EACCES;
    }
    int g = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (g < 0) {
        snprintf(why, whycap, "cannot open %s: %s", path, strerror(errno));
        return IPMPI_EACCES;
    }
    /* Check what was opened, not what the path named a moment before. */
    snprintf(path, sizeof path, "/proc/self/fd/%d", g);
    ssize_t n = readlink(path, link, sizeof link - 1);
    link[n > 0 ? n : 0] = '\0';
    struct stat st;
    int seals = fcntl(g, F_GET_SEALS);
    if (strncmp(link, "/memfd:ipmpi", 12) != 0)
        snprintf(why, whycap, "fd %u of pid %d is not an ipmpi memfd (%s)", fd, pid, link);
    else if (fstat(g, &st) != 0 || !S_ISREG(st.st_mode))
        snprintf(why, whycap, "fd %u of pid %d is not a regular file", fd, pid);
    else if (st.st_uid != geteuid())
        snprintf(why, whycap, "memfd %u of pid %d belongs to uid %u, not %u", fd, pid, (unsigned)st.st_uid,
                 (unsigned)geteuid());
    else if (seals < 0 || !(seals & F_SEAL_SHRINK))
        snprintf(why, whycap, "memfd %u of pid %d is not sealed against shrinking", fd, pid);
    else if ((uint64_t)st.st_size < need)
        snprintf(why, whycap, "memfd %u of pid %d has %llu bytes, %llu named", fd, pid,
                 (unsigned long long)st.st_size, (unsigned long long)need);
    else {
        *size = (uint64_t)st.st_size;
        *ino = (uint64_t)st.st_ino;
        return g;
    }
    close(g);
    return IPMPI_EACCES;
}

void *ipmpi_shm_map(int fd, uint64_t len, int writable, int populate)
{
    if (len == 0 || len > SIZE_MAX)
        return NULL;
    void *p = mmap(NULL, (size_t)len, PROT_READ | (writable ? PROT_WRITE : 0),
                   MAP_SHARED | (populate ? MAP_POPULATE : 0), fd, 0);
    return p == MAP_FAILED ? NULL : p;
}

int ipmpi_vm_read(int pid, uint64_t addr, void *dst, uint64_t len)
{
    uint8_t *d = dst;
    while (len > 0) {
        size_t n = len > ((size_t)1 << 30) ? (size_t)1 << 30 : (size_t)len;
        struct iovec local = {.iov_base = d, .iov_len = n};
        struct iovec remote = {.iov_base = (void *)(uintptr_t)addr, .iov_len = n};
        ssize_t got = process_vm_readv(pid, &local, 1, &remote, 1, 0);
        if (got < 0)
            return -1;
        if (got == 0) {
            errno = EFAULT;
            return -1;
        }
        d += got;
        addr += (uint64_t)got;
        len -= (uint64_t)got;
    }
    return 0;
}
