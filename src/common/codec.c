/* Frame codec: see codec.h. No I/O, no allocation. */
#include "codec.h"

#include <limits.h>
#include <string.h>

#include "ipmpi/errors.h"

void ipmpi_limits_default(ipmpi_limits_t *lim)
{
    lim->max_parts = 4096;
    lim->max_part = (uint64_t)4 << 30;
    lim->max_frame = (uint64_t)8 << 30;
}

long ipmpi_hdr_encode(const ipmpi_hdr_t *h, const uint64_t *lens, uint8_t *out, size_t cap)
{
    if (h->nparts > IPMPI_MAX_PARTS || cap < ipmpi_hdr_wire_size(h->nparts))
        return IPMPI_EINVAL;
    ipmpi_put_u32(out, IPMPI_MAGIC);
    out[4] = IPMPI_PROTO_VERSION;
    out[5] = h->kind;
    out[6] = (uint8_t)h->flags;
    out[7] = (uint8_t)(h->flags >> 8);
    ipmpi_put_u64(out + 8, h->req_id);
    ipmpi_put_u32(out + 16, (uint32_t)h->target);
    ipmpi_put_u32(out + 20, (uint32_t)h->status);
    ipmpi_put_u32(out + 24, h->total);
    ipmpi_put_u32(out + 28, h->nparts);
    ipmpi_put_u64(out + 32, h->aux);
    for (uint32_t i = 0; i < h->nparts; i++)
        ipmpi_put_u64(out + IPMPI_HDR_SIZE + 8u * i, lens[i]);
    return (long)ipmpi_hdr_wire_size(h->nparts);
}

long ipmpi_hdr_decode(const uint8_t *buf, size_t len, const ipmpi_limits_t *lim, ipmpi_hdr_t *out)
{
    if (len < IPMPI_HDR_SIZE)
        return 0;
    if (ipmpi_get_u32(buf) != IPMPI_MAGIC || buf[4] != IPMPI_PROTO_VERSION)
        return IPMPI_EPROTO;
    if (buf[5] == 0 || buf[5] >= IPMPI_K_MAX_)
        return IPMPI_EPROTO;
    uint32_t nparts = ipmpi_get_u32(buf + 28);
    uint32_t maxp = lim->max_parts < IPMPI_MAX_PARTS ? lim->max_parts : IPMPI_MAX_PARTS;
    if (nparts > maxp)
        return IPMPI_E2BIG;
    out->version = buf[4];
    out->kind = buf[5];
    out->flags = (uint16_t)(buf[6] | (buf[7] << 8));
    out->req_id = ipmpi_get_u64(buf + 8);
    out->target = (int32_t)ipmpi_get_u32(buf + 16);
    out->status = (int32_t)ipmpi_get_u32(buf + 20);
    out->total = ipmpi_get_u32(buf + 24);
    out->nparts = nparts;
    out->aux = ipmpi_get_u64(buf + 32);
    return IPMPI_HDR_SIZE;
}

long ipmpi_lens_decode(const uint8_t *buf, size_t len, uint32_t nparts, const ipmpi_limits_t *lim,
                       uint64_t *lens, uint64_t *total)
{
    if (len < (size_t)nparts * 8u)
        return 0;
    uint64_t sum = 0;
    for (uint32_t i = 0; i < nparts; i++) {
        uint64_t l = ipmpi_get_u64(buf + 8u * i);
        if (l > lim->max_part || l > lim->max_frame - sum)
            return IPMPI_E2BIG;
        sum += l;
    }
    for (uint32_t i = 0; i < nparts; i++)
        lens[i] = ipmpi_get_u64(buf + 8u * i);
    *total = sum;
    return (long)nparts * 8;
}

long ipmpi_gather_next(const uint8_t *p, size_t left, const ipmpi_limits_t *lim, ipmpi_hdr_t *h)
{
    if (left == 0)
        return 0;
    long hn = ipmpi_hdr_decode(p, left, lim, h);
    if (hn <= 0)
        return hn == 0 ? IPMPI_EPROTO : hn;
    if (!(h->flags & IPMPI_F_REPLY) ||
        (h->flags & (IPMPI_F_MORE | IPMPI_F_SHM | IPMPI_F_GATHER | IPMPI_F_PACKED)) ||
        ((h->flags & IPMPI_F_SAME) && h->nparts != 0))
        return IPMPI_EPROTO;
    size_t wire = ipmpi_hdr_wire_size(h->nparts);
    if (wire > left)
        return IPMPI_EPROTO;
    uint64_t sum = 0;
    for (uint32_t i = 0; i < h->nparts; i++) {
        uint64_t l = ipmpi_get_u64(p + IPMPI_HDR_SIZE + 8u * i);
        if (l > lim->max_part || l > lim->max_frame - sum)
            return IPMPI_E2BIG;
        sum += l;
    }
    if (sum > left - wire || wire + sum > (uint64_t)LONG_MAX)
        return IPMPI_EPROTO;
    return (long)(wire + sum);
}

void ipmpi_gather_each_init(ipmpi_gather_each_t *it, const uint8_t *p, size_t left, const ipmpi_limits_t *lim)
{
    memset(it, 0, sizeof *it);
    it->p = p;
    it->left = left;
    it->lim = lim;
}

/* Reads the next inner frame (a whole one or a run) into it: 1, 0 at the
 * end, or an error. */
static int each_load(ipmpi_gather_each_t *it)
{
    ipmpi_hdr_t f;
    long n = ipmpi_gather_next(it->p, it->left, it->lim, &f);
    if (n <= 0)
        return (int)n;
    if (f.flags & IPMPI_F_SAME) {
        if (!it->ref || f.aux == 0 || f.aux > IPMPI_GATHER_RUN_MAX || f.target < 0 ||
            (uint64_t)f.target + f.aux > (uint64_t)INT32_MAX)
            return IPMPI_EPROTO;
        it->run_left = f.aux;
        it->run_next = f.target;
    } else {
        if (f.aux != 0)
            return IPMPI_EPROTO;
        it->ref = it->p;
        it->refh = f;
        it->run_left = 1;
        it->run_next = f.target;
    }
    it->p += n;
    it->left -= (size_t)n;
    return 1;
}

int ipmpi_gather_each_run(ipmpi_gather_each_t *it, ipmpi_hdr_t *h, const uint8_t **frame, uint32_t *count)
{
    int rc;
    if (it->run_left == 0 && (rc = each_load(it)) <= 0)
        return rc;
    *h = it->refh;
    h->target = (int32_t)it->run_next;
    *count = (uint32_t)it->run_left;
    it->run_next += (int64_t)it->run_left;
    it->run_left = 0;
    *frame = it->ref;
    return 1;
}

int ipmpi_gather_each_next(ipmpi_gather_each_t *it, ipmpi_hdr_t *h, const uint8_t **frame)
{
    int rc;
    if (it->run_left == 0 && (rc = each_load(it)) <= 0)
        return rc;
    *h = it->refh;
    h->target = (int32_t)it->run_next++;
    it->run_left--;
    *frame = it->ref;
    return 1;
}

/* Whether whole inner frames a and b (headers ha, hb; wire bytes na, nb)
 * are the same reply but for their target. */
static int same_reply(const uint8_t *a, const ipmpi_hdr_t *ha, long na, const uint8_t *b, const ipmpi_hdr_t *hb,
                      long nb)
{
    return na == nb && ha->kind == hb->kind && ha->flags == hb->flags && ha->req_id == hb->req_id &&
           ha->status == hb->status && ha->total == hb->total && ha->nparts == hb->nparts &&
           memcmp(a + IPMPI_HDR_SIZE, b + IPMPI_HDR_SIZE, (size_t)na - IPMPI_HDR_SIZE) == 0;
}

long ipmpi_gather_fold(uint8_t *buf, size_t len, const ipmpi_limits_t *lim)
{
    /* Checked whole first, so that a malformed part is left as it came. */
    ipmpi_gather_each_t chk;
    ipmpi_gather_each_init(&chk, buf, len, lim);
    ipmpi_hdr_t h;
    const uint8_t *fr;
    int rc;
    while ((rc = ipmpi_gather_each_next(&chk, &h, &fr)) > 0)
        ;
    if (rc < 0)
        return rc;
    size_t rd = 0, wr = 0, ref = 0, run = 0;
    long refn = 0;
    int have_ref = 0, have_run = 0; /* run: the last frame written is a run */
    ipmpi_hdr_t refh = {0}, runh = {0};
    while (rd < len) {
        ipmpi_hdr_t f;
        long n = ipmpi_gather_next(buf + rd, len - rd, lim, &f);
        int32_t first = f.target;
        uint64_t count = 0;
        if (f.flags & IPMPI_F_SAME)
            count = f.aux; /* repeats the last whole frame, which matches refh */
        else if (have_ref && same_reply(buf + ref, &refh, refn, buf + rd, &f, n))
            count = 1;
        if (count == 0) {
            /* A new reply: kept whole (moved down over what was folded). */
            memmove(buf + wr, buf + rd, (size_t)n);
            ref = wr;
            refn = n;
            refh = f;
            have_ref = 1;
            have_run = 0;
            wr += (size_t)n;
        } else if (have_run && (uint64_t)runh.target + runh.aux == (uint64_t)first &&
                   runh.aux + count <= IPMPI_GATHER_RUN_MAX) {
            runh.aux += count;
            ipmpi_hdr_encode(&runh, NULL, buf + run, IPMPI_HDR_SIZE);
        } else {
            runh = refh;
            runh.flags = IPMPI_F_REPLY | IPMPI_F_SAME;
            runh.target = first;
            runh.nparts = 0;
            runh.aux = count;
            run = wr;
            ipmpi_hdr_encode(&runh, NULL, buf + wr, IPMPI_HDR_SIZE);
            have_run = 1;
            wr += IPMPI_HDR_SIZE;
        }
        rd += (size_t)n;
    }
    return (long)wr;
}

void ipmpi_shmref_encode(const ipmpi_shmref_t *r, uint8_t *out)
{
    ipmpi_put_u32(out, r->part);
    ipmpi_put_u32(out + 4, r->fd);
    ipmpi_put_u64(out + 8, r->off);
    ipmpi_put_u64(out + 16, r->len);
    ipmpi_put_u64(out + 24, 0);
}

long ipmpi_shmref_decode(const uint8_t *tab, uint64_t tlen, uint32_t nparts, const uint64_t *lens,
                         uint64_t wire_total, const ipmpi_limits_t *lim, ipmpi_shmref_t *out, uint32_t cap)
{
    if (tlen == 0 || tlen % IPMPI_SHMREF_SIZE != 0 || tlen / IPMPI_SHMREF_SIZE > nparts)
        return IPMPI_EPROTO;
    uint64_t k = tlen / IPMPI_SHMREF_SIZE;
    if (k > cap)
        return IPMPI_EINVAL;
    uint64_t sum = wire_total;
    for (uint64_t i = 0; i < k; i++) {
        const uint8_t *e = tab + i * IPMPI_SHMREF_SIZE;
        ipmpi_shmref_t r = {.part = ipmpi_get_u32(e), .fd = ipmpi_get_u32(e + 4), .off = ipmpi_get_u64(e + 8),
                            .len = ipmpi_get_u64(e + 16)};
        if (r.part >= nparts || (i > 0 && r.part <= out[i - 1].part) || lens[r.part] != 0 ||
            ipmpi_get_u64(e + 24) != 0 || r.len == 0 || r.off > UINT64_MAX - r.len)
            return IPMPI_EPROTO;
        if (r.len > lim->max_part || r.len > lim->max_frame || sum > lim->max_frame - r.len)
            return IPMPI_E2BIG;
        sum += r.len;
        out[i] = r;
    }
    return (long)k;
}

int ipmpi_taskdesc_decode(const uint8_t *d, uint64_t len, uint32_t nparts, ipmpi_taskdesc_t *out)
{
    if (len < 16 || nparts < 2)
        return IPMPI_EPROTO;
    uint32_t nst = (uint32_t)d[8] | ((uint32_t)d[9] << 8) | ((uint32_t)d[10] << 16) | ((uint32_t)d[11] << 24);
    if (nst == 0 || nst > IPMPI_TASK_STAGES_MAX || len != 16 + 8ull * nst)
        return IPMPI_EPROTO;
    if (d[12] | d[13] | d[14] | d[15])
        return IPMPI_EPROTO;
    ipmpi_taskdesc_t t;
    uint64_t sum = 0;
    for (uint32_t i = 0; i < nst; i++) {
        const uint8_t *p = d + 16 + 8 * i;
        t.nparts[i] = (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
        t.retries[i] = (uint32_t)p[4] | ((uint32_t)p[5] << 8) | ((uint32_t)p[6] << 16) | ((uint32_t)p[7] << 24);
        if (t.nparts[i] == 0 || t.retries[i] > IPMPI_TASK_RETRIES_MAX)
            return IPMPI_EINVAL;
        sum += t.nparts[i];
    }
    if (sum != (uint64_t)nparts - 1)
        return IPMPI_EPROTO;
    t.nstages = nst;
    t.id = 0;
    for (int k = 7; k >= 0; k--)
        t.id = (t.id << 8) | d[k];
    *out = t;
    return 0;
}

int ipmpi_hello_hdr_ok(const ipmpi_hdr_t *h)
{
    return h->kind == IPMPI_K_HELLO && h->nparts == 1 && !(h->flags & IPMPI_F_REPLY);
}

int ipmpi_hello_len_ok(uint64_t len)
{
    return len == IPMPI_KEY_HEX_LEN;
}
