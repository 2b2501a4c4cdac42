"""Unit tests of licd.shells.notify: the sd_notify protocol against real AF_UNIX datagram sockets.

A test binds the socket systemd would, hands its address to a Notifier and reads back
the exact datagrams. A local datagram is queued by the time sendto() returns, so each
read right after a call sees what that call sent: no sleeping in the hope of arrival.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from licd.shells.notify import Notifier


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound, non-blocking datagram socket in tmp_path and its NOTIFY_SOCKET value."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    yield sock, str(path)
    sock.close()


@pytest.fixture
def notifier(receiver: tuple[socket.socket, str]) -> Iterator[Notifier]:
    n = Notifier.from_environ({"NOTIFY_SOCKET": receiver[1]})
    yield n
    n.close()


def received(sock: socket.socket) -> list[bytes]:
    """Every datagram queued on `sock` now, without waiting for more."""
    out: list[bytes] = []
    while True:
        try:
            out.append(sock.recv(65536))
        except BlockingIOError:
            return out


# --- the messages, byte for byte ----------------------------------------------------


def test_ready(receiver: tuple[socket.socket, str], notifier: Notifier) -> None:
    assert notifier.enabled
    notifier.ready()
    notifier.ready("serving 3 licences on 127.0.0.1:27500")
    assert received(receiver[0]) == [
        b"READY=1",
        b"READY=1\nSTATUS=serving 3 licences on 127.0.0.1:27500",
    ]


def test_status_stopping_watchdog(receiver: tuple[socket.socket, str], notifier: Notifier) -> None:
    notifier.status("draining 2 connections")
    notifier.stopping()
    notifier.watchdog()
    assert received(receiver[0]) == [
        b"STATUS=draining 2 connections",
        b"STOPPING=1",
        b"WATCHDOG=1",
    ]


def test_reloading_carries_the_monotonic_clock(
    receiver: tuple[socket.socket, str], notifier: Notifier
) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.ready()
    [reloading, ready] = received(receiver[0])
    match = re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=([0-9]+)", reloading)
    assert match is not None, reloading
    assert before <= int(match[1]) <= after
    assert ready == b"READY=1"


def test_status_text_stays_on_one_line(
    receiver: tuple[socket.socket, str], notifier: Notifier
) -> None:
    # A newline would smuggle in another assignment (here a fake READY=1); systemd drops
    # a message holding a NUL; text that cannot be encoded must not raise.
    notifier.status("reloaded\nREADY=1\r\nok")
    notifier.ready("a\0b\n")
    notifier.status("bad \udcff surrogate")
    assert received(receiver[0]) == [
        b"STATUS=reloaded READY=1 ok",
        b"READY=1\nSTATUS=ab",
        b"STATUS=bad ? surrogate",
    ]


def test_abstract_socket() -> None:
    name = f"licd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind("\0" + name)
        sock.setblocking(False)
        n = Notifier.from_environ({"NOTIFY_SOCKET": "@" + name})
        assert n.enabled
        n.ready()
        n.close()
        assert received(sock) == [b"READY=1"]
    finally:
        sock.close()


def test_reads_os_environ_by_default(
    receiver: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", receiver[1])
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    n = Notifier.from_environ()
    n.stopping()
    n.close()
    assert n.watchdog_interval == 2.0
    assert received(receiver[0]) == [b"STOPPING=1"]
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not Notifier.from_environ().enabled


# --- disabled -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"NOTIFY_SOCKET": ""},
        {"NOTIFY_SOCKET": "relative/notify.sock"},
        {"NOTIFY_SOCKET": "@"},
        # A watchdog with nowhere to send its pings is no watchdog.
        {"WATCHDOG_USEC": "30000000"},
    ],
    ids=["unset", "empty", "relative", "bare-at", "watchdog-without-socket"],
)
async def test_disabled_notifier_does_nothing(environ: dict[str, str]) -> None:
    n = Notifier.from_environ(environ)
    assert not n.enabled
    assert n.watchdog_interval is None
    n.ready()
    n.ready("status")
    n.status("status")
    n.reloading()
    n.stopping()
    n.watchdog()

    async def no_sleep(delay: float) -> None:
        raise AssertionError("a disabled notifier must not schedule pings")

    await asyncio.wait_for(n.run_watchdog(no_sleep), 5)
    n.close()
    n.close()


def test_close_makes_later_calls_no_ops(
    receiver: tuple[socket.socket, str], notifier: Notifier
) -> None:
    notifier.close()
    notifier.close()
    assert not notifier.enabled
    notifier.ready()
    notifier.watchdog()
    assert received(receiver[0]) == []


# --- the watchdog period --------------------------------------------------------------


@pytest.mark.parametrize(
    ("usec", "pid", "interval"),
    [
        ("30000000", None, 15.0),
        ("30000000", "self", 15.0),
        ("1", "self", 0.0000005),
        ("30000000", "other", None),
        ("30000000", "", None),
        ("30000000", "12x", None),
        ("30000000", "-1", None),
        (None, None, None),
        (None, "self", None),
        ("", None, None),
        ("0", None, None),
        ("-30000000", None, None),
        ("+30000000", None, None),
        ("30000000.0", None, None),
        ("30s", None, None),
        (" 30000000", None, None),
        ("3_000", None, None),
        ("٣٠", None, None),  # non-ASCII digits
        (str(2**64 - 1), None, None),  # USEC_INFINITY: no watchdog
    ],
)
def test_watchdog_interval(
    receiver: tuple[socket.socket, str], usec: str | None, pid: str | None, interval: float | None
) -> None:
    environ = {"NOTIFY_SOCKET": receiver[1]}
    if usec is not None:
        environ["WATCHDOG_USEC"] = usec
    if pid == "self":
        environ["WATCHDOG_PID"] = str(os.getpid())
    elif pid == "other":
        environ["WATCHDOG_PID"] = str(os.getpid() + 1)
    elif pid is not None:
        environ["WATCHDOG_PID"] = pid
    n = Notifier.from_environ(environ)
    assert n.enabled
    assert n.watchdog_interval == interval
    n.close()


class SteppedSleep:
    """A sleep that records each requested delay and returns only when the test steps it."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.entered: asyncio.Queue[None] = asyncio.Queue()
        self._release: asyncio.Queue[None] = asyncio.Queue()

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        self.entered.put_nowait(None)
        await self._release.get()

    async def wait_until_asleep(self) -> None:
        await asyncio.wait_for(self.entered.get(), 5)

    def step(self) -> None:
        self._release.put_nowait(None)


async def test_run_watchdog_pings_at_half_the_period(receiver: tuple[socket.socket, str]) -> None:
    n = Notifier.from_environ({"NOTIFY_SOCKET": receiver[1], "WATCHDOG_USEC": "3000000"})
    sleep = SteppedSleep()
    task = asyncio.create_task(n.run_watchdog(sleep))
    try:
        # The first ping goes out at once, then one per elapsed interval.
        await sleep.wait_until_asleep()
        assert received(receiver[0]) == [b"WATCHDOG=1"]
        assert sleep.delays == [1.5]
        for count in range(2, 5):
            sleep.step()
            await sleep.wait_until_asleep()
            assert received(receiver[0]) == [b"WATCHDOG=1"]
            assert sleep.delays == [1.5] * count
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        n.close()
    assert received(receiver[0]) == []


async def test_no_pings_while_the_loop_is_blocked(receiver: tuple[socket.socket, str]) -> None:
    sock = receiver[0]
    n = Notifier.from_environ({"NOTIFY_SOCKET": receiver[1], "WATCHDOG_USEC": "20000"})
    assert n.watchdog_interval == 0.01

    loop = asyncio.get_running_loop()

    async def next_ping() -> bytes:
        # Wait on the loop until the socket is readable; the bound is a guard against a
        # hang, not a timing assumption.
        return await asyncio.wait_for(loop.sock_recv(sock, 65536), 10)

    task = asyncio.create_task(n.run_watchdog())
    try:
        assert await next_ping() == b"WATCHDOG=1"
        received(sock)  # start the blocked stretch from an empty queue
        # Block the event loop for 30 watchdog intervals. A pinger on a thread would
        # keep sending; the loop's own task cannot.
        time.sleep(0.3)  # noqa: ASYNC251 - blocking the loop is the point of this test
        assert received(sock) == []
        # Once the loop turns again, so do the pings.
        assert await next_ping() == b"WATCHDOG=1"
        assert await next_ping() == b"WATCHDOG=1"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        n.close()


async def test_more_time_to_start_is_asked_for_until_the_work_is_done(
    receiver: tuple[socket.socket, str], notifier: Notifier
) -> None:
    sock = receiver[0]
    loop = asyncio.get_running_loop()
    release = asyncio.Event()

    async def migrate() -> str:
        await release.wait()
        return "opened"

    task = asyncio.create_task(notifier.while_starting(migrate(), "migrating", every=0.01))
    for _ in range(2):  # bounded waits for the datagrams themselves, not for time to pass
        message = await asyncio.wait_for(loop.sock_recv(sock, 65536), 10)
        assert message == b"EXTEND_TIMEOUT_USEC=30000\nSTATUS=migrating"
    release.set()
    assert await asyncio.wait_for(task, 10) == "opened"
    # Nothing is left behind to ask again: no task but this test's own.
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_once_ready_no_more_time_is_asked_for_and_the_status_stays(
    receiver: tuple[socket.socket, str], notifier: Notifier
) -> None:
    """A cluster's standby says READY while its start (waiting to lead) goes on: the
    start timeout is over for systemd, and its STATUS line is not overwritten."""
    sock = receiver[0]
    loop = asyncio.get_running_loop()
    release = asyncio.Event()

    async def wait_to_lead() -> str:
        notifier.ready("standby of a cluster")
        await release.wait()
        return "leading"

    task = asyncio.create_task(notifier.while_starting(wait_to_lead(), "opening", every=0.01))
    message = await asyncio.wait_for(loop.sock_recv(sock, 65536), 10)
    assert message == b"READY=1\nSTATUS=standby of a cluster"
    for _ in range(3):  # several of while_starting's turns: each would have asked
        await asyncio.sleep(0.02)
    release.set()
    assert await asyncio.wait_for(task, 10) == "leading"
    assert received(sock) == []


async def test_work_failing_or_cancelled_while_starting(notifier: Notifier) -> None:
    async def broken() -> None:
        raise RuntimeError("bad database")

    with pytest.raises(RuntimeError, match="bad database"):
        await notifier.while_starting(broken(), "opening")
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    task = asyncio.create_task(notifier.while_starting(forever(), "opening"))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancelled.is_set()  # the work was cancelled with it, not left running


# --- failures never raise or block ----------------------------------------------------


def test_send_to_a_vanished_socket_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "gone.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    n = Notifier.from_environ({"NOTIFY_SOCKET": str(path)})
    sock.close()  # the service manager's socket goes away: ECONNREFUSED
    with caplog.at_level(logging.WARNING, logger="licd.shells.notify"):
        n.ready()
        path.unlink()  # and then its path: ENOENT
        n.watchdog()
        n.stopping()
    n.close()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "event=notify_failed" in warnings[0].getMessage()
    assert str(path) in warnings[0].getMessage()


def test_abstract_socket_nobody_listens_on(caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier.from_environ({"NOTIFY_SOCKET": f"@licd-test-{uuid.uuid4().hex}"})
    assert n.enabled
    with caplog.at_level(logging.WARNING, logger="licd.shells.notify"):
        n.ready()
        n.ready()
    n.close()
    assert [r.getMessage().split()[0] for r in caplog.records] == ["event=notify_failed"]


def test_full_queue_does_not_block(
    receiver: tuple[socket.socket, str], notifier: Notifier, caplog: pytest.LogCaptureFixture
) -> None:
    # Nobody reads the socket: the kernel's queue fills after a few datagrams
    # (net.unix.max_dgram_qlen). A blocking send would hang here forever.
    with caplog.at_level(logging.WARNING, logger="licd.shells.notify"):
        for _ in range(10_000):
            notifier.status("x" * 1000)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    queued = received(receiver[0])
    assert 0 < len(queued) < 10_000
    assert set(queued) == {b"STATUS=" + b"x" * 1000}
