/*
 * Unit tests for the TLS helpers (src/common/tls.h): certificates made and
 * kept private, the fingerprint pin, TLS 1.3 only, capability keys. The
 * handshakes run in this one thread over an in-memory BIO pair, so no
 * socket or second thread is involved. Single-threaded test program.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include <openssl/bio.h>
#include <openssl/ssl.h>

#include "ipmpi/errors.h"
#include "tls.h"

struct fixture {
    char dir[64];
    EVP_PKEY *key;
    X509 *cert;
    char fp[IPMPI_FP_HEX_LEN + 1];
};

static void remove_dir(const char *dir)
{
    char p[128];
    snprintf(p, sizeof p, "%s/controller-key.pem", dir);
    unlink(p);
    snprintf(p, sizeof p, "%s/controller-cert.pem", dir);
    unlink(p);
    rmdir(dir);
}

static int setup(void **state)
{
    struct fixture *fx = calloc(1, sizeof *fx);
    if (!fx)
        return -1;
    strcpy(fx->dir, "/tmp/ipmpi-test-tls-XXXXXX");
    if (!mkdtemp(fx->dir))
        goto free_fx;
    if (ipmpi_tls_load_or_make(fx->dir, "test", 0, &fx->key, &fx->cert) != 0)
        goto remove;
    if (ipmpi_tls_fingerprint(fx->cert, fx->fp) != 0)
        goto free_keys;
    *state = fx;
    return 0;
free_keys:
    EVP_PKEY_free(fx->key);
    X509_free(fx->cert);
remove:
    remove_dir(fx->dir);
free_fx:
    free(fx);
    return -1;
}

static int teardown(void **state)
{
    struct fixture *fx = *state;
    EVP_PKEY_free(fx->key);
    X509_free(fx->cert);
    remove_dir(fx->dir);
    free(fx);
    return 0;
}

/* Both ends of one connection over a BIO pair; handshake() drives them. */
struct conn {
    SSL *client;
    SSL *server;
};

static void conn_open(struct conn *c, SSL_CTX *cctx, SSL_CTX *sctx)
{
    BIO *cb = NULL, *sb = NULL;
    c->client = SSL_new(cctx);
    c->server = SSL_new(sctx);
    assert_non_null(c->client);
    assert_non_null(c->server);
    assert_int_equal(BIO_new_bio_pair(&cb, 0, &sb, 0), 1);
    SSL_set_bio(c->client, cb, cb);
    SSL_set_bio(c->server, sb, sb);
    SSL_set_connect_state(c->client);
    SSL_set_accept_state(c->server);
}

static void conn_close(struct conn *c)
{
    SSL_free(c->client);
    SSL_free(c->server);
}

/* 1 when both ends completed, 0 when either failed. */
static int handshake(struct conn *c)
{
    int cdone = 0, sdone = 0;
    for (int i = 0; i < 100 && !(cdone && sdone); i++) {
        if (!cdone) {
            int r = SSL_do_handshake(c->client);
            if (r == 1)
                cdone = 1;
            else if (SSL_get_error(c->client, r) != SSL_ERROR_WANT_READ)
                return 0;
        }
        if (!sdone) {
            int r = SSL_do_handshake(c->server);
            if (r == 1)
                sdone = 1;
            else if (SSL_get_error(c->server, r) != SSL_ERROR_WANT_READ)
                return 0;
        }
    }
    return cdone && sdone;
}

static void test_fingerprint_is_64_lowercase_hex_and_stable(void **state)
{
    struct fixture *fx = *state;
    char again[IPMPI_FP_HEX_LEN + 1];
    assert_int_equal(strlen(fx->fp), IPMPI_FP_HEX_LEN);
    assert_int_equal(strspn(fx->fp, "0123456789abcdef"), IPMPI_FP_HEX_LEN);
    assert_int_equal(ipmpi_tls_fingerprint(fx->cert, again), 0);
    assert_string_equal(fx->fp, again);
}

static void test_handshake_is_tls13_and_pinned_peer_passes(void **state)
{
    struct fixture *fx = *state;
    SSL_CTX *sctx = ipmpi_tls_server_ctx(fx->key, fx->cert);
    SSL_CTX *cctx = ipmpi_tls_client_ctx();
    assert_non_null(sctx);
    assert_non_null(cctx);
    struct conn c;
    conn_open(&c, cctx, sctx);
    assert_true(handshake(&c));
    assert_int_equal(SSL_version(c.client), TLS1_3_VERSION);
    assert_int_equal(ipmpi_tls_check_peer(c.client, fx->fp), 0);
    conn_close(&c);
    SSL_CTX_free(cctx);
    SSL_CTX_free(sctx);
}

static void test_check_peer_rejects_any_other_fingerprint(void **state)
{
    struct fixture *fx = *state;
    SSL_CTX *sctx = ipmpi_tls_server_ctx(fx->key, fx->cert);
    SSL_CTX *cctx = ipmpi_tls_client_ctx();
    struct conn c;
    conn_open(&c, cctx, sctx);
    assert_true(handshake(&c));
    /* One hex digit changed anywhere is another certificate. */
    for (int i = 0; i < IPMPI_FP_HEX_LEN; i++) {
        char fp[IPMPI_FP_HEX_LEN + 1];
        memcpy(fp, fx->fp, sizeof fp);
        fp[i] = fp[i] == '0' ? '1' : '0';
        assert_int_equal(ipmpi_tls_check_peer(c.client, fp), IPMPI_EACCES);
    }
    conn_close(&c);
    SSL_CTX_free(cctx);
    SSL_CTX_free(sctx);
}

static void test_check_peer_without_certificate_is_refused(void **state)
{
    struct fixture *fx = *state;
    SSL_CTX *cctx = ipmpi_tls_client_ctx();
    SSL *ssl = SSL_new(cctx);
    assert_non_null(ssl);
    /* No handshake: there is no peer certificate to match. */
    assert_int_equal(ipmpi_tls_check_peer(ssl, fx->fp), IPMPI_EACCES);
    SSL_free(ssl);
    SSL_CTX_free(cctx);
}

static void test_server_refuses_tls12_client(void **state)
{
    struct fixture *fx = *state;
    SSL_CTX *sctx = ipmpi_tls_server_ctx(fx->key, fx->cert);
    SSL_CTX *old = SSL_CTX_new(TLS_client_method());
    assert_non_null(old);
    assert_int_equal(SSL_CTX_set_max_proto_version(old, TLS1_2_VERSION), 1);
    struct conn c;
    conn_open(&c, old, sctx);
    assert_false(handshake(&c));
    conn_close(&c);
    SSL_CTX_free(old);
    SSL_CTX_free(sctx);
}

static void test_server_ctx_refuses_mismatched_key(void **state)
{
    struct fixture *fx = *state;
    char dir[] = "/tmp/ipmpi-test-tls2-XXXXXX";
    EVP_PKEY *k2;
    X509 *c2;
    assert_non_null(mkdtemp(dir));
    assert_int_equal(ipmpi_tls_load_or_make(dir, "other", 0, &k2, &c2), 0);
    assert_null(ipmpi_tls_server_ctx(k2, fx->cert));
    EVP_PKEY_free(k2);
    X509_free(c2);
    remove_dir(dir);
}

static void test_load_or_make_writes_files_only_owner_can_read(void **state)
{
    struct fixture *fx = *state;
    const char *names[] = {"controller-key.pem", "controller-cert.pem"};
    for (int i = 0; i < 2; i++) {
        char p[128];
        struct stat st;
        snprintf(p, sizeof p, "%s/%s", fx->dir, names[i]);
        assert_int_equal(stat(p, &st), 0);
        assert_int_equal(st.st_mode & 0777, 0600);
    }
}

static void test_load_or_make_reuses_kept_cert_and_replaces_it_when_asked(void **state)
{
    struct fixture *fx = *state;
    EVP_PKEY *k;
    X509 *c;
    char fp[IPMPI_FP_HEX_LEN + 1];

    /* reuse: the same certificate, so a copied furl keeps working */
    assert_int_equal(ipmpi_tls_load_or_make(fx->dir, "test", 1, &k, &c), 0);
    assert_int_equal(ipmpi_tls_fingerprint(c, fp), 0);
    assert_string_equal(fp, fx->fp);
    EVP_PKEY_free(k);
    X509_free(c);

    /* no reuse: a fresh one, saved in place of the old */
    assert_int_equal(ipmpi_tls_load_or_make(fx->dir, "test", 0, &k, &c), 0);
    assert_int_equal(ipmpi_tls_fingerprint(c, fp), 0);
    assert_string_not_equal(fp, fx->fp);
    EVP_PKEY_free(k);
    X509_free(c);
    char fp2[IPMPI_FP_HEX_LEN + 1];
    assert_int_equal(ipmpi_tls_load_or_make(fx->dir, "test", 1, &k, &c), 0);
    assert_int_equal(ipmpi_tls_fingerprint(c, fp2), 0);
    assert_string_equal(fp, fp2);
    EVP_PKEY_free(k);
    X509_free(c);
}

static void test_load_or_make_replaces_corrupt_files_when_reusing(void **state)
{
    struct fixture *fx = *state;
    char p[128];
    snprintf(p, sizeof p, "%s/controller-key.pem", fx->dir);
    FILE *f = fopen(p, "w");
    assert_non_null(f);
    fputs("not a key\n", f);
    fclose(f);
    EVP_PKEY *k;
    X509 *c;
    assert_int_equal(ipmpi_tls_load_or_make(fx->dir, "test", 1, &k, &c), 0);
    assert_int_equal(X509_check_private_key(c, k), 1);
    EVP_PKEY_free(k);
    X509_free(c);
}

static void test_load_or_make_fails_cleanly_in_missing_dir(void **state)
{
    (void)state;
    EVP_PKEY *k = (EVP_PKEY *)(uintptr_t)0x1;
    X509 *c = (X509 *)(uintptr_t)0x2;
    assert_int_equal(ipmpi_tls_load_or_make("/nonexistent/ipmpi/dir", "x", 1, &k, &c), IPMPI_EIO);
    /* out-params are written only on success */
    assert_true(k == (EVP_PKEY *)(uintptr_t)0x1);
    assert_true(c == (X509 *)(uintptr_t)0x2);
}

static void test_random_hex_is_lowercase_hex_of_right_length_and_varies(void **state)
{
    (void)state;
    char a[2 * 32 + 1], b[2 * 32 + 1];
    assert_int_equal(ipmpi_random_hex(a, 32), 0);
    assert_int_equal(ipmpi_random_hex(b, 32), 0);
    assert_int_equal(strlen(a), IPMPI_KEY_HEX_LEN);
    assert_int_equal(strspn(a, "0123456789abcdef"), IPMPI_KEY_HEX_LEN);
    assert_string_not_equal(a, b);
    char big[2 * 65 + 1];
    assert_int_equal(ipmpi_random_hex(big, 65), IPMPI_ETLS);
}

static void test_consttime_eq_compares_exactly_n_bytes(void **state)
{
    (void)state;
    assert_int_equal(ipmpi_consttime_eq("abcdef", "abcdef", 6), 1);
    assert_int_equal(ipmpi_consttime_eq("abcdef", "abcdeg", 6), 0);
    assert_int_equal(ipmpi_consttime_eq("xbcdef", "abcdef", 6), 0);
    assert_int_equal(ipmpi_consttime_eq("abcdef", "abcdeg", 5), 1);
    assert_int_equal(ipmpi_consttime_eq("a", "b", 0), 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_fingerprint_is_64_lowercase_hex_and_stable, setup, teardown),
        cmocka_unit_test_setup_teardown(test_handshake_is_tls13_and_pinned_peer_passes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_check_peer_rejects_any_other_fingerprint, setup, teardown),
        cmocka_unit_test_setup_teardown(test_check_peer_without_certificate_is_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_server_refuses_tls12_client, setup, teardown),
        cmocka_unit_test_setup_teardown(test_server_ctx_refuses_mismatched_key, setup, teardown),
        cmocka_unit_test_setup_teardown(test_load_or_make_writes_files_only_owner_can_read, setup, teardown),
        cmocka_unit_test_setup_teardown(test_load_or_make_reuses_kept_cert_and_replaces_it_when_asked, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_load_or_make_replaces_corrupt_files_when_reusing, setup, teardown),
        cmocka_unit_test(test_load_or_make_fails_cleanly_in_missing_dir),
        cmocka_unit_test(test_random_hex_is_lowercase_hex_of_right_length_and_varies),
        cmocka_unit_test(test_consttime_eq_compares_exactly_n_bytes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
