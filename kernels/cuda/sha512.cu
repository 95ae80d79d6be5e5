// Batch SHA-512 (FIPS 180-4): one thread per message. Ed25519 verification (R || A || M,
// 96 bytes) reuses rl_sha512_words.
//
// Kernels (extern "C", launched by rayledger/kernels/_cuda.py through cupy.RawModule):
//   sha512_var   variable-length messages given as (values, int64 offsets)
//   sha512_var32 the same with int32 offsets (Arrow BinaryArray)
//   sha512_fixed n messages of one width laid end to end (word loads when width % 8 == 0)
// Offsets, bounds checks and the host-compiled test harness work as in sha256.cu, whose
// prelude (types, aligned loads, rl_bounds) this file includes.

#ifndef RL_SHA512_CU
#define RL_SHA512_CU

#ifndef RL_SHA256_CU
#include "sha256.cu"
#endif

// Big-endian 64-bit word at p, which must be 8-byte aligned.
RL_HD rl_u64 rl_load_be64_aligned(const rl_u8* p) {
    return ((rl_u64)rl_load_be32_aligned(p) << 32) | (rl_u64)rl_load_be32_aligned(p + 4);
}

#define RL_ROTR64(x, n) (((x) >> (n)) | ((x) << (64 - (n))))
#define RL_S512_BSIG0(x) (RL_ROTR64(x, 28) ^ RL_ROTR64(x, 34) ^ RL_ROTR64(x, 39))
#define RL_S512_BSIG1(x) (RL_ROTR64(x, 14) ^ RL_ROTR64(x, 18) ^ RL_ROTR64(x, 41))
#define RL_S512_SSIG0(x) (RL_ROTR64(x, 1) ^ RL_ROTR64(x, 8) ^ ((x) >> 7))
#define RL_S512_SSIG1(x) (RL_ROTR64(x, 19) ^ RL_ROTR64(x, 61) ^ ((x) >> 6))

#define RL_S512_ROUND(a, b, c, d, e, f, g, h, i, k)                                      \
    do {                                                                                 \
        if ((i) >= 16)                                                                   \
            w[(i) & 15] += RL_S512_SSIG1(w[((i) - 2) & 15]) + w[((i) - 7) & 15] +        \
                           RL_S512_SSIG0(w[((i) - 15) & 15]);                            \
        rl_u64 t1_ = h + RL_S512_BSIG1(e) + ((e & f) ^ (~e & g)) + (k) + w[(i) & 15];    \
        d += t1_;                                                                        \
        h = t1_ + RL_S512_BSIG0(a) + ((a & b) ^ (a & c) ^ (b & c));                      \
    } while (0)

RL_HD void rl_sha512_init(rl_u64 s[8]) {
    s[0] = 0x6a09e667f3bcc908ull;
    s[1] = 0xbb67ae8584caa73bull;
    s[2] = 0x3c6ef372fe94f82bull;
    s[3] = 0xa54ff53a5f1d36f1ull;
    s[4] = 0x510e527fade682d1ull;
    s[5] = 0x9b05688c2b3e6c1full;
    s[6] = 0x1f83d9abfb41bd6bull;
    s[7] = 0x5be0cd19137e2179ull;
}

// One compression of the 16-word block w (clobbered) into the state s.
RL_HD void rl_sha512_compress(rl_u64 s[8], rl_u64 w[16]) {
    rl_u64 a = s[0], b = s[1], c = s[2], d = s[3], e = s[4], f = s[5], g = s[6], h = s[7];
    RL_S512_ROUND(a, b, c, d, e, f, g, h, 0, 0x428a2f98d728ae22ull);
    RL_S512_ROUND(h, a, b, c, d, e, f, g, 1, 0x7137449123ef65cdull);
    RL_S512_ROUND(g, h, a, b, c, d, e, f, 2, 0xb5c0fbcfec4d3b2full);
    RL_S512_ROUND(f, g, h, a, b, c, d, e, 3, 0xe9b5dba58189dbbcull);
    RL_S512_ROUND(e, f, g, h, a, b, c, d, 4, 0x3956c25bf348b538ull);
    RL_S512_ROUND(d, e, f, g, h, a, b, c, 5, 0x59f111f1b605d019ull);
    RL_S512_ROUND(c, d, e, f, g, h, a, b, 6, 0x923f82a4af194f9bull);
    RL_S512_ROUND(b, c, d, e, f, g, h, a, 7, 0xab1c5ed5da6d8118ull);
    RL_S512_ROUND(a, b, c, d, e, f, g, h, 8, 0xd807aa98a3030242ull);
    RL_S512_ROUND(h, a, b, c, d, e, f, g, 9, 0x12835b0145706fbeull);
    RL_S512_ROUND(g, h, a, b, c, d, e, f, 10, 0x243185be4ee4b28cull);
    RL_S512_ROUND(f, g, h, a, b, c, d, e, 11, 0x550c7dc3d5ffb4e2ull);
    RL_S512_ROUND(e, f, g, h, a, b, c, d, 12, 0x72be5d74f27b896full);
    RL_S512_ROUND(d, e, f, g, h, a, b, c, 13, 0x80deb1fe3b1696b1ull);
    RL_S512_ROUND(c, d, e, f, g, h, a, b, 14, 0x9bdc06a725c71235ull);
    RL_S512_ROUND(b, c, d, e, f, g, h, a, 15, 0xc19bf174cf692694ull);
    RL_S512_ROUND(a, b, c, d, e, f, g, h, 16, 0xe49b69c19ef14ad2ull);
    RL_S512_ROUND(h, a, b, c, d, e, f, g, 17, 0xefbe4786384f25e3ull);
    RL_S512_ROUND(g, h, a, b, c, d, e, f, 18, 0x0fc19dc68b8cd5b5ull);
    RL_S512_ROUND(f, g, h, a, b, c, d, e, 19, 0x240ca1cc77ac9c65ull);
    RL_S512_ROUND(e, f, g, h, a, b, c, d, 20, 0x2de92c6f592b0275ull);
    RL_S512_ROUND(d, e, f, g, h, a, b, c, 21, 0x4a7484aa6ea6e483ull);
    RL_S512_ROUND(c, d, e, f, g, h, a, b, 22, 0x5cb0a9dcbd41fbd4ull);
    RL_S512_ROUND(b, c, d, e, f, g, h, a, 23, 0x76f988da831153b5ull);
    RL_S512_ROUND(a, b, c, d, e, f, g, h, 24, 0x983e5152ee66dfabull);
    RL_S512_ROUND(h, a, b, c, d, e, f, g, 25, 0xa831c66d2db43210ull);
    RL_S512_ROUND(g, h, a, b, c, d, e, f, 26, 0xb00327c898fb213full);
    RL_S512_ROUND(f, g, h, a, b, c, d, e, 27, 0xbf597fc7beef0ee4ull);
    RL_S512_ROUND(e, f, g, h, a, b, c, d, 28, 0xc6e00bf33da88fc2ull);
    RL_S512_ROUND(d, e, f, g, h, a, b, c, 29, 0xd5a79147930aa725ull);
    RL_S512_ROUND(c, d, e, f, g, h, a, b, 30, 0x06ca6351e003826full);
    RL_S512_ROUND(b, c, d, e, f, g, h, a, 31, 0x142929670a0e6e70ull);
    RL_S512_ROUND(a, b, c, d, e, f, g, h, 32, 0x27b70a8546d22ffcull);
    RL_S512_ROUND(h, a, b, c, d, e, f, g, 33, 0x2e1b21385c26c926ull);
    RL_S512_ROUND(g, h, a, b, c, d, e, f, 34, 0x4d2c6dfc5ac42aedull);
    RL_S512_ROUND(f, g, h, a, b, c, d, e, 35, 0x53380d139d95b3dfull);
    RL_S512_ROUND(e, f, g, h, a, b, c, d, 36, 0x650a73548baf63deull);
    RL_S512_ROUND(d, e, f, g, h, a, b, c, 37, 0x766a0abb3c77b2a8ull);
    RL_S512_ROUND(c, d, e, f, g, h, a, b, 38, 0x81c2c92e47edaee6ull);
    RL_S512_ROUND(b, c, d, e, f, g, h, a, 39, 0x92722c851482353bull);
    RL_S512_ROUND(a, b, c, d, e, f, g, h, 40, 0xa2bfe8a14cf10364ull);
    RL_S512_ROUND(h, a, b, c, d, e, f, g, 41, 0xa81a664bbc423001ull);
    RL_S512_ROUND(g, h, a, b, c, d, e, f, 42, 0xc24b8b70d0f89791ull);
    RL_S512_ROUND(f, g, h, a, b, c, d, e, 43, 0xc76c51a30654be30ull);
    RL_S512_ROUND(e, f, g, h, a, b, c, d, 44, 0xd192e819d6ef5218ull);
    RL_S512_ROUND(d, e, f, g, h, a, b, c, 45, 0xd69906245565a910ull);
    RL_S512_ROUND(c, d, e, f, g, h, a, b, 46, 0xf40e35855771202aull);
    RL_S512_ROUND(b, c, d, e, f, g, h, a, 47, 0x106aa07032bbd1b8ull);
    RL_S512_ROUND(a, b, c, d, e, f, g, h, 48, 0x19a4c116b8d2d0c8ull);
    RL_S512_ROUND(h, a, b, c, d, e, f, g, 49, 0x1e376c085141ab53ull);
    RL_S512_ROUND(g, h, a, b, c, d, e, f, 50, 0x2748774cdf8eeb99ull);
    RL_S512_ROUND(f, g, h, a, b, c, d, e, 51, 0x34b0bcb5e19b48a8ull);
    RL_S512_ROUND(e, f, g, h, a, b, c, d, 52, 0x391c0cb3c5c95a63ull);
    RL_S512_ROUND(d, e, f, g, h, a, b, c, 53, 0x4ed8aa4ae3418acbull);
    RL_S512_ROUND(c, d, e, f, g, h, a, b, 54, 0x5b9cca4f7763e373ull);
    RL_S512_ROUND(b, c, d, e, f, g, h, a, 55, 0x682e6ff3d6b2b8a3ull);
    RL_S512_ROUND(a, b, c, d, e, f, g, h, 56, 0x748f82ee5defb2fcull);
    RL_S512_ROUND(h, a, b, c, d, e, f, g, 57, 0x78a5636f43172f60ull);
    RL_S512_ROUND(g, h, a, b, c, d, e, f, 58, 0x84c87814a1f0ab72ull);
    RL_S512_ROUND(f, g, h, a, b, c, d, e, 59, 0x8cc702081a6439ecull);
    RL_S512_ROUND(e, f, g, h, a, b, c, d, 60, 0x90befffa23631e28ull);
    RL_S512_ROUND(d, e, f, g, h, a, b, c, 61, 0xa4506cebde82bde9ull);
    RL_S512_ROUND(c, d, e, f, g, h, a, b, 62, 0xbef9a3f7b2c67915ull);
    RL_S512_ROUND(b, c, d, e, f, g, h, a, 63, 0xc67178f2e372532bull);
    RL_S512_ROUND(a, b, c, d, e, f, g, h, 64, 0xca273eceea26619cull);
    RL_S512_ROUND(h, a, b, c, d, e, f, g, 65, 0xd186b8c721c0c207ull);
    RL_S512_ROUND(g, h, a, b, c, d, e, f, 66, 0xeada7dd6cde0eb1eull);
    RL_S512_ROUND(f, g, h, a, b, c, d, e, 67, 0xf57d4f7fee6ed178ull);
    RL_S512_ROUND(e, f, g, h, a, b, c, d, 68, 0x06f067aa72176fbaull);
    RL_S512_ROUND(d, e, f, g, h, a, b, c, 69, 0x0a637dc5a2c898a6ull);
    RL_S512_ROUND(c, d, e, f, g, h, a, b, 70, 0x113f9804bef90daeull);
    RL_S512_ROUND(b, c, d, e, f, g, h, a, 71, 0x1b710b35131c471bull);
    RL_S512_ROUND(a, b, c, d, e, f, g, h, 72, 0x28db77f523047d84ull);
    RL_S512_ROUND(h, a, b, c, d, e, f, g, 73, 0x32caab7b40c72493ull);
    RL_S512_ROUND(g, h, a, b, c, d, e, f, 74, 0x3c9ebe0a15c9bebcull);
    RL_S512_ROUND(f, g, h, a, b, c, d, e, 75, 0x431d67c49c100d4cull);
    RL_S512_ROUND(e, f, g, h, a, b, c, d, 76, 0x4cc5d4becb3e42b6ull);
    RL_S512_ROUND(d, e, f, g, h, a, b, c, 77, 0x597f299cfc657e2aull);
    RL_S512_ROUND(c, d, e, f, g, h, a, b, 78, 0x5fcb6fab3ad6faecull);
    RL_S512_ROUND(b, c, d, e, f, g, h, a, 79, 0x6c44198c4a475817ull);
    s[0] += a;
    s[1] += b;
    s[2] += c;
    s[3] += d;
    s[4] += e;
    s[5] += f;
    s[6] += g;
    s[7] += h;
}

// The 128-bit length field: messages here are far below 2^61 bytes, so its upper word is 0.
RL_HD void rl_sha512_length(rl_u64 w[16], rl_u64 len) {
    w[14] = len >> 61;
    w[15] = len << 3;
}

// SHA-512 of p[0:len), byte by byte: any length, any alignment.
RL_HD void rl_sha512_bytes(const rl_u8* p, rl_u64 len, rl_u64 s[8]) {
    rl_u64 blocks = (len + 17 + 127) / 128;
    rl_sha512_init(s);
    for (rl_u64 blk = 0; blk < blocks; ++blk) {
        rl_u64 w[16];
        rl_u64 base = blk * 128;
        if (base + 128 <= len) {
#pragma unroll
            for (int j = 0; j < 16; ++j) {
                rl_u64 word = 0;
                for (int t = 0; t < 8; ++t) word = (word << 8) | p[base + 8 * j + t];
                w[j] = word;
            }
        } else {
#pragma unroll
            for (int j = 0; j < 16; ++j) {
                rl_u64 word = 0;
                for (int t = 0; t < 8; ++t) {
                    rl_u64 q = base + 8 * j + t;
                    rl_u64 c = q < len ? p[q] : (q == len ? 0x80u : 0u);
                    word = (word << 8) | c;
                }
                w[j] = word;
            }
            if (blk == blocks - 1) rl_sha512_length(w, len);
        }
        rl_sha512_compress(s, w);
    }
}

// SHA-512 of p[0:len) where p is 8-byte aligned and len % 8 == 0: whole-word loads.
RL_HD void rl_sha512_words(const rl_u8* p, rl_u64 len, rl_u64 s[8]) {
    rl_u64 blocks = (len + 17 + 127) / 128;
    rl_sha512_init(s);
    for (rl_u64 blk = 0; blk < blocks; ++blk) {
        rl_u64 w[16];
        rl_u64 base = blk * 128;
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            rl_u64 q = base + 8 * j;
            w[j] = q < len ? rl_load_be64_aligned(p + q) : (q == len ? 0x8000000000000000ull : 0ull);
        }
        if (blk == blocks - 1) rl_sha512_length(w, len);
        rl_sha512_compress(s, w);
    }
}

RL_HD void rl_sha512_store(rl_u8* out, const rl_u64 s[8]) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        rl_store_be32_aligned(out + 8 * j, (rl_u32)(s[j] >> 32));
        rl_store_be32_aligned(out + 8 * j + 4, (rl_u32)s[j]);
    }
}

RL_HD void rl_sha512_zero(rl_u8* out) {
#pragma unroll
    for (int j = 0; j < 16; ++j) rl_store_be32_aligned(out + 4 * j, 0u);
}

// ---- per-thread bodies (thread i of n) ----------------------------------------------------

RL_HD void rl_sha512_var_body(rl_u64 i, const rl_u8* values, rl_u64 size,
                              const rl_i64* offsets, rl_i64 base, rl_u64 n, rl_u8* out,
                              rl_i32* err) {
    if (i >= n) return;
    rl_u64 start, end;
    if (!rl_bounds(offsets, base, size, i, &start, &end)) {
        rl_sha512_zero(out + 64 * i);
        *err = 1;
        return;
    }
    rl_u64 s[8];
    rl_sha512_bytes(values + start, end - start, s);
    rl_sha512_store(out + 64 * i, s);
}

RL_HD void rl_sha512_var32_body(rl_u64 i, const rl_u8* values, rl_u64 size,
                                const rl_i32* offsets, rl_i64 base, rl_u64 n, rl_u8* out,
                                rl_i32* err) {
    if (i >= n) return;
    rl_u64 start, end;
    if (!rl_bounds32(offsets, base, size, i, &start, &end)) {
        rl_sha512_zero(out + 64 * i);
        *err = 1;
        return;
    }
    rl_u64 s[8];
    rl_sha512_bytes(values + start, end - start, s);
    rl_sha512_store(out + 64 * i, s);
}

// values must be 8-byte aligned (device allocations are) for the word path.
RL_HD void rl_sha512_fixed_body(rl_u64 i, const rl_u8* values, rl_u64 width, rl_u64 n,
                                rl_u8* out) {
    if (i >= n) return;
    rl_u64 s[8];
    if ((width & 7) == 0)
        rl_sha512_words(values + width * i, width, s);
    else
        rl_sha512_bytes(values + width * i, width, s);
    rl_sha512_store(out + 64 * i, s);
}

#ifdef __CUDACC__
extern "C" __global__ void sha512_var(const rl_u8* values, rl_u64 size, const rl_i64* offsets,
                                      rl_i64 base, rl_u64 n, rl_u8* out, rl_i32* err) {
    rl_sha512_var_body(RL_THREAD_INDEX, values, size, offsets, base, n, out, err);
}

extern "C" __global__ void sha512_var32(const rl_u8* values, rl_u64 size, const rl_i32* offsets,
                                        rl_i64 base, rl_u64 n, rl_u8* out, rl_i32* err) {
    rl_sha512_var32_body(RL_THREAD_INDEX, values, size, offsets, base, n, out, err);
}

extern "C" __global__ void sha512_fixed(const rl_u8* values, rl_u64 width, rl_u64 n,
                                        rl_u8* out) {
    rl_sha512_fixed_body(RL_THREAD_INDEX, values, width, n, out);
}
#endif  // __CUDACC__

#endif  // RL_SHA512_CU
