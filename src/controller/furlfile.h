/*
 * The controller's security directory and listening socket: certificate
 * and capability keys (kept across restarts when the client port is
 * fixed, so a restarted controller writes identical furls), the choice of
 * the address written into the furls, and writing/removing the two furl
 * files atomically (temp file + rename, mode 0600).
 *
 * Thread safety: none; the controller's loop thread only, at start-up and
 * shutdown.
 */
#ifndef IPMPI_CTL_FURLFILE_H
#define IPMPI_CTL_FURLFILE_H

#include <limits.h>

#include <openssl/ssl.h>

#include "furl.h"

typedef struct ipmpi_security {
    char secdir[PATH_MAX];
    int dfd; /* security/, open since it was checked: every file goes in through it (openat) */
    char mec_path[PATH_MAX], tc_path[PATH_MAX];
    char mec_key[IPMPI_KEY_HEX_LEN + 1], tc_key[IPMPI_KEY_HEX_LEN + 1];
    char fingerprint[IPMPI_FP_HEX_LEN + 1];
    EVP_PKEY *key;
    X509 *cert;
    int written; /* the furl files exist and are ours to remove */
} ipmpi_security_t;

/*
 * Checks dir (this user's, not writable by others, not inside a directory
 * others may write to without the sticky bit), makes <dir>/security
 * (0700; an existing one must be this user's and closed to others),
 * loads or makes the certificate (CN = cn) and the two keys in it;
 * persistent: reuse what is there. Every file is opened relative to the
 * checked directory's descriptor (furlfile.c). Returns 0, IPMPI_EACCES
 * (refused, saying why and how to fix it), IPMPI_EIO or IPMPI_ETLS
 * (logged). On success the caller owns sec's contents
 * (ipmpi_security_fini).
 */
int ipmpi_security_setup(ipmpi_security_t *sec, const char *dir, const char *cn, int persistent);
void ipmpi_security_fini(ipmpi_security_t *sec);

/*
 * Opens the non-blocking listening socket: on client_ip when it is not
 * empty (also the furl address), else on all addresses with the furl
 * address chosen as described in the controller's documentation (host
 * name if it resolves off loopback, else the first non-loopback IPv4,
 * else 127.0.0.1). port 0 picks a free one. On success *fd (caller owns),
 * host and *port_out are written. Returns 0 or IPMPI_EIO (logged).
 */
int ipmpi_listen_open(const char *client_ip, int port, int *fd, char host[IPMPI_FURL_HOST_MAX + 1],
                      int *port_out);

/* Writes both furl files for host:port. Returns 0 or IPMPI_EIO (logged). */
int ipmpi_furls_write(ipmpi_security_t *sec, const char *host, int port);
/* Removes the furl files if this process wrote them. */
void ipmpi_furls_remove(ipmpi_security_t *sec);

#endif
