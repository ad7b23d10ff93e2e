/*
 * The small fixed-size messages peers send outside the framed TLS link,
 * parsed without I/O so the fuzzer (tests/fuzz/fuzz_wake.c) can feed them
 * anything: anyone who reaches the sockets may send these bytes.
 *
 * - The ring datagram an engine on another node sends the controller's
 *   UDP wake-up socket (ctl wake.c): its wake key (8 bytes) and engine id
 *   (4), in host byte order (both ends are the same build).
 * - The wake datagram the controller sends an engine's UDP socket
 *   (engine wake.c): the engine's key, 8 bytes, host byte order.
 * - The greeting on a joined engine's liveness connection (ctl join.c,
 *   src/join.h): key (8) and engine id (4), little-endian.
 *
 * Pure functions; reentrant.
 */
#ifndef IPMPI_PEERMSG_H
#define IPMPI_PEERMSG_H

#include <stddef.h>
#include <stdint.h>

#define IPMPI_RING_SIZE 12u
#define IPMPI_WAKE_SIZE 8u

/* A ring datagram of len bytes: 0 with *key and *id set, or IPMPI_EPROTO
 * (wrong size; *key and *id untouched). Whether key and id are one of the
 * controller's engines is the caller's to check. */
int ipmpi_ring_parse(const uint8_t *b, size_t len, uint64_t *key, int32_t *id);
/* Writes the ring datagram of key and id into b (IPMPI_RING_SIZE bytes). */
void ipmpi_ring_encode(uint64_t key, int32_t id, uint8_t b[IPMPI_RING_SIZE]);

/* 1 if the wake datagram b (len bytes) is exactly key, else 0. Compared in
 * constant time. */
int ipmpi_wake_is_key(const uint8_t *b, size_t len, uint64_t key);

/* A liveness greeting of len bytes (src/join.h's IPMPI_JOIN_HELLO): 0 with
 * *key and *id set, or IPMPI_EPROTO (wrong size; untouched). */
int ipmpi_join_hello_parse(const uint8_t *b, size_t len, uint64_t *key, int32_t *id);

#endif
