"""Direct TCP streams into a validator: consensus messages from its peers, sealed batches from
the mempools.

A Ray actor call between two processes costs this 2-core machine 3.2-3.4 ms of CPU in all at
160 calls/s (sender 1.2, receiver 2.1: thread wake-ups in Ray's core workers and the reply
every call carries), where a frame on a TCP stream between the same two async actors costs
0.36-0.39 ms (script /tmp/exp/callcost.py, 2026-12-03). A 1,000-row batch handed to four
actors costs 4-6 ms of the machine's CPU per receiver by object reference and 5.5-7.5 ms as a
call's argument, against about 1 ms on a stream (script /tmp/exp/datacost.py, same day). A
busy network sends some six consensus messages a round, five rounds a second, and seals a few
batches a second for each of four validators. So validators keep one stream to each peer for
proposals, votes and timeouts, and each mempool one to each validator for its sealed batches;
Ray stays the control plane (placement, restarts, the object store, blocks to storage shards,
batch fetches), and the fallback: a frame sent while a stream is not up (before it connects,
after it breaks) goes as a Ray call, as before.

Wire form. The connecting side opens with a hello: ``b"RLS1"``, its 32-byte token, the
sender's number (u32): a validator's index, or ``n + i`` for mempool ``i`` of a network of
``n`` validators. The token is the receiving validator's for that sender alone (an HMAC of the
sender's number under a secret the receiver makes when it starts) and reaches its peers and
the mempools only through Ray (``Validator.set_peer`` and its answer,
``Mempool.set_validator``), so a process that can reach the port but is not one of them cannot
open a stream; consensus messages carry their authors' signatures, checked by the core as
ever, and batches are checked as those read by reference are. Then frames: payload length
(u32), the wall-clock time before which the receiver must not handle the frame (f64, NaN for
none: the emulated WAN's hold), the payload (``consensus.wire`` bytes from a validator,
``mempool.encode_batch_frame`` from a mempool). A bad hello or an oversize frame is counted
and the stream closed; a payload that does not parse is counted by the receiver, as on the
Ray path.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

MAGIC = b"RLS1"
HELLO = struct.Struct(">4s32sI")
HEADER = struct.Struct(">Id")
# Consensus messages carry batch digests, not transactions: a proposal of 64 batches with its
# QC is a few KB; a sealed batch of the largest genesis default (65,536 rows of ~200 bytes) is
# about 13 MB. Anything above this is not a frame of ours.
MAX_FRAME = 32 << 20
# A peer that stops reading (stopped, overloaded) makes the sender buffer; past this the
# stream is dropped and messages go by Ray, which queues them its own way.
MAX_BUFFERED = 8 << 20
HELLO_TIMEOUT_S = 5.0
# Connections still owing their hello, at most: a new one past this closes the oldest. A
# process that can reach the port but holds no token cannot pile up idle connections, nor
# keep a peer out by holding them all (a peer sends its hello with its first bytes, so its
# connection is the newest while it waits; refusing new ones instead, 13 idle connections a
# second, each held HELLO_TIMEOUT_S, kept every peer out)
MAX_PENDING_HELLOS = 64
CONNECT_TIMEOUT_S = 2.0
# A peer that cannot be reached is tried again at most this often (messages go by Ray meanwhile)
RETRY_S = 1.0


@dataclass(frozen=True)
class Endpoint:
    """Where a validator accepts streams, and the token a peer must open with."""

    host: str
    port: int
    token: bytes

    def as_tuple(self) -> tuple[str, int, bytes]:
        return (self.host, self.port, self.token)

    @classmethod
    def parse(cls, value: object) -> Endpoint:
        """An endpoint from what came over Ray, or ``ValueError`` naming the problem."""
        if not isinstance(value, (tuple, list)) or len(value) != 3:
            raise ValueError("endpoint must be (host, port, token)")
        host, port, token = value
        if not isinstance(host, str) or not host:
            raise ValueError("endpoint host must be a non-empty string")
        if type(port) is not int or not 0 < port < 65536:
            raise ValueError("endpoint port must be an int in 1..65535")
        if not isinstance(token, bytes) or len(token) != 32:
            raise ValueError("endpoint token must be 32 bytes")
        return cls(host, port, token)


def parse_endpoint(value: object, index: int, count: Callable[[str], None]) -> Endpoint | None:
    """The endpoint validator ``index`` sent over Ray, or None once a malformed one is logged
    and counted (``stream: bad_endpoint``): the caller then changes nothing."""
    try:
        return Endpoint.parse(value)
    except ValueError as exc:
        log.warning("validator %d sent a bad stream endpoint: %s", index, exc)
        count("stream: bad_endpoint")
        return None


OnFrame = Callable[[int, bytes, float | None], None]


class StreamServer:
    """Accepts peers' streams and hands every frame to ``on_frame(sender, payload,
    not_before)`` on the event loop, in the order each peer sent them. Senders are the other
    validators (``0..n-1`` but ``own_index``) and ``mempools`` mempools (``n..n+mempools-1``)."""

    def __init__(
        self,
        own_index: int,
        n: int,
        on_frame: OnFrame,
        count: Callable[[str], None],
        mempools: int = 0,
    ):
        self.own_index = own_index
        self.n = n
        self.mempools = mempools
        self.on_frame = on_frame
        self.count = count
        self.token = os.urandom(32)
        self.frames_in = 0
        self.endpoint: Endpoint | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        # Connections that have not sent their hello yet, oldest first
        self._pending: dict[asyncio.StreamWriter, None] = {}
        # Each peer's current stream: a newer one from the same peer (it restarted, or
        # reconnected before this side saw the old one end) replaces it
        self._by_sender: dict[int, asyncio.StreamWriter] = {}

    async def start(self, host: str) -> Endpoint:
        self._server = await asyncio.start_server(self._serve, host, 0)
        port = self._server.sockets[0].getsockname()[1]
        self.endpoint = Endpoint(host, port, self.token)
        return self.endpoint

    def token_for(self, sender: int) -> bytes:
        """The token sender ``sender`` (a validator's index, or ``n + i`` for mempool ``i``)
        opens its stream with: its own, derived from this server's secret, so that one peer's
        token cannot open a stream as another (the hello's sender number was taken on its
        word, and a peer could replace another's stream, or feed this validator batch frames
        as another institution's mempool)."""
        return hmac.digest(self.token, b"rayledger/stream-sender/v1" + struct.pack(">I", sender),
                           "sha256")  # fmt: skip

    def endpoint_for(self, sender: int) -> tuple[str, int, bytes] | None:
        """Where to stream to this server, with ``sender``'s own token (None: not started)."""
        if self.endpoint is None:
            return None
        return (self.endpoint.host, self.endpoint.port, self.token_for(sender))

    @property
    def open_streams(self) -> int:
        return len(self._writers)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._pending) >= MAX_PENDING_HELLOS:
            oldest = next(iter(self._pending))
            del self._pending[oldest]
            oldest.close()
            self.count("stream: hello_evicted")
        self._writers.add(writer)
        sender = -1
        try:
            self._pending[writer] = None
            try:
                hello = await asyncio.wait_for(reader.readexactly(HELLO.size), HELLO_TIMEOUT_S)
            except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                self.count("stream: no_hello")
                return
            finally:
                self._pending.pop(writer, None)
            magic, token, sender = HELLO.unpack(hello)
            if magic != MAGIC:
                self.count("stream: bad_magic")
                return
            if sender == self.own_index or sender >= self.n + self.mempools:
                self.count("stream: bad_sender")
                return
            if not hmac.compare_digest(token, self.token_for(sender)):
                self.count("stream: bad_token")
                return
            older = self._by_sender.get(sender)
            self._by_sender[sender] = writer
            if older is not None:
                older.close()
            while True:
                try:
                    size, not_before = HEADER.unpack(await reader.readexactly(HEADER.size))
                    if size > MAX_FRAME:
                        self.count("stream: oversize")
                        return
                    payload = await reader.readexactly(size)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return  # the peer went away (a crash, a restart): it reconnects
                self.frames_in += 1
                try:
                    self.on_frame(sender, payload, None if math.isnan(not_before) else not_before)
                except Exception:  # a fault in handling one frame is not the stream's
                    log.exception("stream from sender %d: handling a frame failed", sender)
                    self.count("stream: handler_error")
        finally:
            self._writers.discard(writer)
            if self._by_sender.get(sender) is writer:
                del self._by_sender[sender]
            writer.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()


class StreamSender:
    """One peer's outbound stream. It connects in the background on first use and after it
    breaks (at most every ``RETRY_S``); until it is up, :meth:`send` answers False and the
    caller sends by Ray instead."""

    def __init__(self, own_index: int, endpoint: Endpoint, count: Callable[[str], None]):
        self.own_index = own_index
        self.endpoint = endpoint
        self.count = count
        self.frames_out = 0
        self._writer: asyncio.StreamWriter | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._last_try = -math.inf
        self._closed = False

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    def start(self) -> None:
        """Connect now rather than on the first send (which would then go another way)."""
        self._maybe_connect()

    def send(self, payload: bytes, not_before: float | None = None) -> bool:
        """Queue one frame; False if the stream is not up (the caller sends another way)."""
        if len(payload) > MAX_FRAME:
            return False
        writer = self._writer
        if writer is None or writer.is_closing():
            self._drop()
            self._maybe_connect()
            return False
        if writer.transport.get_write_buffer_size() > MAX_BUFFERED:
            self.count("stream: peer_not_reading")
            self._drop()
            return False
        hold = math.nan if not_before is None else not_before
        writer.write(HEADER.pack(len(payload), hold) + payload)
        self.frames_out += 1
        return True

    def _maybe_connect(self) -> None:
        if self._closed or self._connecting is not None:
            return
        now = time.monotonic()
        if now - self._last_try < RETRY_S:
            return
        self._last_try = now
        self._connecting = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        ep = self.endpoint
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(ep.host, ep.port), CONNECT_TIMEOUT_S
            )
        except (OSError, TimeoutError) as exc:
            log.debug("stream to %s:%d not up: %s", ep.host, ep.port, exc)
            return
        finally:
            self._connecting = None
        if self._closed:
            writer.close()
            return
        writer.write(HELLO.pack(MAGIC, ep.token, self.own_index))
        self._writer = writer
        self._watch = asyncio.get_running_loop().create_task(self._watch_eof(reader, writer))

    async def _watch_eof(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The receiver never writes: end of stream (or an error) means it closed or died."""
        with contextlib.suppress(ConnectionError, OSError):
            await reader.read(1)
        if self._writer is writer:
            self._drop()

    def _drop(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
        watch, self._watch = self._watch, None
        if watch is not None and watch is not asyncio.current_task():
            watch.cancel()

    def close(self) -> None:
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        self._drop()
