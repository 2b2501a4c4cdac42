"""Tests of licd_client.connection: hello, ids, in-order pipelining, broken peers."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from licd_client import errors, messages, wire
from licd_client.connection import Connection, format_address, parse_address, parse_servers
from tests.fakelicd import LICENCE, FakeLicd

Handler = Callable[["Peer"], Awaitable[None]]


class Peer:
    """The server side of one raw connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = wire.FrameDecoder(wire.MAX_FRAME_AFTER_HELLO)

    async def recv(self) -> dict[str, Any]:
        while (frame := self.decoder.next_frame()) is None:
            data = await self.reader.read(65536)
            assert data, "client closed"
            self.decoder.feed(data)
        return frame

    def send(self, frame: dict[str, Any]) -> None:
        self.writer.write(wire.encode(frame))

    async def hello(self, supported: tuple[int, ...] = messages.PROTOCOLS) -> int:
        """Answer hello as a daemon serving `supported` would; the version settled on."""
        req = await self.recv()
        assert req["op"] == "hello"
        while req["protocol"] not in supported:
            refusal = errors.UnsupportedProtocol(detail={"supported": list(supported)})
            self.send(messages.error_frame(req["id"], refusal))
            req = await self.recv()
            assert req["op"] == "hello"
        self.send(hello_reply(req["id"], req["protocol"]))
        protocol: int = req["protocol"]
        return protocol


def hello_reply(rid: int, protocol: int = 1) -> dict[str, Any]:
    return messages.HelloReply(
        rid, protocol=protocol, server="raw/1", site="s", key=bytes(32), chain=[], time=0.0
    ).to_wire()


def available_reply(rid: int | None) -> dict[str, Any]:
    return {"id": rid, "ok": True, "total": 1, "in_use": 0, "available": 1}


@contextlib.asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[tuple[str, int]]:
    tasks: list[asyncio.Task[None]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.append(task)
        try:
            await handler(Peer(reader, writer))
            await writer.drain()
        except (AssertionError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield "127.0.0.1", server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def open_conn(*addresses: tuple[str, int], io_timeout: float = 5.0) -> Connection:
    return await Connection.open(list(addresses), io_timeout=io_timeout, client_name="t/1")


def available(key: str = "K") -> messages.Available:
    return messages.Available(0, key=key)


async def test_tries_addresses_in_order_and_exposes_hello() -> None:
    async with FakeLicd() as fake:
        conn = await open_conn(("127.0.0.1", closed_port()), ("127.0.0.1", fake.port))
        try:
            assert conn.address == ("127.0.0.1", fake.port)
            assert conn.hello is not None
            assert (conn.hello.server, conn.hello.site) == ("fakelicd/0", "test")
            assert conn.hello.key == fake.public_key
            hello = fake.requests[0]
            assert isinstance(hello, messages.Hello) and hello.client == "t/1"
        finally:
            await conn.close()


async def test_no_address_answers() -> None:
    a, b = closed_port(), closed_port()
    with pytest.raises(errors.ConnectionLost) as info:
        await open_conn(("127.0.0.1", a), ("127.0.0.1", b))
    assert f"127.0.0.1:{a}" in str(info.value) and f"127.0.0.1:{b}" in str(info.value)


async def test_pipelined_requests_get_their_own_replies_in_order() -> None:
    async with FakeLicd() as fake:
        conn = await open_conn(("127.0.0.1", fake.port))
        try:
            keys = [LICENCE.key if i % 2 else "nope" for i in range(20)]
            results = await asyncio.gather(
                *(conn.request(available(k)) for k in keys), return_exceptions=True
            )
            for key, result in zip(keys, results, strict=True):
                if key == LICENCE.key:
                    assert isinstance(result, messages.AvailableReply) and result.total == 3
                else:
                    assert isinstance(result, errors.UnknownLicence)
            ids = [r.id for r in fake.requests]
            assert ids == list(range(1, 22))  # hello is 1; one connection, fresh ids
            assert not conn.closed  # an error reply does not break the connection
        finally:
            await conn.close()


async def test_a_reply_out_of_order_breaks_the_connection() -> None:
    async def handler(peer: Peer) -> None:
        await peer.hello()
        first, second = await peer.recv(), await peer.recv()
        peer.send(available_reply(second["id"]))
        peer.send(available_reply(first["id"]))
        await peer.reader.read()

    async with raw_server(handler) as addr:
        conn = await open_conn(addr)
        results = await asyncio.gather(
            conn.request(available()), conn.request(available()), return_exceptions=True
        )
        assert all(isinstance(r, errors.ConnectionLost) for r in results)
        assert "out of order" in str(results[0])
        assert conn.closed
        with pytest.raises(errors.ConnectionLost):
            await conn.request(available())
        await conn.close()


async def test_an_error_with_a_null_id_answers_the_oldest_request() -> None:
    async def handler(peer: Peer) -> None:
        await peer.hello()
        await peer.recv()
        err = errors.BadRequest("the frame body is not valid msgpack")
        peer.send(messages.error_frame(None, err))

    async with raw_server(handler) as addr:
        conn = await open_conn(addr)
        with pytest.raises(errors.BadRequest, match="not valid msgpack"):
            await conn.request(available())
        await conn.close()


async def test_no_reply_within_the_timeout_breaks_the_connection() -> None:
    async def handler(peer: Peer) -> None:
        await peer.hello()
        await peer.reader.read()  # never answers

    async with raw_server(handler) as addr:
        conn = await open_conn(addr, io_timeout=0.2)
        with pytest.raises(errors.ConnectionLost, match="no reply"):
            await conn.request(available())
        assert conn.closed
        await conn.close()


async def test_an_undecodable_reply_breaks_the_connection() -> None:
    async def handler(peer: Peer) -> None:
        await peer.hello()
        await peer.recv()
        peer.writer.write(wire.PREFIX.pack(3) + b"\xc1\xc1\xc1")
        await peer.reader.read()

    async with raw_server(handler) as addr:
        conn = await open_conn(addr)
        with pytest.raises(errors.ConnectionLost, match="undecodable"):
            await conn.request(available())
        await conn.close()


async def test_a_malformed_reply_is_a_protocol_violation() -> None:
    async def handler(peer: Peer) -> None:
        await peer.hello()
        req = await peer.recv()
        peer.send({"id": req["id"], "ok": True, "total": "many"})
        req = await peer.recv()
        peer.send(available_reply(req["id"]))
        await peer.reader.read()

    async with raw_server(handler) as addr:
        conn = await open_conn(addr)
        with pytest.raises(errors.ProtocolViolation):
            await conn.request(available())
        reply = await conn.request(available())  # still in step
        assert isinstance(reply, messages.AvailableReply)
        await conn.close()


async def test_hello_answered_with_another_protocol_is_refused() -> None:
    async def handler(peer: Peer) -> None:
        req = await peer.recv()
        peer.send(hello_reply(req["id"], protocol=1))
        await peer.reader.read()

    async with raw_server(handler) as addr:
        with pytest.raises(errors.ProtocolViolation, match="protocol 1 to protocol 2"):
            await open_conn(addr)


# ------------------------------------------------------------------ versions


async def test_hello_asks_for_protocol_2_first() -> None:
    async with FakeLicd() as fake:
        conn = await open_conn(("127.0.0.1", fake.port))
        try:
            assert conn.hello is not None and conn.hello.protocol == 2
            assert [(r.op, getattr(r, "protocol", None)) for r in fake.requests] == [("hello", 2)]
        finally:
            await conn.close()


async def test_an_older_daemon_gets_hello_again_with_1_on_the_same_connection() -> None:
    connections: list[int] = []

    async def handler(peer: Peer) -> None:
        connections.append(await peer.hello(supported=(1,)))
        req = await peer.recv()
        peer.send(available_reply(req["id"]))
        await peer.reader.read()

    async with raw_server(handler) as addr:
        conn = await open_conn(addr)
        try:
            assert conn.hello is not None and conn.hello.protocol == 1
            assert isinstance(await conn.request(available()), messages.AvailableReply)
            assert connections == [1]  # one connection, settled on 1
        finally:
            await conn.close()


async def test_a_version_asked_for_is_the_one_hello_settles_on_or_none() -> None:
    """`protocol=`: exactly that version (a site router's link pins 1), never another."""
    async with FakeLicd() as fake:
        address = [("127.0.0.1", fake.port)]
        conn = await Connection.open(address, io_timeout=5.0, client_name="t/1", protocol=1)
        try:
            assert conn.hello is not None and conn.hello.protocol == 1 and not conn.batched
        finally:
            await conn.close()
        fake.protocols = (1,)
        with pytest.raises(errors.UnsupportedProtocol):
            await Connection.open(address, io_timeout=5.0, client_name="t/1", protocol=2)
        hellos = [r for r in fake.requests if isinstance(r, messages.Hello)]
        assert [h.protocol for h in hellos] == [1, 2]  # no second hello with another


async def test_an_older_fake_daemon_hears_hello_twice() -> None:
    async with FakeLicd() as fake:
        fake.protocols = (1,)
        conn = await open_conn(("127.0.0.1", fake.port))
        try:
            assert conn.hello is not None and conn.hello.protocol == 1
            hellos = [r for r in fake.requests if isinstance(r, messages.Hello)]
            assert [h.protocol for h in hellos] == [2, 1]
        finally:
            await conn.close()


@pytest.mark.parametrize("supported", [[2], [1, 2]], ids=["2_only", "1_and_2"])
async def test_a_refusal_of_2_that_lists_2_is_raised(supported: list[int]) -> None:
    """A daemon that refuses 2 while saying it serves 2 is not an older one: no fallback."""
    hellos: list[int] = []

    async def handler(peer: Peer) -> None:
        req = await peer.recv()
        hellos.append(req["protocol"])
        refusal = errors.UnsupportedProtocol(detail={"supported": supported})
        peer.send(messages.error_frame(req["id"], refusal))
        await peer.reader.read()

    async with raw_server(handler) as addr:
        with pytest.raises(errors.UnsupportedProtocol):
            await open_conn(addr)
    assert hellos == [2]


async def test_a_daemon_serving_neither_version_is_refused_after_the_second_hello() -> None:
    hellos: list[int] = []

    async def handler(peer: Peer) -> None:
        for _ in range(2):
            req = await peer.recv()
            hellos.append(req["protocol"])
            refusal = errors.UnsupportedProtocol(detail={"supported": [3]})
            peer.send(messages.error_frame(req["id"], refusal))
        await peer.reader.read()

    async with raw_server(handler) as addr:
        with pytest.raises(errors.UnsupportedProtocol):
            await open_conn(addr)
    assert hellos == [2, 1]


def lease_reply(rid: int, *, batched: bool) -> dict[str, Any]:
    batch = messages.BatchProof(sig=bytes(64), size=2, index=0, path=[bytes(32)])
    return messages.LeaseReply(
        rid,
        handle="h",
        token=b"\x80",
        chain=[],
        expires=1.0,
        ttl=1.0,
        renew_in=0.3,
        seats=1,
        batch=batch if batched else None,
    ).to_wire()


@pytest.mark.parametrize("supported", [(1,), (1, 2)], ids=["protocol_1", "protocol_2"])
async def test_a_batched_reply_only_on_a_protocol_2_connection(supported: tuple[int, ...]) -> None:
    async def handler(peer: Peer) -> None:
        await peer.hello(supported)
        for batched in (False, True, False):
            req = await peer.recv()
            peer.send(lease_reply(req["id"], batched=batched))
        await peer.reader.read()

    heartbeat = messages.Heartbeat(0, lease="secret", nonce=bytes(16))
    async with raw_server(handler) as addr:
        conn = await open_conn(addr)
        try:
            whole = await conn.request(heartbeat)
            assert isinstance(whole, messages.LeaseReply) and whole.batch is None
            if supported == (1,):
                with pytest.raises(errors.ProtocolViolation, match="batched token in a heartbeat"):
                    await conn.request(heartbeat)
            else:
                batched = await conn.request(heartbeat)
                assert isinstance(batched, messages.LeaseReply) and batched.batch is not None
            assert isinstance(await conn.request(heartbeat), messages.LeaseReply)
        finally:
            await conn.close()


async def test_the_peer_closing_fails_pending_requests() -> None:
    async def handler(peer: Peer) -> None:
        await peer.hello()
        await peer.recv()

    async with raw_server(handler) as addr:
        conn = await open_conn(addr)
        with pytest.raises(errors.ConnectionLost, match="closed the connection"):
            await conn.request(available())
        await conn.close()


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("example.org:27501", ("example.org", 27501)),
        ("example.org", ("example.org", 27500)),
        ("10.0.0.1:1", ("10.0.0.1", 1)),
        ("[::1]:27502", ("::1", 27502)),
        ("[::1]", ("::1", 27500)),
        ("::1", ("::1", 27500)),
    ],
)
def test_parse_address(text: str, address: tuple[str, int]) -> None:
    assert parse_address(text) == address
    assert parse_address(format_address(address)) == address


@pytest.mark.parametrize("text", ["", "host:", "host:65536", "host:-1", "[::1]x", ":80"])
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)


def test_parse_servers_keeps_the_order() -> None:
    assert parse_servers("b:2, a:1,") == [("b", 2), ("a", 1)]
    with pytest.raises(ValueError):
        parse_servers(" , ")
