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
#include "ipmpi/errors.h"

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

/* ---- payload parts in a backing (shared memory) ---- */

/* A backing over a heap block whose release counts its calls and frees
 * the block, so ASan sees any use of a part after its backing went. */
typedef struct test_backing {
    ipmpi_backing_t b; /* first: release gets &b */
    uint8_t *mem;
    size_t size;
    int released;      /* release() calls */
} test_backing_t;

static void test_backing_release(ipmpi_backing_t *b)
{
    test_backing_t *t = (test_backing_t *)b;
    t->released++;
    free(t->mem);
    t->mem = NULL;
}

/* refs 0: the first set_backing takes the first reference. */
static void backing_init(test_backing_t *t, size_t size, uint8_t fill)
{
    memset(t, 0, sizeof *t);
    t->b.release = test_backing_release;
    t->mem = malloc(size);
    assert_non_null(t->mem);
    t->size = size;
    memset(t->mem, fill, size);
}

static void test_set_backing_takes_a_reference_released_on_last_unref(void **state)
{
    (void)state;
    test_backing_t tb;
    backing_init(&tb, 64, 0x11);
    /* Hold a reference of our own, so release cannot come early unnoticed. */
    ipmpi_backing_ref(&tb.b);
    uint64_t lens[2] = {4, 100};
    ipmpi_parts_t *p = ipmpi_parts_new(2, lens);
    assert_non_null(p);
    memcpy(p->bufs[0], "head", 4);
    assert_int_equal(ipmpi_parts_set_backing(p, 1, &tb.b, tb.mem + 8, 40), 0);
    assert_int_equal(tb.b.refs, 2);
    assert_int_equal(tb.released, 0);
    assert_non_null(p->back);
    assert_null(p->back[0]);
    assert_ptr_equal(p->back[1], &tb.b);
    assert_ptr_equal(p->bufs[1], tb.mem + 8);
    assert_int_equal(p->lens[1], 40);
    assert_memory_equal(p->bufs[0], "head", 4);
    assert_int_equal(ipmpi_parts_bytes(p), 44);

    /* A second payload reference keeps the backing too. */
    ipmpi_parts_ref(p);
    ipmpi_parts_unref(p);
    assert_int_equal(tb.b.refs, 2);
    ipmpi_parts_unref(p);
    assert_int_equal(tb.b.refs, 1);
    assert_int_equal(tb.released, 0);
    assert_non_null(tb.mem);

    ipmpi_backing_unref(&tb.b);
    assert_int_equal(tb.b.refs, 0);
    assert_int_equal(tb.released, 1);
    assert_null(tb.mem);
}

static void test_set_backing_release_comes_from_the_payload(void **state)
{
    (void)state;
    test_backing_t tb;
    backing_init(&tb, 16, 0x22);
    uint64_t lens[1] = {3};
    ipmpi_parts_t *p = ipmpi_parts_new(1, lens);
    assert_non_null(p);
    assert_int_equal(ipmpi_parts_set_backing(p, 0, &tb.b, tb.mem, 16), 0);
    assert_int_equal(tb.b.refs, 1);
    assert_int_equal(tb.released, 0);
    assert_int_equal(p->bufs[0][15], 0x22);
    ipmpi_parts_unref(p);
    assert_int_equal(tb.b.refs, 0);
    assert_int_equal(tb.released, 1);
}

static void test_two_parts_share_one_backing(void **state)
{
    (void)state;
    test_backing_t tb;
    backing_init(&tb, 100, 0);
    for (int i = 0; i < 100; i++)
        tb.mem[i] = (uint8_t)i;
    uint64_t lens[3] = {1, 1, 2};
    ipmpi_parts_t *p = ipmpi_parts_new(3, lens);
    assert_non_null(p);
    memcpy(p->bufs[2], "zz", 2);
    assert_int_equal(ipmpi_parts_set_backing(p, 0, &tb.b, tb.mem, 30), 0);
    assert_int_equal(ipmpi_parts_set_backing(p, 1, &tb.b, tb.mem + 30, 70), 0);
    assert_int_equal(tb.b.refs, 2);
    assert_int_equal(ipmpi_parts_bytes(p), 102);
    assert_int_equal(p->bufs[0][29], 29);
    assert_int_equal(p->bufs[1][0], 30);
    assert_int_equal(p->bufs[1][69], 99);
    assert_memory_equal(p->bufs[2], "zz", 2);
    ipmpi_parts_unref(p);
    /* Both references go with the payload, and release comes once. */
    assert_int_equal(tb.b.refs, 0);
    assert_int_equal(tb.released, 1);
}

static void test_set_backing_again_drops_the_old_backing(void **state)
{
    (void)state;
    test_backing_t a, b;
    backing_init(&a, 32, 0xaa);
    backing_init(&b, 32, 0xbb);
    uint64_t lens[1] = {8};
    ipmpi_parts_t *p = ipmpi_parts_new(1, lens);
    assert_non_null(p);
    assert_int_equal(ipmpi_parts_set_backing(p, 0, &a.b, a.mem, 32), 0);
    assert_int_equal(a.b.refs, 1);
    assert_int_equal(ipmpi_parts_set_backing(p, 0, &b.b, b.mem + 4, 20), 0);
    assert_int_equal(a.b.refs, 0);
    assert_int_equal(a.released, 1);
    assert_int_equal(b.b.refs, 1);
    assert_int_equal(b.released, 0);
    assert_ptr_equal(p->back[0], &b.b);
    assert_ptr_equal(p->bufs[0], b.mem + 4);
    assert_int_equal(p->lens[0], 20);
    assert_int_equal(p->bufs[0][19], 0xbb);
    ipmpi_parts_unref(p);
    assert_int_equal(a.released, 1);
    assert_int_equal(b.released, 1);
}

static void test_resize_of_backed_part_gives_own_buffer(void **state)
{
    (void)state;
    test_backing_t tb;
    backing_init(&tb, 64, 0x33);
    ipmpi_backing_ref(&tb.b); /* ours: the block must stay readable */
    uint64_t lens[2] = {64, 2};
    ipmpi_parts_t *p = ipmpi_parts_new(2, lens);
    assert_non_null(p);
    memcpy(p->bufs[1], "ok", 2);
    assert_int_equal(ipmpi_parts_set_backing(p, 0, &tb.b, tb.mem, 64), 0);
    assert_int_equal(tb.b.refs, 2);

    assert_int_equal(ipmpi_parts_resize(p, 0, 1000), 0);
    assert_int_equal(tb.b.refs, 1);
    assert_int_equal(tb.released, 0);
    assert_null(p->back[0]);
    assert_ptr_not_equal(p->bufs[0], tb.mem);
    assert_int_equal(p->lens[0], 1000);
    /* Every byte of the new length is ours to write (ASan checks). */
    memset(p->bufs[0], 0x5c, 1000);
    assert_int_equal(p->bufs[0][999], 0x5c);
    /* The backing's memory is not written through the part. */
    for (size_t i = 0; i < tb.size; i++)
        assert_int_equal(tb.mem[i], 0x33);
    assert_memory_equal(p->bufs[1], "ok", 2);
    assert_int_equal(ipmpi_parts_bytes(p), 1002);

    /* A plain (own-buffer) part resizes too, down to 0. */
    assert_int_equal(ipmpi_parts_resize(p, 1, 0), 0);
    assert_int_equal(p->lens[1], 0);
    assert_non_null(p->bufs[1]);
    assert_int_equal(ipmpi_parts_bytes(p), 1000);

    ipmpi_parts_unref(p);
    assert_int_equal(tb.released, 0);
    ipmpi_backing_unref(&tb.b);
    assert_int_equal(tb.released, 1);
}

static void test_resize_to_big_buffer(void **state)
{
    (void)state;
    enum { BIG = 4 << 20 };
    test_backing_t tb;
    backing_init(&tb, 16, 0x44);
    uint64_t lens[2] = {10, 3};
    ipmpi_parts_t *p = ipmpi_parts_new(2, lens);
    assert_non_null(p);
    memcpy(p->bufs[1], "end", 3);
    assert_int_equal(ipmpi_parts_set_backing(p, 0, &tb.b, tb.mem, 16), 0);

    assert_int_equal(ipmpi_parts_resize(p, 0, BIG), 0);
    assert_int_equal(tb.released, 1);
    assert_null(p->back[0]);
    assert_int_equal(p->lens[0], BIG);
    memset(p->bufs[0], 0x7e, BIG);
    assert_int_equal(p->bufs[0][0], 0x7e);
    assert_int_equal(p->bufs[0][BIG - 1], 0x7e);
    assert_int_equal(ipmpi_parts_bytes(p), (uint64_t)BIG + 3);

    /* From a big own buffer to another big one, then to a small one. */
    assert_int_equal(ipmpi_parts_resize(p, 0, 2 * BIG), 0);
    memset(p->bufs[0], 0x1f, 2 * (size_t)BIG);
    assert_int_equal(p->bufs[0][2 * BIG - 1], 0x1f);
    assert_int_equal(ipmpi_parts_resize(p, 0, 5), 0);
    memcpy(p->bufs[0], "small", 5);
    assert_memory_equal(p->bufs[0], "small", 5);
    assert_memory_equal(p->bufs[1], "end", 3);
    assert_int_equal(ipmpi_parts_bytes(p), 8);
    ipmpi_parts_unref(p);
    ipmpi_parts_cache_trim();
}

static void test_resize_refuses_impossible_length(void **state)
{
    (void)state;
    test_backing_t tb;
    backing_init(&tb, 8, 0x55);
    uint64_t lens[1] = {1};
    ipmpi_parts_t *p = ipmpi_parts_new(1, lens);
    assert_non_null(p);
    assert_int_equal(ipmpi_parts_set_backing(p, 0, &tb.b, tb.mem, 8), 0);
    /* Nothing changes on failure: the part keeps its backing. */
    assert_int_equal(ipmpi_parts_resize(p, 0, UINT64_MAX), IPMPI_ENOMEM);
    assert_int_equal(tb.b.refs, 1);
    assert_int_equal(tb.released, 0);
    assert_ptr_equal(p->back[0], &tb.b);
    assert_ptr_equal(p->bufs[0], tb.mem);
    assert_int_equal(p->lens[0], 8);
    ipmpi_parts_unref(p);
    assert_int_equal(tb.released, 1);
}

static void test_drop_last_releases_backed_table(void **state)
{
    (void)state;
    test_backing_t data, table;
    backing_init(&data, 50, 0x66);
    backing_init(&table, 32, 0x77);
    uint64_t lens[3] = {5, 0, 32};
    ipmpi_parts_t *p = ipmpi_parts_new(3, lens);
    assert_non_null(p);
    memcpy(p->bufs[0], "first", 5);
    assert_int_equal(ipmpi_parts_set_backing(p, 1, &data.b, data.mem, 50), 0);
    assert_int_equal(ipmpi_parts_set_backing(p, 2, &table.b, table.mem, 32), 0);
    assert_int_equal(ipmpi_parts_bytes(p), 87);

    ipmpi_parts_drop_last(p);
    assert_int_equal(p->n, 2);
    assert_int_equal(table.released, 1);
    assert_int_equal(data.released, 0);
    assert_int_equal(data.b.refs, 1);
    assert_int_equal(p->lens[0], 5);
    assert_int_equal(p->lens[1], 50);
    assert_memory_equal(p->bufs[0], "first", 5);
    assert_ptr_equal(p->bufs[1], data.mem);
    assert_int_equal(ipmpi_parts_bytes(p), 55);

    /* Now the last part is the backed one. */
    ipmpi_parts_drop_last(p);
    assert_int_equal(p->n, 1);
    assert_int_equal(data.released, 1);
    assert_memory_equal(p->bufs[0], "first", 5);
    /* And an own buffer last. */
    ipmpi_parts_drop_last(p);
    assert_int_equal(p->n, 0);
    assert_int_equal(ipmpi_parts_bytes(p), 0);
    ipmpi_parts_unref(p);
    assert_int_equal(data.released, 1);
    assert_int_equal(table.released, 1);
}

static void test_drop_first_releases_backed_part_and_shifts_backings(void **state)
{
    (void)state;
    test_backing_t a, b;
    backing_init(&a, 40, 0xa1);
    backing_init(&b, 40, 0xb2);
    /* targets (backed by a), own "xyz", backed by b, own "tail" */
    uint64_t lens[4] = {8, 3, 1, 4};
    ipmpi_parts_t *p = ipmpi_parts_new(4, lens);
    assert_non_null(p);
    memcpy(p->bufs[1], "xyz", 3);
    memcpy(p->bufs[3], "tail", 4);
    assert_int_equal(ipmpi_parts_set_backing(p, 0, &a.b, a.mem, 12), 0);
    assert_int_equal(ipmpi_parts_set_backing(p, 2, &b.b, b.mem + 10, 30), 0);
    assert_int_equal(ipmpi_parts_bytes(p), 49);

    ipmpi_parts_drop_first(p);
    assert_int_equal(a.released, 1);
    assert_int_equal(b.released, 0);
    assert_int_equal(p->n, 3);
    assert_int_equal(p->lens[0], 3);
    assert_int_equal(p->lens[1], 30);
    assert_int_equal(p->lens[2], 4);
    assert_memory_equal(p->bufs[0], "xyz", 3);
    assert_ptr_equal(p->bufs[1], b.mem + 10);
    assert_memory_equal(p->bufs[2], "tail", 4);
    /* The backing table moved with the parts. */
    assert_null(p->back[0]);
    assert_ptr_equal(p->back[1], &b.b);
    assert_null(p->back[2]);
    assert_int_equal(ipmpi_parts_bytes(p), 37);

    /* Dropping the own "xyz" must not touch b ... */
    ipmpi_parts_drop_first(p);
    assert_int_equal(b.released, 0);
    assert_int_equal(b.b.refs, 1);
    assert_ptr_equal(p->bufs[0], b.mem + 10);
    assert_ptr_equal(p->back[0], &b.b);
    assert_memory_equal(p->bufs[1], "tail", 4);
    /* ... dropping the backed part releases it. */
    ipmpi_parts_drop_first(p);
    assert_int_equal(b.released, 1);
    assert_int_equal(p->n, 1);
    assert_memory_equal(p->bufs[0], "tail", 4);
    assert_null(p->back[0]);
    ipmpi_parts_unref(p);
    assert_int_equal(a.released, 1);
    assert_int_equal(b.released, 1);
}

static void test_drop_first_then_set_backing_on_shifted_part(void **state)
{
    (void)state;
    /* After a drop_first (no backing yet), set_backing sizes its table for
     * the parts that are left and frees the right own buffer. */
    test_backing_t tb;
    backing_init(&tb, 24, 0xcc);
    uint64_t lens[3] = {8, 2, 6};
    ipmpi_parts_t *p = ipmpi_parts_new(3, lens);
    assert_non_null(p);
    memcpy(p->bufs[1], "ab", 2);
    ipmpi_parts_drop_first(p);
    assert_int_equal(ipmpi_parts_set_backing(p, 1, &tb.b, tb.mem, 24), 0);
    assert_int_equal(p->n, 2);
    assert_memory_equal(p->bufs[0], "ab", 2);
    assert_int_equal(p->lens[1], 24);
    assert_int_equal(p->bufs[1][23], 0xcc);
    assert_int_equal(ipmpi_parts_bytes(p), 26);
    ipmpi_parts_unref(p);
    assert_int_equal(tb.released, 1);
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
        cmocka_unit_test(test_set_backing_takes_a_reference_released_on_last_unref),
        cmocka_unit_test(test_set_backing_release_comes_from_the_payload),
        cmocka_unit_test(test_two_parts_share_one_backing),
        cmocka_unit_test(test_set_backing_again_drops_the_old_backing),
        cmocka_unit_test(test_resize_of_backed_part_gives_own_buffer),
        cmocka_unit_test(test_resize_to_big_buffer),
        cmocka_unit_test(test_resize_refuses_impossible_length),
        cmocka_unit_test(test_drop_last_releases_backed_table),
        cmocka_unit_test(test_drop_first_releases_backed_part_and_shifts_backings),
        cmocka_unit_test(test_drop_first_then_set_backing_on_shifted_part),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
