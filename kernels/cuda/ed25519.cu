// Batch Ed25519 verification (RFC 8032) with OpenSSL's acceptance rule: one thread per signature.
//
// Kernels (extern "C", launched by rayledger/kernels/_cuda.py through cupy.RawModule):
//   ed25519_verify      keys (n x 32), sigs (n x 64), msgs (n x 32) end to end -> ok[i] in {0, 1}
//   ed25519_verify_var  the same with messages of any length, as (values, int64 offsets)
//                       rebased by `base`; a row whose offsets fall outside the buffer reads
//                       nothing, is answered 0 and sets *err (as the hash kernels do)
//
// The rule, row by row, is the one every validator must share, and the one ossl_ed25519_verify
// applies (so the cpu backend, which calls OpenSSL through `cryptography`, agrees on every row):
//   1. S (the signature's second half, little-endian) must be < L, else reject;
//   2. A (the key) decodes as RFC 8032 5.1.3 with two leniencies: its y is taken mod p (a
//      non-canonical y >= p is accepted), and x = 0 with the sign bit set is accepted as x = 0;
//      a y with no x on the curve is rejected;
//   3. k = SHA-512(R || A || M) mod L, over the bytes as given;
//   4. accept iff the canonical encoding of [S]B + [k](-A) equals R byte for byte (the
//      cofactorless equation; a non-canonical R never matches).
// Small-order keys are accepted by this rule, as by OpenSSL; the ledger refuses them itself.
//
// Arithmetic: field elements are eight 32-bit limbs holding any value < 2^256, kept reduced
// only modulo 2^256 - 38 (= 2 * p) and canonicalised when encoded or compared. Points are
// extended twisted Edwards coordinates (X : Y : Z : T) with the complete formulas for a = -1
// (Hisil, Wong, Carter, Dawson 2008), so identity and small-order inputs need no special case.
// [S]B + [k](-A) is a joint fixed-window (4-bit signed digits) ladder over tables of 0..8 times
// each point: 252 doublings and 128 additions, the same instruction stream for every thread.
//
// As in the hash kernels, everything a thread does is __host__ __device__, so the host harness
// (tests/kernels/test_ed25519_host.py) checks it against OpenSSL on machines without a GPU.

#ifndef RL_ED25519_CU
#define RL_ED25519_CU

#ifndef RL_SHA512_CU
#include "sha512.cu"
#endif

// ---- field arithmetic mod p = 2^255 - 19 ----------------------------------------------------

struct rl_fe {
    rl_u32 v[8];  // little-endian limbs, value < 2^256
};

#define RL_FE(a0, a1, a2, a3, a4, a5, a6, a7) \
    { { a0, a1, a2, a3, a4, a5, a6, a7 } }

// The generated constants below are checked against their definitions by
// tests/kernels/test_ed25519_host.py::test_constants_match_their_definitions.
// d = -121665 / 121666
#define RL_ED_D RL_FE(0x135978a3u, 0x75eb4dcau, 0x4141d8abu, 0x00700a4du, \
                      0x7779e898u, 0x8cc74079u, 0x2b6ffe73u, 0x52036ceeu)
// 2 * d
#define RL_ED_D2 RL_FE(0x26b2f159u, 0xebd69b94u, 0x8283b156u, 0x00e0149au, \
                       0xeef3d130u, 0x198e80f2u, 0x56dffce7u, 0x2406d9dcu)
// sqrt(-1) = 2^((p - 1) / 4)
#define RL_ED_SQRTM1 RL_FE(0x4a0ea0b0u, 0xc4ee1b27u, 0xad2fe478u, 0x2f431806u, \
                           0x3dfbd7a7u, 0x2b4d0099u, 0x4fc1df0bu, 0x2b832480u)
// The base point B: y = 4 / 5, x even.
#define RL_ED_BX RL_FE(0x8f25d51au, 0xc9562d60u, 0x9525a7b2u, 0x692cc760u, \
                       0xfdd6dc5cu, 0xc0a4e231u, 0xcd6e53feu, 0x216936d3u)
#define RL_ED_BY RL_FE(0x66666658u, 0x66666666u, 0x66666666u, 0x66666666u, \
                       0x66666666u, 0x66666666u, 0x66666666u, 0x66666666u)
// The group order L = 2^252 + 27742317777372353535851937790883648493.
#define RL_ED_L { 0x5cf5d3edu, 0x5812631au, 0xa2f79cd6u, 0x14def9deu, \
                  0x00000000u, 0x00000000u, 0x00000000u, 0x10000000u }

RL_HD void rl_fe_set(rl_fe* r, rl_u32 small) {
    r->v[0] = small;
#pragma unroll
    for (int i = 1; i < 8; ++i) r->v[i] = 0;
}

// Little-endian bytes, bit 255 ignored (as OpenSSL's fe_frombytes), not reduced.
RL_HD void rl_fe_frombytes(rl_fe* r, const rl_u8* p) {
#pragma unroll
    for (int i = 0; i < 8; ++i)
        r->v[i] = (rl_u32)p[4 * i] | ((rl_u32)p[4 * i + 1] << 8) | ((rl_u32)p[4 * i + 2] << 16) |
                  ((rl_u32)p[4 * i + 3] << 24);
    r->v[7] &= 0x7fffffffu;
}

// Fold a carry c (a multiple of 2^256) back in as c * 38; r stays < 2^256.
RL_HD void rl_fe_fold(rl_fe* r, rl_u64 c) {
    c *= 38;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        c += r->v[i];
        r->v[i] = (rl_u32)c;
        c >>= 32;
    }
    // A second wrap leaves r < 38, so this cannot carry.
    r->v[0] += (rl_u32)(c * 38);
}

RL_HD void rl_fe_add(rl_fe* r, const rl_fe* a, const rl_fe* b) {
    rl_u64 c = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        c += (rl_u64)a->v[i] + b->v[i];
        r->v[i] = (rl_u32)c;
        c >>= 32;
    }
    rl_fe_fold(r, c);
}

RL_HD void rl_fe_sub(rl_fe* r, const rl_fe* a, const rl_fe* b) {
    rl_u64 borrow = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        rl_u64 t = (rl_u64)a->v[i] - b->v[i] - borrow;
        r->v[i] = (rl_u32)t;
        borrow = t >> 63;
    }
    // A borrow means r holds a - b + 2^256 = a - b + 38 (mod p): take 38 off, and once more
    // if that wraps too (the second time it cannot, r being then close to 2^256).
    borrow *= 38;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        rl_u64 t = (rl_u64)r->v[i] - borrow;
        r->v[i] = (rl_u32)t;
        borrow = t >> 63;
    }
    r->v[0] -= (rl_u32)(borrow * 38);
}

// r = t mod (2^256 - 38) for a 512-bit t (16 limbs), since 2^256 = 38 (mod p).
RL_HD void rl_fe_reduce512(rl_fe* r, const rl_u32 t[16]) {
    rl_u64 c = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        c += (rl_u64)t[i + 8] * 38 + t[i];
        r->v[i] = (rl_u32)c;
        c >>= 32;
    }
    rl_fe_fold(r, c);
}

RL_HD void rl_fe_mul(rl_fe* r, const rl_fe* a, const rl_fe* b) {
    rl_u32 t[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) t[i] = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        rl_u64 c = 0;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            c += (rl_u64)a->v[i] * b->v[j] + t[i + j];  // <= 2^64 - 1
            t[i + j] = (rl_u32)c;
            c >>= 32;
        }
        t[i + 8] = (rl_u32)c;
    }
    rl_fe_reduce512(r, t);
}

// r = a^2 with 36 limb products instead of 64: the cross products once, doubled, plus the
// squares on the diagonal. Doublings and the square root's exponentiation are mostly these.
RL_HD void rl_fe_sq(rl_fe* r, const rl_fe* a) {
    rl_u32 t[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) t[i] = 0;
#pragma unroll
    for (int i = 0; i < 7; ++i) {
        rl_u64 c = 0;
#pragma unroll
        for (int j = i + 1; j < 8; ++j) {
            c += (rl_u64)a->v[i] * a->v[j] + t[i + j];
            t[i + j] = (rl_u32)c;
            c >>= 32;
        }
        t[i + 8] = (rl_u32)c;
    }
    // The cross sum is below a^2 / 2 < 2^511: doubling it cannot overflow 16 limbs.
#pragma unroll
    for (int i = 15; i > 0; --i) t[i] = (t[i] << 1) | (t[i - 1] >> 31);
    t[0] <<= 1;
    rl_u64 c = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        rl_u64 d = (rl_u64)a->v[i] * a->v[i];
        c += (rl_u64)t[2 * i] + (rl_u32)d;
        t[2 * i] = (rl_u32)c;
        c >>= 32;
        c += (rl_u64)t[2 * i + 1] + (d >> 32);
        t[2 * i + 1] = (rl_u32)c;
        c >>= 32;
    }
    rl_fe_reduce512(r, t);
}

RL_HD void rl_fe_sqn(rl_fe* r, const rl_fe* a, int n) {
    rl_fe_sq(r, a);
    for (int i = 1; i < n; ++i) rl_fe_sq(r, r);
}

// The unique representative in [0, p).
RL_HD void rl_fe_canonical(rl_fe* r, const rl_fe* a) {
    // a = hi * 2^255 + lo = lo + 19 * hi (mod p), which is < 2^255 + 19.
    rl_u64 c = (a->v[7] >> 31) * 19;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        c += (i == 7) ? (a->v[7] & 0x7fffffffu) : a->v[i];
        r->v[i] = (rl_u32)c;
        c >>= 32;
    }
    // Now r < 2^255 + 19 < 2 * p: r >= p exactly when r + 19 reaches 2^255.
    rl_fe t;
    c = 19;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        c += r->v[i];
        t.v[i] = (rl_u32)c;
        c >>= 32;
    }
    rl_u32 keep = 0u - (t.v[7] >> 31);  // all ones when r >= p: take r + 19 - 2^255 = r - p
    t.v[7] &= 0x7fffffffu;
#pragma unroll
    for (int i = 0; i < 8; ++i) r->v[i] = (t.v[i] & keep) | (r->v[i] & ~keep);
}

RL_HD void rl_fe_tobytes(rl_u8* out, const rl_fe* a) {
    rl_fe c;
    rl_fe_canonical(&c, a);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        out[4 * i] = (rl_u8)c.v[i];
        out[4 * i + 1] = (rl_u8)(c.v[i] >> 8);
        out[4 * i + 2] = (rl_u8)(c.v[i] >> 16);
        out[4 * i + 3] = (rl_u8)(c.v[i] >> 24);
    }
}

RL_HD bool rl_fe_iszero(const rl_fe* a) {
    rl_fe c;
    rl_fe_canonical(&c, a);
    rl_u32 any = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) any |= c.v[i];
    return any == 0;
}

// The sign of x in an encoding: the low bit of its canonical value.
RL_HD rl_u32 rl_fe_isnegative(const rl_fe* a) {
    rl_fe c;
    rl_fe_canonical(&c, a);
    return c.v[0] & 1u;
}

RL_HD void rl_fe_neg(rl_fe* r, const rl_fe* a) {
    rl_fe zero;
    rl_fe_set(&zero, 0);
    rl_fe_sub(r, &zero, a);
}

// z^(2^250 - 1), and z^11 in *z11: the common prefix of inversion and the square root.
RL_HD void rl_fe_pow2250m1(rl_fe* r, rl_fe* z11, const rl_fe* z) {
    rl_fe t0, t1, t2, t3;
    rl_fe_sq(&t0, z);            // z^2
    rl_fe_sqn(&t1, &t0, 2);      // z^8
    rl_fe_mul(&t1, z, &t1);      // z^9
    rl_fe_mul(z11, &t0, &t1);    // z^11
    rl_fe_sq(&t2, z11);          // z^22
    rl_fe_mul(&t1, &t1, &t2);    // z^(2^5 - 1)
    rl_fe_sqn(&t2, &t1, 5);
    rl_fe_mul(&t1, &t2, &t1);    // z^(2^10 - 1)
    rl_fe_sqn(&t2, &t1, 10);
    rl_fe_mul(&t2, &t2, &t1);    // z^(2^20 - 1)
    rl_fe_sqn(&t3, &t2, 20);
    rl_fe_mul(&t2, &t3, &t2);    // z^(2^40 - 1)
    rl_fe_sqn(&t2, &t2, 10);
    rl_fe_mul(&t1, &t2, &t1);    // z^(2^50 - 1)
    rl_fe_sqn(&t2, &t1, 50);
    rl_fe_mul(&t2, &t2, &t1);    // z^(2^100 - 1)
    rl_fe_sqn(&t3, &t2, 100);
    rl_fe_mul(&t2, &t3, &t2);    // z^(2^200 - 1)
    rl_fe_sqn(&t2, &t2, 50);
    rl_fe_mul(r, &t2, &t1);      // z^(2^250 - 1)
}

// 1 / z = z^(p - 2), p - 2 = (2^250 - 1) * 2^5 + 11.
RL_HD void rl_fe_invert(rl_fe* r, const rl_fe* z) {
    rl_fe t, z11;
    rl_fe_pow2250m1(&t, &z11, z);
    rl_fe_sqn(&t, &t, 5);
    rl_fe_mul(r, &t, &z11);
}

// z^((p - 5) / 8), (p - 5) / 8 = (2^250 - 1) * 4 + 1.
RL_HD void rl_fe_pow22523(rl_fe* r, const rl_fe* z) {
    rl_fe t, z11;
    rl_fe_pow2250m1(&t, &z11, z);
    rl_fe_sqn(&t, &t, 2);
    rl_fe_mul(r, &t, z);
}

// ---- points ---------------------------------------------------------------------------------

struct rl_ge {  // extended coordinates: x = X / Z, y = Y / Z, x * y = T / Z
    rl_fe X, Y, Z, T;
};

struct rl_gc {  // a point prepared for addition: Y + X, Y - X, 2 Z, 2 d T
    rl_fe YpX, YmX, Z2, T2d;
};

RL_HD void rl_ge_identity(rl_ge* r) {
    rl_fe_set(&r->X, 0);
    rl_fe_set(&r->Y, 1);
    rl_fe_set(&r->Z, 1);
    rl_fe_set(&r->T, 0);
}

RL_HD void rl_ge_cache(rl_gc* r, const rl_ge* p) {
    const rl_fe d2 = RL_ED_D2;
    rl_fe_add(&r->YpX, &p->Y, &p->X);
    rl_fe_sub(&r->YmX, &p->Y, &p->X);
    rl_fe_add(&r->Z2, &p->Z, &p->Z);
    rl_fe_mul(&r->T2d, &p->T, &d2);
}

// r = p + q (add-2008-hwcd-3, a = -1); complete, so p == q and the identity are fine.
RL_HD void rl_ge_add(rl_ge* r, const rl_ge* p, const rl_gc* q) {
    rl_fe a, b, c, d, e, f, g, h;
    rl_fe_sub(&a, &p->Y, &p->X);
    rl_fe_mul(&a, &a, &q->YmX);
    rl_fe_add(&b, &p->Y, &p->X);
    rl_fe_mul(&b, &b, &q->YpX);
    rl_fe_mul(&c, &p->T, &q->T2d);
    rl_fe_mul(&d, &p->Z, &q->Z2);
    rl_fe_sub(&e, &b, &a);
    rl_fe_sub(&f, &d, &c);
    rl_fe_add(&g, &d, &c);
    rl_fe_add(&h, &b, &a);
    rl_fe_mul(&r->X, &e, &f);
    rl_fe_mul(&r->Y, &g, &h);
    rl_fe_mul(&r->T, &e, &h);
    rl_fe_mul(&r->Z, &f, &g);
}

// r = 2 p (dbl-2008-hwcd, a = -1); T of p is not read.
RL_HD void rl_ge_double(rl_ge* r, const rl_ge* p) {
    rl_fe a, b, c, e, f, g, h;
    rl_fe_sq(&a, &p->X);
    rl_fe_sq(&b, &p->Y);
    rl_fe_sq(&c, &p->Z);
    rl_fe_add(&c, &c, &c);
    rl_fe_add(&e, &p->X, &p->Y);
    rl_fe_sq(&e, &e);
    rl_fe_sub(&e, &e, &a);
    rl_fe_sub(&e, &e, &b);  // E = 2 X Y
    rl_fe_sub(&g, &b, &a);  // G = aA + B with a = -1
    rl_fe_sub(&f, &g, &c);  // F = G - C
    rl_fe_add(&h, &a, &b);
    rl_fe_neg(&h, &h);      // H = aA - B
    rl_fe_mul(&r->X, &e, &f);
    rl_fe_mul(&r->Y, &g, &h);
    rl_fe_mul(&r->T, &e, &h);
    rl_fe_mul(&r->Z, &f, &g);
}

// Decode a key as OpenSSL does (see the head of this file); false when y has no x.
RL_HD bool rl_ge_frombytes(rl_ge* r, const rl_u8* s) {
    const rl_fe d = RL_ED_D;
    const rl_fe sqrtm1 = RL_ED_SQRTM1;
    rl_fe u, v, v3, x, vxx, check;
    rl_fe_frombytes(&r->Y, s);
    rl_fe_set(&r->Z, 1);
    rl_fe_sq(&u, &r->Y);
    rl_fe_mul(&v, &u, &d);
    rl_fe_sub(&u, &u, &r->Z);  // u = y^2 - 1
    rl_fe_add(&v, &v, &r->Z);  // v = d y^2 + 1
    // x = u v^3 (u v^7)^((p - 5) / 8), a square root of u / v when there is one.
    rl_fe_sq(&v3, &v);
    rl_fe_mul(&v3, &v3, &v);
    rl_fe_sq(&x, &v3);
    rl_fe_mul(&x, &x, &v);
    rl_fe_mul(&x, &x, &u);
    rl_fe_pow22523(&x, &x);
    rl_fe_mul(&x, &x, &v3);
    rl_fe_mul(&x, &x, &u);
    rl_fe_sq(&vxx, &x);
    rl_fe_mul(&vxx, &vxx, &v);
    rl_fe_sub(&check, &vxx, &u);
    if (!rl_fe_iszero(&check)) {
        rl_fe_add(&check, &vxx, &u);
        if (!rl_fe_iszero(&check)) return false;
        rl_fe_mul(&x, &x, &sqrtm1);
    }
    if (rl_fe_isnegative(&x) != (rl_u32)(s[31] >> 7)) rl_fe_neg(&x, &x);
    r->X = x;
    rl_fe_mul(&r->T, &r->X, &r->Y);
    return true;
}

RL_HD void rl_ge_tobytes(rl_u8* out, const rl_ge* p) {
    rl_fe zi, x, y;
    rl_fe_invert(&zi, &p->Z);
    rl_fe_mul(&x, &p->X, &zi);
    rl_fe_mul(&y, &p->Y, &zi);
    rl_fe_tobytes(out, &y);
    out[31] |= (rl_u8)(rl_fe_isnegative(&x) << 7);
}

// table[k] = k * p for k = 0..8, prepared for addition.
RL_HD void rl_ge_table(rl_gc table[9], const rl_ge* p) {
    rl_ge id, acc;
    rl_ge_identity(&id);
    rl_ge_cache(&table[0], &id);
    rl_ge_cache(&table[1], p);
    acc = *p;
    for (int k = 2; k <= 8; ++k) {
        rl_ge_add(&acc, &acc, &table[1]);
        rl_ge_cache(&table[k], &acc);
    }
}

// acc += digit * P, digit in [-8, 8], from P's table.
RL_HD void rl_ge_add_digit(rl_ge* acc, const rl_gc table[9], int digit) {
    rl_u32 neg = digit < 0;
    rl_gc q = table[neg ? -digit : digit];
    if (neg) {  // -(x, y) = (-x, y): swap Y + X and Y - X, negate T
        rl_fe t = q.YpX;
        q.YpX = q.YmX;
        q.YmX = t;
        rl_fe_neg(&q.T2d, &q.T2d);
    }
    rl_ge_add(acc, acc, &q);
}

// ---- scalars mod L --------------------------------------------------------------------------

// a < b for eight little-endian limbs.
RL_HD bool rl_sc_less(const rl_u32 a[8], const rl_u32 b[8]) {
    for (int i = 7; i >= 0; --i)
        if (a[i] != b[i]) return a[i] < b[i];
    return false;
}

// r = x mod L for a 512-bit little-endian x (binary long division; branch-free steps).
RL_HD void rl_sc_reduce512(rl_u32 r[8], const rl_u8 x[64]) {
    const rl_u32 l[8] = RL_ED_L;
#pragma unroll
    for (int i = 0; i < 8; ++i) r[i] = 0;
    for (int bit = 511; bit >= 0; --bit) {
        // r = 2 r + bit; r < L keeps this below 2^254.
#pragma unroll
        for (int i = 7; i > 0; --i) r[i] = (r[i] << 1) | (r[i - 1] >> 31);
        r[0] = (r[0] << 1) | ((x[bit >> 3] >> (bit & 7)) & 1u);
        rl_u32 t[8];
        rl_u64 borrow = 0;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            rl_u64 s = (rl_u64)r[i] - l[i] - borrow;
            t[i] = (rl_u32)s;
            borrow = s >> 63;
        }
        rl_u32 keep = (rl_u32)borrow - 1u;  // all ones when r >= L: take r - L
#pragma unroll
        for (int i = 0; i < 8; ++i) r[i] = (t[i] & keep) | (r[i] & ~keep);
    }
}

// Signed 4-bit digits e[0..63] of a scalar < 2^253: sum e[i] 16^i, e[i] in [-8, 7], e[63] <= 2.
RL_HD void rl_sc_digits(signed char e[64], const rl_u32 s[8]) {
#pragma unroll
    for (int i = 0; i < 64; ++i) e[i] = (signed char)((s[i >> 3] >> (4 * (i & 7))) & 15u);
    int carry = 0;
    for (int i = 0; i < 63; ++i) {
        int v = e[i] + carry;
        carry = (v + 8) >> 4;
        e[i] = (signed char)(v - (carry << 4));
    }
    e[63] = (signed char)(e[63] + carry);
}

// ---- verification ---------------------------------------------------------------------------

// The digest's 64 bytes (big-endian state words) into k, read later as a little-endian number.
RL_HD void rl_ed25519_digest_bytes(rl_u8 k[64], const rl_u64 s[8]) {
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int t = 0; t < 8; ++t) k[8 * j + t] = (rl_u8)(s[j] >> (56 - 8 * t));
}

// k = SHA-512(R || A || M) as a little-endian 512-bit number (96 bytes: one block).
RL_HD void rl_ed25519_challenge(rl_u8 k[64], const rl_u8* r, const rl_u8* a, const rl_u8* m) {
    rl_u64 w[16], s[8];
#pragma unroll
    for (int j = 0; j < 12; ++j) {
        const rl_u8* p = j < 4 ? r + 8 * j : (j < 8 ? a + 8 * (j - 4) : m + 8 * (j - 8));
        rl_u64 word = 0;
#pragma unroll
        for (int t = 0; t < 8; ++t) word = (word << 8) | p[t];
        w[j] = word;
    }
    w[12] = 0x8000000000000000ull;
    w[13] = 0;
    w[14] = 0;
    w[15] = 96 * 8;
    rl_sha512_init(s);
    rl_sha512_compress(s, w);
    rl_ed25519_digest_bytes(k, s);
}

// k = SHA-512(R || A || M) for a message of any length, assembled byte by byte.
RL_HD void rl_ed25519_challenge_var(rl_u8 k[64], const rl_u8* r, const rl_u8* a, const rl_u8* m,
                                    rl_u64 mlen) {
    rl_u64 len = 64 + mlen, s[8];
    rl_u64 blocks = (len + 17 + 127) / 128;
    rl_sha512_init(s);
    for (rl_u64 blk = 0; blk < blocks; ++blk) {
        rl_u64 w[16];
        for (int j = 0; j < 16; ++j) {
            rl_u64 word = 0;
            for (int t = 0; t < 8; ++t) {
                rl_u64 q = blk * 128 + 8 * j + t;
                rl_u64 c = q < 32 ? r[q]
                           : q < 64 ? a[q - 32]
                           : q < len ? m[q - 64]
                           : (q == len ? 0x80u : 0u);
                word = (word << 8) | c;
            }
            w[j] = word;
        }
        if (blk == blocks - 1) rl_sha512_length(w, len);
        rl_sha512_compress(s, w);
    }
    rl_ed25519_digest_bytes(k, s);
}

// msg of mlen bytes; mlen < 0 means the fixed 32-byte layout (one SHA-512 block, word loads).
RL_HD bool rl_ed25519_verify_one(const rl_u8* key, const rl_u8* sig, const rl_u8* msg,
                                 rl_i64 mlen) {
    const rl_u32 l[8] = RL_ED_L;
    rl_u32 s[8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
        s[i] = (rl_u32)sig[32 + 4 * i] | ((rl_u32)sig[33 + 4 * i] << 8) |
               ((rl_u32)sig[34 + 4 * i] << 16) | ((rl_u32)sig[35 + 4 * i] << 24);
    if (!rl_sc_less(s, l)) return false;

    rl_ge a;
    if (!rl_ge_frombytes(&a, key)) return false;
    rl_fe_neg(&a.X, &a.X);
    rl_fe_neg(&a.T, &a.T);

    rl_u8 kbytes[64];
    rl_u32 k[8];
    if (mlen < 0)
        rl_ed25519_challenge(kbytes, sig, key, msg);
    else
        rl_ed25519_challenge_var(kbytes, sig, key, msg, (rl_u64)mlen);
    rl_sc_reduce512(k, kbytes);

    signed char es[64], ek[64];
    rl_sc_digits(es, s);
    rl_sc_digits(ek, k);

    rl_gc ta[9], tb[9];
    rl_ge_table(ta, &a);
    rl_ge b;
    const rl_fe bx = RL_ED_BX, by = RL_ED_BY;
    b.X = bx;
    b.Y = by;
    rl_fe_set(&b.Z, 1);
    rl_fe_mul(&b.T, &bx, &by);
    rl_ge_table(tb, &b);

    rl_ge acc;
    rl_ge_identity(&acc);
    for (int i = 63; i >= 0; --i) {
        if (i != 63) {
            rl_ge_double(&acc, &acc);
            rl_ge_double(&acc, &acc);
            rl_ge_double(&acc, &acc);
            rl_ge_double(&acc, &acc);
        }
        rl_ge_add_digit(&acc, tb, es[i]);
        rl_ge_add_digit(&acc, ta, ek[i]);
    }

    rl_u8 check[32];
    rl_ge_tobytes(check, &acc);
    rl_u32 diff = 0;
#pragma unroll
    for (int i = 0; i < 32; ++i) diff |= (rl_u32)(check[i] ^ sig[i]);
    return diff == 0;
}

// ---- per-thread body (thread i of n) --------------------------------------------------------

RL_HD void rl_ed25519_verify_body(rl_u64 i, const rl_u8* keys, const rl_u8* sigs,
                                  const rl_u8* msgs, rl_u64 n, rl_u8* ok) {
    if (i >= n) return;
    ok[i] = rl_ed25519_verify_one(keys + 32 * i, sigs + 64 * i, msgs + 32 * i, -1) ? 1 : 0;
}

RL_HD void rl_ed25519_verify_var_body(rl_u64 i, const rl_u8* keys, const rl_u8* sigs,
                                      const rl_u8* values, rl_u64 size, const rl_i64* offsets,
                                      rl_i64 base, rl_u64 n, rl_u8* ok, rl_i32* err) {
    if (i >= n) return;
    rl_u64 start, end;
    if (!rl_bounds(offsets, base, size, i, &start, &end)) {
        ok[i] = 0;
        *err = 1;
        return;
    }
    bool good = rl_ed25519_verify_one(keys + 32 * i, sigs + 64 * i, values + start,
                                      (rl_i64)(end - start));
    ok[i] = good ? 1 : 0;
}

#ifdef __CUDACC__
extern "C" __global__ void ed25519_verify(const rl_u8* keys, const rl_u8* sigs,
                                          const rl_u8* msgs, rl_u64 n, rl_u8* ok) {
    rl_ed25519_verify_body(RL_THREAD_INDEX, keys, sigs, msgs, n, ok);
}

extern "C" __global__ void ed25519_verify_var(const rl_u8* keys, const rl_u8* sigs,
                                              const rl_u8* values, rl_u64 size,
                                              const rl_i64* offsets, rl_i64 base, rl_u64 n,
                                              rl_u8* ok, rl_i32* err) {
    rl_ed25519_verify_var_body(RL_THREAD_INDEX, keys, sigs, values, size, offsets, base, n, ok,
                               err);
}
#endif  // __CUDACC__

#endif  // RL_ED25519_CU
