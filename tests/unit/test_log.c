/*
 * Unit tests for logging (src/common/log.h): the log file is private, each
 * call is one whole line with timestamp, role and level, the level filters,
 * and a message too long for one line is cut, not split. The tests point
 * fds 1 and 2 at a temporary file and restore them afterwards, so cmocka's
 * own report still reaches the terminal. Single-threaded test program.
 */
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "ipmpi/errors.h"
#include "log.h"

struct fixture {
    char path[64];
    int saved_out;
    int saved_err;
};

static int setup(void **state)
{
    struct fixture *fx = calloc(1, sizeof *fx);
    if (!fx)
        return -1;
    strcpy(fx->path, "/tmp/ipmpi-test-log-XXXXXX");
    int fd = mkstemp(fx->path);
    if (fd < 0) {
        free(fx);
        return -1;
    }
    close(fd);
    /* ipmpi_log_open appends to an existing file; start from a new one. */
    unlink(fx->path);
    fflush(stdout);
    fflush(stderr);
    fx->saved_out = dup(1);
    fx->saved_err = dup(2);
    *state = fx;
    return 0;
}

static int teardown(void **state)
{
    struct fixture *fx = *state;
    fflush(stdout);
    fflush(stderr);
    dup2(fx->saved_out, 1);
    dup2(fx->saved_err, 2);
    close(fx->saved_out);
    close(fx->saved_err);
    unlink(fx->path);
    free(fx);
    return 0;
}

/* Reads the whole log file into buf (NUL-terminated). */
static size_t slurp(const char *path, char *buf, size_t cap)
{
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    size_t n = fread(buf, 1, cap - 1, f);
    fclose(f);
    buf[n] = '\0';
    return n;
}

static size_t count_lines(const char *s)
{
    size_t n = 0;
    for (; *s; s++)
        n += *s == '\n';
    return n;
}

static void test_log_file_is_private_and_takes_stderr(void **state)
{
    struct fixture *fx = *state;
    assert_int_equal(ipmpi_log_open(fx->path, 0), 0);
    struct stat st;
    assert_int_equal(stat(fx->path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0600);
    /* Output of other libraries written to fd 2 lands in the log too. */
    const char msg[] = "from a library\n";
    assert_int_equal(write(2, msg, sizeof msg - 1), (ssize_t)(sizeof msg - 1));
    char buf[4096];
    slurp(fx->path, buf, sizeof buf);
    assert_string_equal(buf, msg);
}

static void test_log_open_with_stdout_takes_both(void **state)
{
    struct fixture *fx = *state;
    assert_int_equal(ipmpi_log_open(fx->path, 1), 0);
    assert_int_equal(write(1, "out\n", 4), 4);
    assert_int_equal(write(2, "err\n", 4), 4);
    char buf[4096];
    slurp(fx->path, buf, sizeof buf);
    assert_string_equal(buf, "out\nerr\n");
}

static void test_log_open_fails_in_missing_dir_and_keeps_stderr(void **state)
{
    (void)state;
    struct stat before, after;
    assert_int_equal(fstat(2, &before), 0);
    assert_int_equal(ipmpi_log_open("/nonexistent/ipmpi/x.log", 1), IPMPI_EIO);
    assert_int_equal(fstat(2, &after), 0);
    assert_true(before.st_ino == after.st_ino && before.st_dev == after.st_dev);
}

static void test_each_call_is_one_line_with_role_and_level(void **state)
{
    struct fixture *fx = *state;
    assert_int_equal(ipmpi_log_open(fx->path, 0), 0);
    ipmpi_log_setup("engine 3", IPMPI_LOG_INFO);
    ipmpi_log(IPMPI_LOG_ERROR, "bad %d", 1);
    ipmpi_log(IPMPI_LOG_WARN, "careful %s", "now");
    ipmpi_log(IPMPI_LOG_INFO, "hello");
    char buf[4096];
    slurp(fx->path, buf, sizeof buf);
    assert_int_equal(count_lines(buf), 3);
    assert_non_null(strstr(buf, "[engine 3] ERROR: bad 1\n"));
    assert_non_null(strstr(buf, "[engine 3] WARN: careful now\n"));
    assert_non_null(strstr(buf, "[engine 3] INFO: hello\n"));
    /* UTC ISO-8601 timestamp with milliseconds starts each line. */
    int y, mo, d, h, mi, s, ms;
    char z;
    assert_int_equal(sscanf(buf, "%4d-%2d-%2dT%2d:%2d:%2d.%3d%c", &y, &mo, &d, &h, &mi, &s, &ms, &z), 8);
    assert_int_equal(z, 'Z');
    assert_true(y >= 2024 && mo >= 1 && mo <= 12);
}

static void test_level_filters_more_verbose_messages(void **state)
{
    struct fixture *fx = *state;
    assert_int_equal(ipmpi_log_open(fx->path, 0), 0);
    ipmpi_log_setup("controller", IPMPI_LOG_WARN);
    ipmpi_log(IPMPI_LOG_INFO, "not shown");
    ipmpi_log(IPMPI_LOG_DEBUG, "not shown");
    ipmpi_log(-1, "not shown");
    ipmpi_log(IPMPI_LOG_WARN, "shown");
    ipmpi_log_setup("controller", IPMPI_LOG_DEBUG);
    ipmpi_log(IPMPI_LOG_DEBUG, "debug shown");
    char buf[4096];
    slurp(fx->path, buf, sizeof buf);
    assert_null(strstr(buf, "not shown"));
    assert_int_equal(count_lines(buf), 2);
    assert_non_null(strstr(buf, "[controller] WARN: shown\n"));
    assert_non_null(strstr(buf, "[controller] DEBUG: debug shown\n"));
}

static void test_long_message_is_cut_to_one_line(void **state)
{
    struct fixture *fx = *state;
    assert_int_equal(ipmpi_log_open(fx->path, 0), 0);
    ipmpi_log_setup("client", IPMPI_LOG_INFO);
    char big[5000];
    memset(big, 'x', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    ipmpi_log(IPMPI_LOG_INFO, "%s", big);
    ipmpi_log(IPMPI_LOG_INFO, "next");
    char buf[8192];
    size_t n = slurp(fx->path, buf, sizeof buf);
    assert_int_equal(count_lines(buf), 2);
    char *nl = strchr(buf, '\n');
    assert_true((size_t)(nl - buf) < 1024);
    assert_true(n < 2048);
    assert_non_null(strstr(nl + 1, "[client] INFO: next\n"));
}

static void test_long_role_is_truncated_not_overflowed(void **state)
{
    struct fixture *fx = *state;
    assert_int_equal(ipmpi_log_open(fx->path, 0), 0);
    char role[200];
    memset(role, 'r', sizeof role - 1);
    role[sizeof role - 1] = '\0';
    ipmpi_log_setup(role, IPMPI_LOG_INFO);
    ipmpi_log(IPMPI_LOG_INFO, "m");
    char buf[4096];
    slurp(fx->path, buf, sizeof buf);
    char *open = strchr(buf, '['), *close = strchr(buf, ']');
    assert_non_null(open);
    assert_non_null(close);
    assert_true(close - open - 1 > 0 && close - open - 1 < 64);
    assert_non_null(strstr(buf, "] INFO: m\n"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_log_file_is_private_and_takes_stderr, setup, teardown),
        cmocka_unit_test_setup_teardown(test_log_open_with_stdout_takes_both, setup, teardown),
        cmocka_unit_test_setup_teardown(test_log_open_fails_in_missing_dir_and_keeps_stderr, setup, teardown),
        cmocka_unit_test_setup_teardown(test_each_call_is_one_line_with_role_and_level, setup, teardown),
        cmocka_unit_test_setup_teardown(test_level_filters_more_verbose_messages, setup, teardown),
        cmocka_unit_test_setup_teardown(test_long_message_is_cut_to_one_line, setup, teardown),
        cmocka_unit_test_setup_teardown(test_long_role_is_truncated_not_overflowed, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
