/*
 * Large receive buffers for Python, shared by the client module and the
 * engines: an object with the (writable) buffer protocol whose memory is a
 * 2 MiB-aligned huge-page mapping, kept in a small cache when the object
 * dies (at most 4 mappings, 1 GiB, 10 s unused) and handed to the next
 * large part of a similar size.
 *
 * Why: on these VMs memory the process has not used lately costs far more
 * than the bytes (256 MiB: ~45 ms to fault in when the kernel has pages to
 * spare, ~600 ms when it must get them from the host, 20 ms to copy into
 * memory already faulted in). Repeated pushes and pulls of similar arrays
 * then land in warm memory. pickle protocol 5 keeps the object alive as
 * long as the array built on it.
 *
 * Thread safety: the cache has its own lock; ipmpi_bigbuf_new needs the
 * GIL, ipmpi_bigbuf_trim does not.
 */
#ifndef IPMPI_BIGBUF_H
#define IPMPI_BIGBUF_H

#include <Python.h>
#include <stdint.h>

/* Parts at least this large get a big buffer; smaller ones a bytearray.
 * 1 MiB: a 2 MB array pushed to 64 engines took 42 ms with fresh memory
 * for each part (4 MiB threshold) and 17 ms with warm buffers
 * (bench_scale.py --engines 64). */
#define IPMPI_BIGBUF_MIN ((uint64_t)1 << 20)

/* Makes the type; call once (module init / engine start). 0 or -1. */
int ipmpi_bigbuf_init(void);

/* A new buffer object of len bytes (contents undefined), its memory in
 * *data; NULL with an exception set on failure. GIL held. */
PyObject *ipmpi_bigbuf_new(uint64_t len, char **data);

/* The memory of o if it is a buffer of this type, else NULL. Needs no GIL
 * (the caller holds a reference). */
const char *ipmpi_bigbuf_data(PyObject *o);

/* Unmaps cached buffers unused for 10 s. Any thread. */
void ipmpi_bigbuf_trim(void);

#endif
