/*
 * Unit tests of the controller's queue module (src/controller/equeue.c):
 * shared payloads, per-engine FIFOs and the request table.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "equeue.h"

static ipmpi_req_t *mkreq(uint64_t id)
{
    ipmpi_req_t *r = ipmpi_req_new(id, id * 10, 7, 2, 1, NULL);
    assert_non_null(r);
    return r;
}

static void test_parts_new_allocates_every_part(void **state)
{
    (void)state;
    uint64_t lens[3] = {0, 5, 100000};
    ipmpi_parts_t *p = ipmpi_parts_new(3, lens);
    assert_non_null(p);
    assert_int_equal(p->n, 3);
    for (int i = 0; i < 3; i++) {
        assert_non_null(p->bufs[i]);
        assert_int_equal(p->lens[i], lens[i]);
        memset(p->bufs[i], 0xab, (size_t)lens[i]);
    }
    assert_int_equal(ipmpi_parts_bytes(p), 100005);
    ipmpi_parts_unref(p);
}

static void test_parts_shared_until_last_unref(void **state)
{
    (void)state;
    ipmpi_parts_t *p = ipmpi_parts_from("hello", 5);
    assert_non_null(p);
    assert_ptr_equal(ipmpi_parts_ref(p), p);
    assert_int_equal(p->refs, 2);
    ipmpi_parts_unref(p);
    assert_int_equal(p->refs, 1);
    assert_memory_equal(p->bufs[0], "hello", 5);
    ipmpi_parts_unref(p);
    ipmpi_parts_unref(NULL);
}

static void test_parts_drop_first_removes_target_list(void **state)
{
    (void)state;
    uint64_t lens[3] = {8, 3, 4};
    ipmpi_parts_t *p = ipmpi_parts_new(3, lens);
    assert_non_null(p);
    memcpy(p->bufs[1], "abc", 3);
    memcpy(p->bufs[2], "defg", 4);
    ipmpi_parts_drop_first(p);
    assert_int_equal(p->n, 2);
    assert_int_equal(p->lens[0], 3);
    assert_int_equal(p->lens[1], 4);
    assert_memory_equal(p->bufs[0], "abc", 3);
    assert_memory_equal(p->bufs[1], "defg", 4);
    ipmpi_parts_drop_first(p);
    ipmpi_parts_drop_first(p);
    assert_int_equal(p->n, 0);
    ipmpi_parts_unref(p);
}

static void test_parts_new_with_no_parts(void **state)
{
    (void)state;
    ipmpi_parts_t *p = ipmpi_parts_new(0, NULL);
    assert_non_null(p);
    assert_int_equal(p->n, 0);
    assert_int_equal(ipmpi_parts_bytes(p), 0);
    ipmpi_parts_unref(p);
}

static void test_equeue_is_fifo_across_growth_and_wrap(void **state)
{
    (void)state;
    ipmpi_equeue_t q;
    ipmpi_equeue_init(&q);
    assert_null(ipmpi_equeue_pop(&q));
    ipmpi_req_t *rs[100];
    for (int i = 0; i < 100; i++)
        rs[i] = mkreq((uint64_t)i + 1);
    /* Interleave pushes and pops so the ring wraps before it grows. */
    uint64_t next_out = 1;
    int in = 0;
    for (int round = 0; round < 20; round++) {
        for (int k = 0; k < 5 && in < 100; k++)
            assert_int_equal(ipmpi_equeue_push(&q, rs[in++]), 0);
        for (int k = 0; k < 2; k++) {
            ipmpi_req_t *r = ipmpi_equeue_pop(&q);
            assert_non_null(r);
            assert_int_equal(r->id, next_out++);
        }
    }
    assert_int_equal(ipmpi_equeue_len(&q), in - (int)(next_out - 1));
    for (uint32_t i = 0; i < ipmpi_equeue_len(&q); i++)
        assert_int_equal(ipmpi_equeue_at(&q, i)->id, next_out + i);
    assert_null(ipmpi_equeue_at(&q, ipmpi_equeue_len(&q)));
    ipmpi_req_t *r;
    while ((r = ipmpi_equeue_pop(&q)))
        assert_int_equal(r->id, next_out++);
    assert_int_equal(next_out, 101);
    assert_int_equal(ipmpi_equeue_len(&q), 0);
    ipmpi_equeue_fini(&q);
    for (int i = 0; i < 100; i++)
        ipmpi_req_free(rs[i]);
}

static void test_req_owns_its_payload(void **state)
{
    (void)state;
    ipmpi_parts_t *p = ipmpi_parts_from("x", 1);
    ipmpi_parts_ref(p);
    ipmpi_req_t *r = ipmpi_req_new(1, 2, 3, 4, 5, p);
    assert_non_null(r);
    assert_int_equal(r->client_req, 2);
    assert_int_equal(r->session, 3);
    assert_int_equal(r->kind, 4);
    assert_int_equal(r->total, 5);
    ipmpi_req_free(r);
    assert_int_equal(p->refs, 1);
    ipmpi_parts_unref(p);
}

/* requests.c relies on a fresh request being neither streamed nor quiet:
 * only a cut-through sets them. */
static void test_req_new_starts_without_stream_and_answers_its_client(void **state)
{
    (void)state;
    ipmpi_req_t *r = ipmpi_req_new(1, 2, 3, 4, 1, ipmpi_parts_new(0, NULL));
    assert_non_null(r);
    assert_null(r->stream);
    assert_int_equal(r->quiet, 0);
    assert_int_equal(r->pending, 0);
    ipmpi_req_free(r);
}

static void test_reqtab_finds_what_was_put(void **state)
{
    (void)state;
    ipmpi_reqtab_t t;
    ipmpi_reqtab_init(&t);
    assert_null(ipmpi_reqtab_get(&t, 1));
    assert_null(ipmpi_reqtab_del(&t, 1));
    enum { N = 1000 };
    ipmpi_req_t *rs[N];
    for (int i = 0; i < N; i++) {
        rs[i] = mkreq((uint64_t)i * 7 + 3);
        assert_int_equal(ipmpi_reqtab_put(&t, rs[i]), 0);
    }
    assert_int_equal(t.len, N);
    for (int i = 0; i < N; i++)
        assert_ptr_equal(ipmpi_reqtab_get(&t, (uint64_t)i * 7 + 3), rs[i]);
    assert_null(ipmpi_reqtab_get(&t, 4));
    ipmpi_reqtab_fini(&t);
    for (int i = 0; i < N; i++)
        ipmpi_req_free(rs[i]);
}

static void test_reqtab_delete_keeps_probe_chains(void **state)
{
    (void)state;
    ipmpi_reqtab_t t;
    ipmpi_reqtab_init(&t);
    enum { N = 4000 };
    ipmpi_req_t **rs = calloc(N, sizeof *rs);
    assert_non_null(rs);
    for (int i = 0; i < N; i++) {
        rs[i] = mkreq((uint64_t)i + 1);
        assert_int_equal(ipmpi_reqtab_put(&t, rs[i]), 0);
    }
    /* Delete every third entry, then check all the others are still found. */
    for (int i = 0; i < N; i += 3)
        assert_ptr_equal(ipmpi_reqtab_del(&t, (uint64_t)i + 1), rs[i]);
    for (int i = 0; i < N; i++) {
        if (i % 3 == 0)
            assert_null(ipmpi_reqtab_get(&t, (uint64_t)i + 1));
        else
            assert_ptr_equal(ipmpi_reqtab_get(&t, (uint64_t)i + 1), rs[i]);
    }
    ipmpi_req_t **all = calloc(t.len, sizeof *all);
    assert_non_null(all);
    uint32_t n = ipmpi_reqtab_collect(&t, all);
    assert_int_equal(n, t.len);
    for (uint32_t i = 0; i < n; i++)
        assert_int_not_equal(all[i]->id % 3, 1);
    for (uint32_t i = 0; i < n; i++)
        assert_ptr_equal(ipmpi_reqtab_del(&t, all[i]->id), all[i]);
    assert_int_equal(t.len, 0);
    free(all);
    ipmpi_reqtab_fini(&t);
    for (int i = 0; i < N; i++)
        ipmpi_req_free(rs[i]);
    free(rs);
}

static void test_reqtab_random_ops_match_a_model(void **state)
{
    (void)state;
    enum { IDS = 512 };
    ipmpi_reqtab_t t;
    ipmpi_reqtab_init(&t);
    ipmpi_req_t *model[IDS] = {0};
    srand(12345);
    for (int step = 0; step < 100000; step++) {
        uint64_t id = (uint64_t)(rand() % IDS);
        if (rand() % 2) {
            if (!model[id]) {
                model[id] = mkreq(id);
                assert_int_equal(ipmpi_reqtab_put(&t, model[id]), 0);
            }
        } else {
            ipmpi_req_t *r = ipmpi_reqtab_del(&t, id);
            assert_ptr_equal(r, model[id]);
            ipmpi_req_free(r);
            model[id] = NULL;
        }
        uint64_t probe = (uint64_t)(rand() % IDS);
        assert_ptr_equal(ipmpi_reqtab_get(&t, probe), model[probe]);
    }
    for (int i = 0; i < IDS; i++)
        ipmpi_req_free(model[i]);
    ipmpi_reqtab_fini(&t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parts_new_allocates_every_part),
        cmocka_unit_test(test_parts_shared_until_last_unref),
        cmocka_unit_test(test_parts_drop_first_removes_target_list),
        cmocka_unit_test(test_parts_new_with_no_parts),
        cmocka_unit_test(test_equeue_is_fifo_across_growth_and_wrap),
        cmocka_unit_test(test_req_owns_its_payload),
        cmocka_unit_test(test_req_new_starts_without_stream_and_answers_its_client),
        cmocka_unit_test(test_reqtab_finds_what_was_put),
        cmocka_unit_test(test_reqtab_delete_keeps_probe_chains),
        cmocka_unit_test(test_reqtab_random_ops_match_a_model),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
