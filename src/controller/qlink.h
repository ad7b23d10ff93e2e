/*
 * Intrusive doubly linked list (libuv's queue.h in spirit): a list head is
 * a link whose next and prev point to itself when empty. The scheduler's
 * queues, the requests running on engines (equeue.h), the result store.
 */
#ifndef IPMPI_CTL_QLINK_H
#define IPMPI_CTL_QLINK_H

#include <stddef.h>

typedef struct ipmpi_qlink {
    struct ipmpi_qlink *next, *prev;
} ipmpi_qlink_t;

#define IPMPI_CONTAINER_OF(ptr, type, member) ((type *)(void *)((char *)(ptr)-offsetof(type, member)))

static inline void ipmpi_ql_init(ipmpi_qlink_t *h) { h->next = h->prev = h; }
static inline int ipmpi_ql_empty(const ipmpi_qlink_t *h) { return h->next == h; }
static inline void ipmpi_ql_insert_after(ipmpi_qlink_t *at, ipmpi_qlink_t *n)
{
    n->prev = at;
    n->next = at->next;
    at->next->prev = n;
    at->next = n;
}
static inline void ipmpi_ql_push_back(ipmpi_qlink_t *h, ipmpi_qlink_t *n) { ipmpi_ql_insert_after(h->prev, n); }
static inline void ipmpi_ql_push_front(ipmpi_qlink_t *h, ipmpi_qlink_t *n) { ipmpi_ql_insert_after(h, n); }
static inline void ipmpi_ql_remove(ipmpi_qlink_t *n)
{
    n->prev->next = n->next;
    n->next->prev = n->prev;
    n->next = n->prev = n;
}
/* A link that is in no list points to itself (after init or remove). */
static inline int ipmpi_ql_linked(const ipmpi_qlink_t *n) { return n->next != n; }

#endif
