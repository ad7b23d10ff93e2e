/*
 * Unit tests for the error table (include/ipmpi/errors.h): the codes travel
 * on the wire, so each must have its own message and name, and a code from
 * a newer peer must still print something. Single-threaded test program.
 */
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>

#include <cmocka.h>

#include "ipmpi/errors.h"
#include "ipmpi/protocol.h"

struct row {
    int code;
    const char *name;
    const char *msg;
};

/* The table as the header states it, built from the same X-macro. */
static const struct row rows[] = {
    {IPMPI_OK, "IPMPI_OK", "success"},
#define XX(name, val, msg) {val, "IPMPI_" #name, msg},
    IPMPI_ERRNO_MAP(XX)
#undef XX
};
#define NROWS (sizeof rows / sizeof rows[0])

static void test_every_code_has_its_table_message_and_name(void **state)
{
    (void)state;
    for (size_t i = 0; i < NROWS; i++) {
        assert_string_equal(ipmpi_strerror(rows[i].code), rows[i].msg);
        assert_string_equal(ipmpi_errname(rows[i].code), rows[i].name);
    }
}

static void test_codes_messages_and_names_are_distinct(void **state)
{
    (void)state;
    for (size_t i = 0; i < NROWS; i++)
        for (size_t j = i + 1; j < NROWS; j++) {
            assert_int_not_equal(rows[i].code, rows[j].code);
            if (strcmp(ipmpi_strerror(rows[i].code), ipmpi_strerror(rows[j].code)) == 0)
                fail_msg("%s and %s share a message", rows[i].name, rows[j].name);
            if (strcmp(ipmpi_errname(rows[i].code), ipmpi_errname(rows[j].code)) == 0)
                fail_msg("%s and %s share a name", rows[i].name, rows[j].name);
        }
}

static void test_error_codes_are_negative_and_wire_values_fixed(void **state)
{
    (void)state;
    for (size_t i = 1; i < NROWS; i++)
        assert_true(rows[i].code < 0);
    /* Spot checks of values that peers already rely on. */
    assert_int_equal(IPMPI_EPROTO, -1);
    assert_int_equal(IPMPI_E2BIG, -2);
    assert_int_equal(IPMPI_EDEAD, -5);
    assert_int_equal(IPMPI_EPYTHON, -19);
}

static void test_unknown_codes_get_the_generic_text(void **state)
{
    (void)state;
    const int unknown[] = {1, 42, -100, -1000, INT_MIN, INT_MAX};
    const char *generic = ipmpi_strerror(unknown[0]);
    const char *gname = ipmpi_errname(unknown[0]);
    assert_non_null(generic);
    assert_non_null(gname);
    for (size_t i = 0; i < sizeof unknown / sizeof unknown[0]; i++) {
        assert_string_equal(ipmpi_strerror(unknown[i]), generic);
        assert_string_equal(ipmpi_errname(unknown[i]), gname);
    }
    /* The generic text is not mistaken for any real code's. */
    for (size_t i = 0; i < NROWS; i++) {
        assert_string_not_equal(ipmpi_strerror(rows[i].code), generic);
        assert_string_not_equal(ipmpi_errname(rows[i].code), gname);
    }
}

/* The request kind table (protocol.h) gives every kind its name and who
 * may send it; gaps and out-of-range values are unknown. */
static void test_kind_table_names_every_kind_and_who_sends_it(void **state)
{
    (void)state;
    static const struct {
        unsigned k;
        const char *name;
        unsigned who;
    } kinds[] = {
#define XX(name, val, str, who) {val, str, who},
        IPMPI_KIND_MAP(XX)
#undef XX
    };
    for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++) {
        assert_string_equal(ipmpi_kind_name(kinds[i].k), kinds[i].name);
        assert_int_equal(ipmpi_kind_who(kinds[i].k), kinds[i].who);
        assert_int_not_equal(kinds[i].who, 0);
        assert_true(kinds[i].k > 0 && kinds[i].k < IPMPI_K_MAX_);
        for (size_t j = i + 1; j < sizeof kinds / sizeof kinds[0]; j++) {
            assert_int_not_equal(kinds[i].k, kinds[j].k);
            assert_string_not_equal(kinds[i].name, kinds[j].name);
        }
    }
    /* Spot checks of wire values and of the access rules. */
    assert_int_equal(IPMPI_K_EXECUTE, 2);
    assert_int_equal(IPMPI_K_TASK_SUBMIT, 14);
    assert_true(ipmpi_kind_who(IPMPI_K_EXECUTE) & IPMPI_KW_ENGINE);
    assert_false(ipmpi_kind_who(IPMPI_K_EXECUTE) & IPMPI_KW_TC);
    assert_false(ipmpi_kind_who(IPMPI_K_TASK_SUBMIT) & IPMPI_KW_MEC);
    assert_int_equal(ipmpi_kind_who(IPMPI_K_READY), IPMPI_KW_INTERNAL);
    const unsigned unknown[] = {0, 29, 31, IPMPI_K_MAX_, 255, 100000};
    for (size_t i = 0; i < sizeof unknown / sizeof unknown[0]; i++) {
        assert_string_equal(ipmpi_kind_name(unknown[i]), "unknown");
        assert_int_equal(ipmpi_kind_who(unknown[i]), 0);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_every_code_has_its_table_message_and_name),
        cmocka_unit_test(test_codes_messages_and_names_are_distinct),
        cmocka_unit_test(test_error_codes_are_negative_and_wire_values_fixed),
        cmocka_unit_test(test_unknown_codes_get_the_generic_text),
        cmocka_unit_test(test_kind_table_names_every_kind_and_who_sends_it),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
