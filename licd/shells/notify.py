"""Tells systemd how the daemon is doing, over the sd_notify(3) datagram protocol.

One AF_UNIX datagram socket to `$NOTIFY_SOCKET`, written directly (no libsystemd):
readiness, status, reload, shutdown, watchdog pings and more time to start. It only
reports what it is told; it must never raise, block the event loop or decide anything
about the daemon's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

#: While the daemon opens its state, systemd is asked for more time to start every
#: START_PING seconds (a schema migration of a big audit log can outlast the unit's start
#: timeout, which would kill it midway and restart it for ever).
START_PING = 10.0

# What systemd's sd_watchdog_enabled() accepts: a positive count of microseconds below
# USEC_INFINITY (2**64 - 1, which means "no watchdog").
_USEC_INFINITY = 2**64 - 1


class Notifier:
    """A sender of notify messages, or a no-op when not run by a service manager.

    `watchdog_interval` is half the watchdog period systemd set (`$WATCHDOG_USEC`), as
    sd_watchdog_enabled(3) advises, or None when there is no watchdog for this process
    or no socket to ping it through.
    """

    enabled: bool
    watchdog_interval: float | None

    def __init__(self, address: bytes | None = None, watchdog_usec: int | None = None) -> None:
        self._address = address
        self._sock: socket.socket | None = None
        self._warned = False
        if address is not None:
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            except OSError as exc:
                log.warning("event=notify_unavailable error=%s", exc.strerror or exc)
            else:
                # Never wait for a slow service manager: a full queue drops the message.
                sock.setblocking(False)
                self._sock = sock
        self.enabled = self._sock is not None
        self.started = False  # READY=1 sent: asking for more time to start is over
        self.watchdog_interval = (
            watchdog_usec / 2_000_000 if self.enabled and watchdog_usec is not None else None
        )

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """The notifier systemd's environment asks for (`os.environ` by default)."""
        env = os.environ if environ is None else environ
        address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        if address is None:
            return cls()
        return cls(address, _watchdog_usec(env))

    # --- the messages ------------------------------------------------------------------

    def ready(self, status: str | None = None) -> None:
        """Start-up or a reload is complete: the daemon listens and its store is open (or,
        a cluster's standby, it listens and waits to lead)."""
        self.started = True
        if status is None:
            self._send("READY=1")
        else:
            self._send(f"READY=1\nSTATUS={_one_line(status)}")

    def status(self, text: str) -> None:
        """A one-line status that `systemctl status` shows."""
        self._send(f"STATUS={_one_line(text)}")

    def reloading(self) -> None:
        """A reload begins; `ready()` must follow when it is done.

        MONOTONIC_USEC lets a systemd that knows it tie the message to the reload it
        asked for; an older one ignores the field.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        """Shutdown has begun."""
        self._send("STOPPING=1")

    def watchdog(self) -> None:
        """The daemon is alive: reset systemd's watchdog timer."""
        self._send("WATCHDOG=1")

    async def run_watchdog(self, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """Ping the watchdog every `watchdog_interval` seconds, forever.

        Run it as a task on the daemon's own event loop: the pings are then proof that
        the loop still turns, and a loop stuck in blocking code stops them, so systemd
        restarts the daemon. Returns at once when there is no watchdog.
        """
        interval = self.watchdog_interval
        if interval is None:
            return
        while True:
            self.watchdog()
            await sleep(interval)

    def extend_start(self, seconds: float, status: str) -> None:
        """Still starting: systemd's start timeout is to allow `seconds` more (nothing
        once READY=1 was sent: a standby is started, and its status stays)."""
        if self.started:
            return
        self._send(f"EXTEND_TIMEOUT_USEC={round(seconds * 1_000_000)}\nSTATUS={_one_line(status)}")

    async def while_starting(
        self, work: Awaitable[T], status: str, *, every: float = START_PING
    ) -> T:
        """`work`'s result, asking systemd for more time to start every `every` seconds
        until it is done (only the event loop's own turns send them: a loop blocked in
        start-up code does not). Cancelled, it cancels `work`."""
        task = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=every)
                if done:
                    return task.result()
                self.extend_start(3 * every, status)
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def close(self) -> None:
        """Close the socket; later messages are no-ops. Safe to call twice."""
        sock, self._sock = self._sock, None
        self.enabled = False
        if sock is not None:
            sock.close()

    # --- sending -----------------------------------------------------------------------

    def _send(self, message: str) -> None:
        sock = self._sock
        if sock is None or self._address is None:
            return
        data = message.encode("utf-8", errors="replace")
        try:
            sock.sendto(data, self._address)
        except OSError as exc:
            # The service manager went away, restarted, or its queue is full. The daemon
            # goes on either way; one warning says so without flooding the journal at
            # every watchdog tick.
            if self._warned:
                log.debug("event=notify_failed error=%s", exc.strerror or exc)
            else:
                self._warned = True
                log.warning(
                    "event=notify_failed socket=%s error=%s (further failures are not logged)",
                    _display(self._address),
                    exc.strerror or exc,
                )


def _socket_address(value: str) -> bytes | None:
    """`$NOTIFY_SOCKET` as a socket address: an absolute path or "@abstract-name"."""
    if not value:
        return None
    raw = os.fsencode(value)
    if raw.startswith(b"@") and len(raw) > 1:
        return b"\0" + raw[1:]
    if raw.startswith(b"/"):
        return raw
    # Other forms (a relative path, a newer systemd's "vsock:...") are not for us.
    log.warning("event=notify_unsupported_socket socket=%r", value)
    return None


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    """`$WATCHDOG_USEC` when it is meant for this process, else None (as systemd reads it)."""
    usec = _decimal(env.get("WATCHDOG_USEC"))
    if usec is None or not 0 < usec < _USEC_INFINITY:
        return None
    pid_text = env.get("WATCHDOG_PID")
    if pid_text is not None and _decimal(pid_text) != os.getpid():
        return None
    return usec


def _decimal(text: str | None) -> int | None:
    """A plain unsigned decimal; anything else (signs, spaces, "1.5", "1_0") is None."""
    if text is None or not text.isascii() or not text.isdigit():
        return None
    return int(text)


def _one_line(text: str) -> str:
    # A newline would start a new assignment in the message and systemd drops a message
    # that holds a NUL byte, so neither may come through from the caller's text.
    return " ".join(text.replace("\0", "").splitlines())


def _display(address: bytes) -> str:
    return "@" + os.fsdecode(address[1:]) if address.startswith(b"\0") else os.fsdecode(address)
