// Batch SHA-256 (FIPS 180-4): one thread per message.
//
// Kernels (extern "C", launched by rayledger/kernels/_cuda.py through cupy.RawModule):
//   sha256_var   variable-length messages given as (values, int64 offsets)
//   sha256_var32 the same with int32 offsets (Arrow BinaryArray), so they need no widening
//   sha256_fixed n messages of one width laid end to end (word loads when width % 4 == 0)
//   sha256_rows  head[i] (k bytes) || values[offsets[i]:offsets[i+1]] (transaction ids)
// Offsets are rebased by `base` (the first offset), since only values[base:] is on the device.
// A row whose offsets fall outside the buffer reads nothing, gets a zero digest and sets *err.
//
// Everything a thread does is a __host__ __device__ function (rl_*), so the same code is
// compiled for the host and checked against hashlib on machines without a GPU
// (tests/kernels/test_cuda_host.py); the __global__ wrappers only compute the thread index.

#ifndef RL_SHA256_CU
#define RL_SHA256_CU

// ---- shared prelude (sha512.cu and merkle.cu include this file for it) ---------------------
// No standard headers: NVRTC compiles this text without them.
typedef unsigned char rl_u8;
typedef unsigned int rl_u32;
typedef int rl_i32;
typedef unsigned long long rl_u64;
typedef long long rl_i64;
#ifdef __CUDACC__
#define RL_HD __host__ __device__ __forceinline__
#define RL_THREAD_INDEX ((rl_u64)blockIdx.x * (rl_u64)blockDim.x + (rl_u64)threadIdx.x)
#else
#define RL_HD static inline
#endif

// Big-endian word at p, which must be 4-byte aligned.
RL_HD rl_u32 rl_load_be32_aligned(const rl_u8* p) {
#ifdef __CUDA_ARCH__
    return __byte_perm(*(const rl_u32*)p, 0, 0x0123);
#else
    return ((rl_u32)p[0] << 24) | ((rl_u32)p[1] << 16) | ((rl_u32)p[2] << 8) | (rl_u32)p[3];
#endif
}

// Store v big-endian at p, which must be 4-byte aligned.
RL_HD void rl_store_be32_aligned(rl_u8* p, rl_u32 v) {
#ifdef __CUDA_ARCH__
    *(rl_u32*)p = __byte_perm(v, 0, 0x0123);
#else
    p[0] = (rl_u8)(v >> 24);
    p[1] = (rl_u8)(v >> 16);
    p[2] = (rl_u8)(v >> 8);
    p[3] = (rl_u8)v;
#endif
}

// Byte `pos` of the message a[0:alen) || b[...]: the row-concatenation view.
RL_HD rl_u8 rl_two_part_byte(const rl_u8* a, rl_u64 alen, const rl_u8* b, rl_u64 pos) {
    return pos < alen ? a[pos] : b[pos - alen];
}

// Checked offsets of message i: 0 <= start <= end <= size after rebasing by base.
RL_HD bool rl_bounds(const rl_i64* offsets, rl_i64 base, rl_u64 size, rl_u64 i,
                     rl_u64* start, rl_u64* end) {
    rl_i64 s = offsets[i] - base;
    rl_i64 e = offsets[i + 1] - base;
    if (s < 0 || e < s || (rl_u64)e > size) return false;
    *start = (rl_u64)s;
    *end = (rl_u64)e;
    return true;
}

RL_HD bool rl_bounds32(const rl_i32* offsets, rl_i64 base, rl_u64 size, rl_u64 i,
                       rl_u64* start, rl_u64* end) {
    rl_i64 s = (rl_i64)offsets[i] - base;
    rl_i64 e = (rl_i64)offsets[i + 1] - base;
    if (s < 0 || e < s || (rl_u64)e > size) return false;
    *start = (rl_u64)s;
    *end = (rl_u64)e;
    return true;
}

// ---- SHA-256 --------------------------------------------------------------------------------

#define RL_ROTR32(x, n) (((x) >> (n)) | ((x) << (32 - (n))))
#define RL_S256_BSIG0(x) (RL_ROTR32(x, 2) ^ RL_ROTR32(x, 13) ^ RL_ROTR32(x, 22))
#define RL_S256_BSIG1(x) (RL_ROTR32(x, 6) ^ RL_ROTR32(x, 11) ^ RL_ROTR32(x, 25))
#define RL_S256_SSIG0(x) (RL_ROTR32(x, 7) ^ RL_ROTR32(x, 18) ^ ((x) >> 3))
#define RL_S256_SSIG1(x) (RL_ROTR32(x, 17) ^ RL_ROTR32(x, 19) ^ ((x) >> 10))

// Round i with the registers already rotated by the caller; the schedule lives in w[16]
// (W[i] overwrites W[i - 16]) so that, fully unrolled, it stays in registers.
#define RL_S256_ROUND(a, b, c, d, e, f, g, h, i, k)                                      \
    do {                                                                                 \
        if ((i) >= 16)                                                                   \
            w[(i) & 15] += RL_S256_SSIG1(w[((i) - 2) & 15]) + w[((i) - 7) & 15] +        \
                           RL_S256_SSIG0(w[((i) - 15) & 15]);                            \
        rl_u32 t1_ = h + RL_S256_BSIG1(e) + ((e & f) ^ (~e & g)) + (k) + w[(i) & 15];    \
        d += t1_;                                                                        \
        h = t1_ + RL_S256_BSIG0(a) + ((a & b) ^ (a & c) ^ (b & c));                      \
    } while (0)

RL_HD void rl_sha256_init(rl_u32 s[8]) {
    s[0] = 0x6a09e667u;
    s[1] = 0xbb67ae85u;
    s[2] = 0x3c6ef372u;
    s[3] = 0xa54ff53au;
    s[4] = 0x510e527fu;
    s[5] = 0x9b05688cu;
    s[6] = 0x1f83d9abu;
    s[7] = 0x5be0cd19u;
}

// One compression of the 16-word block w (clobbered) into the state s.
RL_HD void rl_sha256_compress(rl_u32 s[8], rl_u32 w[16]) {
    rl_u32 a = s[0], b = s[1], c = s[2], d = s[3], e = s[4], f = s[5], g = s[6], h = s[7];
    RL_S256_ROUND(a, b, c, d, e, f, g, h, 0, 0x428a2f98u);
    RL_S256_ROUND(h, a, b, c, d, e, f, g, 1, 0x71374491u);
    RL_S256_ROUND(g, h, a, b, c, d, e, f, 2, 0xb5c0fbcfu);
    RL_S256_ROUND(f, g, h, a, b, c, d, e, 3, 0xe9b5dba5u);
    RL_S256_ROUND(e, f, g, h, a, b, c, d, 4, 0x3956c25bu);
    RL_S256_ROUND(d, e, f, g, h, a, b, c, 5, 0x59f111f1u);
    RL_S256_ROUND(c, d, e, f, g, h, a, b, 6, 0x923f82a4u);
    RL_S256_ROUND(b, c, d, e, f, g, h, a, 7, 0xab1c5ed5u);
    RL_S256_ROUND(a, b, c, d, e, f, g, h, 8, 0xd807aa98u);
    RL_S256_ROUND(h, a, b, c, d, e, f, g, 9, 0x12835b01u);
    RL_S256_ROUND(g, h, a, b, c, d, e, f, 10, 0x243185beu);
    RL_S256_ROUND(f, g, h, a, b, c, d, e, 11, 0x550c7dc3u);
    RL_S256_ROUND(e, f, g, h, a, b, c, d, 12, 0x72be5d74u);
    RL_S256_ROUND(d, e, f, g, h, a, b, c, 13, 0x80deb1feu);
    RL_S256_ROUND(c, d, e, f, g, h, a, b, 14, 0x9bdc06a7u);
    RL_S256_ROUND(b, c, d, e, f, g, h, a, 15, 0xc19bf174u);
    RL_S256_ROUND(a, b, c, d, e, f, g, h, 16, 0xe49b69c1u);
    RL_S256_ROUND(h, a, b, c, d, e, f, g, 17, 0xefbe4786u);
    RL_S256_ROUND(g, h, a, b, c, d, e, f, 18, 0x0fc19dc6u);
    RL_S256_ROUND(f, g, h, a, b, c, d, e, 19, 0x240ca1ccu);
    RL_S256_ROUND(e, f, g, h, a, b, c, d, 20, 0x2de92c6fu);
    RL_S256_ROUND(d, e, f, g, h, a, b, c, 21, 0x4a7484aau);
    RL_S256_ROUND(c, d, e, f, g, h, a, b, 22, 0x5cb0a9dcu);
    RL_S256_ROUND(b, c, d, e, f, g, h, a, 23, 0x76f988dau);
    RL_S256_ROUND(a, b, c, d, e, f, g, h, 24, 0x983e5152u);
    RL_S256_ROUND(h, a, b, c, d, e, f, g, 25, 0xa831c66du);
    RL_S256_ROUND(g, h, a, b, c, d, e, f, 26, 0xb00327c8u);
    RL_S256_ROUND(f, g, h, a, b, c, d, e, 27, 0xbf597fc7u);
    RL_S256_ROUND(e, f, g, h, a, b, c, d, 28, 0xc6e00bf3u);
    RL_S256_ROUND(d, e, f, g, h, a, b, c, 29, 0xd5a79147u);
    RL_S256_ROUND(c, d, e, f, g, h, a, b, 30, 0x06ca6351u);
    RL_S256_ROUND(b, c, d, e, f, g, h, a, 31, 0x14292967u);
    RL_S256_ROUND(a, b, c, d, e, f, g, h, 32, 0x27b70a85u);
    RL_S256_ROUND(h, a, b, c, d, e, f, g, 33, 0x2e1b2138u);
    RL_S256_ROUND(g, h, a, b, c, d, e, f, 34, 0x4d2c6dfcu);
    RL_S256_ROUND(f, g, h, a, b, c, d, e, 35, 0x53380d13u);
    RL_S256_ROUND(e, f, g, h, a, b, c, d, 36, 0x650a7354u);
    RL_S256_ROUND(d, e, f, g, h, a, b, c, 37, 0x766a0abbu);
    RL_S256_ROUND(c, d, e, f, g, h, a, b, 38, 0x81c2c92eu);
    RL_S256_ROUND(b, c, d, e, f, g, h, a, 39, 0x92722c85u);
    RL_S256_ROUND(a, b, c, d, e, f, g, h, 40, 0xa2bfe8a1u);
    RL_S256_ROUND(h, a, b, c, d, e, f, g, 41, 0xa81a664bu);
    RL_S256_ROUND(g, h, a, b, c, d, e, f, 42, 0xc24b8b70u);
    RL_S256_ROUND(f, g, h, a, b, c, d, e, 43, 0xc76c51a3u);
    RL_S256_ROUND(e, f, g, h, a, b, c, d, 44, 0xd192e819u);
    RL_S256_ROUND(d, e, f, g, h, a, b, c, 45, 0xd6990624u);
    RL_S256_ROUND(c, d, e, f, g, h, a, b, 46, 0xf40e3585u);
    RL_S256_ROUND(b, c, d, e, f, g, h, a, 47, 0x106aa070u);
    RL_S256_ROUND(a, b, c, d, e, f, g, h, 48, 0x19a4c116u);
    RL_S256_ROUND(h, a, b, c, d, e, f, g, 49, 0x1e376c08u);
    RL_S256_ROUND(g, h, a, b, c, d, e, f, 50, 0x2748774cu);
    RL_S256_ROUND(f, g, h, a, b, c, d, e, 51, 0x34b0bcb5u);
    RL_S256_ROUND(e, f, g, h, a, b, c, d, 52, 0x391c0cb3u);
    RL_S256_ROUND(d, e, f, g, h, a, b, c, 53, 0x4ed8aa4au);
    RL_S256_ROUND(c, d, e, f, g, h, a, b, 54, 0x5b9cca4fu);
    RL_S256_ROUND(b, c, d, e, f, g, h, a, 55, 0x682e6ff3u);
    RL_S256_ROUND(a, b, c, d, e, f, g, h, 56, 0x748f82eeu);
    RL_S256_ROUND(h, a, b, c, d, e, f, g, 57, 0x78a5636fu);
    RL_S256_ROUND(g, h, a, b, c, d, e, f, 58, 0x84c87814u);
    RL_S256_ROUND(f, g, h, a, b, c, d, e, 59, 0x8cc70208u);
    RL_S256_ROUND(e, f, g, h, a, b, c, d, 60, 0x90befffau);
    RL_S256_ROUND(d, e, f, g, h, a, b, c, 61, 0xa4506cebu);
    RL_S256_ROUND(c, d, e, f, g, h, a, b, 62, 0xbef9a3f7u);
    RL_S256_ROUND(b, c, d, e, f, g, h, a, 63, 0xc67178f2u);
    s[0] += a;
    s[1] += b;
    s[2] += c;
    s[3] += d;
    s[4] += e;
    s[5] += f;
    s[6] += g;
    s[7] += h;
}

// SHA-256 of a[0:alen) || b[0:blen), byte by byte: any lengths, any alignment.
RL_HD void rl_sha256_two_part(const rl_u8* a, rl_u64 alen, const rl_u8* b, rl_u64 blen,
                              rl_u32 s[8]) {
    rl_u64 len = alen + blen;
    rl_u64 blocks = (len + 9 + 63) / 64;
    rl_sha256_init(s);
    for (rl_u64 blk = 0; blk < blocks; ++blk) {
        rl_u32 w[16];
        rl_u64 base = blk * 64;
        if (base + 64 <= len) {
#pragma unroll
            for (int j = 0; j < 16; ++j) {
                rl_u64 p = base + 4 * j;
                w[j] = ((rl_u32)rl_two_part_byte(a, alen, b, p) << 24) |
                       ((rl_u32)rl_two_part_byte(a, alen, b, p + 1) << 16) |
                       ((rl_u32)rl_two_part_byte(a, alen, b, p + 2) << 8) |
                       (rl_u32)rl_two_part_byte(a, alen, b, p + 3);
            }
        } else {
#pragma unroll
            for (int j = 0; j < 16; ++j) {
                rl_u32 word = 0;
                for (int t = 0; t < 4; ++t) {
                    rl_u64 p = base + 4 * j + t;
                    rl_u32 c = p < len ? rl_two_part_byte(a, alen, b, p) : (p == len ? 0x80u : 0u);
                    word = (word << 8) | c;
                }
                w[j] = word;
            }
            if (blk == blocks - 1) {
                w[14] = (rl_u32)((len * 8) >> 32);
                w[15] = (rl_u32)(len * 8);
            }
        }
        rl_sha256_compress(s, w);
    }
}

// SHA-256 of p[0:len) where p is 4-byte aligned and len % 4 == 0: whole-word loads.
RL_HD void rl_sha256_words(const rl_u8* p, rl_u64 len, rl_u32 s[8]) {
    rl_u64 blocks = (len + 9 + 63) / 64;
    rl_sha256_init(s);
    for (rl_u64 blk = 0; blk < blocks; ++blk) {
        rl_u32 w[16];
        rl_u64 base = blk * 64;
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            rl_u64 q = base + 4 * j;
            w[j] = q < len ? rl_load_be32_aligned(p + q) : (q == len ? 0x80000000u : 0u);
        }
        if (blk == blocks - 1) {
            w[14] = (rl_u32)((len * 8) >> 32);
            w[15] = (rl_u32)(len * 8);
        }
        rl_sha256_compress(s, w);
    }
}

RL_HD void rl_sha256_store(rl_u8* out, const rl_u32 s[8]) {
#pragma unroll
    for (int j = 0; j < 8; ++j) rl_store_be32_aligned(out + 4 * j, s[j]);
}

RL_HD void rl_sha256_zero(rl_u8* out) {
#pragma unroll
    for (int j = 0; j < 8; ++j) rl_store_be32_aligned(out + 4 * j, 0u);
}

// ---- per-thread bodies (thread i of n) ----------------------------------------------------

RL_HD void rl_sha256_var_body(rl_u64 i, const rl_u8* values, rl_u64 size,
                              const rl_i64* offsets, rl_i64 base, rl_u64 n, rl_u8* out,
                              rl_i32* err) {
    if (i >= n) return;
    rl_u64 start, end;
    if (!rl_bounds(offsets, base, size, i, &start, &end)) {
        rl_sha256_zero(out + 32 * i);
        *err = 1;
        return;
    }
    rl_u32 s[8];
    rl_sha256_two_part(values, 0, values + start, end - start, s);
    rl_sha256_store(out + 32 * i, s);
}

RL_HD void rl_sha256_var32_body(rl_u64 i, const rl_u8* values, rl_u64 size,
                                const rl_i32* offsets, rl_i64 base, rl_u64 n, rl_u8* out,
                                rl_i32* err) {
    if (i >= n) return;
    rl_u64 start, end;
    if (!rl_bounds32(offsets, base, size, i, &start, &end)) {
        rl_sha256_zero(out + 32 * i);
        *err = 1;
        return;
    }
    rl_u32 s[8];
    rl_sha256_two_part(values, 0, values + start, end - start, s);
    rl_sha256_store(out + 32 * i, s);
}

// values must be 4-byte aligned (device allocations are) for the word path.
RL_HD void rl_sha256_fixed_body(rl_u64 i, const rl_u8* values, rl_u64 width, rl_u64 n,
                                rl_u8* out) {
    if (i >= n) return;
    rl_u32 s[8];
    if ((width & 3) == 0)
        rl_sha256_words(values + width * i, width, s);
    else
        rl_sha256_two_part(values, 0, values + width * i, width, s);
    rl_sha256_store(out + 32 * i, s);
}

RL_HD void rl_sha256_rows_body(rl_u64 i, const rl_u8* head, rl_u64 k, const rl_u8* values,
                               rl_u64 size, const rl_i64* offsets, rl_i64 base, rl_u64 n,
                               rl_u8* out, rl_i32* err) {
    if (i >= n) return;
    rl_u64 start, end;
    if (!rl_bounds(offsets, base, size, i, &start, &end)) {
        rl_sha256_zero(out + 32 * i);
        *err = 1;
        return;
    }
    rl_u32 s[8];
    rl_sha256_two_part(head + k * i, k, values + start, end - start, s);
    rl_sha256_store(out + 32 * i, s);
}

RL_HD void rl_sha256_rows32_body(rl_u64 i, const rl_u8* head, rl_u64 k, const rl_u8* values,
                                 rl_u64 size, const rl_i32* offsets, rl_i64 base, rl_u64 n,
                                 rl_u8* out, rl_i32* err) {
    if (i >= n) return;
    rl_u64 start, end;
    if (!rl_bounds32(offsets, base, size, i, &start, &end)) {
        rl_sha256_zero(out + 32 * i);
        *err = 1;
        return;
    }
    rl_u32 s[8];
    rl_sha256_two_part(head + k * i, k, values + start, end - start, s);
    rl_sha256_store(out + 32 * i, s);
}

#ifdef __CUDACC__
extern "C" __global__ void sha256_var(const rl_u8* values, rl_u64 size, const rl_i64* offsets,
                                      rl_i64 base, rl_u64 n, rl_u8* out, rl_i32* err) {
    rl_sha256_var_body(RL_THREAD_INDEX, values, size, offsets, base, n, out, err);
}

extern "C" __global__ void sha256_var32(const rl_u8* values, rl_u64 size, const rl_i32* offsets,
                                        rl_i64 base, rl_u64 n, rl_u8* out, rl_i32* err) {
    rl_sha256_var32_body(RL_THREAD_INDEX, values, size, offsets, base, n, out, err);
}

extern "C" __global__ void sha256_fixed(const rl_u8* values, rl_u64 width, rl_u64 n,
                                        rl_u8* out) {
    rl_sha256_fixed_body(RL_THREAD_INDEX, values, width, n, out);
}

extern "C" __global__ void sha256_rows(const rl_u8* head, rl_u64 k, const rl_u8* values,
                                       rl_u64 size, const rl_i64* offsets, rl_i64 base,
                                       rl_u64 n, rl_u8* out, rl_i32* err) {
    rl_sha256_rows_body(RL_THREAD_INDEX, head, k, values, size, offsets, base, n, out, err);
}

extern "C" __global__ void sha256_rows32(const rl_u8* head, rl_u64 k, const rl_u8* values,
                                         rl_u64 size, const rl_i32* offsets, rl_i64 base,
                                         rl_u64 n, rl_u8* out, rl_i32* err) {
    rl_sha256_rows32_body(RL_THREAD_INDEX, head, k, values, size, offsets, base, n, out, err);
}
#endif  // __CUDACC__

#endif  // RL_SHA256_CU
