"""The CPU hashing loop, and a worker process that runs it on batches in shared memory.

``hashlib`` holds the GIL for inputs under 2 KiB, so threads cannot spread small messages over
cores; processes can. This file imports only the standard library so that a worker starts in a
few milliseconds as ``python -I -S _hashproc.py FD`` (FD: its end of a Unix socket pair).

Wire protocol, one request at a time: the parent sends a 64-byte header (``_REQUEST``), with two
file descriptors (input and output memfd regions) whenever it has replaced them. The input region
holds ``offsets int64[n + 1]`` (only when there is a tail) then ``head bytes[n * width]`` then the
tail bytes; the worker writes ``n`` digests to the output region and answers ``b"k"``, or ``b"e"``
and a message when anything failed.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import socket
import struct
import sys
from collections.abc import Callable
from typing import Any

ALGORITHMS: dict[str, Callable[..., Any]] = {"sha256": hashlib.sha256, "sha512": hashlib.sha512}
ALGORITHM_CODES = ("sha256", "sha512")
DIGEST_SIZES = {"sha256": 32, "sha512": 64}

# algorithm code, rows, head width, has tail, tail bytes, input capacity, output capacity, spare
_REQUEST = struct.Struct("<8q")


def hash_messages(algorithm: str, messages: list[bytes]) -> bytes:
    """Digests of ``messages``, joined."""
    sha = ALGORITHMS[algorithm]
    return b"".join([sha(m).digest() for m in messages])


def hash_rows(
    algorithm: str,
    head: bytes | memoryview,
    width: int,
    n: int,
    tail: bytes | memoryview | None = None,
    bounds: list[int] | None = None,
) -> bytes:
    """Digests of ``head[i * width:(i + 1) * width] || tail[bounds[i]:bounds[i + 1]]``, joined.

    ``head`` must be ``bytes`` when there is both a head and a tail (the rows are concatenated).
    """
    sha = ALGORITHMS[algorithm]
    if tail is None or bounds is None:
        if width == 0:
            return sha(b"").digest() * n
        return b"".join([sha(head[i : i + width]).digest() for i in range(0, n * width, width)])
    if width == 0:
        return b"".join([sha(tail[a:b]).digest() for a, b in zip(bounds, bounds[1:], strict=False)])
    if not isinstance(head, bytes):
        raise TypeError("head must be bytes when rows have a tail")
    return b"".join(
        [
            sha(head[i : i + width] + tail[a:b]).digest()
            for i, a, b in zip(range(0, n * width, width), bounds, bounds[1:], strict=False)
        ]
    )


def _serve_one(request: bytes, inp: mmap.mmap, out: mmap.mmap) -> None:
    code, n, width, has_tail, tail_bytes, _, _, _ = _REQUEST.unpack(request)
    algorithm = ALGORITHM_CODES[code]
    view = memoryview(inp)
    try:
        pos = 0
        bounds = None
        if has_tail:
            with view[: (n + 1) * 8].cast("q") as offsets:
                bounds = offsets.tolist()
            pos = (n + 1) * 8
        head = bytes(view[pos : pos + n * width])
        pos += n * width
        tail = view[pos : pos + tail_bytes] if has_tail else None
        digests = hash_rows(algorithm, head, width, n, tail, bounds)
        out[: len(digests)] = digests
        if tail is not None:
            tail.release()
    finally:
        view.release()


def serve(sock: socket.socket) -> None:
    """Answer requests until the parent closes its end of the socket."""
    inp: mmap.mmap | None = None
    out: mmap.mmap | None = None
    while True:
        request, fds, _, _ = socket.recv_fds(sock, _REQUEST.size, 2)
        if len(request) != _REQUEST.size:
            return
        if fds:
            in_cap, out_cap = _REQUEST.unpack(request)[5:7]
            # Old mappings go with their last reference.
            inp, out = mmap.mmap(fds[0], in_cap), mmap.mmap(fds[1], out_cap)
            for fd in fds:
                os.close(fd)
        try:
            if inp is None or out is None:
                raise RuntimeError("no shared regions received")
            _serve_one(request, inp, out)
        except Exception as exc:  # report to the parent, which hashes the rows itself
            sock.sendall(b"e" + repr(exc).encode()[:200])
            continue
        sock.sendall(b"k")


if __name__ == "__main__":
    serve(socket.socket(fileno=int(sys.argv[1])))
