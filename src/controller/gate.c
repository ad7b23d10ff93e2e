/* The controller's gate for unauthenticated connections: see gate.h. */
#include "gate.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "ipmpi/errors.h"
#include "log.h"

#define NBUCKETS 1024u /* a power of two */
#define SRC_MAX 64u

/* Connections before HELLO from one address. */
struct pend {
    struct pend *next;
    uint32_t count;
    char src[SRC_MAX];
};

/* Refusals of one address for one reason in the current interval. */
struct rnode {
    struct rnode *next;     /* in its bucket */
    struct rnode *all_next; /* every node, for ipmpi_gate_tick */
    const char *reason;
    uint64_t t_start;       /* start of the interval (ns) */
    uint32_t logged;        /* logged in full this interval */
    uint64_t suppressed;    /* counted for the summary */
    char src[SRC_MAX];
};

struct ipmpi_gate {
    uint64_t seed;
    struct pend *pend[NBUCKETS];
    struct rnode *refs[NBUCKETS];
    struct rnode *all;
    uint32_t nrefs;
    uint64_t next_due; /* earliest end of an interval, UINT64_MAX: none */
};

ipmpi_gate_t *ipmpi_gate_new(void)
{
    ipmpi_gate_t *g = calloc(1, sizeof *g);
    if (!g)
        return NULL;
    if (getrandom(&g->seed, sizeof g->seed, GRND_NONBLOCK) != (ssize_t)sizeof g->seed) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        g->seed = (uint64_t)ts.tv_nsec * 0x9e3779b97f4a7c15ull ^ (uint64_t)ts.tv_sec;
    }
    g->next_due = UINT64_MAX;
    return g;
}

void ipmpi_gate_source(const char *peer, char *src, unsigned cap)
{
    const char *colon = strrchr(peer, ':');
    size_t n = colon ? (size_t)(colon - peer) : strlen(peer);
    if (cap == 0)
        return;
    if (n >= cap)
        n = cap - 1;
    memcpy(src, peer, n);
    src[n] = '\0';
}

/* FNV-1a, seeded: the bucket of src and reason (NULL: none). */
static uint32_t bucket(const ipmpi_gate_t *g, const char *src, const char *reason)
{
    uint64_t h = 0xcbf29ce484222325ull ^ g->seed;
    for (const unsigned char *p = (const unsigned char *)src; *p; p++)
        h = (h ^ *p) * 0x100000001b3ull;
    h = (h ^ 0xff) * 0x100000001b3ull;
    for (const unsigned char *p = (const unsigned char *)(reason ? reason : ""); *p; p++)
        h = (h ^ *p) * 0x100000001b3ull;
    return (uint32_t)(h ^ (h >> 29)) & (NBUCKETS - 1);
}

/* ---- pending counts ---- */

int ipmpi_gate_pending_add(ipmpi_gate_t *g, const char *peer)
{
    char src[SRC_MAX];
    ipmpi_gate_source(peer, src, sizeof src);
    uint32_t b = bucket(g, src, NULL);
    for (struct pend *p = g->pend[b]; p; p = p->next)
        if (strcmp(p->src, src) == 0)
            return (int)++p->count;
    struct pend *p = calloc(1, sizeof *p);
    if (!p)
        return IPMPI_ENOMEM;
    memcpy(p->src, src, sizeof src);
    p->count = 1;
    p->next = g->pend[b];
    g->pend[b] = p;
    return 1;
}

uint32_t ipmpi_gate_pending(const ipmpi_gate_t *g, const char *peer)
{
    char src[SRC_MAX];
    ipmpi_gate_source(peer, src, sizeof src);
    for (const struct pend *p = g->pend[bucket(g, src, NULL)]; p; p = p->next)
        if (strcmp(p->src, src) == 0)
            return p->count;
    return 0;
}

void ipmpi_gate_pending_del(ipmpi_gate_t *g, const char *peer)
{
    char src[SRC_MAX];
    ipmpi_gate_source(peer, src, sizeof src);
    for (struct pend **pp = &g->pend[bucket(g, src, NULL)]; *pp; pp = &(*pp)->next) {
        struct pend *p = *pp;
        if (strcmp(p->src, src) != 0)
            continue;
        if (--p->count == 0) {
            *pp = p->next;
            free(p);
        }
        return;
    }
}

/* ---- refusal logs ---- */

static void summary(const struct rnode *r)
{
    if (r->suppressed)
        ipmpi_log(IPMPI_LOG_WARN, "%llu more connection%s from %s refused in the last %llu s: %s",
                  (unsigned long long)r->suppressed, r->suppressed == 1 ? "" : "s", r->src,
                  (unsigned long long)(IPMPI_GATE_INTERVAL_NS / 1000000000ull), r->reason);
}

static struct rnode *find_refusal(ipmpi_gate_t *g, const char *src, const char *reason, uint64_t now)
{
    uint32_t b = bucket(g, src, reason);
    for (struct rnode *r = g->refs[b]; r; r = r->next)
        if (strcmp(r->reason, reason) == 0 && strcmp(r->src, src) == 0)
            return r;
    if (g->nrefs >= IPMPI_GATE_MAX_SOURCES && strcmp(src, "other addresses") != 0)
        return find_refusal(g, "other addresses", reason, now);
    struct rnode *r = calloc(1, sizeof *r);
    if (!r)
        return NULL;
    snprintf(r->src, sizeof r->src, "%s", src);
    r->reason = reason;
    r->t_start = now;
    r->next = g->refs[b];
    g->refs[b] = r;
    r->all_next = g->all;
    g->all = r;
    g->nrefs++;
    if (now + IPMPI_GATE_INTERVAL_NS < g->next_due)
        g->next_due = now + IPMPI_GATE_INTERVAL_NS;
    return r;
}

void ipmpi_gate_refused(ipmpi_gate_t *g, uint64_t now, const char *peer, const char *reason, const char *fmt, ...)
{
    char src[SRC_MAX];
    ipmpi_gate_source(peer, src, sizeof src);
    struct rnode *r = g ? find_refusal(g, src, reason, now) : NULL;
    if (r && now >= r->t_start + IPMPI_GATE_INTERVAL_NS) {
        /* Its interval ended before the tick came round to it. */
        summary(r);
        r->t_start = now;
        r->logged = 0;
        r->suppressed = 0;
        if (now + IPMPI_GATE_INTERVAL_NS < g->next_due)
            g->next_due = now + IPMPI_GATE_INTERVAL_NS;
    }
    if (r && r->logged >= IPMPI_GATE_LOG_FULL) {
        r->suppressed++;
        return;
    }
    if (r)
        r->logged++;
    /* Without a node (out of memory) every line is logged: better too
     * many lines than a refusal nobody can see. */
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (r && r->logged == IPMPI_GATE_LOG_FULL)
        ipmpi_log(IPMPI_LOG_WARN, "%s (further refusals of %s for this reason are counted, summed up every %llu s)",
                  line, src, (unsigned long long)(IPMPI_GATE_INTERVAL_NS / 1000000000ull));
    else
        ipmpi_log(IPMPI_LOG_WARN, "%s", line);
}

static void unlink_bucket(ipmpi_gate_t *g, struct rnode *r)
{
    for (struct rnode **pp = &g->refs[bucket(g, r->src, r->reason)]; *pp; pp = &(*pp)->next)
        if (*pp == r) {
            *pp = r->next;
            return;
        }
}

uint64_t ipmpi_gate_tick(ipmpi_gate_t *g, uint64_t now)
{
    if (now < g->next_due)
        return g->next_due;
    uint64_t next = UINT64_MAX;
    for (struct rnode **pp = &g->all; *pp;) {
        struct rnode *r = *pp;
        uint64_t end = r->t_start + IPMPI_GATE_INTERVAL_NS;
        if (now < end) {
            if (end < next)
                next = end;
            pp = &r->all_next;
            continue;
        }
        summary(r);
        *pp = r->all_next;
        unlink_bucket(g, r);
        g->nrefs--;
        free(r);
    }
    g->next_due = next;
    return next;
}

void ipmpi_gate_free(ipmpi_gate_t *g)
{
    if (!g)
        return;
    while (g->all) {
        struct rnode *r = g->all;
        g->all = r->all_next;
        summary(r);
        free(r);
    }
    for (uint32_t b = 0; b < NBUCKETS; b++)
        while (g->pend[b]) {
            struct pend *p = g->pend[b];
            g->pend[b] = p->next;
            free(p);
        }
    free(g);
}
