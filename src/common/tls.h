/*
 * TLS pieces shared by the controller and the client: TLS 1.3-only
 * contexts, self-signed certificates, SHA-256 certificate fingerprints
 * (the pin carried in a furl), random capability keys and constant-time
 * key comparison. Reentrant; OpenSSL 3 initialises itself.
 */
#ifndef IPMPI_TLS_H
#define IPMPI_TLS_H

#include <stddef.h>

#include <openssl/ssl.h>
#include <openssl/x509.h>

#include "ipmpi/protocol.h"

/* Writes the lowercase hex SHA-256 of cert's DER form. Returns 0 or IPMPI_ETLS. */
int ipmpi_tls_fingerprint(X509 *cert, char out[IPMPI_FP_HEX_LEN + 1]);

/* Server context (TLS 1.3 only) holding key and cert (the context takes its
 * own references). Returns NULL on failure. Caller owns the result. */
SSL_CTX *ipmpi_tls_server_ctx(EVP_PKEY *key, X509 *cert);

/* Client context (TLS 1.3 only). No CA check: the peer is pinned by its
 * fingerprint with ipmpi_tls_check_peer() after the handshake. Caller owns. */
SSL_CTX *ipmpi_tls_client_ctx(void);

/* Returns 0 if the peer certificate of ssl hashes to fp_hex, else IPMPI_EACCES. */
int ipmpi_tls_check_peer(SSL *ssl, const char *fp_hex);

/*
 * Loads key.pem/cert.pem from dir when reuse is set and both exist; else
 * makes a fresh EC P-256 key and a self-signed cert (CN=cn, 10 years) and
 * saves them there (mode 0600). On success *key and *cert are the caller's.
 * Returns 0, IPMPI_EIO or IPMPI_ETLS.
 */
int ipmpi_tls_load_or_make(const char *dir, const char *cn, int reuse, EVP_PKEY **key, X509 **cert);
/* The same in the directory open as dirfd (borrowed): files are opened
 * relative to it (openat), never through a link, and written new
 * (O_EXCL), so what was checked about the directory holds for them. */
int ipmpi_tls_load_or_make_at(int dirfd, const char *cn, int reuse, EVP_PKEY **key, X509 **cert);

/* Writes 2*nbytes lowercase hex digits of cryptographic randomness and a NUL. */
int ipmpi_random_hex(char *out, size_t nbytes);

/*
 * Tunes a connected TCP socket of the client link: no Nagle delay, and a
 * link that silently stops carrying packets (a partition, a laptop that
 * sleeps, a node that is gone) is declared dead after about idle_s + 3 *
 * 2 s of silence (TCP keepalive), or when sent data stays unacknowledged
 * that long (TCP_USER_TIMEOUT), so a waiting peer gets an error instead
 * of waiting forever; a healthy link that is merely quiet (a request
 * running for hours) is never cut, since the kernels answer the probes.
 * Best effort: options the system lacks are skipped.
 */
void ipmpi_tcp_tune(int fd, int idle_s);

/* Constant-time comparison of two n-byte strings: 1 if equal, else 0. */
int ipmpi_consttime_eq(const void *a, const void *b, size_t n);

#endif
