/*
 * Broadcast trees, the controller's side (tree.h; engines: engine/tree.c;
 * doc/protocol.md section 3). A request for at least --tree-min idle
 * engines goes out as one tree per node: the engines of the controller's
 * node as up to IPMPI_TREE_FANOUT subtrees, those of every other node as
 * one subtree whose root the controller's datagram wakes (wake.c) and
 * whose engines wake each other on their node's doorbells. So the
 * controller sends one message per other node, not one per engine. The
 * replies come back gathered (IPMPI_F_GATHER), one frame per subtree, and
 * are taken apart here into the frames every other path delivers. If an
 * engine that relays dies, the engines below it that have not answered
 * get the request again directly (IPMPI_F_RETRY): an engine that already
 * had it does not run it twice. Loop thread only.
 */
#include <stdlib.h>
#include <string.h>

#include "backoff.h"
#include "bitset.h"
#include "ctl.h"
#include "doorbell.h"
#include "ipmpi/errors.h"
#include "log.h"
#include "tree.h"

int ipmpi_ctl_tree_kind(unsigned kind)
{
    switch (kind) {
    case IPMPI_K_EXECUTE:
    case IPMPI_K_PUSH:
    case IPMPI_K_PULL:
    case IPMPI_K_APPLY:
    case IPMPI_K_RESET:
    case IPMPI_K_KEYS:
    case IPMPI_K_GET_RESULT:
    case IPMPI_K_PROPS:
        return 1;
    default:
        return 0; /* KILL ends the engine that relays; tasks go one by one */
    }
}

int ipmpi_ctl_tree_may(ipmpi_ctl_t *c, const ipmpi_session_t *s, unsigned kind, int n)
{
    return c->o->tree_min > 0 && n >= (int)c->o->tree_min && ipmpi_ctl_tree_kind(kind) &&
           !ipmpi_ctl_must_hold(c, s->id);
}

int ipmpi_ctl_tree_engine(const ipmpi_ctl_t *c, const ipmpi_engine_slot_t *e)
{
    /* Idle, of this job (joined jobs have their own communicators),
     * watched (a relay's death must be seen), and wakeable: on the
     * controller's node (its doorbell) or by datagram (a root elsewhere;
     * below it, engines of its node ring each other's doorbells). */
    return c->watch.enabled && !e->dead && e->ready && !e->held && e->join_first == 0 &&
           e->rank < c->job->world_size && (e->near || e->wake_fd >= 0) &&
           (ipmpi_sched_quiet(&c->sched) || ipmpi_sched_idle(&c->sched, e->id)); /* ready, not dead: live */
}

/* Which node engine e is on, as far as trees go: 0 for the controller's,
 * else the key of the host its wake-ups go to (wake.c). */
static uint64_t node_key(const ipmpi_engine_slot_t *e)
{
    return e->near ? 0 : e->host_key;
}

/*
 * The top of a tree (tree[0] is the controller; ntree entries): the
 * controller's children, as slices [start, start + len) of tree. The
 * engines of its own node come first, in up to IPMPI_TREE_FANOUT slices
 * (tree.h); then each other node's engines, one slice each. A pure
 * function of r->tree and where its engines are, so the slices are found
 * again when a relay dies. Returns how many (at most n - 1).
 */
static uint32_t top_slices(const ipmpi_ctl_t *c, const int32_t *tree, uint32_t ntree, uint32_t *start,
                           uint32_t *len)
{
    uint32_t at = 1, k = 0;
    while (at < ntree && node_key(&c->eng[tree[at] - 1]) == 0)
        at++;
    if (at > 1) {
        uint32_t ns[IPMPI_TREE_FANOUT], nl[IPMPI_TREE_FANOUT];
        uint32_t m = ipmpi_tree_children(at, ns, nl);
        for (uint32_t i = 0; i < m; i++, k++) {
            start[k] = ns[i];
            len[k] = nl[i];
        }
    }
    while (at < ntree) {
        uint64_t key = node_key(&c->eng[tree[at] - 1]);
        start[k] = at;
        while (at < ntree && node_key(&c->eng[tree[at] - 1]) == key)
            at++;
        len[k] = at - start[k];
        k++;
    }
    return k;
}

/* The ranks of ids[0..n) into out, grouped by node (ipmpi_tree_group):
 * the controller's first (key 0), each group in the order given. 0 or
 * IPMPI_ENOMEM. */
static int group_by_node(const ipmpi_ctl_t *c, const int *ids, int n, int32_t *out)
{
    ipmpi_tree_keyed_t *k = c->tree_keys;
    for (int i = 0; i < n; i++) {
        k[i].key = node_key(&c->eng[ids[i]]);
        k[i].pos = i;
    }
    int rc = ipmpi_tree_group(k, (uint32_t)n) == 0 ? 0 : IPMPI_ENOMEM;
    for (int i = 0; rc == 0 && i < n; i++)
        out[i] = c->eng[ids[k[i].pos]].rank;
    return rc;
}

/* The message that precedes the request to a slice's root: the slice's
 * ranks t[start, start + len), the root first. NULL on ENOMEM. */
static ipmpi_parts_t *subtree_msg(const int32_t *t, uint32_t start, uint32_t len)
{
    uint64_t bytes = (uint64_t)len * sizeof *t;
    ipmpi_parts_t *sub = ipmpi_parts_new(1, &bytes);
    if (sub)
        memcpy(sub->bufs[0], t + start, (size_t)bytes);
    return sub;
}

/* Sends r to the root e of one of its top slices: its subtree sub (NULL:
 * no memory for it) first, then the request. */
static void send_root(ipmpi_ctl_t *c, const ipmpi_req_t *r, ipmpi_engine_slot_t *e, ipmpi_parts_t *sub)
{
    /* The subtree first (its own tag): the root reads it right after the
     * header. */
    int rc = sub ? ipmpi_mpilink_send_msg(&c->link, e->rank, IPMPI_TAG_TREE, sub) : IPMPI_ENOMEM;
    if (rc == 0) {
        ipmpi_hdr_t h = {.kind = r->kind, .flags = (uint16_t)(r->eng_flags | IPMPI_F_TREE), .req_id = r->id,
                         .target = e->id};
        rc = ipmpi_mpilink_send(&c->link, e->rank, &h, r->payload);
    }
    if (rc != 0) {
        char msg[160];
        snprintf(msg, sizeof msg, "controller could not send to engine %d: %s", e->id, ipmpi_strerror(rc));
        ipmpi_log(IPMPI_LOG_ERROR, "%s", msg);
        ipmpi_ctl_engine_died(c, e, msg); /* its subtree gets retries */
    } else {
        /* A root answers only once its whole subtree did: ringing it
         * again before then only wakes the loop (its post rang it,
         * ipmpi_ctl_wake). So the first ring-again waits about as long
         * as subtrees take (c->tree_ns), then backs off as usual. */
        ipmpi_ctl_wake_later(c, e, c->tree_ns);
    }
}

void ipmpi_ctl_tree_send(ipmpi_ctl_t *c, ipmpi_req_t *r, const int *ids, int n)
{
    uint64_t now = ipmpi_now_ns();
    r->tree = malloc(((size_t)n + 1) * sizeof *r->tree);
    if (r->tree && group_by_node(c, ids, n, r->tree + 1) != 0) {
        free(r->tree);
        r->tree = NULL;
    }
    if (r->tree) {
        r->ntree = (uint32_t)n + 1;
        r->tree[0] = 0;
    }
    ipmpi_sched_start_reqs(&c->sched, ids, n, r, now);
    for (int i = 0; i < n; i++) {
        ipmpi_ctl_busy(c, &c->eng[ids[i]], 1);
        /* Engines below the roots are rung by their parents, and again
         * by them while they wait for their replies (engine/tree.c); the
         * loop rings again (dispatch.c) only the roots it sends to (their
         * post arms them: ipmpi_ctl_wake), and those it sends a retry. */
        c->eng[ids[i]].wake_due = UINT64_MAX;
    }
    uint32_t *start = c->tree_slices;
    if (!r->tree) {
        /* No memory for the tree (r->ntree stays 0): each engine gets its
         * own send. */
        for (int i = 0; i < n; i++) {
            ipmpi_engine_slot_t *e = &c->eng[ids[i]];
            ipmpi_hdr_t h = {.kind = r->kind, .flags = r->eng_flags, .req_id = r->id, .target = e->id};
            if (ipmpi_mpilink_send(&c->link, e->rank, &h, r->payload) != 0)
                ipmpi_ctl_engine_died(c, e, "controller could not send to it");
        }
        return;
    }
    uint32_t *len = start + r->ntree;
    uint32_t k = top_slices(c, r->tree, r->ntree, start, len);
    int32_t *t = r->tree;
    r->tree_open = k;
    ipmpi_log(IPMPI_LOG_DEBUG, "request %llu sent as a tree of %d engines in %u sends", (unsigned long long)r->id, n,
              k);
    for (uint32_t i = 0; i < k; i++) {
        ipmpi_parts_t *sub = subtree_msg(t, start[i], len[i]);
        send_root(c, r, &c->eng[t[start[i]] - 1], sub);
        ipmpi_parts_unref(sub);
    }
}

/* ---- the tree of every live engine: a request to all of them as a gang ---- */

/*
 * Built once per set of live engines (ctl.h: engines_gen), so that a
 * request to all of them touches no engine's slot: the tree's ranks, the
 * top's slices with each subtree's message ready to send, and which
 * engines are on other nodes (the busy counts of a gathered run). Shared
 * by the requests sent with it (ipmpi_req_t.tree_back).
 */
typedef struct ipmpi_ctl_alltree {
    ipmpi_backing_t back; /* the controller's reference, and one per request */
    uint32_t n;           /* engines */
    uint32_t nfar;        /* of them on other nodes */
    uint32_t nslices;
    uint32_t *start, *len;  /* the top's slices of tree */
    ipmpi_parts_t **sub;    /* each slice's subtree message */
    uint64_t *far;          /* engines on other nodes, as bits by id */
    int32_t *tree;          /* n + 1: the controller (0), then the engines' ranks */
} ipmpi_ctl_alltree_t;

static void alltree_release(ipmpi_backing_t *b)
{
    ipmpi_ctl_alltree_t *a = IPMPI_CONTAINER_OF(b, ipmpi_ctl_alltree_t, back);
    for (uint32_t i = 0; a->sub && i < a->nslices; i++)
        ipmpi_parts_unref(a->sub[i]);
    free(a->sub);
    free(a->start);
    free(a->far);
    free(a->tree);
    free(a);
}

/* The tree of every live engine, or NULL: one cannot take part in a tree
 * (joined, unwatched, not wakeable), none is live, or no memory. */
static ipmpi_ctl_alltree_t *alltree_build(ipmpi_ctl_t *c)
{
    int n = 0, ok = c->watch.enabled;
    for (int i = 0; i < c->nengines; i++) {
        ipmpi_engine_slot_t *e = &c->eng[i];
        e->tree_root = 0;
        if (e->dead || !e->ready)
            continue;
        if (e->join_first != 0 || e->rank >= c->job->world_size || !(e->near || e->wake_fd >= 0))
            ok = 0;
        c->tree_ids[n++] = i;
    }
    if (!ok || n == 0)
        return NULL;
    ipmpi_ctl_alltree_t *a = calloc(1, sizeof *a);
    if (!a)
        return NULL;
    a->back.refs = 1;
    a->back.release = alltree_release;
    a->n = (uint32_t)n;
    a->tree = malloc(((size_t)n + 1) * sizeof *a->tree);
    a->start = malloc(2 * ((size_t)n + 1) * sizeof *a->start);
    a->far = calloc(ipmpi_bits_words((uint32_t)c->nengines), sizeof *a->far);
    if (!a->tree || !a->start || !a->far || group_by_node(c, c->tree_ids, n, a->tree + 1) != 0)
        goto fail;
    a->tree[0] = 0;
    a->len = a->start + n + 1;
    a->nslices = top_slices(c, a->tree, a->n + 1, a->start, a->len);
    a->sub = calloc(a->nslices ? a->nslices : 1, sizeof *a->sub);
    if (!a->sub)
        goto fail;
    for (uint32_t i = 0; i < a->nslices; i++) {
        if (!(a->sub[i] = subtree_msg(a->tree, a->start[i], a->len[i])))
            goto fail;
        c->eng[a->tree[a->start[i]] - 1].tree_root = 1;
    }
    for (int i = 0; i < n; i++)
        if (!c->eng[c->tree_ids[i]].near) {
            ipmpi_bit_set(a->far, (uint32_t)c->tree_ids[i]);
            a->nfar++;
        }
    ipmpi_log(IPMPI_LOG_DEBUG, "tree of all %d engines: %u sends from the controller", n, a->nslices);
    return a;
fail:
    for (int i = 0; i < c->nengines; i++)
        c->eng[i].tree_root = 0;
    alltree_release(&a->back);
    return NULL;
}

void ipmpi_ctl_tree_all_free(ipmpi_ctl_t *c)
{
    if (c->all)
        ipmpi_backing_unref(&c->all->back);
    c->all = NULL;
}

int ipmpi_ctl_tree_all_ready(ipmpi_ctl_t *c, const ipmpi_session_t *s, const ipmpi_hdr_t *h)
{
    /* What ipmpi_sched_start_gang needs (nothing else runs: every live
     * engine is idle), and what submit's tree asks of a request, first:
     * the tree is built again only then. */
    if (!ipmpi_ctl_tree_may(c, s, h->kind, c->sched.nlive) || !ipmpi_sched_quiet(&c->sched) ||
        ipmpi_sched_has_tasks(&c->sched) || c->sched.gang.left > 0 || c->nheld)
        return 0;
    if (c->all_gen != c->engines_gen) {
        ipmpi_ctl_tree_all_free(c);
        c->all = alltree_build(c);
        c->all_gen = c->engines_gen;
    }
    return c->all && c->all->n == (uint32_t)c->sched.nlive;
}

void ipmpi_ctl_tree_send_all(ipmpi_ctl_t *c, ipmpi_req_t *r)
{
    ipmpi_ctl_alltree_t *a = c->all;
    r->tree = a->tree;
    r->ntree = a->n + 1;
    r->tree_back = ipmpi_backing_ref(&a->back);
    r->tree_open = a->nslices;
    /* Every engine's busy count at once (ipmpi_ctl_busy of each). Below
     * the roots, engines are rung by their parents: the ring-again pass
     * skips them while the gang waits for its subtrees (dispatch.c). */
    uint32_t n = ipmpi_sched_start_gang(&c->sched, r, ipmpi_now_ns());
    c->nbusy += (int)n;
    c->nbusy_far += (int)a->nfar;
    c->gangs++;
    ipmpi_log(IPMPI_LOG_DEBUG, "request %llu sent as a tree of %u engines in %u sends: all, as a gang",
              (unsigned long long)r->id, n, a->nslices);
    for (uint32_t i = 0; i < a->nslices; i++)
        send_root(c, r, &c->eng[a->tree[a->start[i]] - 1], a->sub[i]);
}

int ipmpi_ctl_tree_gang_root(const ipmpi_req_t *r, uint32_t k)
{
    const ipmpi_ctl_alltree_t *a = IPMPI_CONTAINER_OF(r->tree_back, ipmpi_ctl_alltree_t, back);
    return k < a->nslices ? a->tree[a->start[k]] - 1 : -1;
}

void ipmpi_ctl_tree_orphans(ipmpi_ctl_t *c, const ipmpi_engine_slot_t *e)
{
    const ipmpi_sitem_t *run = ipmpi_sched_inflight(&c->sched, e->id);
    if (!run || run->type != IPMPI_SITEM_REQ || !run->u.req->tree)
        return;
    ipmpi_req_t *r = run->u.req;
    /* Its replies come as retries now, not one frame per subtree. */
    r->tree_open = 0;
    uint32_t lo = 0, n = 0, *start = malloc(2 * (size_t)r->ntree * sizeof *start);
    if (!start) {
        ipmpi_log(IPMPI_LOG_ERROR, "no memory to find the engines below engine %d in its tree: they may wait for "
                  "their request until the client gives up", e->id);
        return;
    }
    uint32_t *len = start + r->ntree, k = top_slices(c, r->tree, r->ntree, start, len), found = 0;
    for (uint32_t i = 0; i < k && !found; i++)
        if ((found = ipmpi_tree_find(r->tree + start[i], len[i], e->rank, &lo, &n)))
            lo += start[i];
    free(start);
    if (!found || n < 2)
        return;
    int sent = 0;
    for (uint32_t j = lo + 1; j < lo + n; j++) {
        ipmpi_engine_slot_t *d = &c->eng[r->tree[j] - 1];
        const ipmpi_sitem_t *dr = ipmpi_sched_inflight(&c->sched, d->id);
        if (d->dead || !dr || dr->type != IPMPI_SITEM_REQ || dr->u.req != r)
            continue; /* answered already, or dead */
        ipmpi_hdr_t h = {.kind = r->kind, .flags = (uint16_t)(r->eng_flags | IPMPI_F_RETRY), .req_id = r->id,
                         .target = d->id};
        if (ipmpi_mpilink_send(&c->link, d->rank, &h, r->payload) == 0)
            sent++;
    }
    if (sent)
        ipmpi_log(IPMPI_LOG_WARN, "engine %d relayed request %llu: sent it again to %d engines below it", e->id,
                  (unsigned long long)r->id, sent);
}

/* A copy of the parts of inner frame f (header h) of a gathered part. */
static ipmpi_parts_t *inner_parts(const uint8_t *f, const ipmpi_hdr_t *h)
{
    uint64_t few[8], *lens = h->nparts <= 8 ? few : malloc((size_t)h->nparts * sizeof *lens);
    if (!lens)
        return NULL;
    for (uint32_t i = 0; i < h->nparts; i++)
        lens[i] = ipmpi_get_u64(f + IPMPI_HDR_SIZE + 8u * i);
    ipmpi_parts_t *p = ipmpi_parts_new(h->nparts, lens);
    if (p) {
        size_t at = ipmpi_hdr_wire_size(h->nparts);
        for (uint32_t i = 0; i < h->nparts; i++) {
            memcpy(p->bufs[i], f + at, (size_t)lens[i]);
            at += (size_t)lens[i];
        }
    }
    if (lens != few)
        free(lens);
    return p;
}

int ipmpi_ctl_gathered_each(const ipmpi_parts_t *g, int (*fn)(void *arg, const ipmpi_hdr_t *h, ipmpi_parts_t *p),
                            void *arg)
{
    /* Checked against the link's limits when it arrived. */
    const ipmpi_limits_t any = {.max_parts = IPMPI_MAX_PARTS, .max_part = UINT64_MAX, .max_frame = UINT64_MAX};
    ipmpi_gather_each_t it;
    ipmpi_gather_each_init(&it, g->n ? g->bufs[0] : NULL, g->n ? (size_t)g->lens[0] : 0, &any);
    ipmpi_hdr_t h;
    const uint8_t *f;
    ipmpi_parts_t *p = NULL;
    const uint8_t *pf = NULL; /* the frame p was copied from: a run's engines share it */
    int n, rc = 0;
    while (rc == 0 && (n = ipmpi_gather_each_next(&it, &h, &f)) > 0) {
        if (f != pf) {
            ipmpi_parts_unref(p);
            p = inner_parts(f, &h);
            pf = p ? f : NULL;
        }
        rc = p ? fn(arg, &h, p) : IPMPI_ENOMEM;
    }
    ipmpi_parts_unref(p);
    if (rc != 0)
        return rc;
    return n < 0 ? n : 0;
}

/* An inner frame as the frame its engine would have sent alone. */
static int as_engine_frame(void *arg, const ipmpi_hdr_t *h, ipmpi_parts_t *p)
{
    ipmpi_ctl_engine_frame(arg, h->target + 1, h, ipmpi_parts_ref(p));
    return 0;
}

/*
 * The request the inner frames of gathered part f (left bytes) answer (the
 * first one's; NULL: none in flight), and in *whole whether they all are
 * the final replies of distinct engines that run it and its client takes
 * them whole; *count gets their number. While whole, c->gather_ids gets
 * their engine ids, so that settling them needs no second pass over the
 * frames, and *props says whether one carries IPMPI_F_PROPS. Malformed:
 * NULL and *count = UINT32_MAX.
 */
static ipmpi_req_t *answered(ipmpi_ctl_t *c, const uint8_t *f, size_t left, uint32_t *count, int *whole, int *props)
{
    ipmpi_req_t *r = NULL;
    uint64_t mark = c->gathered;
    ipmpi_gather_each_t it;
    ipmpi_gather_each_init(&it, f, left, &c->link.lim);
    ipmpi_hdr_t h;
    const uint8_t *fr;
    int n;
    *count = 0;
    *whole = 1;
    *props = 0;
    while ((n = ipmpi_gather_each_next(&it, &h, &fr)) > 0) {
        if (h.target < 0 || h.target >= c->nengines)
            break;
        ipmpi_engine_slot_t *e = &c->eng[h.target];
        const ipmpi_sitem_t *it = ipmpi_sched_inflight(&c->sched, e->id);
        ipmpi_req_t *hr = it && it->type == IPMPI_SITEM_REQ && it->u.req->id == h.req_id ? it->u.req : NULL;
        if (!hr || (*count && hr != r) || e->dead || e->gather_mark == mark)
            *whole = 0;
        else if (*whole) /* all distinct so far: fewer than c->nengines */
            c->gather_ids[*count] = (uint32_t)h.target;
        *props |= (h.flags & IPMPI_F_PROPS) != 0;
        e->gather_mark = mark;
        if (!*count)
            r = hr;
        (*count)++;
    }
    if (n != 0) {
        *count = UINT32_MAX;
        return NULL;
    }
    if (!r || !(r->reply_flags & IPMPI_F_GATHER_OK) || r->quiet || r->out_dropped || *count > r->pending)
        *whole = 0;
    return r;
}

/* The engines of gathered part f (left bytes) whose replies changed their
 * properties (IPMPI_F_PROPS, rare: a second walk of the part) get a new
 * generation in the scheduler. */
static void props_changed(ipmpi_ctl_t *c, const uint8_t *f, size_t left)
{
    ipmpi_gather_each_t each;
    ipmpi_gather_each_init(&each, f, left, &c->link.lim);
    ipmpi_hdr_t h;
    const uint8_t *fr;
    while (ipmpi_gather_each_next(&each, &h, &fr) > 0)
        if (h.flags & IPMPI_F_PROPS)
            ipmpi_sched_props_changed(&c->sched, h.target);
}

/*
 * A gathered frame for the gang (sched.h), settled a run at a time: each
 * run of engines that answered alike (IPMPI_F_SAME) is one check of the
 * gang's pending bits and one update of every count, not one per engine.
 * Returns 1 when it did all of ipmpi_ctl_tree_gathered's work, 0 when the
 * frame is not the gang's whole answer for engines still pending, or its
 * client cannot take it whole (nothing changed: the general path takes
 * it, engine by engine).
 */
static int gang_gathered(ipmpi_ctl_t *c, ipmpi_parts_t *parts, const uint8_t *f, size_t left)
{
    ipmpi_req_t *r = c->sched.gang.item.u.req;
    ipmpi_session_t *s = ipmpi_ctl_session(c, r->session);
    if (!s || !(r->reply_flags & IPMPI_F_GATHER_OK) || r->quiet || r->out_dropped || !r->tree_back)
        return 0;
    ipmpi_gather_each_t it;
    ipmpi_gather_each_init(&it, f, left, &c->link.lim);
    ipmpi_hdr_t h;
    const uint8_t *fr;
    uint32_t k, nruns = 0, count = 0, *runs = c->gang_runs;
    int rc, props = 0;
    /* Each run is taken out of the pending set as it is read, so that an
     * engine named twice is refused; all are put back if one is. */
    while ((rc = ipmpi_gather_each_run(&it, &h, &fr, &k)) > 0) {
        if (h.req_id != r->id || h.target < 0 || !ipmpi_sched_gang_take(&c->sched, (uint32_t)h.target, k)) {
            rc = -1;
            break;
        }
        runs[2 * nruns] = (uint32_t)h.target;
        runs[2 * nruns + 1] = k;
        nruns++;
        count += k;
        props |= (h.flags & IPMPI_F_PROPS) != 0;
    }
    ipmpi_hdr_t out = {.kind = r->kind, .flags = IPMPI_F_REPLY | IPMPI_F_GATHER, .req_id = r->client_req,
                       .target = IPMPI_TARGET_ALL, .total = r->total};
    if (rc != 0 || count == 0 || count > r->pending || ipmpi_session_send(s, &out, parts) != 0) {
        for (uint32_t i = 0; i < nruns; i++)
            ipmpi_sched_gang_untake(&c->sched, runs[2 * i], runs[2 * i + 1]);
        return 0;
    }
    /* Delivered whole: what each engine's final reply settles. */
    c->gathered_whole++;
    c->gang_frames++;
    if (r->tree_open)
        r->tree_open--;
    ipmpi_ctl_result_gathered(c, r, parts, count);
    const ipmpi_ctl_alltree_t *a = IPMPI_CONTAINER_OF(r->tree_back, ipmpi_ctl_alltree_t, back);
    uint64_t now = ipmpi_now_ns();
    uint32_t far = 0;
    for (uint32_t i = 0; i < nruns; i++) {
        ipmpi_sched_gang_settle(&c->sched, runs[2 * i], runs[2 * i + 1], now);
        if (a->nfar)
            far += ipmpi_bits_count(a->far, runs[2 * i], runs[2 * i + 1]);
    }
    c->nbusy -= (int)count;
    c->nbusy_far -= (int)far;
    if (props)
        props_changed(c, f, left);
    r->pending -= count;
    if (r->pending == 0)
        ipmpi_ctl_req_release(c, r);
    /* Engines that answered take what waits for them, if anything does. */
    if (c->sched.nreq_queued > 0 || ipmpi_sched_has_tasks(&c->sched) || c->nheld)
        for (uint32_t i = 0; i < nruns; i++)
            for (uint32_t e = runs[2 * i]; e < runs[2 * i] + runs[2 * i + 1]; e++)
                ipmpi_ctl_dispatch(c, &c->eng[e]);
    if (props)
        ipmpi_ctl_kick(c);
    return 1;
}

void ipmpi_ctl_tree_gathered(ipmpi_ctl_t *c, int rank, ipmpi_parts_t *parts)
{
    const uint8_t *f = parts->n == 1 ? parts->bufs[0] : NULL;
    size_t left = parts->n == 1 ? (size_t)parts->lens[0] : 0;
    uint32_t count = UINT32_MAX;
    int whole = 0, props = 0;
    c->gathered++;
    if (rank >= 1 && rank <= c->nengines) {
        /* How long the subtree of the engine that sent it took (a root's
         * request went out when it was put in flight). */
        const ipmpi_sitem_t *it = ipmpi_sched_inflight(&c->sched, rank - 1);
        if (it && it->type == IPMPI_SITEM_REQ && it->u.req->tree && it->u.req->tree_open) {
            uint64_t took = ipmpi_now_ns() - it->sent_ns;
            c->tree_ns = c->tree_ns ? c->tree_ns - c->tree_ns / 4 + took / 4 : took;
        }
    }
    if (f && c->sched.gang.left > 0 && gang_gathered(c, parts, f, left))
        goto done;
    ipmpi_req_t *r = f ? answered(c, f, left, &count, &whole, &props) : NULL;
    if (count == UINT32_MAX) {
        ipmpi_log(IPMPI_LOG_ERROR, "malformed gathered replies from rank %d; dropped", rank);
        goto done;
    }
    if (r && r->tree_open)
        r->tree_open--;
    if (!whole)
        r = NULL;
    ipmpi_session_t *s = r ? ipmpi_ctl_session(c, r->session) : NULL;
    ipmpi_hdr_t out = {.kind = r ? r->kind : 0, .flags = IPMPI_F_REPLY | IPMPI_F_GATHER,
                       .req_id = r ? r->client_req : 0, .target = IPMPI_TARGET_ALL, .total = r ? r->total : 0};
    if (!s || ipmpi_session_send(s, &out, parts) != 0) {
        /* One frame per engine, as every other path delivers them. */
        if (ipmpi_ctl_gathered_each(parts, as_engine_frame, c) != 0)
            ipmpi_log(IPMPI_LOG_ERROR, "no memory for the gathered replies from rank %d: their engines' "
                      "requests stay in flight, as if lost", rank);
        goto done;
    }
    /* Forwarded whole: the client takes it apart. Here only what each
     * engine's final reply settles (ipmpi_ctl_engine_frame's work). */
    c->gathered_whole++;
    ipmpi_ctl_result_gathered(c, r, parts, count);
    /* Every engine at once (ipmpi_ctl_reply_in's work); answered: each
     * one's oldest item is r. */
    ipmpi_sched_done_reqs(&c->sched, c->gather_ids, count, r, ipmpi_now_ns());
    if (props)
        props_changed(c, f, left);
    /* answered: r has at least count replies pending. */
    r->pending -= count;
    if (r->pending == 0)
        ipmpi_ctl_req_release(c, r);
    for (uint32_t i = 0; i < count; i++) {
        ipmpi_engine_slot_t *e = &c->eng[c->gather_ids[i]];
        ipmpi_ctl_busy(c, e, -1);
        ipmpi_ctl_dispatch(c, e);
    }
    if (props)
        ipmpi_ctl_kick(c);
done:
    ipmpi_parts_unref(parts);
}
