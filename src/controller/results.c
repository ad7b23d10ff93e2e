/*
 * Kept results of MultiEngine requests and the RESULT_* kinds (results.h,
 * doc/protocol.md section 7): a record per engine request of a mec
 * session, the final replies kept in it, forwarded to sessions that
 * fetch it while it runs, evicted within --result-memory. Loop thread
 * only.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <openssl/rand.h>

#include "codec.h"
#include "ctl.h"
#include "ipmpi/errors.h"
#include "json.h"
#include "log.h"

_Static_assert(offsetof(ipmpi_result_t, key) == 0, "a record must begin with its key (ipmpi_idtab_t)");

/* Bytes a record costs beyond its replies' parts and its table of them
 * (counted in res->bytes as it grows: room_for_reply). */
static uint64_t overhead(void)
{
    return sizeof(ipmpi_result_t);
}

/* "instance:session:req", the id users see (ipmpi.results parses it). */
static void id_str(uint64_t instance, uint64_t key, char *buf, size_t cap)
{
    snprintf(buf, cap, "%016llx:%u:%u", (unsigned long long)instance, (unsigned)(key >> 32), (unsigned)key);
}

int ipmpi_ctl_results_init(ipmpi_ctl_t *c)
{
    ipmpi_results_t *rs = &c->results;
    memset(rs, 0, sizeof *rs);
    ipmpi_rstore_init(&rs->st, c->o->result_memory, c->o->result_memory / IPMPI_RESULT_DELIVERED_SHARE);
    /* Ids name their controller: a restarted controller (same furl, with
     * --client-port) must not answer for its predecessor's ids. */
    if (RAND_bytes((unsigned char *)&c->instance, sizeof c->instance) != 1) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        c->instance = ((uint64_t)ts.tv_sec << 32) ^ (uint64_t)ts.tv_nsec ^ ((uint64_t)getpid() << 16);
    }
    return 0;
}

static void drop_replies(ipmpi_results_t *rs, ipmpi_result_t *res)
{
    for (uint32_t i = 0; res->reps && i < res->nrep; i++)
        ipmpi_parts_unref(res->reps[i].parts);
    free(res->reps);
    res->reps = NULL;
    res->repcap = 0;
    uint64_t kept = res->bytes - overhead();
    ipmpi_rstore_count(&rs->st, -(int64_t)kept);
    res->bytes -= kept;
}

/* Room in res->reps for one more entry, counted in the budget. 0 or
 * IPMPI_ENOMEM. */
static int room_for_reply(ipmpi_results_t *rs, ipmpi_result_t *res)
{
    if (res->nrep < res->repcap)
        return 0;
    uint32_t cap = res->repcap ? 2 * res->repcap : 4;
    if (cap > res->total)
        cap = res->total;
    if (cap <= res->nrep)
        return IPMPI_ENOMEM; /* never: at most total replies are kept */
    ipmpi_rreply_t *n = realloc(res->reps, (size_t)cap * sizeof *n);
    if (!n)
        return IPMPI_ENOMEM;
    uint64_t more = (uint64_t)(cap - res->repcap) * sizeof *n;
    res->reps = n;
    res->repcap = cap;
    res->bytes += more;
    ipmpi_rstore_count(&rs->st, (int64_t)more);
    return 0;
}

static void record_free(ipmpi_result_t *res)
{
    for (uint32_t i = 0; res->reps && i < res->nrep; i++)
        ipmpi_parts_unref(res->reps[i].parts);
    free(res->reps);
    free(res->subs);
    free(res);
}

/* Removes a record (finished or running) from the table and the budget. */
static void record_remove(ipmpi_results_t *rs, ipmpi_result_t *res, int evicted)
{
    if (ipmpi_rstore_has(&res->e))
        ipmpi_rstore_del(&rs->st, &res->e);
    else
        ipmpi_rstore_count(&rs->st, -(int64_t)res->bytes);
    if (res->req)
        res->req->res = NULL;
    ipmpi_idtab_del(&rs->tab, res->key);
    if (evicted)
        ipmpi_idset_add(&rs->st.evicted, res->key);
    record_free(res);
}

void ipmpi_ctl_results_fini(ipmpi_ctl_t *c)
{
    ipmpi_results_t *rs = &c->results;
    for (uint32_t i = 0; i < rs->tab.cap; i++) {
        /* Requests still in the table are being freed without their
         * records (nothing reads r->res then). */
        if (rs->tab.slots[i])
            record_free(rs->tab.slots[i]);
    }
    ipmpi_idtab_fini(&rs->tab);
    ipmpi_rstore_fini(&rs->st);
    memset(rs, 0, sizeof *rs);
}

/* Evicts finished records until need more bytes fit (rstore's order). */
static void make_room(ipmpi_ctl_t *c, uint64_t need)
{
    ipmpi_results_t *rs = &c->results;
    ipmpi_rentry_t *e;
    while ((e = ipmpi_rstore_victim(&rs->st, need, NULL))) {
        ipmpi_result_t *res = IPMPI_CONTAINER_OF(e, ipmpi_result_t, e);
        if (!e->delivered) {
            /* Delivered ones go quietly (that is their purpose); a result
             * nobody got is worth a line. */
            char id[64];
            id_str(c->instance, res->key, id, sizeof id);
            ipmpi_log(IPMPI_LOG_INFO, "request %s: result evicted unfetched (--result-memory)", id);
        }
        record_remove(rs, res, 1);
    }
}

void ipmpi_ctl_result_open(ipmpi_ctl_t *c, const ipmpi_session_t *s, ipmpi_req_t *r)
{
    ipmpi_results_t *rs = &c->results;
    if (s->sno == 0 || r->client_req > UINT32_MAX || r->total == 0)
        return; /* documented: such requests have no id */
    uint64_t key = ((uint64_t)s->sno << 32) | r->client_req;
    ipmpi_result_t *res = ipmpi_idtab_get(&rs->tab, key);
    if (res && res->req) {
        /* Running under the same id: a cut-through request withdrawn and
         * submitted again (stream.c), or a client that reused a req_id.
         * The record, and whoever fetches it, follow the new request. */
        res->req->res = NULL;
        drop_replies(rs, res);
        res->nrep = 0;
        res->ngot = 0;
        res->dropped = 0;
        res->missed = 0;
    } else {
        if (res)
            record_remove(rs, res, 0);
        res = calloc(1, sizeof *res);
        if (!res || (res->key = key, ipmpi_idtab_put(&rs->tab, res) != 0)) {
            free(res);
            return; /* out of memory: this request gets no kept result */
        }
        ipmpi_rentry_init(&res->e);
        ipmpi_rstore_count(&rs->st, (int64_t)overhead());
        res->bytes = overhead();
    }
    res->kind = r->kind;
    res->total = r->total;
    res->req = r;
    r->res = res;
    make_room(c, 0);
}

struct fetch_to {
    ipmpi_session_t *s;
    uint64_t req;
    uint32_t total;
};

/* One engine's reply of a kept gathered part, as its own frame (send_kept). */
static int send_one(void *arg, const ipmpi_hdr_t *eh, ipmpi_parts_t *p)
{
    const struct fetch_to *f = arg;
    ipmpi_hdr_t h = {.kind = IPMPI_K_RESULT_FETCH, .flags = IPMPI_F_REPLY, .req_id = f->req, .target = eh->target,
                     .status = eh->status, .total = f->total};
    return ipmpi_session_send(f->s, &h, p);
}

/* Sends kept reply rp of res to s as the reply to its fetch (req, flags).
 * A gathered one goes whole to a fetch that allows it, else one frame per
 * engine. */
static void send_kept(ipmpi_session_t *s, uint64_t req, uint16_t flags, const ipmpi_result_t *res,
                      const ipmpi_rreply_t *rp)
{
    ipmpi_hdr_t h = {.kind = IPMPI_K_RESULT_FETCH, .flags = IPMPI_F_REPLY, .req_id = req, .target = rp->target,
                     .status = rp->status, .total = res->total};
    int rc;
    if (rp->target == IPMPI_TARGET_ALL && (flags & IPMPI_F_GATHER_OK)) {
        h.flags |= IPMPI_F_GATHER;
        rc = ipmpi_session_send(s, &h, rp->parts);
    } else if (rp->target == IPMPI_TARGET_ALL) {
        rc = ipmpi_ctl_gathered_each(rp->parts, send_one, &(struct fetch_to){s, req, res->total});
    } else {
        /* Parts in the controller's memfds go by shared memory only to a
         * client that allows it; any other gets them inline. */
        rc = (flags & IPMPI_F_SHM_OK) ? ipmpi_ctl_send_reply(s, &h, rp->parts, (flags & IPMPI_F_VM_OK) != 0)
                                      : ipmpi_session_send(s, &h, rp->parts);
    }
    if (rc != 0)
        ipmpi_session_send_error(s, IPMPI_K_RESULT_FETCH, req, rp->target, res->total, IPMPI_ENOMEM,
                                 "controller out of memory for the reply");
}

/* 1 when some kept part of res lives in a memfd of the controller's
 * (a reply for a same-host client, doc/protocol.md section 5). */
static int in_memfds(const ipmpi_result_t *res)
{
    for (uint32_t i = 0; res->reps && i < res->nrep; i++)
        if (res->reps[i].parts && res->reps[i].parts->back)
            return 1;
    return 0;
}

/* Every reply of res is in: it becomes an entry of the store. */
static void finish(ipmpi_ctl_t *c, ipmpi_result_t *res)
{
    ipmpi_results_t *rs = &c->results;
    res->req = NULL;
    if (res->dropped) {
        record_remove(rs, res, 1);
        return;
    }
    int got = !res->missed;
    for (uint32_t i = 0; !got && i < res->nsubs; i++)
        got = ipmpi_ctl_session(c, res->subs[i].session) != NULL;
    free(res->subs);
    res->subs = NULL;
    res->nsubs = 0;
    if (got && in_memfds(res)) {
        /* Delivered through memfds: the client on this host has it, and
         * keeping it would pin memfds the shm path bounds (their pool). */
        record_remove(rs, res, 1);
        return;
    }
    ipmpi_rstore_count(&rs->st, -(int64_t)res->bytes);
    ipmpi_rstore_add(&rs->st, &res->e, res->bytes);
    if (got)
        ipmpi_rstore_delivered(&rs->st, &res->e);
    make_room(c, 0); /* may evict res itself: a delivered result beyond the delivered share */
}

/* Keeps rp (parts borrowed) in r's record and sends it to r's fetchers. */
static void keep(ipmpi_ctl_t *c, ipmpi_req_t *r, const ipmpi_rreply_t *rp, int owner_got)
{
    ipmpi_result_t *res = r->res;
    if (!res || r->quiet || rp->count > res->total - res->ngot)
        return;
    if (!owner_got)
        res->missed = 1;
    for (uint32_t i = 0; i < res->nsubs; i++) {
        ipmpi_session_t *s = ipmpi_ctl_session(c, res->subs[i].session);
        if (s)
            send_kept(s, res->subs[i].client_req, res->subs[i].flags, res, rp);
    }
    if (!res->dropped) {
        uint64_t n = rp->parts ? ipmpi_parts_bytes(rp->parts) : 0;
        make_room(c, n);
        int fits = ipmpi_rstore_fits(&c->results.st, n);
        if (!fits || room_for_reply(&c->results, res) != 0) {
            char id[64];
            id_str(c->instance, res->key, id, sizeof id);
            if (fits)
                ipmpi_log(IPMPI_LOG_WARN, "request %s: no memory to keep its replies; they go to its client only", id);
            else
                ipmpi_log(IPMPI_LOG_INFO, "request %s: its replies are too large to keep within --result-memory "
                          "(%llu MiB); they go to its client only", id,
                          (unsigned long long)(c->results.st.budget >> 20));
            drop_replies(&c->results, res);
            res->dropped = 1;
        } else {
            res->reps[res->nrep] = *rp;
            if (rp->parts)
                ipmpi_parts_ref(rp->parts);
            res->nrep++;
            res->bytes += n;
            ipmpi_rstore_count(&c->results.st, (int64_t)n);
        }
    }
    res->ngot += rp->count;
    if (res->ngot == res->total) {
        r->res = NULL;
        finish(c, res);
    }
}

void ipmpi_ctl_result_reply(ipmpi_ctl_t *c, ipmpi_req_t *r, int32_t target, int32_t status, ipmpi_parts_t *parts,
                            int owner_got)
{
    ipmpi_rreply_t rp = {.target = target, .status = status, .parts = parts, .count = 1};
    keep(c, r, &rp, owner_got);
}

void ipmpi_ctl_result_gathered(ipmpi_ctl_t *c, ipmpi_req_t *r, ipmpi_parts_t *parts, uint32_t count)
{
    ipmpi_rreply_t rp = {.target = IPMPI_TARGET_ALL, .parts = parts, .count = count};
    keep(c, r, &rp, 1);
}

/* ---- RESULT_FETCH and RESULT_CLEAR ---- */

/* One 16-byte id (u64 instance, u64 key) of part 0 at i. */
static void read_id(const ipmpi_parts_t *p, uint64_t i, uint64_t *instance, uint64_t *key)
{
    *instance = ipmpi_get_u64(p->bufs[0] + 16 * i);
    *key = ipmpi_get_u64(p->bufs[0] + 16 * i + 8);
}

static void do_fetch(ipmpi_ctl_t *c, ipmpi_session_t *s, const ipmpi_hdr_t *h, const ipmpi_parts_t *p)
{
    ipmpi_results_t *rs = &c->results;
    if (p->n != 1 || p->lens[0] != 16) {
        ipmpi_ctl_reply_err(s, h, IPMPI_EPROTO, "RESULT_FETCH: part 0 must be a request id: u64 instance, u64 "
                                                "session << 32 | req_id");
        return;
    }
    uint64_t instance, key;
    read_id(p, 0, &instance, &key);
    char id[64];
    id_str(instance, key, id, sizeof id);
    if (instance != c->instance) {
        ipmpi_ctl_reply_err(s, h, IPMPI_EINVAL,
                            "request id %s belongs to another controller (this controller's ids begin %016llx:); "
                            "a restarted controller does not have its predecessor's results",
                            id, (unsigned long long)c->instance);
        return;
    }
    ipmpi_result_t *res = ipmpi_idtab_get(&rs->tab, key);
    if (!res || res->dropped) {
        if (res || ipmpi_idset_has(&rs->st.evicted, key))
            ipmpi_ctl_reply_err(s, h, IPMPI_EEVICTED,
                                "the result of request %s was evicted: the controller's result memory "
                                "(--result-memory %llu MiB) needed room",
                                id, (unsigned long long)(rs->st.budget >> 20));
        else
            ipmpi_ctl_reply_err(s, h, IPMPI_ENOENT,
                                "no request %s in this controller: never submitted, or its result was cleared", id);
        return;
    }
    uint16_t flags = h->flags & (IPMPI_F_SHM_OK | IPMPI_F_VM_OK | IPMPI_F_GATHER_OK);
    if (res->req) {
        if (res->nsubs >= IPMPI_RESULT_SUBS_MAX) {
            ipmpi_ctl_reply_err(s, h, IPMPI_EAGAIN, "request %s is fetched by %u clients already; try again when "
                                "it has finished", id, res->nsubs);
            return;
        }
        struct ipmpi_rsub *n = realloc(res->subs, (res->nsubs + 1) * sizeof *n);
        if (!n) {
            ipmpi_ctl_reply_err(s, h, IPMPI_ENOMEM, "controller out of memory");
            return;
        }
        res->subs = n;
        res->subs[res->nsubs++] = (struct ipmpi_rsub){.session = s->id, .client_req = h->req_id, .flags = flags};
    }
    for (uint32_t i = 0; i < res->nrep; i++)
        send_kept(s, h->req_id, flags, res, &res->reps[i]);
    if (!res->req && in_memfds(res))
        record_remove(rs, res, 1); /* as in finish: delivered memfds are not kept */
    else if (!res->req)
        ipmpi_rstore_delivered(&rs->st, &res->e);
}

static void do_clear(ipmpi_ctl_t *c, ipmpi_session_t *s, const ipmpi_hdr_t *h, const ipmpi_parts_t *p)
{
    ipmpi_results_t *rs = &c->results;
    uint32_t cleared = 0;
    jbuf_t b = {0};
    if (p->n == 0) {
        ipmpi_rentry_t *e;
        for (; (e = ipmpi_rstore_first(&rs->st)); cleared++)
            record_remove(rs, IPMPI_CONTAINER_OF(e, ipmpi_result_t, e), 0);
        jb_printf(&b, "{\"cleared\": %u, \"unknown\": []}", cleared);
        ipmpi_ctl_send_json(s, h, &b);
        return;
    }
    if (p->n != 1 || p->lens[0] == 0 || p->lens[0] % 16 != 0) {
        ipmpi_ctl_reply_err(s, h, IPMPI_EPROTO, "RESULT_CLEAR: part 0 must be one or more 16-byte request ids, "
                                                "or absent (every finished result)");
        return;
    }
    jb_printf(&b, "{\"cleared\": ");
    jbuf_t unk = {0};
    for (uint64_t i = 0; i < p->lens[0] / 16; i++) {
        uint64_t instance, key;
        read_id(p, i, &instance, &key);
        ipmpi_result_t *res = instance == c->instance ? ipmpi_idtab_get(&rs->tab, key) : NULL;
        if (res && !res->req) {
            record_remove(rs, res, 0);
            cleared++;
        } else {
            char id[64];
            id_str(instance, key, id, sizeof id);
            jb_printf(&unk, "%s\"%s\"", unk.len ? ", " : "", id);
        }
    }
    jb_printf(&b, "%u, \"unknown\": [%s]}", cleared, unk.s ? unk.s : "");
    b.oom |= unk.oom;
    free(unk.s);
    ipmpi_ctl_send_json(s, h, &b);
}

void ipmpi_ctl_result_frame(ipmpi_ctl_t *c, ipmpi_session_t *s, const ipmpi_hdr_t *h, const ipmpi_parts_t *p)
{
    if (h->kind == IPMPI_K_RESULT_FETCH)
        do_fetch(c, s, h, p);
    else
        do_clear(c, s, h, p);
}
