/*
 * The JSON text builder (json.h). A builder belongs to one thread.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "json.h"

static void jb_grow(jbuf_t *b, size_t need)
{
    if (b->oom || b->len + need + 1 <= b->cap)
        return;
    size_t ncap = b->cap ? b->cap : 256;
    while (ncap < b->len + need + 1)
        ncap *= 2;
    char *n = realloc(b->s, ncap);
    if (!n) {
        b->oom = 1;
        return;
    }
    b->s = n;
    b->cap = ncap;
}

void jb_printf(jbuf_t *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0) {
        b->oom = 1;
        return;
    }
    jb_grow(b, (size_t)n);
    if (b->oom)
        return;
    va_start(ap, fmt);
    vsnprintf(b->s + b->len, b->cap - b->len, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

/* Appends s as a JSON string literal, escaping quotes, backslashes and
 * control characters (other bytes pass through: they are UTF-8). */
void jb_str(jbuf_t *b, const char *s)
{
    jb_printf(b, "\"");
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            jb_printf(b, "\\%c", ch);
        else if (ch < 0x20)
            jb_printf(b, "\\u%04x", ch);
        else
            jb_printf(b, "%c", ch);
    }
    jb_printf(b, "\"");
}

