/* The CPU backend's hashing loop: one call hashes every row of a batch.

   Row i is head[i * width : (i + 1) * width] followed, when there is a tail, by
   values[offsets[i] : offsets[i + 1]]. The digest function is passed in as OpenSSL's
   Init/Update/Final triple (SHA256_* or SHA512_*), taken from the libcrypto that Python's
   hashlib itself uses, so this file needs no headers and links against nothing; it only
   removes the Python interpreter from between messages (about 100 ns a small message here
   against 650-1,300 through hashlib one call at a time).

   The Python side (kernels/_native.py) checks shapes, dtypes and offsets before calling.
   Returns 0, or the 1-based row whose Init/Update/Final reported a failure. */

#include <stddef.h>
#include <stdint.h>

typedef int (*init_fn)(void *ctx);
typedef int (*update_fn)(void *ctx, const void *data, size_t len);
typedef int (*final_fn)(unsigned char *md, void *ctx);

/* Large enough for OpenSSL's SHA512_CTX (216 bytes) and SHA256_CTX (112 bytes). */
#define CTX_BYTES 512

int64_t rl_hash_rows(init_fn init, update_fn update, final_fn final, int64_t digest_size,
                     const uint8_t *head, int64_t width, const uint8_t *values,
                     const int64_t *offsets, int64_t n, uint8_t *out)
{
    _Alignas(64) unsigned char ctx[CTX_BYTES];
    for (int64_t i = 0; i < n; i++) {
        if (!init(ctx))
            return i + 1;
        if (width > 0 && !update(ctx, head + i * width, (size_t)width))
            return i + 1;
        if (offsets != NULL) {
            int64_t lo = offsets[i], hi = offsets[i + 1];
            if (hi > lo && !update(ctx, values + lo, (size_t)(hi - lo)))
                return i + 1;
        }
        if (!final(out + i * digest_size, ctx))
            return i + 1;
    }
    return 0;
}
