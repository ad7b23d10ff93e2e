/*
 * libFuzzer harness for the small messages anyone who reaches a socket may
 * send outside the TLS link (src/common/peermsg.h): the ring datagram the
 * controller's UDP wake-up socket reads (src/controller/wake.c), the wake
 * datagram an engine's UDP socket reads (src/engine/wake.c), and the
 * greeting on a joined engine's liveness connection (src/controller/
 * join.c). Built and run by `make fuzz FUZZ_TARGETS=fuzz_wake` and, for a
 * bounded time, by `make check` (tests/fuzz/run-fuzz).
 *
 * Contracts, trapped on a breach: each message is taken only at its exact
 * size and then re-encodes to the same bytes; anything else leaves the
 * outputs untouched; a wake datagram matches a key exactly when it is
 * that key's 8 bytes.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "codec.h"
#include "ipmpi/errors.h"
#include "join.h"
#include "peermsg.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const uint64_t k0 = 0x0123456789abcdefull;
    const int32_t i0 = -7;

    uint64_t key = k0;
    int32_t id = i0;
    int r = ipmpi_ring_parse(data, size, &key, &id);
    if ((r == 0) != (size == IPMPI_RING_SIZE) || (r != 0 && r != IPMPI_EPROTO))
        __builtin_trap();
    if (r != 0 && (key != k0 || id != i0))
        __builtin_trap();
    if (r == 0) {
        uint8_t e[IPMPI_RING_SIZE];
        ipmpi_ring_encode(key, id, e);
        if (memcmp(e, data, sizeof e) != 0)
            __builtin_trap();
    }

    uint64_t fixed = 0x5a5a00ff13579bdfull;
    int same = size == IPMPI_WAKE_SIZE && memcmp(data, &fixed, sizeof fixed) == 0;
    if (ipmpi_wake_is_key(data, size, fixed) != same)
        __builtin_trap();
    if (size >= sizeof fixed) {
        uint64_t own;
        memcpy(&own, data, sizeof own);
        if (ipmpi_wake_is_key(data, size, own) != (size == IPMPI_WAKE_SIZE))
            __builtin_trap();
    }

    key = k0;
    id = i0;
    r = ipmpi_join_hello_parse(data, size, &key, &id);
    if ((r == 0) != (size == IPMPI_JOIN_HELLO) || (r != 0 && r != IPMPI_EPROTO))
        __builtin_trap();
    if (r != 0 && (key != k0 || id != i0))
        __builtin_trap();
    if (r == 0) {
        uint8_t e[IPMPI_JOIN_HELLO];
        ipmpi_put_u64(e, key);
        ipmpi_put_u32(e + 8, (uint32_t)id);
        if (memcmp(e, data, sizeof e) != 0)
            __builtin_trap();
    }
    return 0;
}
