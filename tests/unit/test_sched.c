/*
 * Unit tests of the controller's scheduler (src/controller/sched.c), one
 * claim of sched.h per test: MultiEngine requests, tasks, look-ahead,
 * fairness, the alternation of the two, abort, retries, engine death,
 * depend refusals and client references. The scheduler has no clock: the
 * tests choose every `now`. Run under ASan (build-asan) for the leak and
 * use-after-free claims of the reference counting.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

/* Through src/ (AM_CPPFLAGS), not -I src/controller: that directory's
 * sched.h would shadow the system <sched.h> for every header that
 * includes it. */
#include "controller/sched.h"
#include "ipmpi/errors.h"

#define MS 1000000ull /* nanoseconds */

/* ---- helpers ---- */

static void sched_up(ipmpi_sched_t *s, int nengines, uint32_t depth)
{
    assert_int_equal(ipmpi_sched_init(s, nengines, depth), 0);
    for (int e = 0; e < nengines; e++)
        ipmpi_sched_engine_ready(s, e);
    assert_int_equal(s->nlive, nengines);
}

static ipmpi_req_t *mkreq(uint64_t id, uint64_t session)
{
    ipmpi_parts_t *p = ipmpi_parts_new(0, NULL);
    assert_non_null(p);
    ipmpi_req_t *r = ipmpi_req_new(id, id + 1000, session, 1, 1, p);
    assert_non_null(r);
    return r;
}

static void mktasks(ipmpi_stask_t *t, size_t n, uint64_t first_id)
{
    for (size_t i = 0; i < n; i++)
        ipmpi_stask_init(&t[i], first_id + i);
}

static void submit_all(ipmpi_sched_t *s, ipmpi_sched_client_t *cl, ipmpi_stask_t *t, size_t n)
{
    for (size_t i = 0; i < n; i++)
        ipmpi_sched_submit(s, cl, &t[i]);
}

/* next(e) must hand out a task, stamped with now. */
static ipmpi_stask_t *next_task(ipmpi_sched_t *s, int e, uint64_t now)
{
    ipmpi_sitem_t it;
    memset(&it, 0, sizeof it);
    assert_int_equal(ipmpi_sched_next(s, e, now, NULL, NULL, &it), 1);
    assert_int_equal(it.type, IPMPI_SITEM_TASK);
    assert_int_equal(it.sent_ns, now);
    assert_non_null(it.u.task);
    return it.u.task;
}

/* next(e) must hand out a request, stamped with now. */
static ipmpi_req_t *next_req(ipmpi_sched_t *s, int e, uint64_t now)
{
    ipmpi_sitem_t it;
    memset(&it, 0, sizeof it);
    assert_int_equal(ipmpi_sched_next(s, e, now, NULL, NULL, &it), 1);
    assert_int_equal(it.type, IPMPI_SITEM_REQ);
    assert_int_equal(it.sent_ns, now);
    assert_non_null(it.u.req);
    return it.u.req;
}

/* next(e) must hand out nothing now. */
static void next_nothing(ipmpi_sched_t *s, int e, uint64_t now)
{
    ipmpi_sitem_t it;
    assert_int_equal(ipmpi_sched_next(s, e, now, NULL, NULL, &it), 0);
}

static ipmpi_stask_t *done_task(ipmpi_sched_t *s, int e, uint64_t now)
{
    ipmpi_sitem_t it;
    memset(&it, 0, sizeof it);
    assert_int_equal(ipmpi_sched_done(s, e, now, &it), 1);
    assert_int_equal(it.type, IPMPI_SITEM_TASK);
    return it.u.task;
}

static ipmpi_req_t *done_req(ipmpi_sched_t *s, int e, uint64_t now)
{
    ipmpi_sitem_t it;
    memset(&it, 0, sizeof it);
    assert_int_equal(ipmpi_sched_done(s, e, now, &it), 1);
    assert_int_equal(it.type, IPMPI_SITEM_REQ);
    return it.u.req;
}

static uint32_t inflight_count(const ipmpi_sched_t *s, int e) { return s->eng[e].fly_len; }

/*
 * Gives every task back and frees the scheduler: in-flight items are
 * taken with done (requests freed), queued requests popped and freed,
 * queued or parked tasks cancelled, every task finalised.
 */
static void settle(ipmpi_sched_t *s, ipmpi_stask_t *t, size_t nt)
{
    ipmpi_sitem_t it;
    for (int e = 0; e < s->nengines; e++) {
        while (ipmpi_sched_done(s, e, 0, &it) == 1)
            if (it.type == IPMPI_SITEM_REQ)
                ipmpi_req_free(it.u.req);
        ipmpi_req_t *r;
        while ((r = ipmpi_equeue_pop(&s->eng[e].q)) != NULL)
            ipmpi_req_free(r);
    }
    for (size_t i = 0; i < nt; i++) {
        if (t[i].queued)
            assert_int_equal(ipmpi_sched_cancel(s, &t[i]), 0);
        ipmpi_stask_fini(&t[i]);
    }
    assert_int_equal(s->nqueued, 0);
    assert_int_equal(s->nparked, 0);
    ipmpi_sched_fini(s);
}

typedef struct hold_ctx {
    uint64_t held_session; /* hold says 1 for this session */
    int calls;
    uint64_t last_session;
} hold_ctx_t;

static int hold_one_session(void *ctx, uint64_t session)
{
    hold_ctx_t *h = ctx;
    h->calls++;
    h->last_session = session;
    return session == h->held_session;
}

/* ---- setup ---- */

static void test_init_rejects_bad_depth_and_engine_count(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    assert_int_equal(ipmpi_sched_init(&s, 2, IPMPI_SCHED_DEPTH_MAX + 1), IPMPI_EINVAL);
    assert_int_equal(ipmpi_sched_init(&s, -1, 0), IPMPI_EINVAL);
    assert_int_equal(ipmpi_sched_init(&s, 2, IPMPI_SCHED_DEPTH_MAX), 0);
    ipmpi_sched_fini(&s);
}

static void test_engines_added_later_get_the_next_ids_and_work_while_the_others_stay_put(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    assert_int_equal(ipmpi_sched_init_cap(&s, 2, 1, 0), IPMPI_EINVAL); /* capacity below the engines */
    assert_int_equal(ipmpi_sched_init_cap(&s, 2, 5, 1), 0);
    ipmpi_sched_engine_ready(&s, 0);
    ipmpi_sched_engine_ready(&s, 1);
    const ipmpi_sengine_t *first = &s.eng[0];
    ipmpi_req_t *r0 = mkreq(1, 1);
    assert_int_equal(ipmpi_sched_queue_req(&s, 1, r0), 0);
    /* Engine 2 does not exist yet: nothing can be queued on it. */
    ipmpi_req_t *r2 = mkreq(2, 1);
    assert_int_not_equal(ipmpi_sched_queue_req(&s, 2, r2), 0);
    assert_int_equal(ipmpi_sched_add_engines(&s, 4), IPMPI_EINVAL); /* 2 + 4 > 5 */
    assert_int_equal(ipmpi_sched_add_engines(&s, 3), 0);
    assert_int_equal(s.nengines, 5);
    assert_ptr_equal(&s.eng[0], first); /* nothing moved: links into it stay valid */
    assert_int_equal(s.nlive, 2);       /* added engines are not live before READY */
    ipmpi_sched_engine_ready(&s, 4);
    assert_int_equal(s.nlive, 3);
    assert_int_equal(ipmpi_sched_queue_req(&s, 4, r2), 0);
    assert_ptr_equal(next_req(&s, 4, 7), r2);
    assert_ptr_equal(next_req(&s, 1, 8), r0);
    assert_ptr_equal(done_req(&s, 4, 9), r2);
    assert_ptr_equal(done_req(&s, 1, 9), r0);
    assert_int_equal(ipmpi_sched_add_engines(&s, 1), IPMPI_EINVAL); /* full */
    ipmpi_sched_fini(&s);
    ipmpi_req_free(r0);
    ipmpi_req_free(r2);
}

/* How many requests the running list holds, and whether r is one. */
static int running_len(const ipmpi_sched_t *s, const ipmpi_req_t *r, int *has)
{
    int n = 0;
    *has = 0;
    for (const ipmpi_qlink_t *q = s->running.next; q != &s->running; q = q->next, n++)
        *has |= IPMPI_CONTAINER_OF(q, ipmpi_req_t, running) == r;
    return n;
}

static void test_running_list_and_counts_follow_every_hand_out_answer_and_pop(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    sched_up(&s, 3, 1);
    int has;
    ipmpi_req_t *r = mkreq(1, 1), *q = mkreq(2, 1);
    assert_true(ipmpi_sched_quiet(&s));
    for (int e = 0; e < 3; e++)
        assert_int_equal(ipmpi_sched_queue_req(&s, e, r), 0);
    assert_int_equal(s.nreq_queued, 3);
    assert_false(ipmpi_sched_quiet(&s)); /* queued, nothing in flight yet */
    assert_int_equal(running_len(&s, r, &has), 0);
    assert_ptr_equal(next_req(&s, 0, 1), r);
    assert_ptr_equal(next_req(&s, 1, 1), r);
    /* Running on two engines: one entry in the list, two in flight. */
    assert_int_equal(s.nreq_queued, 1);
    assert_int_equal(r->nfly, 2);
    assert_int_equal(running_len(&s, r, &has), 1);
    assert_true(has);
    assert_int_equal(ipmpi_sched_queue_req(&s, 0, q), 0);
    assert_int_equal(s.nreq_queued, 2);
    /* A pop outside the scheduler (clear_queue, a death) counts too. */
    assert_ptr_equal(ipmpi_equeue_pop(&s.eng[2].q), r);
    assert_int_equal(s.nreq_queued, 1);
    assert_ptr_equal(done_req(&s, 0, 2), r);
    assert_int_equal(running_len(&s, r, &has), 1);
    assert_false(ipmpi_sched_quiet(&s)); /* r runs on engine 1 */
    assert_ptr_equal(done_req(&s, 1, 2), r);
    assert_int_equal(r->nfly, 0);
    assert_int_equal(running_len(&s, r, &has), 0);
    assert_false(ipmpi_sched_quiet(&s)); /* q still waits on engine 0 */
    /* Started directly (a tree's engines) runs the same. */
    assert_int_equal(ipmpi_sched_start_req(&s, 2, r, 3), 0);
    assert_ptr_equal(next_req(&s, 0, 3), q);
    assert_int_equal(s.nreq_queued, 0);
    assert_int_equal(running_len(&s, q, &has), 2);
    assert_true(has);
    assert_ptr_equal(IPMPI_CONTAINER_OF(s.running.next, ipmpi_req_t, running), r); /* oldest first */
    assert_ptr_equal(done_req(&s, 2, 4), r);
    /* Tasks in flight are counted, not listed. */
    ipmpi_sched_client_t *cl = ipmpi_sched_client_new(1);
    assert_non_null(cl);
    ipmpi_stask_t t;
    ipmpi_stask_init(&t, 9);
    ipmpi_sched_submit(&s, cl, &t);
    assert_ptr_equal(next_task(&s, 1, 5), &t);
    assert_int_equal(s.nfly_tasks, 1);
    assert_false(ipmpi_sched_quiet(&s));
    assert_int_equal(running_len(&s, q, &has), 1);
    assert_ptr_equal(done_task(&s, 1, 6), &t);
    assert_int_equal(s.nfly_tasks, 0);
    assert_ptr_equal(done_req(&s, 0, 6), q);
    assert_true(ipmpi_sched_quiet(&s)); /* nothing queued, nothing in flight */
    assert_int_equal(ipmpi_sched_start_req(&s, 0, q, 7), 0);
    ipmpi_stask_fini(&t);
    ipmpi_sched_client_unref(cl);
    /* Queued and in flight at the end: the queue's count goes with its
     * engine, the running request is detached (its free touches no list). */
    assert_int_equal(ipmpi_sched_queue_req(&s, 1, r), 0);
    assert_int_equal(s.nreq_queued, 1);
    ipmpi_sched_fini(&s);
    assert_int_equal(s.nreq_queued, 0);
    assert_true(ipmpi_ql_empty(&s.running));
    assert_int_equal(q->nfly, 0);
    ipmpi_req_free(q);
    ipmpi_req_free(r);
}

static void test_a_tree_request_goes_in_flight_and_is_settled_on_all_its_engines_at_once(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    sched_up(&s, 4, 2);
    int has;
    ipmpi_req_t *busy = mkreq(1, 1), *r = mkreq(2, 1);
    assert_int_equal(ipmpi_sched_start_req(&s, 2, busy, 1), 0);
    assert_int_not_equal(ipmpi_sched_open_engine(&s), -1); /* idle engines have room for tasks */
    int ids[] = {0, 1, 2, 3};
    /* Engine 2 is not idle: it is left as it was. */
    assert_int_equal(ipmpi_sched_start_reqs(&s, ids, 4, r, 5), 3);
    assert_int_equal(r->nfly, 3);
    assert_int_equal(running_len(&s, r, &has), 2);
    assert_true(has);
    assert_int_equal(ipmpi_sched_open_engine(&s), -1); /* none has room now */
    for (int e = 0; e < 4; e++) {
        const ipmpi_sitem_t *it = ipmpi_sched_inflight(&s, e);
        assert_non_null(it);
        assert_ptr_equal(it->u.req, e == 2 ? busy : r);
        assert_int_equal(it->sent_ns, e == 2 ? 1 : 5);
        assert_int_equal(inflight_count(&s, e), 1);
        assert_false(ipmpi_sched_idle(&s, e));
    }
    /* Nothing is idle any more: a second call starts nothing. */
    assert_int_equal(ipmpi_sched_start_reqs(&s, ids, 4, busy, 6), 0);
    assert_int_equal(busy->nfly, 1);
    /* Their gathered replies: settled at once; engine 2 (its oldest item
     * is another request) and an id out of range are left alone. */
    const uint32_t answered[] = {0, 1, 2, 3, 7};
    assert_int_equal(ipmpi_sched_done_reqs(&s, answered, 5, r, 7), 3);
    assert_int_equal(r->nfly, 0);
    assert_int_equal(running_len(&s, busy, &has), 1);
    assert_true(has);
    for (int e = 0; e < 4; e++)
        assert_int_equal(ipmpi_sched_idle(&s, e), e != 2);
    assert_int_equal(s.eng[3].last_reply_ns, 7);
    assert_int_equal(ipmpi_sched_done_reqs(&s, answered, 5, r, 8), 0); /* twice: nothing */
    assert_ptr_equal(done_req(&s, 2, 9), busy);
    assert_true(ipmpi_ql_empty(&s.running));
    assert_int_not_equal(ipmpi_sched_open_engine(&s), -1);
    /* Engines with room are open for tasks again. */
    ipmpi_sched_client_t *cl = ipmpi_sched_client_new(1);
    assert_non_null(cl);
    ipmpi_stask_t t;
    ipmpi_stask_init(&t, 3);
    ipmpi_sched_submit(&s, cl, &t);
    assert_ptr_equal(next_task(&s, 1, 10), &t);
    assert_ptr_equal(done_task(&s, 1, 11), &t);
    ipmpi_stask_fini(&t);
    ipmpi_sched_client_unref(cl);
    ipmpi_sched_fini(&s);
    ipmpi_req_free(busy);
    ipmpi_req_free(r);
}

static void test_init_starts_with_no_live_engine_and_nothing_queued(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    assert_int_equal(ipmpi_sched_init(&s, 3, 2), 0);
    assert_int_equal(s.nengines, 3);
    assert_int_equal(s.nlive, 0);
    assert_int_equal(s.depth, 2);
    assert_int_equal(s.nqueued, 0);
    assert_int_equal(s.nparked, 0);
    assert_int_equal(ipmpi_sched_has_tasks(&s), 0);
    assert_int_equal(ipmpi_sched_open_engine(&s), -1);
    for (int e = 0; e < 3; e++) {
        assert_int_equal(s.eng[e].live, 0);
        assert_null(ipmpi_sched_inflight(&s, e));
    }
    ipmpi_sched_engine_ready(&s, 1);
    assert_int_equal(s.nlive, 1);
    assert_int_equal(ipmpi_sched_open_engine(&s), 1);
    ipmpi_sched_fini(&s);
}

static void test_stask_init_sets_id_and_nothing_else(void **state)
{
    (void)state;
    ipmpi_stask_t t;
    memset(&t, 0x5a, sizeof t);
    ipmpi_stask_init(&t, 42);
    assert_int_equal(t.id, 42);
    assert_null(t.client);
    assert_int_equal(t.queued, 0);
    assert_int_equal(t.parked, 0);
    assert_int_equal(t.avoid, -1);
    assert_int_equal(t.nrefusals, 0);
    ipmpi_stask_fini(&t);
}

/* ---- MultiEngine requests ---- */

static void test_requests_to_one_engine_go_in_fifo_order(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    sched_up(&s, 2, 2);
    ipmpi_req_t *r[5];
    for (int i = 0; i < 5; i++) {
        r[i] = mkreq((uint64_t)i, 7);
        assert_int_equal(ipmpi_sched_queue_req(&s, 0, r[i]), 0);
    }
    for (int i = 0; i < 5; i++) {
        assert_ptr_equal(next_req(&s, 0, 100 + (uint64_t)i), r[i]);
        assert_ptr_equal(done_req(&s, 0, 200 + (uint64_t)i), r[i]);
    }
    next_nothing(&s, 0, 300);
    /* engine 1 had none */
    next_nothing(&s, 1, 300);
    for (int i = 0; i < 5; i++)
        ipmpi_req_free(r[i]);
    settle(&s, NULL, 0);
}

static void test_request_goes_only_to_an_engine_with_nothing_in_flight(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    sched_up(&s, 1, 4);
    ipmpi_req_t *a = mkreq(1, 7), *b = mkreq(2, 7);
    assert_int_equal(ipmpi_sched_queue_req(&s, 0, a), 0);
    assert_int_equal(ipmpi_sched_queue_req(&s, 0, b), 0);
    assert_ptr_equal(next_req(&s, 0, 10), a);
    /* look-ahead is for tasks only: b waits until a is answered */
    next_nothing(&s, 0, 11);
    assert_int_equal(inflight_count(&s, 0), 1);
    assert_int_equal(ipmpi_equeue_len(&s.eng[0].q), 1);
    const ipmpi_sitem_t *fly = ipmpi_sched_inflight(&s, 0);
    assert_non_null(fly);
    assert_int_equal(fly->type, IPMPI_SITEM_REQ);
    assert_ptr_equal(fly->u.req, a);
    assert_int_equal(fly->sent_ns, 10);
    assert_ptr_equal(done_req(&s, 0, 12), a);
    assert_null(ipmpi_sched_inflight(&s, 0));
    assert_ptr_equal(next_req(&s, 0, 13), b);
    ipmpi_req_free(a);
    settle(&s, NULL, 0);
}

static void test_held_client_request_makes_next_return_2_and_hands_nothing(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    sched_up(&s, 1, 2);
    ipmpi_req_t *r = mkreq(1, 77);
    assert_int_equal(ipmpi_sched_queue_req(&s, 0, r), 0);
    hold_ctx_t h = {.held_session = 77};
    ipmpi_sitem_t it;
    assert_int_equal(ipmpi_sched_next(&s, 0, 5, hold_one_session, &h, &it), 2);
    assert_true(h.calls >= 1);
    assert_int_equal(h.last_session, 77);
    assert_int_equal(inflight_count(&s, 0), 0);
    assert_null(ipmpi_sched_inflight(&s, 0));
    assert_int_equal(ipmpi_equeue_len(&s.eng[0].q), 1);
    /* asked again once the client reads: the request goes */
    h.held_session = 0;
    memset(&it, 0, sizeof it);
    assert_int_equal(ipmpi_sched_next(&s, 0, 6, hold_one_session, &h, &it), 1);
    assert_int_equal(it.type, IPMPI_SITEM_REQ);
    assert_ptr_equal(it.u.req, r);
    settle(&s, NULL, 0);
}

static void test_not_ready_and_dead_engines_get_nothing(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    assert_int_equal(ipmpi_sched_init(&s, 2, 2), 0);
    ipmpi_req_t *r0 = mkreq(1, 7), *r1 = mkreq(2, 7);
    assert_int_equal(ipmpi_sched_queue_req(&s, 0, r0), 0);
    assert_int_equal(ipmpi_sched_queue_req(&s, 1, r1), 0);
    next_nothing(&s, 0, 1); /* not ready yet */
    next_nothing(&s, 1, 1);
    ipmpi_sched_engine_ready(&s, 0);
    ipmpi_sched_engine_ready(&s, 1);
    ipmpi_sched_engine_dead(&s, 1);
    next_nothing(&s, 1, 2); /* dead */
    assert_ptr_equal(next_req(&s, 0, 2), r0);
    settle(&s, NULL, 0);
}

static void test_idle_means_live_with_nothing_in_flight_and_nothing_queued(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    assert_int_equal(ipmpi_sched_init(&s, 2, 2), 0);
    assert_int_equal(ipmpi_sched_idle(&s, 0), 0); /* not ready */
    ipmpi_sched_engine_ready(&s, 0);
    ipmpi_sched_engine_ready(&s, 1);
    assert_int_equal(ipmpi_sched_idle(&s, 0), 1);
    assert_int_equal(ipmpi_sched_idle(&s, -1), 0);
    assert_int_equal(ipmpi_sched_idle(&s, 2), 0);
    ipmpi_req_t *r = mkreq(1, 7);
    assert_int_equal(ipmpi_sched_queue_req(&s, 0, r), 0);
    assert_int_equal(ipmpi_sched_idle(&s, 0), 0); /* queued */
    assert_ptr_equal(next_req(&s, 0, 1), r);
    assert_int_equal(ipmpi_sched_idle(&s, 0), 0); /* in flight */
    assert_ptr_equal(done_req(&s, 0, 2), r);
    assert_int_equal(ipmpi_sched_idle(&s, 0), 1);
    ipmpi_sched_engine_dead(&s, 1);
    assert_int_equal(ipmpi_sched_idle(&s, 1), 0);
    ipmpi_req_free(r);
    settle(&s, NULL, 0);
}

static void test_start_req_puts_the_request_in_flight_on_an_idle_engine(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    sched_up(&s, 1, 2);
    ipmpi_sched_client_t *cl = ipmpi_sched_client_new(1);
    ipmpi_stask_t t[3];
    mktasks(t, 3, 1);
    submit_all(&s, cl, t, 3);
    ipmpi_req_t *r = mkreq(1, 7);
    assert_int_equal(ipmpi_sched_start_req(&s, 0, r, 42), 0);
    const ipmpi_sitem_t *f = ipmpi_sched_inflight(&s, 0);
    assert_non_null(f);
    assert_int_equal(f->type, IPMPI_SITEM_REQ);
    assert_ptr_equal(f->u.req, r);
    assert_int_equal(f->sent_ns, 42);
    assert_int_equal(ipmpi_equeue_len(&s.eng[0].q), 0);
    /* like a request from next: nothing joins it in flight */
    assert_int_equal(ipmpi_sched_open_engine(&s), -1);
    next_nothing(&s, 0, 43);
    assert_ptr_equal(done_req(&s, 0, 44), r);
    /* and after it a task goes */
    assert_ptr_equal(next_task(&s, 0, 45), &t[0]);
    ipmpi_req_free(r);
    settle(&s, t, 3);
    ipmpi_sched_client_unref(cl);
}

static void test_start_req_is_eagain_and_changes_nothing_unless_idle(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    assert_int_equal(ipmpi_sched_init(&s, 3, 2), 0);
    ipmpi_req_t *r = mkreq(1, 7), *q = mkreq(2, 7);
    assert_int_equal(ipmpi_sched_start_req(&s, 0, r, 1), IPMPI_EAGAIN); /* not ready */
    for (int e = 0; e < 3; e++)
        ipmpi_sched_engine_ready(&s, e);
    ipmpi_sched_engine_dead(&s, 2);
    assert_int_equal(ipmpi_sched_start_req(&s, 2, r, 1), IPMPI_EAGAIN); /* dead */
    assert_null(ipmpi_sched_inflight(&s, 2));
    /* engine 1: a task in flight */
    ipmpi_sched_client_t *cl = ipmpi_sched_client_new(1);
    ipmpi_stask_t t;
    ipmpi_stask_init(&t, 1);
    ipmpi_sched_submit(&s, cl, &t);
    assert_ptr_equal(next_task(&s, 1, 1), &t);
    assert_int_equal(ipmpi_sched_start_req(&s, 1, r, 2), IPMPI_EAGAIN);
    assert_int_equal(inflight_count(&s, 1), 1);
    /* engine 0: a request queued (it must not be overtaken) */
    assert_int_equal(ipmpi_sched_queue_req(&s, 0, q), 0);
    assert_int_equal(ipmpi_sched_start_req(&s, 0, r, 3), IPMPI_EAGAIN);
    assert_int_equal(inflight_count(&s, 0), 0);
    assert_ptr_equal(next_req(&s, 0, 4), q);
    ipmpi_req_free(r);
    settle(&s, &t, 1);
    ipmpi_sched_client_unref(cl);
}

/* ---- tasks: balance and look-ahead ---- */

static void test_open_engine_prefers_an_engine_with_nothing_in_flight(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    sched_up(&s, 3, 2);
    ipmpi_sched_client_t *cl = ipmpi_sched_client_new(1);
    ipmpi_stask_t t[6];
    mktasks(t, 6, 1);
    submit_all(&s, cl, t, 6);
    assert_int_equal(ipmpi_sched_has_tasks(&s), 1);
    /* every engine empty: the three first tasks land on three engines */
    int used[3] = {0, 0, 0};
    for (int i = 0; i < 3; i++) {
        int e = ipmpi_sched_open_engine(&s);
        assert_in_range(e, 0, 2);
        assert_int_equal(inflight_count(&s, e), 0);
        assert_ptr_equal(next_task(&s, e, 10), &t[i]);
        used[e]++;
    }
    assert_int_equal(used[0] + used[1] + used[2], 3);
    assert_true(used[0] == 1 && used[1] == 1 && used[2] == 1);
    /* all busy but with room (depth 2): still an engine is open */
    int e = ipmpi_sched_open_engine(&s);
    assert_in_range(e, 0, 2);
    /* engine 1 empties: it is the one preferred */
    assert_ptr_equal(done_task(&s, 1, 20), &t[1]);
    assert_int_equal(ipmpi_sched_open_engine(&s), 1);
    settle(&s, t, 6);
    ipmpi_sched_client_unref(cl);
}

static void test_task_goes_to_any_engine_with_room(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    sched_up(&s, 2, 0);
    ipmpi_sched_client_t *cl = ipmpi_sched_client_new(1);
    ipmpi_stask_t t[3];
    mktasks(t, 3, 1);
    submit_all(&s, cl, t, 3);
    assert_ptr_equal(next_task(&s, 1, 1), &t[0]);
    assert_ptr_equal(next_task(&s, 0, 1), &t[1]);
    /* both full (depth 0): no engine open */
    assert_int_equal(ipmpi_sched_open_engine(&s), -1);
    next_nothing(&s, 0, 2);
    next_nothing(&s, 1, 2);
    assert_ptr_equal(done_task(&s, 1, 3), &t[0]);
    assert_int_equal(ipmpi_sched_open_engine(&s), 1);
    assert_ptr_equal(next_task(&s, 1, 4), &t[2]);
    assert_int_equal(ipmpi_sched_has_tasks(&s), 0);
    settle(&s, t, 3);
    ipmpi_sched_client_unref(cl);
}

static void test_lookahead_allows_at_most_one_plus_depth_tasks_in_flight(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    sched_up(&s, 1, 3);
    ipmpi_sched_client_t *cl = ipmpi_sched_client_new(1);
    ipmpi_stask_t t[8];
    mktasks(t, 8, 1);
    submit_all(&s, cl, t, 8);
    for (int i = 0; i < 4; i++) {
        assert_int_equal(ipmpi_sched_open_engine(&s), 0);
        assert_ptr_equal(next_task(&s, 0, 10 + (uint64_t)i), &t[i]);
    }
    assert_int_equal(inflight_count(&s, 0), 4);
    assert_int_equal(ipmpi_sched_open_engine(&s), -1);
    next_nothing(&s, 0, 20);
    /* replies come oldest first; each frees one place */
    assert_ptr_equal(ipmpi_sched_inflight(&s, 0)->u.task, &t[0]);
    assert_ptr_equal(done_task(&s, 0, 30), &t[0]);
    assert_ptr_equal(next_task(&s, 0, 31), &t[4]);
    next_nothing(&s, 0, 32);
    settle(&s, t, 8);
    ipmpi_sched_client_unref(cl);
}

static void test_depth_zero_means_one_task_in_flight(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    sched_up(&s, 1, 0);
    ipmpi_sched_client_t *cl = ipmpi_sched_client_new(1);
    ipmpi_stask_t t[3];
    mktasks(t, 3, 1);
    submit_all(&s, cl, t, 3);
    assert_ptr_equal(next_task(&s, 0, 1), &t[0]);
    next_nothing(&s, 0, 2);
    assert_int_equal(ipmpi_sched_open_engine(&s), -1);
    assert_ptr_equal(done_task(&s, 0, 3), &t[0]);
    assert_ptr_equal(next_task(&s, 0, 4), &t[1]);
    next_nothing(&s, 0, 5);
    settle(&s, t, 3);
    ipmpi_sched_client_unref(cl);
}

static void test_inflight_ring_keeps_order_past_its_growth(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    sched_up(&s, 1, IPMPI_SCHED_DEPTH_MAX);
    ipmpi_sched_client_t *cl = ipmpi_sched_client_new(1);
    enum { N = IPMPI_SCHED_DEPTH_MAX + 3 };
    ipmpi_stask_t t[N];
    mktasks(t, N, 1);
    submit_all(&s, cl, t, N);
    /* round 1 fills it, replies free half, round 2 wraps the ring */
    for (int i = 0; i < (int)IPMPI_SCHED_DEPTH_MAX + 1; i++)
        assert_ptr_equal(next_task(&s, 0, 100 + (uint64_t)i), &t[i]);
    next_nothing(&s, 0, 500);
    for (int i = 0; i < 2; i++) {
        const ipmpi_sitem_t *f = ipmpi_sched_inflight(&s, 0);
        assert_ptr_equal(f->u.task, &t[i]);
        assert_int_equal(f->sent_ns, 100 + (uint64_t)i);
        assert_ptr_equal(done_task(&s, 0, 600), &t[i]);
    }
    assert_ptr_equal(next_task(&s, 0, 700), &t[N - 2]);
    assert_ptr_equal(next_task(&s, 0, 701), &t[N - 1]);
    for (int i = 2; i < N; i++)
        assert_ptr_equal(done_task(&s, 0, 800), &t[i]);
    assert_int_equal(ipmpi_sched_done(&s, 0, 900, &(ipmpi_sitem_t){0}), 0);
    settle(&s, t, N);
    ipmpi_sched_client_unref(cl);
}

/* Runs n tasks of cl on engine 0 one at a time, each taking service ns. */
static uint64_t run_one_by_one(ipmpi_sched_t *s, ipmpi_stask_t *t, size_t n, uint64_t now, uint64_t service)
{
    for (size_t i = 0; i < n; i++) {
        assert_ptr_equal(next_task(s, 0, now), &t[i]);
        now += service;
        assert_ptr_equal(done_task(s, 0, now), &t[i]);
        now += 1;
    }
    return now;
}

static void test_lookahead_off_for_long_tasks_and_on_again_for_short(void **state)
{
    (void)state;
    enum { NLONG = 64, NSHORT = 512, NPROBE = 4 };
    ipmpi_sched_t s;
    sched_up(&s, 1, 3);
    ipmpi_sched_client_t *cl = ipmpi_sched_client_new(1);
    ipmpi_stask_t *t = calloc(NLONG + NSHORT + 2 * NPROBE, sizeof *t);
    assert_non_null(t);
    size_t nt = NLONG + NSHORT + 2 * NPROBE;
    mktasks(t, nt, 1);
    uint64_t now = 1000;

    /* long tasks (5x the bound): one in flight at a time, whatever depth */
    submit_all(&s, cl, t, NLONG);
    now = run_one_by_one(&s, t, NLONG, now, 5 * IPMPI_SCHED_LOOKAHEAD_MAX_NS);
    assert_true(s.eng[0].task_ns > IPMPI_SCHED_LOOKAHEAD_MAX_NS);
    submit_all(&s, cl, t + NLONG, NPROBE);
    assert_ptr_equal(next_task(&s, 0, now), &t[NLONG]);
    next_nothing(&s, 0, now + 1);
    assert_int_equal(ipmpi_sched_open_engine(&s), -1);
    assert_ptr_equal(done_task(&s, 0, now + 5 * IPMPI_SCHED_LOOKAHEAD_MAX_NS), &t[NLONG]);
    now += 5 * IPMPI_SCHED_LOOKAHEAD_MAX_NS + 1;
    for (size_t i = NLONG + 1; i < NLONG + NPROBE; i++)
        assert_int_equal(ipmpi_sched_cancel(&s, &t[i]), 0);

    /* short tasks (1 us): the average falls and look-ahead comes back */
    ipmpi_stask_t *sh = t + NLONG + NPROBE;
    submit_all(&s, cl, sh, NSHORT);
    now = run_one_by_one(&s, sh, NSHORT, now, 1000);
    assert_true(s.eng[0].task_ns < IPMPI_SCHED_LOOKAHEAD_MAX_NS);
    ipmpi_stask_t *pr = sh + NSHORT;
    submit_all(&s, cl, pr, NPROBE);
    for (int i = 0; i < NPROBE; i++)
        assert_ptr_equal(next_task(&s, 0, now), &pr[i]);
    next_nothing(&s, 0, now);

    settle(&s, t, nt);
    free(t);
    ipmpi_sched_client_unref(cl);
}

static void test_lookahead_stays_on_for_short_tasks_that_queue_on_the_engine(void **state)
{
    (void)state;
    /* The engine runs its tasks one after another, each 1 ms (half the
     * bound); look-ahead keeps 1 + depth = 3 of them there, so each
     * reply comes 3 ms after its task was sent, 1 ms after the one
     * before. The service time is 1 ms: look-ahead must stay on. */
    enum { N = 200 };
    const uint64_t svc = IPMPI_SCHED_LOOKAHEAD_MAX_NS / 2;
    ipmpi_sched_t s;
    sched_up(&s, 1, 2);
    ipmpi_sched_client_t *cl = ipmpi_sched_client_new(1);
    ipmpi_stask_t *t = calloc(N, sizeof *t);
    assert_non_null(t);
    mktasks(t, N, 1);
    submit_all(&s, cl, t, N);
    uint64_t finish[N];
    uint64_t now = 1000, busy_until = 0;
    size_t sent = 0, answered = 0;
    while (answered < N) {
        ipmpi_sitem_t it;
        while (ipmpi_sched_next(&s, 0, now, NULL, NULL, &it) == 1) {
            assert_ptr_equal(it.u.task, &t[sent]);
            busy_until = (busy_until > now ? busy_until : now) + svc;
            finish[sent++] = busy_until;
        }
        if (sent < N)
            assert_int_equal(inflight_count(&s, 0), 3);
        now = finish[answered];
        assert_ptr_equal(done_task(&s, 0, now), &t[answered]);
        answered++;
    }
    assert_true(s.eng[0].task_ns < IPMPI_SCHED_LOOKAHEAD_MAX_NS);
    settle(&s, t, N);
    free(t);
    ipmpi_sched_client_unref(cl);
}

/* ---- fairness ---- */

static void test_two_clients_are_served_alternately(void **state)
{
    (void)state;
    enum { N = 100 };
    ipmpi_sched_t s;
    sched_up(&s, 1, 0);
    ipmpi_sched_client_t *a = ipmpi_sched_client_new(1), *b = ipmpi_sched_client_new(2);
    ipmpi_stask_t ta[N], tb[N];
    mktasks(ta, N, 1);
    mktasks(tb, N, 1001);
    submit_all(&s, a, ta, N);
    submit_all(&s, b, tb, N);
    assert_int_equal(a->nqueued, N);
    assert_int_equal(b->nqueued, N);
    assert_int_equal(s.nqueued, 2 * N);
    uint64_t now = 1;
    for (int i = 0; i < N; i++) {
        ipmpi_stask_t *x = next_task(&s, 0, now++);
        assert_ptr_equal(x, &ta[i]);
        assert_ptr_equal(x->client, a);
        assert_ptr_equal(done_task(&s, 0, now++), x);
        x = next_task(&s, 0, now++);
        assert_ptr_equal(x, &tb[i]);
        assert_ptr_equal(x->client, b);
        assert_ptr_equal(done_task(&s, 0, now++), x);
    }
    assert_int_equal(ipmpi_sched_has_tasks(&s), 0);
    next_nothing(&s, 0, now);
    settle(&s, ta, N);
    for (int i = 0; i < N; i++)
        ipmpi_stask_fini(&tb[i]);
    ipmpi_sched_client_unref(a);
    ipmpi_sched_client_unref(b);
}

static void test_round_robin_drops_clients_that_run_out(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    sched_up(&s, 1, 0);
    ipmpi_sched_client_t *cl[3];
    ipmpi_stask_t t[6];
    mktasks(t, 6, 1);
    for (int c = 0; c < 3; c++)
        cl[c] = ipmpi_sched_client_new((uint64_t)c + 1);
    /* A: 3 tasks, B: 1, C: 2 -> A B C A C A */
    ipmpi_sched_submit(&s, cl[0], &t[0]);
    ipmpi_sched_submit(&s, cl[0], &t[1]);
    ipmpi_sched_submit(&s, cl[0], &t[2]);
    ipmpi_sched_submit(&s, cl[1], &t[3]);
    ipmpi_sched_submit(&s, cl[2], &t[4]);
    ipmpi_sched_submit(&s, cl[2], &t[5]);
    const int want[6] = {0, 3, 4, 1, 5, 2};
    for (int i = 0; i < 6; i++) {
        assert_ptr_equal(next_task(&s, 0, (uint64_t)i), &t[want[i]]);
        done_task(&s, 0, (uint64_t)i);
    }
    settle(&s, t, 6);
    for (int c = 0; c < 3; c++)
        ipmpi_sched_client_unref(cl[c]);
}

static void test_held_client_is_skipped_while_others_go_on(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    sched_up(&s, 1, 0);
    ipmpi_sched_client_t *a = ipmpi_sched_client_new(1), *b = ipmpi_sched_client_new(2);
    ipmpi_stask_t ta[3], tb[3];
    mktasks(ta, 3, 1);
    mktasks(tb, 3, 11);
    submit_all(&s, a, ta, 3);
    submit_all(&s, b, tb, 3);
    a->held = 1;
    for (int i = 0; i < 3; i++) {
        assert_ptr_equal(next_task(&s, 0, 1), &tb[i]);
        done_task(&s, 0, 2);
    }
    /* only held tasks left: nothing goes, and they stay queued */
    next_nothing(&s, 0, 3);
    assert_int_equal(a->nqueued, 3);
    for (int i = 0; i < 3; i++)
        assert_int_equal(ta[i].queued, 1);
    a->held = 0;
    for (int i = 0; i < 3; i++) {
        assert_ptr_equal(next_task(&s, 0, 4), &ta[i]);
        done_task(&s, 0, 5);
    }
    settle(&s, ta, 3);
    for (int i = 0; i < 3; i++)
        ipmpi_stask_fini(&tb[i]);
    ipmpi_sched_client_unref(a);
    ipmpi_sched_client_unref(b);
}

/* ---- MultiEngine requests and tasks on one engine ---- */

static void test_waiting_request_stops_new_tasks_until_in_flight_ones_finish(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    sched_up(&s, 2, 2);
    ipmpi_sched_client_t *cl = ipmpi_sched_client_new(1);
    ipmpi_stask_t t[10];
    mktasks(t, 10, 1);
    submit_all(&s, cl, t, 10);
    assert_ptr_equal(next_task(&s, 0, 1), &t[0]);
    assert_ptr_equal(next_task(&s, 0, 2), &t[1]);
    ipmpi_req_t *r = mkreq(1, 9);
    assert_int_equal(ipmpi_sched_queue_req(&s, 0, r), 0);
    /* engine 0 has room (depth 2) but a request waits: no new task */
    next_nothing(&s, 0, 3);
    /* engine 1 is not concerned */
    assert_ptr_equal(next_task(&s, 1, 3), &t[2]);
    assert_ptr_equal(done_task(&s, 0, 4), &t[0]);
    next_nothing(&s, 0, 5); /* t[1] still in flight */
    assert_ptr_equal(done_task(&s, 0, 6), &t[1]);
    assert_ptr_equal(next_req(&s, 0, 7), r);
    assert_ptr_equal(done_req(&s, 0, 8), r);
    ipmpi_req_free(r);
    settle(&s, t, 10);
    ipmpi_sched_client_unref(cl);
}

static void test_requests_and_tasks_alternate_so_neither_starves(void **state)
{
    (void)state;
    enum { ROUNDS = 10 };
    ipmpi_sched_t s;
    sched_up(&s, 1, 2);
    ipmpi_sched_client_t *cl = ipmpi_sched_client_new(1);
    ipmpi_stask_t t[ROUNDS + 5];
    mktasks(t, ROUNDS + 5, 1);
    submit_all(&s, cl, t, ROUNDS + 5);
    assert_ptr_equal(next_task(&s, 0, 1), &t[0]);
    assert_ptr_equal(done_task(&s, 0, 2), &t[0]);
    uint64_t now = 10;
    /* a request always waits and tasks always wait: one of each in turn */
    ipmpi_req_t *r = mkreq(0, 9);
    assert_int_equal(ipmpi_sched_queue_req(&s, 0, r), 0);
    for (int i = 0; i < ROUNDS; i++) {
        assert_ptr_equal(next_req(&s, 0, now++), r);
        ipmpi_req_t *again = mkreq((uint64_t)i + 1, 9);
        assert_int_equal(ipmpi_sched_queue_req(&s, 0, again), 0);
        assert_ptr_equal(done_req(&s, 0, now++), r);
        ipmpi_req_free(r);
        r = again;
        /* after the request, one task goes... */
        assert_ptr_equal(next_task(&s, 0, now++), &t[i + 1]);
        /* ...and no more, though depth allows, while a request waits */
        next_nothing(&s, 0, now++);
        assert_ptr_equal(done_task(&s, 0, now++), &t[i + 1]);
    }
    settle(&s, t, ROUNDS + 5); /* frees the last request, still queued */
    ipmpi_sched_client_unref(cl);
}

static void test_held_request_keeps_its_turn_after_a_task(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    sched_up(&s, 1, 2);
    ipmpi_sched_client_t *cl = ipmpi_sched_client_new(1);
    ipmpi_stask_t t[3];
    mktasks(t, 3, 1);
    submit_all(&s, cl, t, 3);
    assert_ptr_equal(next_task(&s, 0, 1), &t[0]);
    done_task(&s, 0, 2);
    ipmpi_req_t *r = mkreq(1, 77);
    assert_int_equal(ipmpi_sched_queue_req(&s, 0, r), 0);
    hold_ctx_t h = {.held_session = 77};
    ipmpi_sitem_t it;
    /* a task went last: the request is the only candidate, and it is held */
    assert_int_equal(ipmpi_sched_next(&s, 0, 3, hold_one_session, &h, &it), 2);
    assert_int_equal(inflight_count(&s, 0), 0);
    assert_int_equal(s.nqueued, 2);
    h.held_session = 0;
    memset(&it, 0, sizeof it);
    assert_int_equal(ipmpi_sched_next(&s, 0, 4, hold_one_session, &h, &it), 1);
    assert_int_equal(it.type, IPMPI_SITEM_REQ);
    assert_ptr_equal(it.u.req, r);
    settle(&s, t, 3);
    ipmpi_sched_client_unref(cl);
}

/*
 * The controller's dispatch loop: while tasks are queued, ask
 * open_engine and hand one out there. An engine offered must take a task,
 * or the loop never ends.
 */
static int dispatch_while_open(ipmpi_sched_t *s, uint64_t now, int max)
{
    int n = 0, e;
    while (ipmpi_sched_has_tasks(s) && (e = ipmpi_sched_open_engine(s)) >= 0) {
        ipmpi_sitem_t it;
        assert_true(n < max);
        assert_int_equal(ipmpi_sched_next(s, e, now, NULL, NULL, &it), 1);
        n++;
    }
    return n;
}

static void test_open_engine_never_offers_an_engine_whose_request_waits(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    sched_up(&s, 2, 2);
    ipmpi_sched_client_t *cl = ipmpi_sched_client_new(1);
    ipmpi_stask_t t[10];
    mktasks(t, 10, 1);
    submit_all(&s, cl, t, 10);
    assert_ptr_equal(next_task(&s, 0, 1), &t[0]);
    ipmpi_req_t *r = mkreq(1, 9);
    assert_int_equal(ipmpi_sched_queue_req(&s, 0, r), 0);
    /* engine 1 takes 3 (1 + depth), engine 0 none: the loop ends */
    assert_int_equal(dispatch_while_open(&s, 2, 20), 3);
    assert_int_equal(inflight_count(&s, 0), 1);
    assert_int_equal(inflight_count(&s, 1), 3);
    settle(&s, t, 10);
    ipmpi_sched_client_unref(cl);
}

/* ---- abort ---- */

static void test_cancel_removes_a_queued_task_that_never_runs(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    sched_up(&s, 1, 0);
    ipmpi_sched_client_t *cl = ipmpi_sched_client_new(1);
    ipmpi_stask_t t[3];
    mktasks(t, 3, 1);
    submit_all(&s, cl, t, 3);
    assert_int_equal(ipmpi_sched_cancel(&s, &t[1]), 0);
    assert_int_equal(t[1].queued, 0);
    assert_int_equal(s.nqueued, 2);
    assert_int_equal(cl->nqueued, 2);
    assert_ptr_equal(next_task(&s, 0, 1), &t[0]);
    done_task(&s, 0, 2);
    assert_ptr_equal(next_task(&s, 0, 3), &t[2]);
    done_task(&s, 0, 4);
    next_nothing(&s, 0, 5);
    assert_int_equal(ipmpi_sched_has_tasks(&s), 0);
    settle(&s, t, 3);
    ipmpi_sched_client_unref(cl);
}

static void test_cancel_of_last_queued_task_empties_the_scheduler(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    sched_up(&s, 1, 0);
    ipmpi_sched_client_t *cl = ipmpi_sched_client_new(1);
    ipmpi_stask_t t;
    ipmpi_stask_init(&t, 1);
    ipmpi_sched_submit(&s, cl, &t);
    assert_int_equal(ipmpi_sched_cancel(&s, &t), 0);
    assert_int_equal(ipmpi_sched_has_tasks(&s), 0);
    assert_int_equal(cl->nqueued, 0);
    next_nothing(&s, 0, 1);
    /* the client left the ring: a new task of it still goes */
    ipmpi_sched_submit(&s, cl, &t);
    assert_ptr_equal(next_task(&s, 0, 2), &t);
    settle(&s, &t, 1);
    ipmpi_sched_client_unref(cl);
}

static void test_cancel_of_in_flight_or_unknown_task_is_enoent(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    sched_up(&s, 1, 0);
    ipmpi_sched_client_t *cl = ipmpi_sched_client_new(1);
    ipmpi_stask_t t[2];
    mktasks(t, 2, 1);
    ipmpi_sched_submit(&s, cl, &t[0]);
    assert_ptr_equal(next_task(&s, 0, 1), &t[0]);
    assert_int_equal(ipmpi_sched_cancel(&s, &t[0]), IPMPI_ENOENT);
    assert_int_equal(inflight_count(&s, 0), 1);
    assert_int_equal(ipmpi_sched_cancel(&s, &t[1]), IPMPI_ENOENT); /* never submitted */
    done_task(&s, 0, 2);
    assert_int_equal(ipmpi_sched_cancel(&s, &t[0]), IPMPI_ENOENT); /* finished */
    settle(&s, t, 2);
    ipmpi_sched_client_unref(cl);
}

/* ---- retries ---- */

static void test_retry_is_not_given_to_the_avoided_engine_while_another_lives(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    sched_up(&s, 2, 0);
    ipmpi_sched_client_t *cl = ipmpi_sched_client_new(1);
    ipmpi_stask_t t;
    ipmpi_stask_init(&t, 1);
    ipmpi_sched_submit(&s, cl, &t);
    assert_ptr_equal(next_task(&s, 0, 1), &t);
    assert_ptr_equal(done_task(&s, 0, 2), &t);
    /* failed there: submitted again, avoiding engine 0 */
    t.avoid = 0;
    ipmpi_sched_submit(&s, cl, &t);
    assert_int_equal(cl->refs, 2); /* no second reference through t */
    next_nothing(&s, 0, 3);
    assert_ptr_equal(next_task(&s, 1, 4), &t);
    settle(&s, &t, 1);
    ipmpi_sched_client_unref(cl);
}

static void test_retry_waits_for_a_busy_other_engine(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    sched_up(&s, 2, 0);
    ipmpi_sched_client_t *cl = ipmpi_sched_client_new(1);
    ipmpi_stask_t t[2];
    mktasks(t, 2, 1);
    ipmpi_sched_submit(&s, cl, &t[0]);
    assert_ptr_equal(next_task(&s, 1, 1), &t[0]);
    t[1].avoid = 0;
    ipmpi_sched_submit(&s, cl, &t[1]);
    next_nothing(&s, 0, 2); /* engine 1 lives, though busy */
    done_task(&s, 1, 3);
    assert_ptr_equal(next_task(&s, 1, 4), &t[1]);
    settle(&s, t, 2);
    ipmpi_sched_client_unref(cl);
}

static void test_avoided_task_lets_the_next_one_go_to_that_engine(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    sched_up(&s, 2, 0);
    ipmpi_sched_client_t *cl = ipmpi_sched_client_new(1);
    ipmpi_stask_t t[2];
    mktasks(t, 2, 1);
    t[0].avoid = 0;
    submit_all(&s, cl, t, 2);
    assert_ptr_equal(next_task(&s, 0, 1), &t[1]);
    assert_ptr_equal(next_task(&s, 1, 1), &t[0]);
    settle(&s, t, 2);
    ipmpi_sched_client_unref(cl);
}

static void test_retry_goes_to_the_avoided_engine_when_it_is_the_only_live_one(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    sched_up(&s, 2, 0);
    ipmpi_sched_engine_dead(&s, 1);
    ipmpi_sched_client_t *cl = ipmpi_sched_client_new(1);
    ipmpi_stask_t t;
    ipmpi_stask_init(&t, 1);
    t.avoid = 0;
    ipmpi_sched_submit(&s, cl, &t);
    assert_int_equal(ipmpi_sched_open_engine(&s), 0);
    assert_ptr_equal(next_task(&s, 0, 1), &t);
    settle(&s, &t, 1);
    ipmpi_sched_client_unref(cl);
}

static void test_retry_queued_before_the_other_engine_dies_goes_to_the_avoided_one(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    sched_up(&s, 2, 0);
    ipmpi_sched_client_t *cl = ipmpi_sched_client_new(1);
    ipmpi_stask_t t[2];
    mktasks(t, 2, 1);
    ipmpi_sched_submit(&s, cl, &t[0]);
    assert_ptr_equal(next_task(&s, 1, 1), &t[0]);
    t[1].avoid = 0;
    ipmpi_sched_submit(&s, cl, &t[1]);
    next_nothing(&s, 0, 2);
    ipmpi_sched_engine_dead(&s, 1);
    assert_int_equal(ipmpi_sched_open_engine(&s), 0);
    assert_ptr_equal(next_task(&s, 0, 3), &t[1]);
    settle(&s, t, 2);
    ipmpi_sched_client_unref(cl);
}

/* ---- engine death ---- */

static void test_dead_engine_gets_nothing_and_gives_back_what_it_held(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    sched_up(&s, 2, 0);
    ipmpi_req_t *r1 = mkreq(1, 7), *r2 = mkreq(2, 7);
    assert_int_equal(ipmpi_sched_queue_req(&s, 0, r1), 0);
    assert_int_equal(ipmpi_sched_queue_req(&s, 0, r2), 0);
    assert_ptr_equal(next_req(&s, 0, 1), r1);
    ipmpi_sched_client_t *cl = ipmpi_sched_client_new(1);
    ipmpi_stask_t t[3];
    mktasks(t, 3, 1);
    submit_all(&s, cl, t, 3);
    assert_ptr_equal(next_task(&s, 1, 2), &t[0]);

    ipmpi_sched_engine_dead(&s, 0);
    assert_int_equal(s.nlive, 1);
    assert_int_equal(s.eng[0].live, 0);
    next_nothing(&s, 0, 3);
    /* what it held stays for the caller */
    assert_ptr_equal(ipmpi_sched_inflight(&s, 0)->u.req, r1);
    assert_ptr_equal(done_req(&s, 0, 4), r1);
    assert_ptr_equal(ipmpi_equeue_pop(&s.eng[0].q), r2);
    assert_null(ipmpi_equeue_pop(&s.eng[0].q));
    next_nothing(&s, 0, 5); /* empty now, still dead */
    assert_int_equal(ipmpi_sched_open_engine(&s), -1); /* 1 is full */

    ipmpi_sched_engine_dead(&s, 1);
    assert_int_equal(s.nlive, 0);
    next_nothing(&s, 1, 6);
    assert_ptr_equal(done_task(&s, 1, 7), &t[0]);
    assert_int_equal(ipmpi_sched_open_engine(&s), -1);
    ipmpi_req_free(r1);
    ipmpi_req_free(r2);
    settle(&s, t, 3);
    ipmpi_sched_client_unref(cl);
}

static void test_open_engine_never_returns_a_dead_engine(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    sched_up(&s, 4, 1);
    ipmpi_sched_client_t *cl = ipmpi_sched_client_new(1);
    ipmpi_stask_t t[16];
    mktasks(t, 16, 1);
    submit_all(&s, cl, t, 16);
    ipmpi_sched_engine_dead(&s, 2);
    ipmpi_sched_engine_dead(&s, 0);
    assert_int_equal(s.nlive, 2);
    int e, n = 0;
    while ((e = ipmpi_sched_open_engine(&s)) >= 0) {
        assert_true(e == 1 || e == 3);
        next_task(&s, e, 1);
        assert_true(++n <= 4);
    }
    assert_int_equal(n, 4); /* 2 live engines x (1 + depth) */
    /* an engine that dies with room is closed at once */
    done_task(&s, 3, 2);
    ipmpi_sched_engine_dead(&s, 3);
    assert_int_equal(ipmpi_sched_open_engine(&s), -1);
    done_task(&s, 1, 3);
    assert_int_equal(ipmpi_sched_open_engine(&s), 1);
    settle(&s, t, 16);
    ipmpi_sched_client_unref(cl);
}

/* ---- depend refusals ---- */

static void test_refused_task_goes_back_to_the_front_of_its_client_queue(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    sched_up(&s, 2, 0);
    ipmpi_sched_client_t *cl = ipmpi_sched_client_new(1);
    ipmpi_stask_t t[3];
    mktasks(t, 3, 1);
    submit_all(&s, cl, t, 3);
    assert_ptr_equal(next_task(&s, 0, 1), &t[0]);
    assert_ptr_equal(next_task(&s, 1, 1), &t[1]);
    assert_ptr_equal(done_task(&s, 0, 2), &t[0]);
    assert_int_equal(ipmpi_sched_refused(&s, 0, &t[0]), 0);
    assert_int_equal(t[0].queued, 1);
    assert_int_equal(t[0].parked, 0);
    assert_int_equal(ipmpi_sched_refuses(&s, 0, &t[0]), 1);
    assert_int_equal(ipmpi_sched_refuses(&s, 1, &t[0]), 0);
    /* engine 0 skips the task it refused */
    assert_ptr_equal(next_task(&s, 0, 3), &t[2]);
    /* engine 1 gets it before the younger ones */
    done_task(&s, 1, 4);
    assert_ptr_equal(next_task(&s, 1, 5), &t[0]);
    settle(&s, t, 3);
    ipmpi_sched_client_unref(cl);
}

static void test_refusing_engine_is_not_offered_the_task_again(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    sched_up(&s, 2, 0);
    ipmpi_sched_client_t *cl = ipmpi_sched_client_new(1);
    ipmpi_stask_t t[2];
    mktasks(t, 2, 1);
    ipmpi_sched_submit(&s, cl, &t[0]);
    assert_ptr_equal(next_task(&s, 1, 1), &t[0]); /* engine 1 busy */
    ipmpi_sched_submit(&s, cl, &t[1]);
    assert_ptr_equal(next_task(&s, 0, 1), &t[1]);
    assert_ptr_equal(done_task(&s, 0, 2), &t[1]);
    assert_int_equal(ipmpi_sched_refused(&s, 0, &t[1]), 0);
    for (int i = 0; i < 5; i++)
        next_nothing(&s, 0, 3 + (uint64_t)i);
    done_task(&s, 1, 10);
    assert_ptr_equal(next_task(&s, 1, 11), &t[1]);
    settle(&s, t, 2);
    ipmpi_sched_client_unref(cl);
}

/* Hands t out on e and has e refuse it. */
static void refuse_on(ipmpi_sched_t *s, int e, ipmpi_stask_t *t, uint64_t now)
{
    assert_ptr_equal(next_task(s, e, now), t);
    assert_ptr_equal(done_task(s, e, now + 1), t);
    assert_int_equal(ipmpi_sched_refused(s, e, t), 0);
}

/* Room is not acceptance (sched.h): an open engine that no queued task
 * will take is offered, and next() hands it nothing; the task waits. */
static void assert_offered_but_given_nothing(ipmpi_sched_t *s, int e, uint32_t queued)
{
    ipmpi_sitem_t it;
    if (e < 0)
        e = ipmpi_sched_open_engine(s);
    assert_true(e >= 0);
    assert_true(ipmpi_ql_linked(&s->eng[e].open));
    assert_int_equal(ipmpi_sched_next(s, e, 9, NULL, NULL, &it), 0);
    assert_int_equal(s->nqueued, queued);
    assert_null(ipmpi_sched_inflight(s, e));
}

static void test_open_engine_that_refused_every_queued_task_is_given_nothing(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    sched_up(&s, 2, 0);
    ipmpi_sched_client_t *cl = ipmpi_sched_client_new(1);
    ipmpi_stask_t t[2];
    mktasks(t, 2, 1);
    ipmpi_sched_submit(&s, cl, &t[0]);
    assert_ptr_equal(next_task(&s, 1, 1), &t[0]); /* engine 1 full */
    ipmpi_sched_submit(&s, cl, &t[1]);
    refuse_on(&s, 0, &t[1], 2);
    assert_int_equal(ipmpi_sched_has_tasks(&s), 1);
    assert_offered_but_given_nothing(&s, 0, 1);
    settle(&s, t, 2);
    ipmpi_sched_client_unref(cl);
}

static void test_open_engine_the_only_task_avoids_is_given_nothing(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    sched_up(&s, 2, 0);
    ipmpi_sched_client_t *cl = ipmpi_sched_client_new(1);
    ipmpi_stask_t t[2];
    mktasks(t, 2, 1);
    ipmpi_sched_submit(&s, cl, &t[0]);
    assert_ptr_equal(next_task(&s, 1, 1), &t[0]); /* engine 1 full */
    t[1].avoid = 0;
    ipmpi_sched_submit(&s, cl, &t[1]);
    assert_offered_but_given_nothing(&s, 0, 1);
    settle(&s, t, 2);
    ipmpi_sched_client_unref(cl);
}

static void test_open_engines_are_given_nothing_when_only_held_clients_have_tasks(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    sched_up(&s, 2, 0);
    ipmpi_sched_client_t *cl = ipmpi_sched_client_new(1);
    ipmpi_stask_t t[2];
    mktasks(t, 2, 1);
    submit_all(&s, cl, t, 2);
    cl->held = 1;
    assert_offered_but_given_nothing(&s, 0, 2);
    assert_offered_but_given_nothing(&s, 1, 2);
    ipmpi_sitem_t it;
    cl->held = 0;
    assert_int_equal(ipmpi_sched_next(&s, 1, 9, NULL, NULL, &it), 1);
    assert_ptr_equal(it.u.task, &t[0]);
    assert_ptr_equal(done_task(&s, 1, 10), &t[0]);
    settle(&s, t, 2);
    ipmpi_sched_client_unref(cl);
}

static void test_retry_goes_back_to_the_avoided_engine_when_every_other_refuses(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    sched_up(&s, 2, 0);
    ipmpi_sched_client_t *cl = ipmpi_sched_client_new(1);
    ipmpi_stask_t t;
    ipmpi_stask_init(&t, 1);
    ipmpi_sched_submit(&s, cl, &t);
    /* depend admits engine 0 only; the attempt there failed */
    assert_ptr_equal(next_task(&s, 0, 1), &t);
    assert_ptr_equal(done_task(&s, 0, 2), &t);
    t.avoid = 0;
    ipmpi_sched_submit(&s, cl, &t);
    refuse_on(&s, 1, &t, 3);
    /* no other live engine will run it: the avoided one must */
    assert_ptr_equal(next_task(&s, 0, 5), &t);
    settle(&s, &t, 1);
    ipmpi_sched_client_unref(cl);
}

static void test_task_every_live_engine_refused_is_parked(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    sched_up(&s, 2, 0);
    ipmpi_sched_client_t *cl = ipmpi_sched_client_new(1);
    ipmpi_stask_t t;
    ipmpi_stask_init(&t, 1);
    ipmpi_sched_submit(&s, cl, &t);
    refuse_on(&s, 0, &t, 1);
    assert_int_equal(s.nparked, 0);
    refuse_on(&s, 1, &t, 3);
    assert_int_equal(s.nparked, 1);
    assert_int_equal(t.parked, 1);
    assert_int_equal(t.queued, 1);
    assert_int_equal(s.nqueued, 0);
    assert_int_equal(cl->nqueued, 0);
    assert_int_equal(ipmpi_sched_has_tasks(&s), 0);
    next_nothing(&s, 0, 5);
    next_nothing(&s, 1, 5);
    settle(&s, &t, 1);
    ipmpi_sched_client_unref(cl);
}

static void test_props_changed_brings_a_parked_task_back_for_that_engine(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    sched_up(&s, 2, 0);
    ipmpi_sched_client_t *cl = ipmpi_sched_client_new(1);
    ipmpi_stask_t t;
    ipmpi_stask_init(&t, 1);
    ipmpi_sched_submit(&s, cl, &t);
    refuse_on(&s, 0, &t, 1);
    refuse_on(&s, 1, &t, 3);
    assert_int_equal(s.nparked, 1);
    ipmpi_sched_props_changed(&s, 1);
    assert_int_equal(s.nparked, 0);
    assert_int_equal(t.parked, 0);
    assert_int_equal(ipmpi_sched_has_tasks(&s), 1);
    assert_int_equal(ipmpi_sched_refuses(&s, 1, &t), 0);
    assert_int_equal(ipmpi_sched_refuses(&s, 0, &t), 1);
    next_nothing(&s, 0, 5); /* engine 0's refusal still counts */
    assert_ptr_equal(next_task(&s, 1, 6), &t);
    settle(&s, &t, 1);
    ipmpi_sched_client_unref(cl);
}

static void test_spin_forgets_every_refusal_and_queues_parked_tasks(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    sched_up(&s, 2, 0);
    ipmpi_sched_client_t *cl = ipmpi_sched_client_new(1);
    ipmpi_stask_t t[2];
    mktasks(t, 2, 1);
    submit_all(&s, cl, t, 2);
    refuse_on(&s, 0, &t[0], 1);
    refuse_on(&s, 1, &t[0], 3);
    assert_int_equal(s.nparked, 1);
    assert_int_equal(s.nqueued, 1);
    assert_int_equal(ipmpi_sched_spin(&s), 2);
    assert_int_equal(s.nparked, 0);
    assert_int_equal(ipmpi_sched_refuses(&s, 0, &t[0]), 0);
    assert_int_equal(ipmpi_sched_refuses(&s, 1, &t[0]), 0);
    ipmpi_stask_t *x = next_task(&s, 0, 5), *y = next_task(&s, 1, 5);
    assert_true((x == &t[0] && y == &t[1]) || (x == &t[1] && y == &t[0]));
    settle(&s, t, 2);
    ipmpi_sched_client_unref(cl);
}

static void test_parked_task_can_be_cancelled(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    sched_up(&s, 1, 0);
    ipmpi_sched_client_t *cl = ipmpi_sched_client_new(1);
    ipmpi_stask_t t;
    ipmpi_stask_init(&t, 1);
    ipmpi_sched_submit(&s, cl, &t);
    refuse_on(&s, 0, &t, 1);
    assert_int_equal(s.nparked, 1);
    assert_int_equal(ipmpi_sched_cancel(&s, &t), 0);
    assert_int_equal(s.nparked, 0);
    assert_int_equal(t.queued, 0);
    assert_int_equal(t.parked, 0);
    ipmpi_sched_props_changed(&s, 0); /* nothing parked comes back */
    assert_int_equal(ipmpi_sched_has_tasks(&s), 0);
    next_nothing(&s, 0, 3);
    settle(&s, &t, 1);
    ipmpi_sched_client_unref(cl);
}

static void test_new_engine_unparks_tasks_the_others_refused(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    assert_int_equal(ipmpi_sched_init(&s, 2, 0), 0);
    ipmpi_sched_engine_ready(&s, 0);
    ipmpi_sched_client_t *cl = ipmpi_sched_client_new(1);
    ipmpi_stask_t t;
    ipmpi_stask_init(&t, 1);
    ipmpi_sched_submit(&s, cl, &t);
    refuse_on(&s, 0, &t, 1);
    assert_int_equal(s.nparked, 1); /* every live engine refused */
    ipmpi_sched_engine_ready(&s, 1);
    assert_int_equal(s.nparked, 0);
    assert_int_equal(ipmpi_sched_has_tasks(&s), 1);
    assert_ptr_equal(next_task(&s, 1, 3), &t);
    settle(&s, &t, 1);
    ipmpi_sched_client_unref(cl);
}

static void test_death_of_the_last_engine_not_refusing_parks_the_task(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    sched_up(&s, 3, 0);
    ipmpi_sched_client_t *cl = ipmpi_sched_client_new(1);
    ipmpi_stask_t t[2];
    mktasks(t, 2, 1);
    ipmpi_sched_submit(&s, cl, &t[0]);
    assert_ptr_equal(next_task(&s, 2, 1), &t[0]); /* engine 2 busy */
    ipmpi_sched_submit(&s, cl, &t[1]);
    refuse_on(&s, 0, &t[1], 2);
    refuse_on(&s, 1, &t[1], 4);
    assert_int_equal(s.nparked, 0); /* engine 2 may take it */
    ipmpi_sched_engine_dead(&s, 2);
    /* no live engine will take it: once they have been asked (parking at
     * the death or at the first look is both fine), it is parked and no
     * busy loop remains */
    next_nothing(&s, 0, 6);
    next_nothing(&s, 1, 6);
    assert_int_equal(s.nparked, 1);
    assert_int_equal(t[1].parked, 1);
    assert_int_equal(ipmpi_sched_has_tasks(&s), 0);
    assert_int_equal(dispatch_while_open(&s, 6, 1), 0);
    ipmpi_sched_props_changed(&s, 0);
    assert_ptr_equal(next_task(&s, 0, 7), &t[1]);
    settle(&s, t, 2);
    ipmpi_sched_client_unref(cl);
}

static void test_death_of_a_refusing_engine_keeps_the_task_parked(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    sched_up(&s, 2, 0);
    ipmpi_sched_client_t *cl = ipmpi_sched_client_new(1);
    ipmpi_stask_t t;
    ipmpi_stask_init(&t, 1);
    ipmpi_sched_submit(&s, cl, &t);
    refuse_on(&s, 0, &t, 1);
    refuse_on(&s, 1, &t, 3);
    ipmpi_sched_engine_dead(&s, 0);
    assert_int_equal(ipmpi_sched_has_tasks(&s), 0);
    next_nothing(&s, 1, 5);
    assert_int_equal(ipmpi_sched_open_engine(&s) == 0, 0);
    settle(&s, &t, 1);
    ipmpi_sched_client_unref(cl);
}

static void test_engine_finds_the_task_it_accepts_behind_scan_max_minus_one_refused(void **state)
{
    (void)state;
    /* 1 + depth = SCAN_MAX - 1 tasks in flight on engine 0, all refused:
     * they go back to the front, and the task behind them is the
     * SCAN_MAX-th looked at, still within one turn */
    enum { N = IPMPI_SCHED_SCAN_MAX - 1 };
    ipmpi_sched_t s;
    sched_up(&s, 2, N - 1);
    ipmpi_sched_client_t *cl = ipmpi_sched_client_new(1);
    ipmpi_stask_t t[N + 1];
    mktasks(t, N + 1, 1);
    submit_all(&s, cl, t, N + 1);
    for (int i = 0; i < N; i++)
        assert_ptr_equal(next_task(&s, 0, 1), &t[i]);
    for (int i = 0; i < N; i++) {
        assert_ptr_equal(done_task(&s, 0, 2), &t[i]);
        assert_int_equal(ipmpi_sched_refused(&s, 0, &t[i]), 0);
    }
    assert_int_equal(s.nparked, 0); /* engine 1 has refused none */
    assert_int_equal(s.nqueued, N + 1);
    assert_ptr_equal(next_task(&s, 0, 3), &t[N]);
    /* engine 1 gets the refused ones, the last refused first */
    assert_ptr_equal(next_task(&s, 1, 4), &t[N - 1]);
    settle(&s, t, N + 1);
    ipmpi_sched_client_unref(cl);
}

/* ---- client references ---- */

static void test_client_lives_while_a_task_or_the_session_holds_it(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    sched_up(&s, 1, 0);
    ipmpi_sched_client_t *cl = ipmpi_sched_client_new(33);
    assert_non_null(cl);
    assert_int_equal(cl->refs, 1);
    assert_int_equal(cl->session, 33);
    assert_int_equal(cl->held, 0);
    assert_int_equal(cl->nqueued, 0);
    ipmpi_stask_t t[2];
    mktasks(t, 2, 1);
    submit_all(&s, cl, t, 2);
    assert_int_equal(cl->refs, 3);
    assert_ptr_equal(t[0].client, cl);
    assert_int_equal(ipmpi_sched_cancel(&s, &t[0]), 0);
    assert_int_equal(cl->refs, 3); /* cancel keeps t's reference */
    ipmpi_stask_fini(&t[0]);
    assert_int_equal(cl->refs, 2);
    ipmpi_sched_client_unref(cl); /* the session ends */
    assert_int_equal(cl->refs, 1);
    /* the task still runs; finishing it frees the client (ASan: no leak,
     * no use after free) */
    assert_ptr_equal(next_task(&s, 0, 1), &t[1]);
    assert_int_equal(t[1].client->session, 33);
    done_task(&s, 0, 2);
    ipmpi_stask_fini(&t[1]);
    ipmpi_sched_fini(&s);
}

static void test_client_unref_at_one_frees_the_record(void **state)
{
    (void)state;
    ipmpi_sched_client_t *cl = ipmpi_sched_client_new(5);
    assert_non_null(cl);
    ipmpi_sched_client_unref(cl); /* ASan reports a leak otherwise */
}

static void test_stask_fini_frees_refusals_and_the_client_reference(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    sched_up(&s, 3, 0);
    ipmpi_sched_client_t *cl = ipmpi_sched_client_new(1);
    ipmpi_stask_t t;
    ipmpi_stask_init(&t, 1);
    ipmpi_sched_submit(&s, cl, &t);
    refuse_on(&s, 0, &t, 1);
    refuse_on(&s, 1, &t, 3);
    assert_int_equal(t.nrefusals, 2);
    assert_int_equal(ipmpi_sched_cancel(&s, &t), 0);
    assert_int_equal(cl->refs, 2);
    ipmpi_stask_fini(&t);
    assert_int_equal(cl->refs, 1);
    ipmpi_sched_client_unref(cl);
    ipmpi_sched_fini(&s);
}

/* An argument runs only the tests whose names match it (a glob). */
/* ---- gangs: one request on every live engine as one item ---- */

/* Engines whose link is in the open list. */
static int open_len(const ipmpi_sched_t *s)
{
    int n = 0;
    for (const ipmpi_qlink_t *q = s->open.next; q != &s->open; q = q->next)
        n++;
    return n;
}

static void test_a_gang_holds_a_request_on_every_live_engine_and_settles_runs_of_them(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    /* 130 engines: the sets span three words; engine 70 is dead. */
    sched_up(&s, 130, 0);
    ipmpi_sched_engine_dead(&s, 70);
    ipmpi_req_t *r = mkreq(1, 1), *other = mkreq(2, 1);
    /* Not quiet (a request queued): no gang, nothing changed. */
    assert_int_equal(ipmpi_sched_queue_req(&s, 3, other), 0);
    assert_int_equal(ipmpi_sched_start_gang(&s, r, 5), 0);
    assert_int_equal(r->nfly, 0);
    assert_ptr_equal(next_req(&s, 3, 6), other);
    assert_int_equal(ipmpi_sched_start_gang(&s, r, 5), 0); /* in flight: not quiet either */
    assert_ptr_equal(done_req(&s, 3, 7), other);
    assert_int_equal(ipmpi_sched_start_gang(&s, r, 8), 129);
    assert_int_equal(r->nfly, 129);
    int has = 0;
    assert_int_equal(running_len(&s, r, &has), 1);
    assert_true(has);
    assert_false(ipmpi_sched_quiet(&s));
    for (int e = 0; e < 130; e++) {
        const ipmpi_sitem_t *it = ipmpi_sched_inflight(&s, e);
        if (e == 70) {
            assert_null(it);
            continue;
        }
        assert_non_null(it);
        assert_ptr_equal(it->u.req, r);
        assert_int_equal(it->type, IPMPI_SITEM_REQ);
        assert_int_equal(it->sent_ns, 8);
        assert_int_equal(ipmpi_sched_nfly(&s, e), 1);
        assert_false(ipmpi_sched_idle(&s, e));
        assert_int_equal(inflight_count(&s, e), 0); /* no engine's ring was touched */
    }
    /* A second gang waits for the first. */
    assert_int_equal(ipmpi_sched_start_gang(&s, other, 9), 0);
    /* Runs: only when every engine of the run is pending; the dead one
     * is no member, an id past the end is refused. */
    assert_int_equal(ipmpi_sched_gang_take(&s, 60, 20), 0);
    assert_int_equal(ipmpi_sched_gang_take(&s, 120, 11), 0);
    assert_int_equal(ipmpi_sched_gang_take(&s, 0, 0), 0);
    assert_int_equal(ipmpi_sched_gang_take(&s, 0, 64), 1);
    assert_int_equal(ipmpi_sched_gang_take(&s, 63, 2), 0); /* 63 taken: nothing changed */
    assert_true(ipmpi_sched_gang_pending(&s, 64));
    ipmpi_sched_gang_untake(&s, 0, 64); /* could not be delivered whole */
    for (int e = 0; e < 64; e++)
        assert_ptr_equal(ipmpi_sched_inflight(&s, e)->u.req, r);
    assert_int_equal(ipmpi_sched_gang_take(&s, 0, 64), 1);
    ipmpi_sched_gang_settle(&s, 0, 64, 10);
    assert_int_equal(r->nfly, 65);
    for (int e = 0; e < 64; e++) {
        assert_null(ipmpi_sched_inflight(&s, e));
        assert_true(ipmpi_sched_idle(&s, e));
    }
    assert_int_equal(ipmpi_sched_gang_take(&s, 64, 6), 1);
    ipmpi_sched_gang_settle(&s, 64, 6, 11);
    assert_int_equal(ipmpi_sched_gang_take(&s, 71, 58), 1);
    ipmpi_sched_gang_settle(&s, 71, 58, 11);
    /* The last member answers alone (a reply sent directly). */
    assert_int_equal(r->nfly, 1);
    assert_ptr_equal(done_req(&s, 129, 12), r);
    assert_int_equal(s.eng[129].last_reply_ns, 12);
    assert_int_equal(r->nfly, 0);
    assert_int_equal(s.gang.left, 0);
    assert_true(ipmpi_sched_quiet(&s));
    assert_int_equal(ipmpi_sched_gang_take(&s, 0, 1), 0); /* no gang */
    /* Every live engine has room for a task again, as before the gang. */
    assert_int_equal(open_len(&s), 129);
    /* And the next gang may go. */
    assert_int_equal(ipmpi_sched_start_gang(&s, other, 13), 129);
    const uint32_t all[] = {0, 1, 70, 129, 500};
    assert_int_equal(ipmpi_sched_done_reqs(&s, all, 5, r, 14), 0); /* another request: untouched */
    assert_int_equal(ipmpi_sched_done_reqs(&s, all, 5, other, 14), 3);
    assert_int_equal(other->nfly, 126);
    /* A member dies: its item is taken back one by one, as for any engine. */
    ipmpi_sched_engine_dead(&s, 5);
    assert_ptr_equal(done_req(&s, 5, 15), other);
    assert_false(ipmpi_sched_gang_pending(&s, 5));
    assert_int_equal(other->nfly, 125);
    ipmpi_sched_fini(&s);
    assert_int_equal(other->nfly, 0); /* detached by fini */
    ipmpi_req_free(r);
    ipmpi_req_free(other);
}

static void test_a_gang_member_takes_no_task_or_request_until_it_answered_then_both_go(void **state)
{
    (void)state;
    ipmpi_sched_t s;
    sched_up(&s, 4, 1);
    ipmpi_sched_client_t *cl = ipmpi_sched_client_new(1);
    assert_non_null(cl);
    ipmpi_stask_t t[3];
    mktasks(t, 3, 10);
    /* Engine 1 ran a task last: the gang's answer clears that, as any
     * request's answer does. */
    submit_all(&s, cl, t, 1);
    assert_ptr_equal(next_task(&s, 1, 1), &t[0]);
    assert_ptr_equal(done_task(&s, 1, 2), &t[0]);
    assert_true(s.eng[1].last_task);
    assert_int_equal(s.nlast_task, 1);
    ipmpi_req_t *r = mkreq(1, 1), *after = mkreq(2, 1);
    assert_int_equal(ipmpi_sched_start_gang(&s, r, 3), 4);
    /* A task submitted now finds no member with room; the open list
     * drops each member it is offered. */
    submit_all(&s, cl, t + 1, 2);
    int offered = 0, e;
    while ((e = ipmpi_sched_open_engine(&s)) >= 0 && offered < 10) {
        next_nothing(&s, e, 4);
        offered++;
    }
    assert_int_equal(offered, 4);
    assert_int_equal(open_len(&s), 0);
    assert_int_equal(ipmpi_sched_open_engine(&s), -1);
    assert_true(s.gang.open_stale);
    /* A request queued behind the gang on engine 2. */
    assert_int_equal(ipmpi_sched_queue_req(&s, 2, after), 0);
    next_nothing(&s, 2, 5);
    /* A task cancelled while the gang runs: nothing left to hand out. */
    assert_int_equal(ipmpi_sched_cancel(&s, &t[2]), 0);
    /* Engines 0 and 1 answer in one run: they are open again, and engine 1
     * lost its last_task. */
    assert_int_equal(ipmpi_sched_gang_take(&s, 0, 2), 1);
    ipmpi_sched_gang_settle(&s, 0, 2, 6);
    assert_false(s.eng[1].last_task);
    assert_int_equal(s.nlast_task, 0);
    assert_int_equal(open_len(&s), 2);
    assert_ptr_equal(next_task(&s, 0, 7), &t[1]);
    /* Engine 2's queued request goes once it answered; engine 3 after. */
    assert_int_equal(ipmpi_sched_gang_take(&s, 2, 2), 1);
    ipmpi_sched_gang_settle(&s, 2, 2, 8);
    assert_int_equal(s.gang.left, 0);
    assert_int_equal(r->nfly, 0);
    assert_ptr_equal(next_req(&s, 2, 9), after);
    /* Open: 1 and 3 (idle), 0 (one task in flight, room for one ahead). */
    assert_int_equal(open_len(&s), 3);
    settle(&s, t, 3);
    ipmpi_sched_client_unref(cl);
    ipmpi_req_free(r);
}

int main(int argc, char **argv)
{
    if (argc > 1)
        cmocka_set_test_filter(argv[1]);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_init_rejects_bad_depth_and_engine_count),
        cmocka_unit_test(test_a_gang_holds_a_request_on_every_live_engine_and_settles_runs_of_them),
        cmocka_unit_test(test_a_gang_member_takes_no_task_or_request_until_it_answered_then_both_go),
        cmocka_unit_test(test_init_starts_with_no_live_engine_and_nothing_queued),
        cmocka_unit_test(test_stask_init_sets_id_and_nothing_else),
        cmocka_unit_test(test_requests_to_one_engine_go_in_fifo_order),
        cmocka_unit_test(test_request_goes_only_to_an_engine_with_nothing_in_flight),
        cmocka_unit_test(test_held_client_request_makes_next_return_2_and_hands_nothing),
        cmocka_unit_test(test_not_ready_and_dead_engines_get_nothing),
        cmocka_unit_test(test_idle_means_live_with_nothing_in_flight_and_nothing_queued),
        cmocka_unit_test(test_start_req_puts_the_request_in_flight_on_an_idle_engine),
        cmocka_unit_test(test_start_req_is_eagain_and_changes_nothing_unless_idle),
        cmocka_unit_test(test_open_engine_prefers_an_engine_with_nothing_in_flight),
        cmocka_unit_test(test_task_goes_to_any_engine_with_room),
        cmocka_unit_test(test_lookahead_allows_at_most_one_plus_depth_tasks_in_flight),
        cmocka_unit_test(test_depth_zero_means_one_task_in_flight),
        cmocka_unit_test(test_inflight_ring_keeps_order_past_its_growth),
        cmocka_unit_test(test_lookahead_off_for_long_tasks_and_on_again_for_short),
        cmocka_unit_test(test_lookahead_stays_on_for_short_tasks_that_queue_on_the_engine),
        cmocka_unit_test(test_two_clients_are_served_alternately),
        cmocka_unit_test(test_round_robin_drops_clients_that_run_out),
        cmocka_unit_test(test_held_client_is_skipped_while_others_go_on),
        cmocka_unit_test(test_waiting_request_stops_new_tasks_until_in_flight_ones_finish),
        cmocka_unit_test(test_requests_and_tasks_alternate_so_neither_starves),
        cmocka_unit_test(test_held_request_keeps_its_turn_after_a_task),
        cmocka_unit_test(test_open_engine_never_offers_an_engine_whose_request_waits),
        cmocka_unit_test(test_cancel_removes_a_queued_task_that_never_runs),
        cmocka_unit_test(test_cancel_of_last_queued_task_empties_the_scheduler),
        cmocka_unit_test(test_cancel_of_in_flight_or_unknown_task_is_enoent),
        cmocka_unit_test(test_retry_is_not_given_to_the_avoided_engine_while_another_lives),
        cmocka_unit_test(test_retry_waits_for_a_busy_other_engine),
        cmocka_unit_test(test_avoided_task_lets_the_next_one_go_to_that_engine),
        cmocka_unit_test(test_retry_goes_to_the_avoided_engine_when_it_is_the_only_live_one),
        cmocka_unit_test(test_retry_queued_before_the_other_engine_dies_goes_to_the_avoided_one),
        cmocka_unit_test(test_dead_engine_gets_nothing_and_gives_back_what_it_held),
        cmocka_unit_test(test_open_engine_never_returns_a_dead_engine),
        cmocka_unit_test(test_refused_task_goes_back_to_the_front_of_its_client_queue),
        cmocka_unit_test(test_refusing_engine_is_not_offered_the_task_again),
        cmocka_unit_test(test_open_engine_that_refused_every_queued_task_is_given_nothing),
        cmocka_unit_test(test_open_engine_the_only_task_avoids_is_given_nothing),
        cmocka_unit_test(test_open_engines_are_given_nothing_when_only_held_clients_have_tasks),
        cmocka_unit_test(test_retry_goes_back_to_the_avoided_engine_when_every_other_refuses),
        cmocka_unit_test(test_task_every_live_engine_refused_is_parked),
        cmocka_unit_test(test_props_changed_brings_a_parked_task_back_for_that_engine),
        cmocka_unit_test(test_spin_forgets_every_refusal_and_queues_parked_tasks),
        cmocka_unit_test(test_parked_task_can_be_cancelled),
        cmocka_unit_test(test_new_engine_unparks_tasks_the_others_refused),
        cmocka_unit_test(test_death_of_the_last_engine_not_refusing_parks_the_task),
        cmocka_unit_test(test_death_of_a_refusing_engine_keeps_the_task_parked),
        cmocka_unit_test(test_engine_finds_the_task_it_accepts_behind_scan_max_minus_one_refused),
        cmocka_unit_test(test_client_lives_while_a_task_or_the_session_holds_it),
        cmocka_unit_test(test_client_unref_at_one_frees_the_record),
        cmocka_unit_test(test_engines_added_later_get_the_next_ids_and_work_while_the_others_stay_put),
        cmocka_unit_test(test_running_list_and_counts_follow_every_hand_out_answer_and_pop),
        cmocka_unit_test(test_a_tree_request_goes_in_flight_and_is_settled_on_all_its_engines_at_once),
        cmocka_unit_test(test_stask_fini_frees_refusals_and_the_client_reference),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
