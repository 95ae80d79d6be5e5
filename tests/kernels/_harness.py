"""Builds the host harness: the CUDA kernels' per-thread bodies compiled for the CPU.

Each exported ``h_<kernel>`` takes exactly the parameters of the ``<kernel>`` it stands for and
loops the body over the rows (plus three surplus "threads" past the end, which must do nothing).
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from rayledger.kernels import _cuda

HARNESS = r"""
#include "sha256.cu"
#include "sha512.cu"
#include "merkle.cu"
#include "ed25519.cu"

#define RL_GRID(n) for (rl_u64 i = 0; i < (rl_u64)(n) + 3; ++i)

extern "C" {
void h_sha256_var(const rl_u8* v, rl_u64 size, const rl_i64* o, rl_i64 base, rl_u64 n,
                  rl_u8* out, rl_i32* err) {
    RL_GRID(n) rl_sha256_var_body(i, v, size, o, base, n, out, err);
}
void h_sha256_var32(const rl_u8* v, rl_u64 size, const rl_i32* o, rl_i64 base, rl_u64 n,
                    rl_u8* out, rl_i32* err) {
    RL_GRID(n) rl_sha256_var32_body(i, v, size, o, base, n, out, err);
}
void h_sha256_fixed(const rl_u8* v, rl_u64 width, rl_u64 n, rl_u8* out) {
    RL_GRID(n) rl_sha256_fixed_body(i, v, width, n, out);
}
void h_sha256_rows(const rl_u8* head, rl_u64 k, const rl_u8* v, rl_u64 size, const rl_i64* o,
                   rl_i64 base, rl_u64 n, rl_u8* out, rl_i32* err) {
    RL_GRID(n) rl_sha256_rows_body(i, head, k, v, size, o, base, n, out, err);
}
void h_sha256_rows32(const rl_u8* head, rl_u64 k, const rl_u8* v, rl_u64 size,
                     const rl_i32* o, rl_i64 base, rl_u64 n, rl_u8* out, rl_i32* err) {
    RL_GRID(n) rl_sha256_rows32_body(i, head, k, v, size, o, base, n, out, err);
}
void h_sha512_var(const rl_u8* v, rl_u64 size, const rl_i64* o, rl_i64 base, rl_u64 n,
                  rl_u8* out, rl_i32* err) {
    RL_GRID(n) rl_sha512_var_body(i, v, size, o, base, n, out, err);
}
void h_sha512_var32(const rl_u8* v, rl_u64 size, const rl_i32* o, rl_i64 base, rl_u64 n,
                    rl_u8* out, rl_i32* err) {
    RL_GRID(n) rl_sha512_var32_body(i, v, size, o, base, n, out, err);
}
void h_sha512_fixed(const rl_u8* v, rl_u64 width, rl_u64 n, rl_u8* out) {
    RL_GRID(n) rl_sha512_fixed_body(i, v, width, n, out);
}
void h_merkle_leaves(const rl_u8* leaves, rl_u64 n, rl_u8* out) {
    RL_GRID(n) rl_merkle_leaves_body(i, leaves, n, out);
}
void h_merkle_level(const rl_u8* children, rl_u64 m, rl_u8* parents) {
    RL_GRID((m + 1) / 2) rl_merkle_level_body(i, children, m, parents);
}
void h_fe_op(int op, const rl_u32* a, const rl_u32* b, rl_u32* out, rl_u64 n) {
    for (rl_u64 i = 0; i < n; ++i) {
        const rl_fe* x = (const rl_fe*)(a + 8 * i);
        const rl_fe* y = (const rl_fe*)(b + 8 * i);
        rl_fe* r = (rl_fe*)(out + 8 * i);
        switch (op) {
            case 0: rl_fe_add(r, x, y); break;
            case 1: rl_fe_sub(r, x, y); break;
            case 2: rl_fe_mul(r, x, y); break;
            case 3: rl_fe_sq(r, x); break;
            case 4: rl_fe_canonical(r, x); break;
            case 5: rl_fe_invert(r, x); break;
            case 6: rl_fe_pow22523(r, x); break;
            default: rl_sc_reduce512(r->v, (const rl_u8*)(a + 16 * i)); break;
        }
    }
}
void h_ed25519_verify_var(const rl_u8* keys, const rl_u8* sigs, const rl_u8* v, rl_u64 size,
                          const rl_i64* o, rl_i64 base, rl_u64 n, rl_u8* ok, rl_i32* err) {
    RL_GRID(n) rl_ed25519_verify_var_body(i, keys, sigs, v, size, o, base, n, ok, err);
}
void h_ed25519_verify(const rl_u8* keys, const rl_u8* sigs, const rl_u8* msgs, rl_u64 n,
                      rl_u8* ok) {
    RL_GRID(n) rl_ed25519_verify_body(i, keys, sigs, msgs, n, ok);
}
}
"""


def build_harness(out_dir: Path) -> ctypes.CDLL:
    """Compile the harness into ``out_dir`` and load it; skip when no compiler is present."""
    source = out_dir / "harness.cu"
    source.write_text(HARNESS)
    lib = out_dir / "libharness.so"
    if shutil.which("g++"):
        cmd = [
            "g++",
            "-x",
            "c++",
            "-O1",
            "-Wall",
            "-Wno-unknown-pragmas",
            "-Werror",
            "-shared",
            "-fPIC",
        ]
    elif shutil.which("nvcc"):
        cmd = [
            "nvcc",
            "-arch=sm_90",
            "-O1",
            "-shared",
            "-Xcompiler",
            "-fPIC,-Wall,-Wno-unknown-pragmas",
        ]
    else:
        pytest.skip("no host compiler (g++ or nvcc) on PATH")
    done = subprocess.run(
        [*cmd, f"-I{_cuda.CUDA_DIR}", str(source), "-o", str(lib)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    return ctypes.CDLL(str(lib))
