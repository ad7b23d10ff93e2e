/* Shared TLS helpers: see tls.h. */
#include "tls.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <limits.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>

#include "ipmpi/errors.h"

int ipmpi_tls_fingerprint(X509 *cert, char out[IPMPI_FP_HEX_LEN + 1])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    if (!X509_digest(cert, EVP_sha256(), md, &n) || n != 32)
        return IPMPI_ETLS;
    for (unsigned i = 0; i < n; i++) {
        out[2 * i] = "0123456789abcdef"[md[i] >> 4];
        out[2 * i + 1] = "0123456789abcdef"[md[i] & 15];
    }
    out[2 * n] = '\0';
    return 0;
}

static SSL_CTX *ctx_13(const SSL_METHOD *m)
{
    SSL_CTX *ctx = SSL_CTX_new(m);
    if (!ctx)
        return NULL;
    if (!SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION) ||
        !SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION)) {
        SSL_CTX_free(ctx);
        return NULL;
    }
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_num_tickets(ctx, 0);
    return ctx;
}

SSL_CTX *ipmpi_tls_server_ctx(EVP_PKEY *key, X509 *cert)
{
    SSL_CTX *ctx = ctx_13(TLS_server_method());
    if (!ctx)
        return NULL;
    if (SSL_CTX_use_certificate(ctx, cert) != 1 || SSL_CTX_use_PrivateKey(ctx, key) != 1 ||
        SSL_CTX_check_private_key(ctx) != 1) {
        SSL_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

SSL_CTX *ipmpi_tls_client_ctx(void)
{
    SSL_CTX *ctx = ctx_13(TLS_client_method());
    if (ctx)
        SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    return ctx;
}

int ipmpi_tls_check_peer(SSL *ssl, const char *fp_hex)
{
    char fp[IPMPI_FP_HEX_LEN + 1];
    X509 *peer = SSL_get1_peer_certificate(ssl);
    if (!peer)
        return IPMPI_EACCES;
    int rc = ipmpi_tls_fingerprint(peer, fp);
    X509_free(peer);
    if (rc != 0 || !ipmpi_consttime_eq(fp, fp_hex, IPMPI_FP_HEX_LEN))
        return IPMPI_EACCES;
    return 0;
}

static int make_cert(const char *cn, EVP_PKEY **key_out, X509 **cert_out)
{
    EVP_PKEY *key = EVP_EC_gen("P-256");
    if (!key)
        return IPMPI_ETLS;
    X509 *x = X509_new();
    if (!x)
        goto free_key;
    unsigned char serial[16];
    if (RAND_bytes(serial, sizeof serial) != 1)
        goto free_x;
    serial[0] &= 0x7f;
    BIGNUM *bn = BN_bin2bn(serial, sizeof serial, NULL);
    if (!bn)
        goto free_x;
    int ok = BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(x)) != NULL;
    BN_free(bn);
    if (!ok || !X509_set_version(x, 2) || !X509_gmtime_adj(X509_getm_notBefore(x), -3600) ||
        !X509_gmtime_adj(X509_getm_notAfter(x), 10L * 365 * 24 * 3600) || !X509_set_pubkey(x, key))
        goto free_x;
    X509_NAME *name = X509_get_subject_name(x);
    if (!X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8, (const unsigned char *)cn, -1, -1, 0) ||
        !X509_set_issuer_name(x, name) || !X509_sign(x, key, EVP_sha256()))
        goto free_x;
    *key_out = key;
    *cert_out = x;
    return 0;
free_x:
    X509_free(x);
free_key:
    EVP_PKEY_free(key);
    return IPMPI_ETLS;
}

/* name in dirfd, made new for writing (mode 0600): never through a link
 * planted under the name (the directory was checked to be this user's
 * own, see furlfile.c). */
static FILE *open_private(int dirfd, const char *name, const char *mode)
{
    unlinkat(dirfd, name, 0);
    int fd = openat(dirfd, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0)
        return NULL;
    fchmod(fd, 0600);
    FILE *f = fdopen(fd, mode);
    if (!f)
        close(fd);
    return f;
}

/* name in dirfd for reading, not through a link; NULL if it cannot be opened. */
static FILE *open_existing(int dirfd, const char *name)
{
    int fd = openat(dirfd, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return NULL;
    FILE *f = fdopen(fd, "r");
    if (!f)
        close(fd);
    return f;
}

int ipmpi_tls_load_or_make_at(int dirfd, const char *cn, int reuse, EVP_PKEY **key, X509 **cert)
{
    static const char kname[] = "controller-key.pem", cname[] = "controller-cert.pem";
    if (reuse) {
        FILE *kf = open_existing(dirfd, kname), *cf = open_existing(dirfd, cname);
        EVP_PKEY *k = kf ? PEM_read_PrivateKey(kf, NULL, NULL, NULL) : NULL;
        X509 *c = cf ? PEM_read_X509(cf, NULL, NULL, NULL) : NULL;
        if (kf)
            fclose(kf);
        if (cf)
            fclose(cf);
        if (k && c && X509_check_private_key(c, k) == 1) {
            *key = k;
            *cert = c;
            return 0;
        }
        EVP_PKEY_free(k);
        X509_free(c);
    }
    EVP_PKEY *k;
    X509 *c;
    int rc = make_cert(cn, &k, &c);
    if (rc != 0)
        return rc;
    FILE *kf = open_private(dirfd, kname, "w");
    FILE *cf = kf ? open_private(dirfd, cname, "w") : NULL;
    int ok = kf && cf && PEM_write_PrivateKey(kf, k, NULL, NULL, 0, NULL, NULL) && PEM_write_X509(cf, c);
    if (kf)
        ok = (fclose(kf) == 0) && ok;
    if (cf)
        ok = (fclose(cf) == 0) && ok;
    if (!ok) {
        EVP_PKEY_free(k);
        X509_free(c);
        return IPMPI_EIO;
    }
    *key = k;
    *cert = c;
    return 0;
}

int ipmpi_tls_load_or_make(const char *dir, const char *cn, int reuse, EVP_PKEY **key, X509 **cert)
{
    int dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dirfd < 0)
        return IPMPI_EIO;
    int rc = ipmpi_tls_load_or_make_at(dirfd, cn, reuse, key, cert);
    close(dirfd);
    return rc;
}

int ipmpi_random_hex(char *out, size_t nbytes)
{
    unsigned char buf[64];
    if (nbytes > sizeof buf || RAND_bytes(buf, (int)nbytes) != 1)
        return IPMPI_ETLS;
    for (size_t i = 0; i < nbytes; i++) {
        out[2 * i] = "0123456789abcdef"[buf[i] >> 4];
        out[2 * i + 1] = "0123456789abcdef"[buf[i] & 15];
    }
    out[2 * nbytes] = '\0';
    OPENSSL_cleanse(buf, sizeof buf);
    return 0;
}

int ipmpi_consttime_eq(const void *a, const void *b, size_t n)
{
    return CRYPTO_memcmp(a, b, n) == 0;
}

void ipmpi_tcp_tune(int fd, int idle_s)
{
    int one = 1, intvl = 2, cnt = 3;
    /* With keepalive on, TCP_USER_TIMEOUT also decides when failed probes
     * end the connection (measured: a 30 s value made a partition take
     * 31 s to notice), so it is the keepalive's own span. */
    unsigned int user_ms = (unsigned int)(idle_s + intvl * cnt) * 1000u;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle_s, sizeof idle_s);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof intvl);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof cnt);
#ifdef TCP_USER_TIMEOUT
    setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &user_ms, sizeof user_ms);
#endif
}
