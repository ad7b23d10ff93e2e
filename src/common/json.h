/*
 * A small JSON text builder (the controller's replies, an engine's READY):
 * snprintf into a growing buffer; an allocation failure sets oom and later
 * calls do nothing, so callers check once at the end. The caller frees s.
 * Thread safety: none needed; each builder belongs to one caller.
 */
#ifndef IPMPI_JSON_H
#define IPMPI_JSON_H

#include <stddef.h>

typedef struct jbuf {
    char *s;
    size_t len, cap;
    int oom;
} jbuf_t;

/* Appends printf-formatted text. */
void jb_printf(jbuf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Appends s as a JSON string literal (quotes, backslashes and control
 * characters escaped; other bytes pass through as UTF-8). */
void jb_str(jbuf_t *b, const char *s);

#endif
