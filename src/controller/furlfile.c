/*
 * Security directory, keys, listening socket and furl files of the
 * controller: see furlfile.h. Loop thread only.
 */
#include "furlfile.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ipmpi/errors.h"
#include "log.h"
#include "tls.h"

/* Writes len bytes to name in dirfd through a temp file and renameat(),
 * mode 0600, so a reader sees either no file or the whole file. The temp
 * file is made new (O_EXCL) and never through a link (O_NOFOLLOW), and
 * relative to the checked directory's descriptor (openat), so a directory
 * swapped in under the same path afterwards gets nothing: a file or link
 * planted under its name is removed first, never written through. */
static int write_atomic(int dirfd, const char *name, const char *data, size_t len)
{
    char tmp[NAME_MAX + 1];
    if (snprintf(tmp, sizeof tmp, "%s.tmp%d", name, (int)getpid()) >= (int)sizeof tmp)
        return IPMPI_EINVAL;
    unlinkat(dirfd, tmp, 0);
    int fd = openat(dirfd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0)
        return IPMPI_EIO;
    int rc = IPMPI_EIO;
    fchmod(fd, 0600);
    size_t off = 0;
    while (off < len) {
        ssize_t w = write(fd, data + off, len - off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            goto close_fd;
        off += (size_t)w;
    }
    if (fsync(fd) != 0)
        goto close_fd;
    rc = 0;
close_fd:
    if (close(fd) != 0)
        rc = IPMPI_EIO;
    if (rc == 0 && renameat(dirfd, tmp, dirfd, name) != 0)
        rc = IPMPI_EIO;
    if (rc != 0)
        unlinkat(dirfd, tmp, 0);
    return rc;
}

/* Reads a 64-hex-digit key from name in dirfd (not through a link) into
 * out (lowercased). 0 or IPMPI_EIO. */
static int read_key(int dirfd, const char *name, char out[IPMPI_KEY_HEX_LEN + 1])
{
    char buf[IPMPI_KEY_HEX_LEN + 8];
    int fd = openat(dirfd, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return IPMPI_EIO;
    size_t n = 0;
    for (;;) {
        ssize_t r = read(fd, buf + n, sizeof buf - 1 - n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        n += (size_t)r;
        if (n == sizeof buf - 1)
            break;
    }
    close(fd);
    buf[n] = '\0';
    while (n > 0 && isspace((unsigned char)buf[n - 1]))
        buf[--n] = '\0';
    if (n != IPMPI_KEY_HEX_LEN)
        return IPMPI_EIO;
    for (size_t i = 0; i < n; i++) {
        if (!isxdigit((unsigned char)buf[i]))
            return IPMPI_EIO;
        out[i] = (char)tolower((unsigned char)buf[i]);
    }
    out[n] = '\0';
    return 0;
}

/* Longest chain of parent directories looked at (a loop guard). */
#define MAX_DEPTH 256

/*
 * Refuses a profile directory (open as fd, shown as path) that someone
 * else could move away and replace: one of the directories it is in is
 * writable by group or others without the sticky bit (a sticky one, such
 * as /tmp, lets only an entry's owner rename it), as ssh refuses such
 * path components. Walks ".." from fd up to the root (a directory that
 * cannot even be searched ends the walk). Returns 0 or IPMPI_EACCES
 * (logged).
 */
static int check_parents(int fd, const char *path)
{
    char shown[PATH_MAX];
    if (!realpath(path, shown))
        snprintf(shown, sizeof shown, "%s", path);
    struct stat st;
    if (fstat(fd, &st) != 0)
        return IPMPI_EIO;
    int cur = fd, rc = 0;
    for (int depth = 0; depth < MAX_DEPTH; depth++) {
        /* O_PATH: a directory above may be searchable only (0711). */
        int up = openat(cur, "..", O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (up < 0)
            break;
        if (cur != fd)
            close(cur);
        cur = up;
        struct stat pst;
        if (fstat(up, &pst) != 0)
            break;
        if (pst.st_dev == st.st_dev && pst.st_ino == st.st_ino)
            break; /* the root: its ".." is itself */
        char *slash = strrchr(shown, '/');
        if (slash && slash != shown)
            *slash = '\0';
        else
            snprintf(shown, sizeof shown, "/");
        if ((pst.st_mode & (S_IWGRP | S_IWOTH)) && !(pst.st_mode & S_ISVTX)) {
            ipmpi_log(IPMPI_LOG_ERROR,
                      "%s is inside %s, which is writable by %s without the sticky bit (mode %04o): they "
                      "could move the profile directory away and put their own in its place; use a profile "
                      "directory elsewhere (--ipmpi-dir or IPMPI_DIR), or run chmod go-w %s (or chmod +t %s)",
                      path, shown, (pst.st_mode & S_IWOTH) ? "others" : "its group",
                      (unsigned)(pst.st_mode & 07777), shown, shown);
            rc = IPMPI_EACCES;
            break;
        }
        st = pst;
    }
    if (cur != fd)
        close(cur);
    return rc;
}

/*
 * Keys go only where nobody else can read or replace them. The profile
 * directory (secret = 0) and its security/ (secret = 1) must be
 * directories, not links, owned by this user; the profile directory must
 * not be writable by others (they could swap security/ for their own) nor
 * be inside a directory others may write to without the sticky bit
 * (check_parents), and security/ must not be open to others at all (0700;
 * an existing looser one is refused, not changed: others may have read or
 * replaced what is in it). Otherwise the controller refuses to start,
 * saying why: a shared or planted directory would hand the keys to someone
 * else. Opens name relative to at (AT_FDCWD or the profile directory) with
 * O_DIRECTORY | O_NOFOLLOW; returns the descriptor the checks were made
 * on (caller closes), or a negative IPMPI_E* (logged). Everything after is
 * done relative to it.
 */
static int open_checked_dir(int at, const char *name, const char *path, int secret)
{
    int fd = openat(at, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) {
        ipmpi_log(IPMPI_LOG_ERROR, "cannot open %s: %s (a symbolic link is refused here)", path, strerror(errno));
        return IPMPI_EACCES;
    }
    struct stat st;
    int rc = 0;
    if (fstat(fd, &st) != 0) {
        ipmpi_log(IPMPI_LOG_ERROR, "cannot stat %s: %s", path, strerror(errno));
        rc = IPMPI_EIO;
    } else if (st.st_uid != geteuid()) {
        ipmpi_log(IPMPI_LOG_ERROR,
                  "%s belongs to uid %u, not to this user (uid %u): keys kept there could be read or replaced "
                  "by its owner; use a profile directory of your own (--ipmpi-dir or IPMPI_DIR)",
                  path, (unsigned)st.st_uid, (unsigned)geteuid());
        rc = IPMPI_EACCES;
    } else if (!secret && (st.st_mode & (S_IWGRP | S_IWOTH))) {
        ipmpi_log(IPMPI_LOG_ERROR,
                  "%s is writable by others (mode %03o): they could replace its security/ directory; "
                  "run chmod go-w %s",
                  path, (unsigned)(st.st_mode & 0777), path);
        rc = IPMPI_EACCES;
    } else if (secret && (st.st_mode & 077)) {
        ipmpi_log(IPMPI_LOG_ERROR,
                  "security directory %s is open to others (mode %03o): they may have read or replaced the "
                  "keys in it, so it is refused; run chmod 700 %s (and remove the files in it, for new keys, "
                  "if others may have read them)",
                  path, (unsigned)(st.st_mode & 0777), path);
        rc = IPMPI_EACCES;
    } else if (!secret) {
        rc = check_parents(fd, path);
    }
    if (rc != 0) {
        close(fd);
        return rc;
    }
    return fd;
}

static int load_or_make_key(int dirfd, const char *secdir, const char *name, int persistent,
                            char out[IPMPI_KEY_HEX_LEN + 1])
{
    char file[64], line[IPMPI_KEY_HEX_LEN + 2];
    snprintf(file, sizeof file, "ipcontroller-%s.key", name);
    if (persistent && read_key(dirfd, file, out) == 0)
        return 0;
    int rc = ipmpi_random_hex(out, IPMPI_KEY_HEX_LEN / 2);
    if (rc != 0)
        return rc;
    snprintf(line, sizeof line, "%s\n", out);
    rc = write_atomic(dirfd, file, line, strlen(line));
    if (rc != 0)
        ipmpi_log(IPMPI_LOG_ERROR, "cannot write %s/%s: %s", secdir, file, strerror(errno));
    return rc;
}

int ipmpi_security_setup(ipmpi_security_t *sec, const char *dir, const char *cn, int persistent)
{
    memset(sec, 0, sizeof *sec);
    sec->dfd = -1;
    if (snprintf(sec->secdir, sizeof sec->secdir, "%s/security", dir) >= (int)sizeof sec->secdir ||
        snprintf(sec->mec_path, sizeof sec->mec_path, "%s/ipcontroller-mec.furl", sec->secdir) >=
            (int)sizeof sec->mec_path ||
        snprintf(sec->tc_path, sizeof sec->tc_path, "%s/ipcontroller-tc.furl", sec->secdir) >=
            (int)sizeof sec->tc_path) {
        ipmpi_log(IPMPI_LOG_ERROR, "profile directory path too long: %s", dir);
        return IPMPI_EINVAL;
    }
    int pfd = open_checked_dir(AT_FDCWD, dir, dir, 0);
    if (pfd < 0)
        return pfd;
    if (mkdirat(pfd, "security", 0700) != 0 && errno != EEXIST) {
        ipmpi_log(IPMPI_LOG_ERROR, "cannot create %s: %s", sec->secdir, strerror(errno));
        close(pfd);
        return IPMPI_EIO;
    }
    sec->dfd = open_checked_dir(pfd, "security", sec->secdir, 1);
    close(pfd);
    if (sec->dfd < 0) {
        int rc = sec->dfd;
        sec->dfd = -1;
        return rc;
    }
    int rc = ipmpi_tls_load_or_make_at(sec->dfd, cn, persistent, &sec->key, &sec->cert);
    if (rc != 0) {
        ipmpi_log(IPMPI_LOG_ERROR, "cannot load or make the certificate in %s: %s", sec->secdir,
                  ipmpi_strerror(rc));
        ipmpi_security_fini(sec);
        return rc;
    }
    rc = ipmpi_tls_fingerprint(sec->cert, sec->fingerprint);
    if (rc == 0)
        rc = load_or_make_key(sec->dfd, sec->secdir, "mec", persistent, sec->mec_key);
    if (rc == 0)
        rc = load_or_make_key(sec->dfd, sec->secdir, "tc", persistent, sec->tc_key);
    if (rc != 0) {
        ipmpi_security_fini(sec);
        return rc;
    }
    return 0;
}

void ipmpi_security_fini(ipmpi_security_t *sec)
{
    if (sec->dfd >= 0)
        close(sec->dfd);
    sec->dfd = -1;
    EVP_PKEY_free(sec->key);
    X509_free(sec->cert);
    sec->key = NULL;
    sec->cert = NULL;
}

static int is_loopback_sa(const struct sockaddr *sa)
{
    if (sa->sa_family == AF_INET)
        return (ntohl(((const struct sockaddr_in *)sa)->sin_addr.s_addr) >> 24) == 127;
    if (sa->sa_family == AF_INET6) {
        const struct in6_addr *a = &((const struct sockaddr_in6 *)sa)->sin6_addr;
        return IN6_IS_ADDR_LOOPBACK(a) ||
               (IN6_IS_ADDR_V4MAPPED(a) && a->s6_addr[12] == 127);
    }
    return 0;
}

/* The host name if it resolves to some non-loopback address. */
static int pick_hostname(char host[IPMPI_FURL_HOST_MAX + 1])
{
    char name[256];
    if (gethostname(name, sizeof name - 1) != 0)
        return -1;
    name[sizeof name - 1] = '\0';
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *ai = NULL;
    if (getaddrinfo(name, NULL, &hints, &ai) != 0)
        return -1;
    int ok = 0;
    for (struct addrinfo *p = ai; p && !ok; p = p->ai_next)
        if (p->ai_family == AF_INET && !is_loopback_sa(p->ai_addr))
            ok = 1;
    freeaddrinfo(ai);
    if (!ok)
        return -1;
    snprintf(host, IPMPI_FURL_HOST_MAX + 1, "%s", name);
    return 0;
}

/* The first non-loopback IPv4 address of an interface that is up. */
static int pick_ifaddr(char host[IPMPI_FURL_HOST_MAX + 1])
{
    struct ifaddrs *ifa = NULL;
    if (getifaddrs(&ifa) != 0)
        return -1;
    int rc = -1;
    for (struct ifaddrs *p = ifa; p; p = p->ifa_next) {
        if (!p->ifa_addr || p->ifa_addr->sa_family != AF_INET || !(p->ifa_flags & IFF_UP) ||
            (p->ifa_flags & IFF_LOOPBACK) || is_loopback_sa(p->ifa_addr))
            continue;
        if (inet_ntop(AF_INET, &((struct sockaddr_in *)p->ifa_addr)->sin_addr, host, IPMPI_FURL_HOST_MAX + 1)) {
            rc = 0;
            break;
        }
    }
    freeifaddrs(ifa);
    return rc;
}

int ipmpi_listen_open(const char *client_ip, int port, int *fd_out, char host[IPMPI_FURL_HOST_MAX + 1],
                      int *port_out)
{
    char portstr[16];
    snprintf(portstr, sizeof portstr, "%d", port);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE},
                    *ai = NULL;
    int gai = getaddrinfo(client_ip[0] ? client_ip : "0.0.0.0", portstr, &hints, &ai);
    if (gai != 0) {
        ipmpi_log(IPMPI_LOG_ERROR, "cannot resolve --client-ip %s: %s", client_ip, gai_strerror(gai));
        return IPMPI_EIO;
    }
    int fd = -1, loopback = 0, err = 0;
    for (struct addrinfo *p = ai; p; p = p->ai_next) {
        fd = socket(p->ai_family, p->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, p->ai_protocol);
        if (fd < 0) {
            err = errno;
            continue;
        }
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, p->ai_addr, p->ai_addrlen) == 0 && listen(fd, SOMAXCONN) == 0) {
            loopback = is_loopback_sa(p->ai_addr);
            break;
        }
        err = errno;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(ai);
    if (fd < 0) {
        ipmpi_log(IPMPI_LOG_ERROR, "cannot listen on %s:%d: %s", client_ip[0] ? client_ip : "0.0.0.0", port,
                  strerror(err));
        return IPMPI_EIO;
    }
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    getsockname(fd, (struct sockaddr *)&ss, &sl);
    int real_port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                                    : ((struct sockaddr_in *)&ss)->sin_port);
    if (client_ip[0]) {
        snprintf(host, IPMPI_FURL_HOST_MAX + 1, "%s", client_ip);
    } else if (pick_hostname(host) == 0 || pick_ifaddr(host) == 0) {
        loopback = 0;
    } else {
        snprintf(host, IPMPI_FURL_HOST_MAX + 1, "127.0.0.1");
        loopback = 1;
    }
    ipmpi_log(IPMPI_LOG_INFO, "listening on %s:%d (furl address %s)", client_ip[0] ? client_ip : "0.0.0.0",
              real_port, host);
    if (loopback)
        ipmpi_log(IPMPI_LOG_WARN, "furl address %s is loopback: clients on other hosts cannot connect; "
                                  "use --client-ip",
                  host);
    *fd_out = fd;
    *port_out = real_port;
    return 0;
}

int ipmpi_furls_write(ipmpi_security_t *sec, const char *host, int port)
{
    ipmpi_furl_t f;
    char line[512];
    memset(&f, 0, sizeof f);
    snprintf(f.fingerprint, sizeof f.fingerprint, "%s", sec->fingerprint);
    snprintf(f.host, sizeof f.host, "%s", host);
    f.port = port;
    const char *keys[2] = {sec->mec_key, sec->tc_key}, *paths[2] = {sec->mec_path, sec->tc_path};
    static const char *const names[2] = {"ipcontroller-mec.furl", "ipcontroller-tc.furl"};
    for (int i = 0; i < 2; i++) {
        snprintf(f.key, sizeof f.key, "%s", keys[i]);
        int n = ipmpi_furl_format(&f, line, sizeof line - 1);
        if (n < 0) {
            ipmpi_log(IPMPI_LOG_ERROR, "cannot format the furl for %s:%d", host, port);
            return n;
        }
        line[n] = '\n';
        int rc = write_atomic(sec->dfd, names[i], line, (size_t)n + 1);
        if (rc != 0) {
            ipmpi_log(IPMPI_LOG_ERROR, "cannot write %s: %s", paths[i], strerror(errno));
            return rc;
        }
        sec->written = 1;
    }
    ipmpi_log(IPMPI_LOG_INFO, "wrote %s", sec->mec_path);
    ipmpi_log(IPMPI_LOG_INFO, "wrote %s", sec->tc_path);
    return 0;
}

void ipmpi_furls_remove(ipmpi_security_t *sec)
{
    if (!sec->written)
        return;
    unlinkat(sec->dfd, "ipcontroller-mec.furl", 0);
    unlinkat(sec->dfd, "ipcontroller-tc.furl", 0);
    sec->written = 0;
}
