"""A stand-in for the slice of CuPy that kernels/_cuda.py uses, running the host-compiled kernels.

"Device" arrays are numpy arrays; copies are memmoves; a kernel launch checks every argument
against the kernel's C signature parsed from kernels/cuda/*.cu (pointer element types, and numpy
scalars of exactly the C integer types, which is what RawKernel needs and does not check), checks
that the grid covers every row, then runs the harness's ``h_<kernel>``. This exercises the
wrapper's chunking, staging, offsets and argument order without a GPU; it says nothing about
timing or the device-only code paths.
"""

from __future__ import annotations

import ctypes
import re
import types
from typing import Any

import numpy as np

_POINTEE = {"rl_u8": np.uint8, "rl_i32": np.int32, "rl_i64": np.int64}
_SCALAR = {"rl_u64": (np.uint64, ctypes.c_uint64), "rl_i64": (np.int64, ctypes.c_int64)}
# Parameter holding the row count, and rows per thread, of each kernel.
_ROWS = {"merkle_level": ("m", 2)}


class FakeArray:
    def __init__(self, a: np.ndarray) -> None:
        self.a = a

    @property
    def size(self) -> int:
        return int(self.a.size)

    @property
    def dtype(self) -> np.dtype[Any]:
        return self.a.dtype

    @property
    def data(self) -> FakePointer:
        return FakePointer(self)

    def __getitem__(self, key: Any) -> FakeArray:
        return FakeArray(self.a[key])

    def view(self, dtype: Any) -> FakeArray:
        return FakeArray(self.a.view(dtype))

    def reshape(self, *shape: Any) -> FakeArray:
        return FakeArray(self.a.reshape(*shape))

    def fill(self, value: int) -> None:
        self.a.fill(value)

    def sum(self) -> FakeArray:
        return FakeArray(np.array(self.a.sum()))

    def get(self) -> np.ndarray:
        return self.a.copy()


class FakePointer:
    def __init__(self, arr: FakeArray) -> None:
        self.arr = arr

    def copy_from_host_async(self, src: ctypes.c_void_p, size: int, stream: Any) -> None:
        assert isinstance(stream, FakeStream)
        assert 0 <= size <= self.arr.a.nbytes, (size, self.arr.a.nbytes)
        if size:
            ctypes.memmove(self.arr.a.ctypes.data, src.value, size)

    def copy_to_host_async(self, dst: ctypes.c_void_p, size: int, stream: Any) -> None:
        assert isinstance(stream, FakeStream)
        assert 0 <= size <= self.arr.a.nbytes, (size, self.arr.a.nbytes)
        if size:
            ctypes.memmove(dst.value, self.arr.a.ctypes.data, size)


class FakeEvent:
    def synchronize(self) -> None:
        pass


class FakeStream:
    current: list[FakeStream | None] = [None]

    def __init__(self, non_blocking: bool = False) -> None:
        self.non_blocking = non_blocking

    def __enter__(self) -> FakeStream:
        self.current.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.current.pop()

    def synchronize(self) -> None:
        pass

    def record(self) -> FakeEvent:
        return FakeEvent()


def _signatures(code: str) -> dict[str, list[tuple[str, str, bool]]]:
    sigs: dict[str, list[tuple[str, str, bool]]] = {}
    for name, params in re.findall(r'extern "C" __global__ void (\w+)\(([^)]*)\)', code):
        parsed = []
        for param in params.split(","):
            m = re.fullmatch(r"\s*(?:const\s+)?(\w+)\s*(\*?)\s*(\w+)\s*", param)
            assert m, param
            parsed.append((m.group(1), m.group(3), m.group(2) == "*"))
        sigs[name] = parsed
    return sigs


class FakeKernel:
    def __init__(self, name: str, params: list[tuple[str, str, bool]], lib: ctypes.CDLL) -> None:
        self.name, self.params, self.fn = name, params, getattr(lib, f"h_{name}")
        self.launches = 0
        self.max_threads_per_block = 1024
        self.blocks: list[int] = []

    def __call__(
        self, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...]
    ) -> None:
        assert FakeStream.current[-1] is not None, f"{self.name} launched outside a stream"
        assert len(args) == len(self.params), f"{self.name}: {len(args)} args"
        cargs: list[Any] = []
        values: dict[str, int] = {}
        for arg, (ctype, pname, pointer) in zip(args, self.params, strict=True):
            if pointer:
                assert isinstance(arg, FakeArray), f"{self.name}.{pname}: {type(arg)}"
                want = _POINTEE[ctype]
                assert arg.dtype == want, f"{self.name}.{pname}: {arg.dtype} for {ctype}*"
                assert arg.a.flags.c_contiguous
                cargs.append(ctypes.c_void_p(arg.a.ctypes.data))
            else:
                np_type, c_type = _SCALAR[ctype]
                assert type(arg) is np_type, f"{self.name}.{pname}: {type(arg)} for {ctype}"
                values[pname] = int(arg)
                cargs.append(c_type(int(arg)))
        rows_param, per_thread = _ROWS.get(self.name, ("n", 1))
        needed = -(-values[rows_param] // per_thread)
        assert grid[0] * block[0] >= needed, f"{self.name}: grid covers {grid[0] * block[0]}"
        assert 0 < block[0] <= self.max_threads_per_block, f"{self.name}: block {block[0]}"
        self.launches += 1
        self.blocks.append(block[0])
        self.fn(*cargs)


class FakeModule:
    def __init__(self, lib: ctypes.CDLL, code: str) -> None:
        self.kernels = {
            name: FakeKernel(name, params, lib) for name, params in _signatures(code).items()
        }

    def get_function(self, name: str) -> FakeKernel:
        return self.kernels[name]


def make_cupy(lib: ctypes.CDLL) -> tuple[types.ModuleType, types.ModuleType]:
    """Fake ``cupy`` and ``cupyx`` modules whose kernels run in ``lib`` (the host harness)."""
    cp = types.ModuleType("cupy")
    cp.uint8, cp.int32, cp.int64 = np.uint8, np.int32, np.int64  # type: ignore[attr-defined]
    cp.empty = lambda shape, dtype=np.float64: FakeArray(np.empty(shape, dtype))  # type: ignore[attr-defined]
    cp.zeros = lambda shape, dtype=np.float64: FakeArray(np.zeros(shape, dtype))  # type: ignore[attr-defined]
    cp.asarray = lambda a: FakeArray(np.array(a))  # type: ignore[attr-defined]
    cp.RawModule = lambda code, **_: FakeModule(lib, code)  # type: ignore[attr-defined]
    cp.cuda = types.SimpleNamespace(  # type: ignore[attr-defined]
        Stream=FakeStream,
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 1),
    )
    cupyx = types.ModuleType("cupyx")
    cupyx.empty_pinned = lambda shape, dtype: np.empty(shape, dtype)  # type: ignore[attr-defined]
    return cp, cupyx
