"""A fake licd for client tests: the wire protocol over real TCP, with knobs to misbehave.

It speaks docs/protocol.md sections 1-4 with `licd_client.wire`/`messages`, signs tokens with
a test key, keeps its leases across `restart()` on the same port, and can drop replies,
answer errors or tamper with tokens on demand. A checkout sent with `queue` that finds no
seat waits in its queue ("Queueing"): queue updates when its place changes (and at
`queue_tick()`), the seat when a checkin frees one, its place kept for a resend when its
connection ends. Heartbeat replies carry `idle_reclaim_in` when it is set. Hello settles
on the asked version when it is in `protocols` (else unsupported_protocol); with
`batch_size`, lease replies on a protocol-2 connection are batched ("Batched signatures"):
the token is signed in a tree of that many leaves, the others made up. It is not the
daemon: no durability, no reaping, no policies, no timers (updates come when a test says).
`ThreadedFakeLicd` runs one in a background loop for blocking tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack
from nacl.signing import SigningKey

from licd_client import errors, messages, tokens, wire


@dataclass
class FakeLicence:
    key: str
    id: str
    total: int
    features: messages.Features = field(default_factory=dict)
    product: str = "dicom"


@dataclass
class FakeQueued:
    """A checkout waiting in the fake's queue. `connected`: a connection is waiting for
    its reply (only those are served); `owner` tells that connection from an earlier one
    whose checkout a resend took over."""

    req: messages.Checkout
    connected: bool = False
    owner: object = None
    tick: bool = False  # an update is due whether or not its place changed
    wake: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class FakeLease:
    lease_id: str
    handle: str
    key: str
    seats: int
    request: str
    holder: messages.Holder
    ttl: float


LICENCE = FakeLicence("XXXX-YYYY-ZZZZ", "dicom-hq", 3, {"tier": "pro", "ocr": True})


class FakeLicd:
    """The fake daemon. Its state (licences, leases) outlives stop()/restart()."""

    def __init__(self, *licences: FakeLicence, ttl: float = 30.0, renew_in: float = 10.0) -> None:
        self.signing_key = SigningKey.generate()
        self.site = "test"
        # Copies: tests edit them (an admin's edit), and LICENCE is shared.
        self.licences = {lic.key: replace(lic) for lic in (licences or (LICENCE,))}
        self.leases: dict[str, FakeLease] = {}
        self.ttl = ttl
        self.renew_in = renew_in
        self.port = 0
        #: Every request received, in order.
        self.requests: list[messages.Request] = []
        #: Ops whose next request is processed but never answered (the connection drops).
        self.drop_reply: set[str] = set()
        #: op -> error answered instead of processing, until removed.
        self.fail: dict[str, errors.LicdError] = {}
        #: Applied to every token before it is sent.
        self.tamper: Callable[[bytes], bytes] | None = None
        #: Sign tokens with this key instead (and, with `delegator`, send a chain).
        self.token_key: SigningKey | None = None
        self.delegator: SigningKey | None = None
        self.nonce_override: bytes | None = None
        #: The versions hello settles on; another gets unsupported_protocol.
        self.protocols: tuple[int, ...] = messages.PROTOCOLS
        #: Leaves of the tree a lease reply's token is batched in on a protocol-2
        #: connection (0: signed whole), and its leaf's index there.
        self.batch_size = 0
        self.batch_index = 0
        #: Checkouts waiting for a seat, first served first.
        self.queue: list[FakeQueued] = []
        #: Every queue update sent, in order.
        self.updates: list[messages.QueueUpdate] = []
        self.queue_update_in = 10.0
        self.queue_wait: float | None = None  # the estimate updates carry (None: none)
        #: Sent in every heartbeat reply when set: the lease is idle (docs/protocol.md).
        self.idle_reclaim_in: float | None = None
        self._handles = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    # ---------------------------------------------------------------- lifecycle

    @property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @property
    def key_hex(self) -> str:
        return tokens.key_to_text(self.public_key)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ops(self) -> list[str]:
        return [r.op for r in self.requests]

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and drop every connection (leases are kept)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._writers):
            w.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def __aenter__(self) -> FakeLicd:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -------------------------------------------------------------- connections

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        decoder = wire.FrameDecoder(wire.MAX_FRAME_AFTER_HELLO, wire.REQUEST_LIMITS)
        protocol = 0  # the version this connection's hello settled on
        try:
            while data := await reader.read(65536):
                decoder.feed(data)
                while (frame := decoder.next_frame()) is not None:
                    req = messages.parse_request(frame)
                    self.requests.append(req)
                    if isinstance(req, messages.Checkout) and self._queues(req):
                        if not await self._wait_in_queue(req, reader, writer, decoder, protocol):
                            return  # the client left
                        continue
                    reply = self._answer(req)
                    if isinstance(req, messages.Hello) and reply["ok"]:
                        protocol = req.protocol
                    if req.op in self.drop_reply:
                        self.drop_reply.discard(req.op)
                        return
                    writer.write(wire.encode(self._batched(reply, protocol)))
                await writer.drain()
        except (ConnectionError, errors.LicdError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    # ------------------------------------------------------------------ queue

    def queue_tick(self) -> None:
        """What the daemon does every `update_in`: each waiting checkout gets an update."""
        for entry in self.queue:
            entry.tick = True
            entry.wake.set()

    def _queue_changed(self) -> None:
        for entry in self.queue:
            entry.wake.set()

    def _queued(self, request: str) -> FakeQueued | None:
        return next((q for q in self.queue if q.req.request == request), None)

    def _queues(self, req: messages.Checkout) -> bool:
        """True for a checkout that waits in the queue: sent with `queue`, and either
        already waiting (a resend) or finding no seat free."""
        if not req.queue or req.op in self.fail:
            return False
        if self._queued(req.request) is not None:
            return True
        lic = self.licences.get(req.key)
        held = any(q.request == req.request for q in self.leases.values())
        return lic is not None and not held and self._in_use(lic.key) + req.seats > lic.total

    async def _wait_in_queue(
        self,
        req: messages.Checkout,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        decoder: wire.FrameDecoder,
        protocol: int,
    ) -> bool:
        """Serve a queued checkout: updates, then its final reply. False when the client
        left first (its connection ended): its place is kept for a resend to take."""
        entry = self._queued(req.request)
        if entry is None:
            entry = FakeQueued(req)
            self.queue.append(entry)
        entry.req, entry.owner, entry.connected = req, writer, True
        self._queue_changed()  # an earlier connection waiting for it learns it lost it
        shown = 0
        try:
            while True:
                entry.wake.clear()
                if entry.owner is not writer:
                    requeued = errors.Unavailable(detail={"reason": "requeued"})
                    writer.write(wire.encode(messages.error_frame(req.id, requeued)))
                    return True
                if entry is next(q for q in self.queue if q.connected):
                    with contextlib.suppress(errors.SeatsExhausted):
                        reply = self._checkout(entry.req)
                        self.queue.remove(entry)
                        self._queue_changed()
                        writer.write(wire.encode(self._batched(reply.to_wire(), protocol)))
                        return True
                position = self.queue.index(entry) + 1
                if position != shown or entry.tick:
                    update = messages.QueueUpdate(
                        entry.req.id,
                        position=position,
                        waiting=len(self.queue),
                        update_in=self.queue_update_in,
                        wait=self.queue_wait,
                    )
                    writer.write(wire.encode(update.to_wire()))
                    self.updates.append(update)
                    shown, entry.tick = position, False
                await writer.drain()
                if not await self._woken(entry, reader, decoder):
                    return False
        finally:
            if entry.owner is writer:
                entry.connected = False

    @staticmethod
    async def _woken(
        entry: FakeQueued, reader: asyncio.StreamReader, decoder: wire.FrameDecoder
    ) -> bool:
        """Wait until `entry` is woken or the client sends something (kept for later);
        False when the client closed its side."""
        read = asyncio.ensure_future(reader.read(65536))
        woken = asyncio.ensure_future(entry.wake.wait())
        try:
            await asyncio.wait({read, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
            if not read.done():
                read.cancel()
        if read.done():
            data = read.result()
            if not data:
                return False
            decoder.feed(data)
        return True

    # ------------------------------------------------------------------- ops

    def _answer(self, req: messages.Request) -> dict[str, Any]:
        failure = self.fail.get(req.op)
        if failure is not None:
            return messages.error_frame(req.id, failure)
        try:
            return self._process(req).to_wire()
        except errors.LicdError as exc:
            return messages.error_frame(req.id, exc)

    def _process(self, req: messages.Request) -> messages.Reply:
        if isinstance(req, messages.Hello):
            if req.protocol not in self.protocols:
                raise errors.UnsupportedProtocol(detail={"supported": list(self.protocols)})
            return messages.HelloReply(
                req.id,
                protocol=req.protocol,
                server="fakelicd/0",
                site=self.site,
                key=self.public_key,
                chain=[],
                time=time.time(),
            )
        if isinstance(req, messages.Available):
            lic = self._licence(req.key)
            used = self._in_use(lic.key)
            return messages.AvailableReply(req.id, lic.total, used, max(0, lic.total - used))
        if isinstance(req, messages.Checkout):
            return self._checkout(req)
        if isinstance(req, messages.Heartbeat):
            lease = self.leases.get(req.lease)
            if lease is None:
                raise errors.LeaseUnknown()
            reply = self._lease_reply(req.id, lease, req.nonce, include_id=False)
            return replace(reply, idle_reclaim_in=self.idle_reclaim_in)
        if isinstance(req, messages.Checkin):
            released = self.leases.pop(req.lease, None) is not None
            self._queue_changed()  # a seat may be free for the head of the queue
            return messages.CheckinReply(req.id, released)
        raise errors.BadRequest(f"unsupported op {req.op}")

    def _licence(self, key: str) -> FakeLicence:
        lic = self.licences.get(key)
        if lic is None:
            raise errors.UnknownLicence()
        return lic

    def _in_use(self, key: str) -> int:
        return sum(lease.seats for lease in self.leases.values() if lease.key == key)

    def _checkout(self, req: messages.Checkout) -> messages.LeaseReply:
        lic = self._licence(req.key)
        for lease in self.leases.values():
            if lease.key == req.key and lease.request == req.request:
                return self._lease_reply(req.id, lease, req.nonce, include_id=True)
        used = self._in_use(lic.key)
        if used + req.seats > lic.total:
            raise errors.SeatsExhausted(detail={"in_use": used, "total": lic.total})
        ttl = min(self.ttl, req.ttl) if req.ttl is not None else self.ttl
        lease = FakeLease(
            lease_id=secrets.token_urlsafe(24),
            handle=f"L{next(self._handles):04d}",
            key=req.key,
            seats=req.seats,
            request=req.request,
            holder=req.holder,
            ttl=ttl,
        )
        self.leases[lease.lease_id] = lease
        return self._lease_reply(req.id, lease, req.nonce, include_id=True)

    def _lease_reply(
        self, rid: int, lease: FakeLease, nonce: bytes, *, include_id: bool
    ) -> messages.LeaseReply:
        lic = self.licences[lease.key]
        now = time.time()
        signer = self.token_key or self.signing_key
        payload = tokens.lease_payload(
            issuer=bytes(signer.verify_key),
            issued=now,
            expires=now + lease.ttl,
            handle=lease.handle,
            licence=lic.id,
            product=lic.product,
            seats=lease.seats,
            features=dict(lic.features),
            holder=lease.holder,
            nonce=self.nonce_override or nonce,
            site=self.site,
        )
        token = tokens.sign(signer, payload)
        if self.tamper is not None:
            token = self.tamper(token)
        chain: list[bytes] = []
        if self.delegator is not None:
            block = {  # a router's block: a lease with `del`, bounding the token's content
                "typ": "lease",
                "iss": bytes(self.delegator.verify_key),
                "iat": now - 60,
                "exp": now + 3600,
                "product": lic.product,
                "seats": lic.total,
                "features": dict(lic.features),
                "del": bytes(signer.verify_key),
            }
            chain = [tokens.sign(self.delegator, block)]
        return messages.LeaseReply(
            rid,
            handle=lease.handle,
            token=token,
            chain=chain,
            expires=now + lease.ttl,
            ttl=lease.ttl,
            renew_in=min(self.renew_in, lease.ttl / 3),
            seats=lease.seats,
            features=dict(lic.features),
            lease=lease.lease_id if include_id else None,
        )

    def _batched(self, frame: dict[str, Any], protocol: int) -> dict[str, Any]:
        """A lease reply's `frame` with its token batched, when this connection and
        `batch_size` say so; any other frame as it is."""
        if protocol < messages.BATCHED or self.batch_size < 2 or "token" not in frame:
            return frame
        payload = frame["token"][tokens.SIGNATURE_LEN :]
        others = [msgpack.packb({"typ": "lease", "n": i}) for i in range(self.batch_size - 1)]
        others.insert(self.batch_index, payload)
        proof = tokens.sign_batch(self.token_key or self.signing_key, others)[self.batch_index]
        return {**frame, "token": payload, "batch": proof.to_wire()}


class ThreadedFakeLicd:
    """A FakeLicd serving from its own event loop thread, for blocking-API tests."""

    def __init__(self, fake: FakeLicd | None = None) -> None:
        self.fake = fake or FakeLicd()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run a coroutine function (or plain function) on the server's loop."""

        async def run() -> Any:
            result = fn()
            if asyncio.iscoroutine(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    @contextlib.contextmanager
    def running(self) -> Iterator[FakeLicd]:
        self._thread.start()
        self.call(self.fake.start)
        try:
            yield self.fake
        finally:
            self.call(self.fake.stop)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()
