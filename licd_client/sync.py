"""The blocking API for ordinary (threaded) apps, on top of the asyncio client.

A `Client` owns one daemon thread running an event loop (started on first use) and an
`AsyncClient` inside it; its methods hand coroutines to that loop and wait. Leases keep
renewing on that thread; callbacks run there too and must not block. A call interrupted
(Ctrl-C) cancels its operation and waits, bounded, while it winds up. An exit hook checks
in every lease still held. No protocol logic here: it all lives in client.py/lease.py.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import logging
import random
import ssl as _ssl
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from . import messages, tokens
from .backoff import Backoff
from .client import (
    INTERRUPT_GRACE,
    AsyncClient,
    QueuedCallback,
    resolve_anchors,
    resolve_servers,
)
from .connection import Address
from .errors import ConnectionLost
from .lease import AsyncLease, IdleWarningCallback, LeaseState, Mode

log = logging.getLogger("licd_client")

T = TypeVar("T")
#: How long `close()` (and the exit hook) waits for check-ins before giving up.
CLOSE_TIMEOUT = 10.0
#: How long an interrupted call waits for its operation to wind up: an interrupted
#: checkout's wait for its reply, then its checkin (client.py), and a little slack.
INTERRUPT_WAIT = 2 * INTERRUPT_GRACE + 1.0


class Client:
    """A licd client for code that does not run an event loop. Thread-safe."""

    def __init__(
        self,
        servers: str | Sequence[str | Address] | None = None,
        server_key: str | bytes | Sequence[str | bytes] | None = None,
        *,
        client_name: str | None = None,
        ssl: _ssl.SSLContext | None = None,
        io_timeout: float = 5.0,
        retry_for: float = 10.0,
        rng: random.Random | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        # Resolved now, so a bad address or key fails here rather than in the thread.
        self.servers = resolve_servers(servers)
        self.anchors = resolve_anchors(server_key)
        options: dict[str, Any] = {
            "ssl": ssl,
            "io_timeout": io_timeout,
            "retry_for": retry_for,
            "rng": rng,
            "backoff": backoff,
        }
        if client_name is not None:
            options["client_name"] = client_name
        self._options = options
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._async: AsyncClient | None = None
        self._closed = False

    # ------------------------------------------------------------ the loop thread

    def _start(self) -> tuple[asyncio.AbstractEventLoop, AsyncClient]:
        with self._lock:
            if self._closed:
                raise ConnectionLost("the client is closed")
            if self._loop is not None and self._async is not None:
                return self._loop, self._async
            loop = asyncio.new_event_loop()
            thread = threading.Thread(
                target=self._serve, args=(loop,), name="licd-client", daemon=True
            )
            thread.start()
            self._loop, self._thread = loop, thread
            self._async = self._submit(loop, self._make_async()).result()
            # Registered after lease.py's exit hook, so it runs first (atexit is LIFO) and
            # checks leases in through the loop rather than over a blocking socket.
            atexit.register(self.close)
            return loop, self._async

    async def _make_async(self) -> AsyncClient:
        return AsyncClient(self.servers, self.anchors, **self._options)

    @staticmethod
    def _serve(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    @staticmethod
    def _submit(
        loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]
    ) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, loop)

    def _on_loop_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def run(self, make: Callable[[AsyncClient], Coroutine[Any, Any, T]]) -> T:
        """Run `make(async_client)` on the client's loop and wait for its result."""
        if self._on_loop_thread():
            raise RuntimeError("blocking licd_client calls cannot be made from a callback")
        loop, client = self._start()

        async def call() -> T:  # makes the coroutine on the loop: none is left unawaited
            return await make(client)

        coro = call()
        done = self._submit(loop, coro)
        try:
            result: T = done.result()
        except BaseException:
            if not done.done():  # interrupted: KeyboardInterrupt, a signal handler's error
                self._interrupt(loop, done, coro)
            raise
        return result

    @staticmethod
    def _interrupt(
        loop: asyncio.AbstractEventLoop,
        done: concurrent.futures.Future[Any],
        coro: Coroutine[Any, Any, Any],
    ) -> None:
        """Cancel the operation whose caller was interrupted and wait (bounded) while it
        winds up, so that an interrupted checkout gives back the lease it was granted."""

        def cancel() -> None:  # on the loop, where the operation's task already exists
            for task in asyncio.all_tasks(loop):
                if task.get_coro() is coro:
                    task.cancel()

        loop.call_soon_threadsafe(cancel)
        concurrent.futures.wait([done], timeout=INTERRUPT_WAIT)

    # --------------------------------------------------------------- operations

    @property
    def hello(self) -> messages.HelloReply | None:
        """The daemon's hello result (server, site, key, time), once connected."""
        return self._async.hello if self._async is not None else None

    def available(self, key: str) -> messages.AvailableReply:
        """How many seats of licence `key` are free."""
        return self.run(lambda c: c.available(key))

    def checkout(
        self,
        key: str,
        *,
        seats: int = 1,
        ttl: float | None = None,
        app: str | None = None,
        instance: str | None = None,
        mode: Mode = "lease",
        wait: float = 0.0,
        queue: bool = False,
        on_queued: QueuedCallback | None = None,
        on_expiring: Callable[[float], object] | None = None,
        on_renewed: Callable[[Lease], object] | None = None,
        on_lost: Callable[[Exception], object] | None = None,
        on_idle_warning: IdleWarningCallback | None = None,
    ) -> Lease:
        """Take seats of licence `key` (see `AsyncClient.checkout`, which says what
        `queue` does). Callbacks run on the client's background thread. Ctrl-C while
        queued leaves the queue."""
        lease = Lease(self)

        def renewed(_: AsyncLease) -> None:
            if on_renewed is not None:
                on_renewed(lease)

        lease._inner = self.run(
            lambda c: c.checkout(
                key,
                seats=seats,
                ttl=ttl,
                app=app,
                instance=instance,
                mode=mode,
                wait=wait,
                queue=queue,
                on_queued=on_queued,
                on_expiring=on_expiring,
                on_renewed=renewed,
                on_lost=on_lost,
                on_idle_warning=on_idle_warning,
            )
        )
        return lease

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Check in every held lease, close the connection and stop the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            loop, thread, client = self._loop, self._thread, self._async
        atexit.unregister(self.close)
        if loop is None or thread is None:
            return
        if threading.current_thread() is thread:
            raise RuntimeError("Client.close() cannot be called from a callback")
        if client is not None:
            try:
                self._submit(loop, client.aclose()).result(timeout)
            except Exception as exc:
                log.warning("licd_client: closing the client: %s", exc)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Lease:
    """A held lease (blocking API). Made by `Client.checkout()`."""

    _inner: AsyncLease

    def __init__(self, client: Client) -> None:
        self._client = client
        self._releasing: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        inner = getattr(self, "_inner", None)
        return f"<Lease {inner.handle if inner else '?'} {inner.state.value if inner else ''}>"

    @property
    def key(self) -> str:
        return self._inner.key

    @property
    def lease_id(self) -> str:
        """The secret lease id (whoever holds it can renew or release the lease)."""
        return self._inner.lease_id

    @property
    def handle(self) -> str:
        return self._inner.handle

    @property
    def seats(self) -> int:
        return self._inner.seats

    @property
    def features(self) -> messages.Features:
        return dict(self._inner.features)

    @property
    def expires(self) -> float:
        """The daemon's wall-clock expiry (informative; validity uses the lease clock)."""
        return self._inner.expires

    @property
    def overdraft(self) -> bool:
        """Granted beyond the licence's seats, within its overdraft."""
        return self._inner.overdraft

    @property
    def statement(self) -> tokens.Statement | None:
        return self._inner.statement

    @property
    def state(self) -> LeaseState:
        return self._inner.state

    @property
    def lost_reason(self) -> Exception | None:
        return self._inner.lost_reason

    def remaining(self) -> float:
        return self._inner.remaining()

    @property
    def valid(self) -> bool:
        return self._inner.valid

    def touch(self) -> None:
        """Mark the lease in use now (see AsyncLease.touch); cheap, from any thread."""
        self._inner.touch()

    def validate(self) -> None:
        """Raise unless the lease is good (strict mode asks the daemon)."""
        self._client.run(lambda _: self._inner.validate())

    def consume(
        self, counter: str, units: int = 1, *, dedup: str | None = None
    ) -> messages.ConsumeReply:
        """Use `units` of a metered counter under this lease (see AsyncLease.consume)."""
        return self._client.run(lambda _: self._inner.consume(counter, units, dedup=dedup))

    def release(self) -> None:
        """Check the lease in. Idempotent. From a callback it is scheduled, not awaited."""
        if self._inner.state is LeaseState.RELEASED:
            return
        if self._client._on_loop_thread():
            self._releasing = asyncio.get_running_loop().create_task(self._inner.release())
            return
        with contextlib.suppress(ConnectionLost):  # client closed: already checked in
            self._client.run(lambda _: self._inner.release())

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


# ------------------------------------------------------------- module-level helpers

_default: Client | None = None
_default_lock = threading.Lock()


def default_client() -> Client:
    """The process-wide Client, configured from LICD_SERVER and LICD_SERVER_KEY."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Client()
        return _default


def checkout(key: str, **options: Any) -> Lease:
    """`Client.checkout` on the default client."""
    return default_client().checkout(key, **options)


def available(key: str) -> messages.AvailableReply:
    """`Client.available` on the default client."""
    return default_client().available(key)
