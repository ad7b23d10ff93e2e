/*
 * Unit tests for the controller's security directory (src/controller/
 * furlfile.c): what it refuses, that it changes nothing it refuses, and
 * that every file goes in through the descriptor of the directory it
 * checked (openat), so a directory swapped in under the same path later
 * gets nothing. Runs as any user (the suite runs as root: a directory
 * owned by another uid needs chown, tests/system/test_security_dir.py).
 * Single-threaded test program.
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

#include "controller/furlfile.h"
#include "ipmpi/errors.h"

static char top[64];

static int setup(void **state)
{
    (void)state;
    strcpy(top, "/tmp/ipmpi-test-secdir-XXXXXX");
    return mkdtemp(top) ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", top);
    return system(cmd) == 0 ? 0 : -1;
}

static void path_of(char *out, size_t cap, const char *rel)
{
    snprintf(out, cap, "%s/%s", top, rel);
}

static int exists(const char *rel)
{
    char p[256];
    struct stat st;
    path_of(p, sizeof p, rel);
    return lstat(p, &st) == 0;
}

static void make_dir(const char *rel, mode_t mode)
{
    char p[256];
    path_of(p, sizeof p, rel);
    assert_int_equal(mkdir(p, 0700), 0);
    assert_int_equal(chmod(p, mode), 0);
}

/* The files land in the directory that was checked, even when another
 * directory is put under its name afterwards (a rename race). */
static void test_files_go_into_the_checked_directory(void **state)
{
    (void)state;
    char prof[256], sec[256], moved[256];
    make_dir("prof", 0700);
    path_of(prof, sizeof prof, "prof");
    ipmpi_security_t s;
    assert_int_equal(ipmpi_security_setup(&s, prof, "test", 0), 0);
    assert_true(exists("prof/security/ipcontroller-mec.key"));
    assert_true(exists("prof/security/controller-key.pem"));
    /* security/ is moved away and a directory of someone else's making
     * takes its name: the furls still go into the one that was checked. */
    path_of(sec, sizeof sec, "prof/security");
    path_of(moved, sizeof moved, "prof/checked");
    assert_int_equal(rename(sec, moved), 0);
    make_dir("prof/security", 0777);
    assert_int_equal(ipmpi_furls_write(&s, "127.0.0.1", 4242), 0);
    assert_true(exists("prof/checked/ipcontroller-mec.furl"));
    assert_true(exists("prof/checked/ipcontroller-tc.furl"));
    assert_false(exists("prof/security/ipcontroller-mec.furl"));
    assert_false(exists("prof/security/ipcontroller-tc.furl"));
    ipmpi_furls_remove(&s);
    assert_false(exists("prof/checked/ipcontroller-mec.furl"));
    ipmpi_security_fini(&s);
}

static void test_a_security_directory_open_to_others_is_refused_unchanged(void **state)
{
    (void)state;
    char prof[256], sec[256];
    make_dir("loose", 0700);
    make_dir("loose/security", 0755);
    path_of(prof, sizeof prof, "loose");
    path_of(sec, sizeof sec, "loose/security");
    ipmpi_security_t s;
    assert_int_equal(ipmpi_security_setup(&s, prof, "test", 0), IPMPI_EACCES);
    struct stat st;
    assert_int_equal(stat(sec, &st), 0);
    assert_int_equal(st.st_mode & 07777, 0755);
    assert_false(exists("loose/security/controller-key.pem"));
    assert_false(exists("loose/security/ipcontroller-mec.key"));
    /* Closed to others, as the message says (chmod 700): accepted. */
    assert_int_equal(chmod(sec, 0700), 0);
    assert_int_equal(ipmpi_security_setup(&s, prof, "test", 0), 0);
    ipmpi_security_fini(&s);
}

static void test_a_parent_writable_by_others_needs_the_sticky_bit(void **state)
{
    (void)state;
    char prof[256];
    make_dir("ww", 0777);
    make_dir("ww/prof", 0700);
    path_of(prof, sizeof prof, "ww/prof");
    ipmpi_security_t s;
    assert_int_equal(ipmpi_security_setup(&s, prof, "test", 0), IPMPI_EACCES);
    assert_false(exists("ww/prof/security"));
    /* Group-writable is the same. */
    char ww[256];
    path_of(ww, sizeof ww, "ww");
    assert_int_equal(chmod(ww, 0770), 0);
    assert_int_equal(ipmpi_security_setup(&s, prof, "test", 0), IPMPI_EACCES);
    /* A grandparent counts too. */
    make_dir("ww/prof2", 0755);
    make_dir("ww/prof2/inner", 0700);
    path_of(prof, sizeof prof, "ww/prof2/inner");
    assert_int_equal(ipmpi_security_setup(&s, prof, "test", 0), IPMPI_EACCES);
    /* With the sticky bit (as /tmp), only an entry's owner may rename it. */
    assert_int_equal(chmod(ww, 01777), 0);
    assert_int_equal(ipmpi_security_setup(&s, prof, "test", 0), 0);
    ipmpi_security_fini(&s);
}

static void test_links_are_refused(void **state)
{
    (void)state;
    char prof[256], target[256], link[256];
    make_dir("real", 0700);
    path_of(target, sizeof target, "real");
    path_of(link, sizeof link, "linked");
    assert_int_equal(symlink(target, link), 0);
    ipmpi_security_t s;
    assert_int_equal(ipmpi_security_setup(&s, link, "test", 0), IPMPI_EACCES);
    make_dir("p3", 0700);
    path_of(prof, sizeof prof, "p3");
    path_of(link, sizeof link, "p3/security");
    assert_int_equal(symlink(target, link), 0);
    assert_int_equal(ipmpi_security_setup(&s, prof, "test", 0), IPMPI_EACCES);
    assert_false(exists("real/controller-key.pem"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_files_go_into_the_checked_directory, setup, teardown),
        cmocka_unit_test_setup_teardown(test_a_security_directory_open_to_others_is_refused_unchanged, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_a_parent_writable_by_others_needs_the_sticky_bit, setup, teardown),
        cmocka_unit_test_setup_teardown(test_links_are_refused, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
