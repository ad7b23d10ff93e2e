/*
 * Requests the controller answers itself: HELLO, GET_IDS, QUEUE_STATUS,
 * CLEAR_QUEUE, PROPERTIES, SHM_PROBE and RELEASE. Loop thread only.
 */
#include <ctype.h>
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "backoff.h"
#include "ctl.h"
#include "doorbell.h"
#include "ipmpi/errors.h"
#include "json.h"
#include "log.h"
#include "shm.h"
#include "shmbuf.h"
#include "tls.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

void ipmpi_ctl_do_hello(ipmpi_ctl_t *c, ipmpi_session_t *s, const ipmpi_hdr_t *h, const ipmpi_parts_t *p)
{
    int cap = IPMPI_CAP_NONE;
    if (p->n >= 1 && p->lens[0] == IPMPI_KEY_HEX_LEN) {
        /* Both comparisons always run: the time taken says nothing about the key. */
        int mec = ipmpi_consttime_eq(p->bufs[0], c->sec.mec_key, IPMPI_KEY_HEX_LEN);
        int tc = ipmpi_consttime_eq(p->bufs[0], c->sec.tc_key, IPMPI_KEY_HEX_LEN);
        cap = mec ? IPMPI_CAP_MEC : tc ? IPMPI_CAP_TC : IPMPI_CAP_NONE;
    }
    if (cap == IPMPI_CAP_NONE) {
        ipmpi_gate_refused(c->gate, ipmpi_now_ns(), s->peer, "wrong key", "client %s refused: wrong key", s->peer);
        ipmpi_ctl_reply_err(s, h, IPMPI_EACCES, "access denied: wrong key");
        ipmpi_session_close_after_flush(s, ipmpi_now_ns());
        return;
    }
    ipmpi_log(IPMPI_LOG_INFO, "client %s connected with capability %s", s->peer,
              cap == IPMPI_CAP_MEC ? "mec" : "tc");
    s->cap = cap;
    s->sno = ++c->next_sno; /* 0 after 2^32 sessions: no request ids any more */
    s->stream_begin = cap == IPMPI_CAP_MEC ? ipmpi_ctl_stream_begin : NULL;
    if (RAND_bytes(s->shm_nonce, sizeof s->shm_nonce) != 1)
        c->host_id[0] = '\0'; /* no randomness, no shared memory: never offered again */
    jbuf_t b = {0};
    jb_printf(&b, "{\"capability\": \"%s\", \"engines\": %d, \"ids\": [", cap == IPMPI_CAP_MEC ? "mec" : "tc",
              c->nlive);
    int first = 1;
    for (int i = 0; i < c->nengines; i++)
        if (!c->eng[i].dead && c->eng[i].ready) {
            jb_printf(&b, first ? "%d" : ", %d", i);
            first = 0;
        }
    jb_printf(&b, "], \"version\": %d, \"session\": %u, \"instance\": \"%016llx\"", IPMPI_PROTO_VERSION, s->sno,
              (unsigned long long)c->instance);
    if (c->host_id[0]) {
        jb_printf(&b, ", \"host\": ");
        jb_str(&b, c->host_id);
        jb_printf(&b, ", \"pid\": %ld, \"uid\": %lu, \"shm_nonce\": \"", (long)getpid(),
                  (unsigned long)geteuid());
        for (size_t i = 0; i < sizeof s->shm_nonce; i++)
            jb_printf(&b, "%02x", s->shm_nonce[i]);
        jb_printf(&b, "\"");
    }
    jb_printf(&b, "}");
    ipmpi_ctl_send_json(s, h, &b);
}

void ipmpi_ctl_do_get_ids(ipmpi_ctl_t *c, ipmpi_session_t *s, const ipmpi_hdr_t *h)
{
    jbuf_t b = {0};
    jb_printf(&b, "[");
    int first = 1;
    for (int i = 0; i < c->nengines; i++)
        if (!c->eng[i].dead && c->eng[i].ready) {
            jb_printf(&b, first ? "%d" : ", %d", i);
            first = 0;
        }
    jb_printf(&b, "]");
    ipmpi_ctl_send_json(s, h, &b);
}

void ipmpi_ctl_do_queue_status(ipmpi_ctl_t *c, ipmpi_session_t *s, const ipmpi_hdr_t *h, int n)
{
    jbuf_t b = {0};
    jb_printf(&b, "[");
    for (int i = 0; i < n; i++) {
        ipmpi_engine_slot_t *e = &c->eng[c->targets[i]];
        const ipmpi_sengine_t *se = &c->sched.eng[e->id];
        const ipmpi_sitem_t *run = ipmpi_sched_inflight(&c->sched, e->id);
        jb_printf(&b, "%s{\"id\": %d, \"running\": ", i ? ", " : "", e->id);
        if (run)
            jb_printf(&b, "\"%s\"", run->type == IPMPI_SITEM_REQ ? ipmpi_kind_name(run->u.req->kind) : "task");
        else
            jb_printf(&b, "null");
        jb_printf(&b, ", \"tasks\": %u, \"queue\": [", se->fly_tasks);
        for (uint32_t k = 0; k < ipmpi_equeue_len(&se->q); k++)
            jb_printf(&b, "%s\"%s\"", k ? ", " : "", ipmpi_kind_name(ipmpi_equeue_at(&se->q, k)->kind));
        jb_printf(&b, "]}");
    }
    jb_printf(&b, "]");
    ipmpi_ctl_send_json(s, h, &b);
}

void ipmpi_ctl_do_clear_queue(ipmpi_ctl_t *c, ipmpi_session_t *s, const ipmpi_hdr_t *h, int n)
{
    unsigned long cleared = 0;
    for (int i = 0; i < n; i++) {
        ipmpi_engine_slot_t *e = &c->eng[c->targets[i]];
        char msg[128];
        snprintf(msg, sizeof msg, "removed from the queue of engine %d by CLEAR_QUEUE before it ran", e->id);
        ipmpi_req_t *r;
        while ((r = ipmpi_equeue_pop(&c->sched.eng[e->id].q))) {
            ipmpi_ctl_req_fail_one(c, r, e->id, IPMPI_EABORTED, msg);
            cleared++;
        }
    }
    jbuf_t b = {0};
    jb_printf(&b, "{\"cleared\": %lu}", cleared);
    ipmpi_ctl_send_json(s, h, &b);
}

void ipmpi_ctl_do_properties(ipmpi_ctl_t *c, ipmpi_session_t *s, const ipmpi_hdr_t *h, int n)
{
    jbuf_t b = {0};
    jb_printf(&b, "[");
    for (int i = 0; i < n; i++) {
        ipmpi_engine_slot_t *e = &c->eng[c->targets[i]];
        jb_printf(&b, "%s{\"id\": %d", i ? ", " : "", e->id);
        /* The READY JSON is an object built by our engine: splice its
         * members in after our "id"; anything else goes in as a string. */
        const char *p = e->props;
        if (p) {
            size_t len = strlen(p);
            while (len && (p[len - 1] == ' ' || p[len - 1] == '\n' || p[len - 1] == '\r' || p[len - 1] == '\t'))
                len--;
            while (len && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t'))
                p++, len--;
            if (len >= 2 && p[0] == '{' && p[len - 1] == '}') {
                const char *in = p + 1;
                size_t il = len - 2;
                while (il && (*in == ' ' || *in == '\n' || *in == '\t' || *in == '\r'))
                    in++, il--;
                if (il)
                    jb_printf(&b, ", %.*s", (int)il, in);
            } else {
                jb_printf(&b, ", \"ready\": ");
                jb_str(&b, e->props);
            }
        }
        if (e->dead) {
            jb_printf(&b, ", \"dead\": ");
            jb_str(&b, e->why);
        }
        jb_printf(&b, "}");
    }
    jb_printf(&b, "]");
    ipmpi_ctl_send_json(s, h, &b);
}


/* RELEASE: part 0 lists the u32 handles (memfd fds, or IPMPI_SHM_VM
 * handles) of lent memory the client is done with. */
void ipmpi_ctl_do_release(ipmpi_session_t *s, const ipmpi_parts_t *p)
{
    if (p->n != 1 || p->lens[0] % 4 != 0) {
        ipmpi_log(IPMPI_LOG_WARN, "client %s: malformed RELEASE ignored", s->peer);
        return;
    }
    for (uint64_t i = 0; i < p->lens[0] / 4; i++)
        ipmpi_session_release(s, ipmpi_get_u32(p->bufs[0] + 4 * i));
}

/* SHM_PROBE: the nonce came through the client's memfd; it goes back
 * through one of ours, so the client knows both directions work. */
void ipmpi_ctl_do_shm_probe(ipmpi_session_t *s, const ipmpi_hdr_t *h, const ipmpi_parts_t *p)
{
    /* client_frame checked that part 0 came by shared memory. */
    if (!(h->flags & IPMPI_F_SHM) || p->n != 1 || p->lens[0] != sizeof s->shm_nonce ||
        ipmpi_consttime_eq(p->bufs[0], s->shm_nonce, sizeof s->shm_nonce) != 1) {
        ipmpi_ctl_reply_err(s, h, IPMPI_EACCES, "SHM_PROBE: part 0, in the shared memory of pid %llu, must be the "
                  "32-byte shm_nonce of this session's HELLO", (unsigned long long)h->aux);
        return;
    }
    /* Only the process that holds our random nonce is this client: from
     * now on the session's shared memory must be that pid's. */
    s->shm_pid = (int)h->aux;
    ipmpi_hdr_t rh = {.kind = h->kind, .flags = IPMPI_F_REPLY, .req_id = h->req_id,
                      .target = IPMPI_TARGET_CONTROLLER, .total = 1};
    if (h->flags & IPMPI_F_VM_OK) {
        /* Process memory both ways: the nonce goes back from our memory,
         * as a part large enough to go that way. */
        uint64_t big = IPMPI_SHM_MIN;
        ipmpi_parts_t *out = ipmpi_parts_new(1, &big);
        if (out) {
            memset(out->bufs[0], 0, (size_t)big);
            memcpy(out->bufs[0], p->bufs[0], (size_t)p->lens[0]);
        }
        if (!out || ipmpi_ctl_send_reply(s, &rh, out, 1) != 0)
            ipmpi_ctl_reply_err(s, h, IPMPI_ENOMEM, "controller out of memory for the probe");
        ipmpi_parts_unref(out);
        return;
    }
    uint64_t zero = 0;
    ipmpi_parts_t *out = ipmpi_parts_new(1, &zero);
    ipmpi_shmbuf_t *sb = out ? ipmpi_shmbuf_get(p->lens[0]) : NULL;
    if (sb) {
        memcpy(sb->base, p->bufs[0], (size_t)p->lens[0]);
        if (ipmpi_parts_set_backing(out, 0, &sb->b, sb->base, p->lens[0]) != 0) {
            ipmpi_parts_unref(out);
            out = NULL;
        }
        ipmpi_backing_unref(&sb->b);
    }
    if (!sb || !out || ipmpi_ctl_send_reply(s, &rh, out, 0) != 0)
        ipmpi_ctl_reply_err(s, h, IPMPI_ENOMEM, "controller out of memory for shared memory");
    ipmpi_parts_unref(out);
}

long ipmpi_ctl_engine_pid(const ipmpi_engine_slot_t *e)
{
    const char *p = e->props ? strstr(e->props, "\"pid\":") : NULL;
    return p ? strtol(p + 6, NULL, 10) : 0;
}

int ipmpi_ctl_signal_engine(const ipmpi_engine_slot_t *e, int sig)
{
    long pid = ipmpi_ctl_engine_pid(e);
    if (pid <= 1 || e->dead || !ipmpi_ctl_watch_sibling(pid))
        return IPMPI_ENOENT;
    return kill((pid_t)pid, sig) == 0 ? 0 : IPMPI_ENOENT;
}

void ipmpi_ctl_intr_register(ipmpi_engine_slot_t *e, const char *text, size_t len)
{
    size_t want = 5 + 2 * sizeof e->intr_key;
    e->intr_ok = 0;
    if (len != want || memcmp(text, "intr ", 5) != 0)
        goto bad;
    for (size_t i = 0; i < sizeof e->intr_key; i++) {
        unsigned v;
        char hex[3] = {text[5 + 2 * i], text[6 + 2 * i], '\0'};
        if (!isxdigit((unsigned char)hex[0]) || !isxdigit((unsigned char)hex[1]) || sscanf(hex, "%2x", &v) != 1)
            goto bad;
        e->intr_key[i] = (uint8_t)v;
    }
    e->intr_ok = 1;
    return;
bad:
    ipmpi_log(IPMPI_LOG_WARN, "engine %d: malformed interrupt part in READY; interrupts do not reach it", e->id);
}

int ipmpi_ctl_far_signal(ipmpi_ctl_t *c, const ipmpi_engine_slot_t *e, uint32_t kind, uint64_t req_id)
{
    if (e->dead || e->wake_fd < 0 || !e->intr_ok)
        return IPMPI_ENOENT;
    uint8_t b[IPMPI_WAKE_INTR_LEN] = {0}, mac[EVP_MAX_MD_SIZE];
    unsigned int ml = 0;
    uint64_t seq = ++c->intr_seq;
    /* Native byte order, as the wake key: same architecture assumed. */
    memcpy(b, &e->wake_key, 8);
    memcpy(b + 8, &kind, 4);
    memcpy(b + 16, &req_id, 8);
    memcpy(b + 24, &seq, 8);
    if (!HMAC(EVP_sha256(), e->intr_key, sizeof e->intr_key, b + 8, 24, mac, &ml) || ml < 16)
        return IPMPI_EIO;
    memcpy(b + 32, mac, 16);
    /* Three copies: one lost on the way would leave the code running
     * (the engine takes each count once). */
    int sent = 0;
    for (int k = 0; k < 3; k++)
        sent |= sendto(e->wake_fd, b, sizeof b, MSG_DONTWAIT, (const struct sockaddr *)&e->wake_addr, e->wake_len) ==
                (ssize_t)sizeof b;
    return sent ? 0 : IPMPI_EIO;
}

/*
 * INTERRUPT: for each target engine with a request in flight, the
 * request's id goes into its doorbell slot, then SIGINT: the engine
 * raises KeyboardInterrupt in that request only (engine.c), whether it
 * runs already or is about to. An engine this controller cannot signal
 * (another node, joined) gets the same by an INTERRUPT datagram
 * (ipmpi_ctl_far_signal). Engines that are idle are left alone; engines
 * reached by neither way are reported as unreachable.
 *
 * Without a request list every running request is interrupted, whoever
 * sent it, and queued requests are not touched (clear_queue takes them
 * back). With one (the part after the target list: u64 req_ids of this
 * session, the client's Ctrl-C), only those: an engine is interrupted
 * only when one of them is in flight there ("busy" when it runs another
 * request), and those still queued on the target engines are removed
 * with an EABORTED reply ("aborted": how many).
 */
/* The request ids an INTERRUPT names, sorted: a long list costs the loop
 * a sort and a binary search per request looked at, not a scan. */
typedef struct {
    uint64_t *ids;
    size_t n;
    uint64_t session;
} named_t;

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static int named(const named_t *nm, const ipmpi_req_t *r)
{
    return r->session == nm->session && bsearch(&r->client_req, nm->ids, nm->n, sizeof *nm->ids, cmp_u64) != NULL;
}

/* Removes the named requests from e's queue, each with its EABORTED
 * reply; returns how many. */
static unsigned long abort_named(ipmpi_ctl_t *c, ipmpi_engine_slot_t *e, const named_t *nm)
{
    ipmpi_equeue_t *q = &c->sched.eng[e->id].q;
    unsigned long n = 0;
    char msg[128];
    snprintf(msg, sizeof msg, "removed from the queue of engine %d by the client's interrupt before it ran", e->id);
    /* Once round the ring: the others go back in their order (a push
     * after a pop never grows the ring). */
    for (uint32_t k = ipmpi_equeue_len(q); k > 0; k--) {
        ipmpi_req_t *r = ipmpi_equeue_pop(q);
        if (named(nm, r)) {
            ipmpi_ctl_req_fail_one(c, r, e->id, IPMPI_EABORTED, msg);
            n++;
        } else
            (void)ipmpi_equeue_push(q, r);
    }
    return n;
}

/* The id the engine knows an in-flight item by (its req_id). */
static uint64_t sitem_id(const ipmpi_sitem_t *run)
{
    return run->type == IPMPI_SITEM_REQ ? run->u.req->id : IPMPI_CONTAINER_OF(run->u.task, ipmpi_task_t, s)->disp;
}

void ipmpi_ctl_do_interrupt(ipmpi_ctl_t *c, ipmpi_session_t *s, const ipmpi_hdr_t *h, const ipmpi_parts_t *p, int n)
{
    int part = h->target == IPMPI_TARGET_LIST ? 1 : 0;
    int nparts = p ? (int)p->n : 0;
    if (nparts > part + 1 || (nparts == part + 1 && (p->lens[part] == 0 || p->lens[part] % 8 != 0))) {
        ipmpi_ctl_reply_err(s, h, IPMPI_EPROTO, "INTERRUPT: after the target list, at most one part: a "
                                                "non-empty array of u64 request ids of this session");
        return;
    }
    int only = nparts == part + 1; /* the client names its requests */
    named_t nm = {.session = s->id};
    if (only) {
        nm.n = (size_t)(p->lens[part] / 8);
        nm.ids = malloc(nm.n * sizeof *nm.ids);
        if (!nm.ids) {
            ipmpi_ctl_reply_err(s, h, IPMPI_ENOMEM, "controller out of memory");
            return;
        }
        for (size_t k = 0; k < nm.n; k++)
            nm.ids[k] = ipmpi_get_u64(p->bufs[part] + 8 * k);
        qsort(nm.ids, nm.n, sizeof *nm.ids, cmp_u64);
    }
    jbuf_t lists[5] = {{0}};
    int counts[5] = {0};
    unsigned long aborted = 0;
    enum { DONE, IDLE, FAR, DEAD, BUSY };
    for (int i = 0; i < n; i++) {
        ipmpi_engine_slot_t *e = &c->eng[c->targets[i]];
        if (only && !e->dead)
            aborted += abort_named(c, e, &nm);
        const ipmpi_sitem_t *run = e->dead ? NULL : ipmpi_sched_inflight(&c->sched, e->id);
        if (run && only) {
            /* The first of the named requests sent to e: the running one,
             * or one sent ahead, interrupted when it starts. */
            const ipmpi_sengine_t *se = &c->sched.eng[e->id];
            const ipmpi_sitem_t *hit = run->type == IPMPI_SITEM_REQ && named(&nm, run->u.req) ? run : NULL;
            for (uint32_t k = 0; k < se->fly_len && !hit; k++) {
                const ipmpi_sitem_t *it = &se->fly[(se->fly_head + k) & (se->fly_cap - 1)];
                if (it->type == IPMPI_SITEM_REQ && named(&nm, it->u.req))
                    hit = it;
            }
            if (!hit) {
                jb_printf(&lists[BUSY], counts[BUSY]++ ? ", %d" : "%d", e->id);
                continue;
            }
            run = hit;
        }
        int k = e->dead ? DEAD : !run ? IDLE : FAR;
        if (run && ipmpi_doorbell_reaches(c->job->bell, e->rank)) {
            /* The engine interrupts exactly this request (doorbell.h). */
            ipmpi_doorbell_set_interrupt(c->job->bell, e->rank, sitem_id(run));
            if (ipmpi_ctl_signal_engine(e, SIGINT) == 0)
                k = DONE;
        }
        if (run && k != DONE && ipmpi_ctl_far_signal(c, e, IPMPI_WAKE_INTERRUPT, sitem_id(run)) == 0)
            k = DONE;
        if (k == DONE)
            ipmpi_log(IPMPI_LOG_INFO, "engine %d interrupted by client %s", e->id, s->peer);
        jb_printf(&lists[k], counts[k]++ ? ", %d" : "%d", e->id);
    }
    jbuf_t b = {0};
    jb_printf(&b, "{\"interrupted\": [%s], \"idle\": [%s], \"unreachable\": [%s], \"dead\": [%s]",
              lists[DONE].s ? lists[DONE].s : "", lists[IDLE].s ? lists[IDLE].s : "",
              lists[FAR].s ? lists[FAR].s : "", lists[DEAD].s ? lists[DEAD].s : "");
    if (only)
        jb_printf(&b, ", \"busy\": [%s], \"aborted\": %lu", lists[BUSY].s ? lists[BUSY].s : "", aborted);
    jb_printf(&b, "}");
    for (int k = 0; k < 5; k++) {
        b.oom |= lists[k].oom;
        free(lists[k].s);
    }
    free(nm.ids);
    ipmpi_ctl_send_json(s, h, &b);
}
