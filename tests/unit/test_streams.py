"""Direct streams between validators (``actors.streams``), without Ray: frames arrive in
order with their holds; every bad hello and an oversize frame is counted and closes the
stream; connections owing their hello are bounded, and a peer's newer stream replaces its
older one; a sender answers False (send by Ray) until its stream is up, after the peer goes
away, and when the peer stops reading, and connects again after the peer comes back."""

from __future__ import annotations

import asyncio
import math
import struct
from collections.abc import Awaitable, Callable
from typing import Any, cast

import pytest

from rayledger.actors import streams
from rayledger.actors.streams import HEADER, HELLO, MAGIC, Endpoint, StreamSender, StreamServer

HOST = "127.0.0.1"


class Peer:
    """A receiving validator (index 0 of 4, taking streams from 4 mempools too, senders 4-7):
    its frames and its counts."""

    def __init__(self) -> None:
        self.frames: list[tuple[int, bytes, float | None]] = []
        self.counts: dict[str, int] = {}
        self.server = StreamServer(0, 4, self._frame, self._count, mempools=4)

    def _frame(self, sender: int, payload: bytes, not_before: float | None) -> None:
        self.frames.append((sender, payload, not_before))

    def _count(self, reason: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1


async def until(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 30))


def as_sender(peer: Peer, sender: int) -> Endpoint:
    """The peer's endpoint with the token of ``sender`` (each sender has its own)."""
    return Endpoint.parse(peer.server.endpoint_for(sender))


def with_peer(body: Callable[[Peer, Endpoint], Awaitable[None]]) -> None:
    """Run ``body`` with a receiving peer listening; its server is closed afterwards, whatever
    happens."""

    async def main() -> None:
        peer = Peer()
        ep = await peer.server.start(HOST)
        try:
            await body(peer, ep)
        finally:
            peer.server.close()

    run(main)


async def connected(sender: StreamSender) -> None:
    assert not sender.send(b"before")  # not up yet: the caller sends by Ray
    await until(lambda: sender.connected)


def test_endpoint_parse_names_each_problem() -> None:
    token = b"t" * 32
    assert Endpoint.parse(("h", 5, token)) == Endpoint("h", 5, token)
    assert Endpoint.parse(["h", 5, token]).as_tuple() == ("h", 5, token)
    for bad, words in [
        ("h:5", "(host, port, token)"),
        (("h", 5), "(host, port, token)"),
        (("", 5, token), "host"),
        ((5, 5, token), "host"),
        (("h", 0, token), "port"),
        (("h", 65536, token), "port"),
        (("h", True, token), "port"),
        (("h", "5", token), "port"),
        (("h", 5, b"short"), "token"),
        (("h", 5, "t" * 32), "token"),
    ]:
        with pytest.raises(ValueError, match=words):
            Endpoint.parse(bad)


def test_frames_arrive_in_order_with_their_holds() -> None:
    async def body(peer: Peer, ep: Endpoint) -> None:
        sender = StreamSender(2, as_sender(peer, 2), peer._count)
        await connected(sender)
        payloads = [b"m%d" % i * (i + 1) for i in range(200)] + [b""]
        for i, p in enumerate(payloads):
            assert sender.send(p, 1000.5 + i if i % 2 else None)
        await until(lambda: len(peer.frames) == len(payloads))
        assert [f[1] for f in peer.frames] == payloads
        assert all(f[0] == 2 for f in peer.frames)
        assert [f[2] for f in peer.frames[:4]] == [None, 1001.5, None, 1003.5]
        assert sender.frames_out == len(payloads) and peer.server.frames_in == len(payloads)
        assert peer.server.open_streams == 1 and not peer.counts
        # Larger than any message of ours: refused by the sender, never written
        assert not sender.send(b"x" * (streams.MAX_FRAME + 1))
        sender.close()
        assert not sender.connected and not sender.send(b"after close")
        # A mempool's stream: its frames come with its sender number
        mempool = StreamSender(7, as_sender(peer, 7), peer._count)
        await connected(mempool)
        assert mempool.send(b"batch")
        await until(lambda: peer.frames[-1] == (7, b"batch", None))
        mempool.close()

    with_peer(body)


async def until_closed(reader: asyncio.StreamReader) -> bytes:
    """What the server sent before it closed the stream (a reset, which a close with bytes
    still unread may send, is a close too)."""
    try:
        return await asyncio.wait_for(reader.read(), 10)
    except ConnectionResetError:
        return b""


async def raw_stream(ep: Endpoint, data: bytes) -> bytes:
    """Open a stream, write ``data``, and read until the server closes it."""
    reader, writer = await asyncio.open_connection(ep.host, ep.port)
    writer.write(data)
    await writer.drain()
    try:
        return await until_closed(reader)
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("hello", "reason"),
    [
        (lambda tok: HELLO.pack(b"XXXX", tok, 1), "stream: bad_magic"),
        (lambda tok: HELLO.pack(MAGIC, b"\x00" * 32, 1), "stream: bad_token"),
        (lambda tok: HELLO.pack(MAGIC, tok, 8), "stream: bad_sender"),  # past the mempools
        (lambda tok: HELLO.pack(MAGIC, tok, 0), "stream: bad_sender"),  # the server's own
        (lambda tok: HELLO.pack(MAGIC, tok, 1)[:20], "stream: no_hello"),
    ],
)
def test_a_bad_hello_is_counted_and_closes_the_stream(
    hello: Callable[[bytes], bytes], reason: str
) -> None:
    async def body(peer: Peer, ep: Endpoint) -> None:
        frame = HEADER.pack(3, math.nan) + b"abc"
        # The server closes without a word (the short hello: once the client stops writing)
        reader, writer = await asyncio.open_connection(ep.host, ep.port)
        writer.write(hello(peer.server.token_for(1)) + frame)
        if reason == "stream: no_hello":
            writer.write_eof()
        assert await until_closed(reader) == b""
        writer.close()
        assert peer.counts == {reason: 1}
        assert peer.frames == [] and peer.server.frames_in == 0
        await until(lambda: peer.server.open_streams == 0)

    with_peer(body)


def test_a_silent_connection_is_closed_after_the_hello_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(streams, "HELLO_TIMEOUT_S", 0.2)

    async def body(peer: Peer, ep: Endpoint) -> None:
        assert await raw_stream(ep, b"") == b""
        assert peer.counts == {"stream: no_hello": 1}

    with_peer(body)


def test_an_oversize_frame_closes_the_stream_after_the_frames_before_it() -> None:
    async def body(peer: Peer, ep: Endpoint) -> None:
        good = HEADER.pack(2, 7.0) + b"ok"
        huge = struct.pack(">Id", streams.MAX_FRAME + 1, math.nan) + b"x" * 100
        after = HEADER.pack(5, math.nan) + b"later"
        assert (
            await raw_stream(
                ep, HELLO.pack(MAGIC, peer.server.token_for(3), 3) + good + huge + after
            )
            == b""
        )
        assert peer.frames == [(3, b"ok", 7.0)]
        assert peer.counts == {"stream: oversize": 1}

    with_peer(body)


def test_a_frame_whose_handling_fails_is_counted_and_the_stream_goes_on() -> None:
    async def body(peer: Peer, ep: Endpoint) -> None:
        seen = peer._frame

        def flaky(sender: int, payload: bytes, not_before: float | None) -> None:
            if payload == b"bad":
                raise RuntimeError("a bug in the handler")
            seen(sender, payload, not_before)

        peer.server.on_frame = flaky
        sender = StreamSender(3, as_sender(peer, 3), peer._count)
        await connected(sender)
        for p in (b"a", b"bad", b"b"):
            assert sender.send(p)
        await until(lambda: len(peer.frames) == 2)
        assert [f[1] for f in peer.frames] == [b"a", b"b"] and sender.connected
        assert peer.counts == {"stream: handler_error": 1}
        sender.close()

    with_peer(body)


def test_a_newer_stream_from_a_peer_replaces_its_older_one() -> None:
    async def body(peer: Peer, ep: Endpoint) -> None:
        old_r, old_w = await asyncio.open_connection(ep.host, ep.port)
        old_w.write(
            HELLO.pack(MAGIC, peer.server.token_for(2), 2) + HEADER.pack(3, math.nan) + b"old"
        )
        await until(lambda: len(peer.frames) == 1)
        new = StreamSender(2, as_sender(peer, 2), peer._count)
        await connected(new)
        assert await until_closed(old_r) == b""  # the server closed the older stream
        old_w.close()
        assert new.send(b"new")
        await until(lambda: len(peer.frames) == 2)
        assert peer.frames == [(2, b"old", None), (2, b"new", None)]
        await until(lambda: peer.server.open_streams == 1)
        assert peer.counts == {} and new.connected
        new.close()

    with_peer(body)


def test_connections_owing_their_hello_are_bounded_and_cannot_keep_a_peer_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(streams, "MAX_PENDING_HELLOS", 2)

    async def body(peer: Peer, ep: Endpoint) -> None:
        idle = [await asyncio.open_connection(ep.host, ep.port) for _ in range(2)]
        await until(lambda: peer.server.open_streams == 2)
        # Every slot is held by a connection that says nothing: a peer connecting still
        # gets in, and the oldest idle connection is closed to make room
        sender = StreamSender(3, as_sender(peer, 3), peer._count)
        await connected(sender)
        assert sender.send(b"first")
        await until(lambda: len(peer.frames) == 1)
        assert await asyncio.wait_for(idle[0][0].read(), 5) == b""
        await until(lambda: peer.counts.get("stream: no_hello") == 1)
        assert peer.counts == {"stream: hello_evicted": 1, "stream: no_hello": 1}
        # The other idle one is still there, and says hello late: taken
        idle[1][1].write(HELLO.pack(MAGIC, peer.server.token_for(2), 2) + HEADER.pack(1, math.nan))
        idle[1][1].write(b"x")
        await until(lambda: len(peer.frames) == 2)
        assert sorted(f[0] for f in peer.frames) == [2, 3]
        for _, w in idle:
            w.close()
        sender.close()

    with_peer(body)


def test_a_peer_that_goes_away_is_noticed_and_reconnected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(streams, "RETRY_S", 0.05)

    async def body(peer: Peer, ep: Endpoint) -> None:
        sender = StreamSender(1, as_sender(peer, 1), peer._count)
        await connected(sender)
        assert sender.send(b"one")
        await until(lambda: len(peer.frames) == 1)
        # The receiving end closes its streams (as a crashed process's do); it still listens
        for w in list(peer.server._writers):
            w.close()
        await until(lambda: not sender.connected)
        # By Ray meanwhile; sends start a new stream (at most every RETRY_S)
        await until(lambda: sender.send(b"two"))
        await until(lambda: len(peer.frames) == 2)
        assert [f[1] for f in peer.frames] == [b"one", b"two"]
        # A peer gone for good: refused connections, every message by Ray
        peer.server.close()
        await until(lambda: not sender.connected)
        for _ in range(5):
            assert not sender.send(b"gone")
            await asyncio.sleep(0.06)
        assert not sender.connected
        sender.close()

    with_peer(body)


def test_a_peer_that_stops_reading_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streams, "MAX_BUFFERED", 64 << 10)
    monkeypatch.setattr(streams, "RETRY_S", 3600)  # no second stream in this test
    counts: dict[str, int] = {}
    held: list[Any] = []

    async def body() -> None:
        async def never_reads(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            held.append(w)
            cast(asyncio.Transport, w.transport).pause_reading()

        server = await asyncio.start_server(never_reads, HOST, 0)
        port = server.sockets[0].getsockname()[1]

        def count(reason: str) -> None:
            counts[reason] = counts.get(reason, 0) + 1

        sender = StreamSender(1, Endpoint(HOST, port, b"k" * 32), count)
        await connected(sender)
        sent = 0
        while sender.send(b"y" * 65536):
            sent += 1
            assert sent < 10_000, "the sender never noticed"
        assert counts == {"stream: peer_not_reading": 1}
        assert not sender.connected and not sender.send(b"z")
        server.close()
        for w in held:
            w.close()

    run(body)


def test_a_token_opens_a_stream_only_as_the_sender_it_was_made_for() -> None:
    """Every peer and mempool holds a token for this validator: one that named another's
    number in its hello used to be taken on its word (it could replace the other's stream, or
    send batch frames as another institution's mempool)."""

    async def body(peer: Peer, ep: Endpoint) -> None:
        frame = HEADER.pack(3, math.nan) + b"abc"
        two = peer.server.token_for(2)
        assert two != peer.server.token_for(3) and two != ep.token
        assert await raw_stream(ep, HELLO.pack(MAGIC, two, 3) + frame) == b""
        assert await raw_stream(ep, HELLO.pack(MAGIC, ep.token, 2) + frame) == b""
        assert peer.counts == {"stream: bad_token": 2} and peer.frames == []
        sender = StreamSender(2, as_sender(peer, 2), peer._count)
        await connected(sender)
        assert sender.send(b"ok")
        await until(lambda: peer.frames == [(2, b"ok", None)])
        sender.close()

    with_peer(body)
