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

int ipmpi_ctl_tree_engine(const ipmpi_ctl_t *c, const ipmpi_engine_slot_t *e)
{
    /* Idle, of this job (joined jobs have their own communicators),
     * watched (a relay's death must be seen), and wakeable: on the
     * controller's node (its doorbell) or by datagram (a root elsewhere;
     * below it, engines of its node ring each other's doorbells). */
    return c->watch.enabled && !e->dead && e->ready && !e->held && e->join_first == 0 &&
           e->rank < c->job->world_size && (ipmpi_doorbell_reaches(c->link.bell, e->rank) || e->wake_fd >= 0) &&
           ipmpi_sched_idle(&c->sched, e->id);
}

/* Which node engine e is on, as far as trees go: 0 for the controller's,
 * else the key of the host its wake-ups go to (wake.c). */
static uint64_t node_key(const ipmpi_ctl_t *c, const ipmpi_engine_slot_t *e)
{
    return ipmpi_doorbell_reaches(c->link.bell, e->rank) ? 0 : e->host_key;
}

/*
 * The top of a request's tree (r->tree[0] is the controller): the
 * controller's children, as slices [start, start + len) of r->tree. The
 * engines of its own node come first, in up to IPMPI_TREE_FANOUT slices
 * (tree.h); then each other node's engines, one slice each. A pure
 * function of r->tree and where its engines are, so the slices are found
 * again when a relay dies. Returns how many (at most n - 1).
 */
static uint32_t top_slices(const ipmpi_ctl_t *c, const ipmpi_req_t *r, uint32_t *start, uint32_t *len)
{
    uint32_t at = 1, k = 0;
    while (at < r->ntree && node_key(c, &c->eng[r->tree[at] - 1]) == 0)
        at++;
    if (at > 1) {
        uint32_t ns[IPMPI_TREE_FANOUT], nl[IPMPI_TREE_FANOUT];
        uint32_t m = ipmpi_tree_children(at, ns, nl);
        for (uint32_t i = 0; i < m; i++, k++) {
            start[k] = ns[i];
            len[k] = nl[i];
        }
    }
    while (at < r->ntree) {
        uint64_t key = node_key(c, &c->eng[r->tree[at] - 1]);
        start[k] = at;
        while (at < r->ntree && node_key(c, &c->eng[r->tree[at] - 1]) == key)
            at++;
        len[k] = at - start[k];
        k++;
    }
    return k;
}

typedef struct {
    uint64_t key;
    int pos;
} keyed_t;

static int by_key(const void *x, const void *y)
{
    const keyed_t *a = x, *b = y;
    if (a->key != b->key)
        return a->key < b->key ? -1 : 1;
    return a->pos - b->pos;
}

/* The ranks of ids[0..n) into out, grouped by node: the controller's
 * first (key 0), each group in the order given. 0 or IPMPI_ENOMEM. */
static int group_by_node(const ipmpi_ctl_t *c, const int *ids, int n, int32_t *out)
{
    keyed_t *k = malloc((size_t)(n > 0 ? n : 1) * sizeof *k);
    if (!k)
        return IPMPI_ENOMEM;
    for (int i = 0; i < n; i++) {
        k[i].key = node_key(c, &c->eng[ids[i]]);
        k[i].pos = i;
    }
    qsort(k, (size_t)n, sizeof *k, by_key);
    for (int i = 0; i < n; i++)
        out[i] = c->eng[ids[k[i].pos]].rank;
    free(k);
    return 0;
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
    for (int i = 0; i < n; i++) {
        ipmpi_sched_start_req(&c->sched, ids[i], r, now);
        ipmpi_ctl_busy(c, &c->eng[ids[i]], 1);
    }
    uint32_t *start = r->tree ? malloc(2 * (size_t)r->ntree * sizeof *start) : NULL;
    if (!start) {
        /* No memory for the tree: each engine gets its own send. */
        free(r->tree);
        r->tree = NULL;
        r->ntree = 0;
        for (int i = 0; i < n; i++) {
            ipmpi_engine_slot_t *e = &c->eng[ids[i]];
            ipmpi_hdr_t h = {.kind = r->kind, .flags = r->eng_flags, .req_id = r->id, .target = e->id};
            if (ipmpi_mpilink_send(&c->link, e->rank, &h, r->payload) != 0)
                ipmpi_ctl_engine_died(c, e, "controller could not send to it");
        }
        return;
    }
    uint32_t *len = start + r->ntree;
    uint32_t k = top_slices(c, r, start, len);
    int32_t *t = r->tree;
    ipmpi_log(IPMPI_LOG_DEBUG, "request %llu sent as a tree of %d engines in %u sends", (unsigned long long)r->id, n,
              k);
    for (uint32_t i = 0; i < k; i++) {
        ipmpi_engine_slot_t *e = &c->eng[t[start[i]] - 1];
        uint64_t bytes = (uint64_t)len[i] * sizeof *t;
        ipmpi_parts_t *sub = ipmpi_parts_new(1, &bytes);
        int rc = IPMPI_ENOMEM;
        if (sub) {
            memcpy(sub->bufs[0], t + start[i], (size_t)bytes);
            /* The subtree first (its own tag): the root reads it right
             * after the header. */
            rc = ipmpi_mpilink_send_msg(&c->link, e->rank, IPMPI_TAG_TREE, sub);
            ipmpi_parts_unref(sub);
        }
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
        }
    }
    free(start);
}

void ipmpi_ctl_tree_orphans(ipmpi_ctl_t *c, const ipmpi_engine_slot_t *e)
{
    const ipmpi_sitem_t *run = ipmpi_sched_inflight(&c->sched, e->id);
    if (!run || run->type != IPMPI_SITEM_REQ || !run->u.req->tree)
        return;
    ipmpi_req_t *r = run->u.req;
    uint32_t lo = 0, n = 0, *start = malloc(2 * (size_t)r->ntree * sizeof *start);
    if (!start) {
        ipmpi_log(IPMPI_LOG_ERROR, "no memory to find the engines below engine %d in its tree: they may wait for "
                  "their request until the client gives up", e->id);
        return;
    }
    uint32_t *len = start + r->ntree, k = top_slices(c, r, start, len), found = 0;
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

void ipmpi_ctl_tree_gathered(ipmpi_ctl_t *c, int rank, ipmpi_parts_t *parts)
{
    const uint8_t *p = parts->n ? parts->bufs[0] : NULL;
    size_t left = parts->n ? (size_t)parts->lens[0] : 0;
    uint64_t *lens = NULL;
    while (left > 0) {
        ipmpi_hdr_t h;
        long hn = ipmpi_hdr_decode(p, left, &c->link.lim, &h);
        if (hn <= 0 || h.nparts > IPMPI_MAX_PARTS)
            goto bad;
        free(lens);
        lens = malloc(((size_t)h.nparts + 1) * sizeof *lens);
        uint64_t total = 0;
        if (!lens || (h.nparts && ipmpi_lens_decode(p + hn, left - (size_t)hn, h.nparts, &c->link.lim, lens,
                                                      &total) <= 0))
            goto bad;
        size_t wire = ipmpi_hdr_wire_size(h.nparts);
        if (wire > left || total > left - wire || !(h.flags & IPMPI_F_REPLY) ||
            (h.flags & (IPMPI_F_GATHER | IPMPI_F_PACKED)) || h.target < 0 || h.target >= c->nengines)
            goto bad;
        ipmpi_parts_t *sub = ipmpi_parts_new(h.nparts, lens);
        if (!sub) {
            ipmpi_log(IPMPI_LOG_ERROR, "no memory for a gathered reply of engine %d", h.target);
            goto done; /* that engine's request stays in flight: as if lost */
        }
        size_t at = wire;
        for (uint32_t i = 0; i < h.nparts; i++) {
            memcpy(sub->bufs[i], p + at, (size_t)lens[i]);
            at += (size_t)lens[i];
        }
        ipmpi_ctl_engine_frame(c, h.target + 1, &h, sub);
        p += at;
        left -= at;
    }
    goto done;
bad:
    ipmpi_log(IPMPI_LOG_ERROR, "malformed gathered replies from rank %d (%zu bytes left); dropped", rank, left);
done:
    free(lens);
    ipmpi_parts_unref(parts);
}
