"""Tests of the blocking API (licd_client.sync) against a fake daemon on its own thread."""

from __future__ import annotations

import atexit
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import pytest

import licd_client
from licd_client import errors, messages, sync
from licd_client.lease import LeaseState
from tests.fakelicd import LICENCE, ThreadedFakeLicd

KEY = LICENCE.key


@pytest.fixture
def server() -> Iterator[ThreadedFakeLicd]:
    srv = ThreadedFakeLicd()
    with srv.running():
        yield srv


def leases(server: ThreadedFakeLicd) -> dict[str, Any]:
    result: dict[str, Any] = server.call(lambda: dict(server.fake.leases))
    return result


def make_client(server: ThreadedFakeLicd) -> sync.Client:
    return sync.Client(server.fake.address, server.fake.key_hex)


def test_checkout_and_release(server: ThreadedFakeLicd) -> None:
    with make_client(server) as client:
        lease = client.checkout(KEY, seats=2, mode="strict")
        assert lease.valid and lease.state is LeaseState.ACTIVE
        assert lease.handle == "L0001" and lease.seats == 2
        assert lease.features == {"tier": "pro", "ocr": True}
        assert 29 < lease.remaining() <= 30
        assert list(leases(server)) == [lease.lease_id]
        lease.validate()  # strict: a heartbeat
        assert server.fake.ops().count("heartbeat") == 1
        assert client.available(KEY).in_use == 2
        assert client.hello is not None and client.hello.site == "test"
        lease.release()
        lease.release()
        assert leases(server) == {}
        assert server.fake.ops().count("checkin") == 1
        assert not lease.valid
        with pytest.raises(errors.LeaseUnknown):
            lease.validate()


def test_errors_reach_the_calling_thread(server: ThreadedFakeLicd) -> None:
    with make_client(server) as client:
        with pytest.raises(errors.UnknownLicence):
            client.checkout("no-such-key")
        held = client.checkout(KEY, seats=3)
        with pytest.raises(errors.SeatsExhausted, match="maximum allowed"):
            client.checkout(KEY)
        held.release()


def test_context_managers_and_close_check_in(server: ThreadedFakeLicd) -> None:
    client = make_client(server)
    with client.checkout(KEY) as lease:
        assert leases(server)
    assert lease.state is LeaseState.RELEASED and leases(server) == {}
    kept = client.checkout(KEY)
    thread = client._thread
    assert thread is not None and thread.daemon and thread.is_alive()
    client.close()
    assert kept.state is LeaseState.RELEASED and leases(server) == {}
    assert not thread.is_alive()
    client.close()  # idempotent
    with pytest.raises(errors.ConnectionLost):
        client.checkout(KEY)
    kept.release()  # after close: nothing to do, no error


def test_exit_hook_checks_in_held_leases(
    server: ThreadedFakeLicd, monkeypatch: pytest.MonkeyPatch
) -> None:
    hooks: list[Callable[[], None]] = []
    monkeypatch.setattr(atexit, "register", hooks.append)
    monkeypatch.setattr(atexit, "unregister", lambda fn: None)
    client = make_client(server)
    client.checkout(KEY)
    assert leases(server)
    assert len(hooks) == 1
    hooks[0]()  # what the interpreter does at exit
    assert leases(server) == {}


def test_callbacks_run_on_the_client_thread(server: ThreadedFakeLicd) -> None:
    server.fake.renew_in = 0.05  # renewals come quickly, on the real clock
    renewed = threading.Event()
    lost = threading.Event()
    seen: list[Any] = []

    def on_renewed(lease: sync.Lease) -> None:
        seen.append((lease, threading.current_thread().name))
        renewed.set()

    def on_lost(reason: Exception) -> None:
        seen.append(reason)
        lease.release()  # from a callback: scheduled, must not deadlock
        lost.set()

    with make_client(server) as client:
        lease = client.checkout(KEY, on_renewed=on_renewed, on_lost=on_lost)
        assert renewed.wait(5)
        assert seen[0] == (lease, "licd-client")
        server.call(server.fake.leases.clear)  # revoked
        assert lost.wait(5)
        assert isinstance(seen[-1], errors.LeaseUnknown)
    assert lease.state is LeaseState.RELEASED


def test_module_level_checkout_uses_the_environment(
    server: ThreadedFakeLicd, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LICD_SERVER", f"127.0.0.1:1,{server.fake.address}")
    monkeypatch.setenv("LICD_SERVER_KEY", server.fake.key_hex)
    monkeypatch.setattr(sync, "_default", None)
    try:
        assert licd_client.available(KEY).available == 3
        with licd_client.checkout(KEY, app="tool") as lease:
            assert lease.valid
            assert licd_client.default_client() is licd_client.default_client()
        assert leases(server) == {}
    finally:
        licd_client.default_client().close()


def test_bad_configuration_fails_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError):
        sync.Client("host:99999")
    with pytest.raises(ValueError):
        sync.Client("127.0.0.1:1", "not-a-key")


def test_without_a_key_checkout_says_what_to_set(
    server: ThreadedFakeLicd, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LICD_SERVER_KEY", raising=False)
    with (
        sync.Client(server.fake.address) as client,
        pytest.raises(errors.TokenInvalid, match="licd key show"),
    ):
        client.checkout(KEY)
    assert leases(server) == {}


def test_ctrl_c_during_a_checkout_checks_in_the_lease_it_was_granted(
    server: ThreadedFakeLicd, monkeypatch: pytest.MonkeyPatch
) -> None:
    interrupted = threading.Event()

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        interrupted.set()
        raise KeyboardInterrupt

    answer = server.fake._answer

    def interrupt_then_answer(req: messages.Request) -> dict[str, Any]:
        if isinstance(req, messages.Checkout):
            # A real SIGINT to the caller, blocked in checkout(); the reply goes out only
            # once the interruption has reached it.
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
            assert interrupted.wait(10)
        return answer(req)

    monkeypatch.setattr(server.fake, "_answer", interrupt_then_answer)
    old = signal.signal(signal.SIGINT, on_sigint)
    try:
        with make_client(server) as client, pytest.raises(KeyboardInterrupt):
            client.checkout(KEY)
    finally:
        signal.signal(signal.SIGINT, old)
    # The client never had the lease to hold, so neither close() nor its exit hook
    # could check it in: the interrupted checkout did.
    assert server.fake.ops()[-2:] == ["checkout", "checkin"]
    assert leases(server) == {}
