/*
 * Wait policy for ranks that poll (MPI has no blocking wait that does not
 * spin): after the last activity a rank spins for spin_ns, then sleeps for
 * a time that doubles from min_ns up to max_ns but never exceeds a quarter
 * of the time idle since the last activity (so waking late costs at most
 * ~25% of the idle spell). ipmpi_backoff_next() is a
 * pure function of the state and the clock, so it is unit-tested without
 * sleeping. One backoff per polling loop; not thread-safe.
 */
#ifndef IPMPI_BACKOFF_H
#define IPMPI_BACKOFF_H

#include <stdint.h>

typedef struct ipmpi_backoff {
    uint64_t spin_ns;    /* busy-poll this long after activity */
    uint64_t min_ns;     /* first sleep after the spin */
    uint64_t max_ns;     /* longest sleep (0 = never sleep: pure spin) */
    uint64_t last_busy;  /* clock of the last activity */
    uint64_t cur_ns;     /* next sleep length */
} ipmpi_backoff_t;

/* Monotonic clock in nanoseconds. */
uint64_t ipmpi_now_ns(void);

/* spin_us: spin window; max_us: sleep cap (0 = spin forever). Starts busy at now. */
void ipmpi_backoff_init(ipmpi_backoff_t *b, uint64_t spin_us, uint64_t max_us, uint64_t now);

/* Records activity at now: the next waits spin again. */
void ipmpi_backoff_busy(ipmpi_backoff_t *b, uint64_t now);

/*
 * Returns how long to sleep now (0: poll again at once) and advances the
 * growth of the sleep length. Never more than max_ns.
 */
uint64_t ipmpi_backoff_next(ipmpi_backoff_t *b, uint64_t now);

/* Sleeps ipmpi_backoff_next(b, now) nanoseconds (nothing if 0). */
void ipmpi_backoff_wait(ipmpi_backoff_t *b);

#endif
