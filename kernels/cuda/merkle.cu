// RFC 6962 Merkle trees on the device, one launch per level, no level copied back in between.
//
//   merkle_leaves  out[i] = SHA-256(0x00 || leaves[i])                 (32-byte leaves)
//   merkle_level   parents[j] = SHA-256(0x01 || children[2j] || children[2j+1]), and an
//                  unpaired last child is carried up unchanged (the RFC's largest-power-of-two
//                  split); m children give (m + 1) / 2 parents.
// _cuda.py keeps every level in one device buffer (level h + 1 right after level h), so
// merkle_levels copies the whole tree back once and merkle_root only its last 32 bytes.
// Both messages have fixed shapes, so the blocks are assembled from whole words: leaf and
// child rows must be 4-byte aligned (rows of a device allocation are).

#ifndef RL_MERKLE_CU
#define RL_MERKLE_CU

#ifndef RL_SHA256_CU
#include "sha256.cu"
#endif

RL_HD void rl_merkle_load8(const rl_u8* p, rl_u32 x[8]) {
#pragma unroll
    for (int j = 0; j < 8; ++j) x[j] = rl_load_be32_aligned(p + 4 * j);
}

// SHA-256(0x00 || leaf): 33 bytes, one block. Word j holds leaf bytes 4j-1 .. 4j+2.
RL_HD void rl_merkle_leaf_hash(const rl_u8* leaf, rl_u8* out) {
    rl_u32 x[8], w[16], s[8];
    rl_merkle_load8(leaf, x);
    w[0] = x[0] >> 8;
#pragma unroll
    for (int j = 1; j < 8; ++j) w[j] = (x[j - 1] << 24) | (x[j] >> 8);
    w[8] = (x[7] << 24) | 0x00800000u;
#pragma unroll
    for (int j = 9; j < 15; ++j) w[j] = 0;
    w[15] = 33 * 8;
    rl_sha256_init(s);
    rl_sha256_compress(s, w);
    rl_sha256_store(out, s);
}

// SHA-256(0x01 || left || right): 65 bytes, two blocks.
RL_HD void rl_merkle_node_hash(const rl_u8* left, const rl_u8* right, rl_u8* out) {
    rl_u32 l[8], r[8], w[16], s[8];
    rl_merkle_load8(left, l);
    rl_merkle_load8(right, r);
    w[0] = 0x01000000u | (l[0] >> 8);
#pragma unroll
    for (int j = 1; j < 8; ++j) w[j] = (l[j - 1] << 24) | (l[j] >> 8);
    w[8] = (l[7] << 24) | (r[0] >> 8);
#pragma unroll
    for (int j = 9; j < 16; ++j) w[j] = (r[j - 9] << 24) | (r[j - 8] >> 8);
    rl_sha256_init(s);
    rl_sha256_compress(s, w);
    w[0] = (r[7] << 24) | 0x00800000u;
#pragma unroll
    for (int j = 1; j < 15; ++j) w[j] = 0;
    w[15] = 65 * 8;
    rl_sha256_compress(s, w);
    rl_sha256_store(out, s);
}

// ---- per-thread bodies (thread i of n) ----------------------------------------------------

RL_HD void rl_merkle_leaves_body(rl_u64 i, const rl_u8* leaves, rl_u64 n, rl_u8* out) {
    if (i >= n) return;
    rl_merkle_leaf_hash(leaves + 32 * i, out + 32 * i);
}

// Parent j of a level with m children.
RL_HD void rl_merkle_level_body(rl_u64 j, const rl_u8* children, rl_u64 m, rl_u8* parents) {
    if (j >= (m + 1) / 2) return;
    const rl_u8* left = children + 64 * j;
    rl_u8* out = parents + 32 * j;
    if (2 * j + 1 < m) {
        rl_merkle_node_hash(left, left + 32, out);
    } else {
#pragma unroll
        for (int t = 0; t < 8; ++t) rl_store_be32_aligned(out + 4 * t, rl_load_be32_aligned(left + 4 * t));
    }
}

#ifdef __CUDACC__
extern "C" __global__ void merkle_leaves(const rl_u8* leaves, rl_u64 n, rl_u8* out) {
    rl_merkle_leaves_body(RL_THREAD_INDEX, leaves, n, out);
}

extern "C" __global__ void merkle_level(const rl_u8* children, rl_u64 m, rl_u8* parents) {
    rl_merkle_level_body(RL_THREAD_INDEX, children, m, parents);
}
#endif  // __CUDACC__

#endif  // RL_MERKLE_CU
