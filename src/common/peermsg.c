/* Parsers of peers' small fixed-size messages: see peermsg.h. */
#include "peermsg.h"

#include <string.h>

#include "codec.h"
#include "ipmpi/errors.h"
#include "join.h"

int ipmpi_ring_parse(const uint8_t *b, size_t len, uint64_t *key, int32_t *id)
{
    if (len != IPMPI_RING_SIZE)
        return IPMPI_EPROTO;
    memcpy(key, b, sizeof *key);
    memcpy(id, b + 8, sizeof *id);
    return 0;
}

void ipmpi_ring_encode(uint64_t key, int32_t id, uint8_t b[IPMPI_RING_SIZE])
{
    memcpy(b, &key, sizeof key);
    memcpy(b + 8, &id, sizeof id);
}

int ipmpi_wake_is_key(const uint8_t *b, size_t len, uint64_t key)
{
    if (len != IPMPI_WAKE_SIZE)
        return 0;
    uint8_t k[IPMPI_WAKE_SIZE], diff = 0;
    memcpy(k, &key, sizeof k);
    for (size_t i = 0; i < sizeof k; i++)
        diff |= (uint8_t)(b[i] ^ k[i]);
    return diff == 0;
}

int ipmpi_join_hello_parse(const uint8_t *b, size_t len, uint64_t *key, int32_t *id)
{
    if (len != IPMPI_JOIN_HELLO)
        return IPMPI_EPROTO;
    *key = ipmpi_get_u64(b);
    *id = (int32_t)ipmpi_get_u32(b + 8);
    return 0;
}
