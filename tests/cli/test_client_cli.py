"""Tests of `licd-client` (licd_client.cli) against a fake daemon on its own thread.

Most run `main(argv)` in-process; the signal tests run the real command in a child
process and signal it. The overdraft test runs the command against a real daemon served
in the test's event loop (tests.support.running), as only the daemon grants overdraft.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey

from licd_client import errors, messages
from licd_client.cli import EXIT_ERROR, EXIT_LOST, EXIT_REFUSED, EXIT_USAGE, main
from tests.fakelicd import LICENCE, FakeQueued, ThreadedFakeLicd
from tests.support import DICOM, address, make_config, running

KEY = LICENCE.key
PY = sys.executable


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[ThreadedFakeLicd]:
    srv = ThreadedFakeLicd()
    with srv.running():
        monkeypatch.setenv("LICD_SERVER", srv.fake.address)
        monkeypatch.setenv("LICD_SERVER_KEY", srv.fake.key_hex)
        yield srv


def leases(server: ThreadedFakeLicd) -> dict[str, Any]:
    result: dict[str, Any] = server.call(lambda: dict(server.fake.leases))
    return result


def test_available_prints_the_counts(
    server: ThreadedFakeLicd, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["available", KEY]) == 0
    out = capsys.readouterr().out.split()
    assert out == ["total", "3", "in_use", "0", "available", "3"]
    assert main(["--json", "available", KEY]) == 0
    assert json.loads(capsys.readouterr().out) == {"total": 3, "in_use": 0, "available": 3}


def test_available_of_an_unknown_licence(
    server: ThreadedFakeLicd, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["available", "nope"]) == EXIT_REFUSED
    err = capsys.readouterr().err
    assert err == "licd-client: unknown_licence: no such licence key\n"


def test_the_daemons_text_is_shown_escaped(
    server: ThreadedFakeLicd, capsys: pytest.CaptureFixture[str]
) -> None:
    # An error's message may quote what some client sent: it reaches no terminal raw.
    refusal = errors.UnknownLicence("no seat for host 'ws1\nlicd-client: ok\x1b[2J\u202e'")
    server.call(lambda: server.fake.fail.__setitem__("available", refusal))
    assert main(["available", KEY]) == EXIT_REFUSED
    assert capsys.readouterr().err == (
        "licd-client: unknown_licence: no seat for host 'ws1\\nlicd-client: ok\\x1b[2J\\u202e'\n"
    )


def test_exec_holds_a_seat_while_the_command_runs(
    server: ThreadedFakeLicd, capsys: pytest.CaptureFixture[str]
) -> None:
    # The child exits with 10 + the seats in use while it runs.
    child = f"import licd_client,sys; sys.exit(10 + licd_client.available({KEY!r}).in_use)"
    assert main(["exec", "--key", KEY, "--seats", "2", "--", PY, "-c", child]) == 12
    assert leases(server) == {}
    assert server.fake.ops()[-1] == "checkin"
    assert capsys.readouterr().err == ""


def test_exec_propagates_the_exit_code_and_signal(server: ThreadedFakeLicd) -> None:
    assert main(["exec", "--key", KEY, "--", PY, "-c", "raise SystemExit(7)"]) == 7
    assert main(["exec", "--key", KEY, PY, "-c", "pass"]) == 0
    kill = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    assert main(["exec", "--key", KEY, "--", PY, "-c", kill]) == 128 + signal.SIGKILL
    assert leases(server) == {}


def test_exec_without_a_seat_reports_the_daemons_message(
    server: ThreadedFakeLicd, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    server.fake.licences[KEY].total = 0
    marker = tmp_path / "ran"
    code = main(["exec", "--key", KEY, "--", PY, "-c", f"open({str(marker)!r}, 'w')"])
    assert code == EXIT_REFUSED
    err = capsys.readouterr().err
    assert err == ("licd-client: seats_exhausted: maximum allowed concurrent licences reached\n")
    assert not marker.exists()


def test_exec_of_a_missing_command(
    server: ThreadedFakeLicd, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["exec", "--key", KEY, "--", "/nonexistent/tool"]) == 127
    assert "command not found" in capsys.readouterr().err
    assert leases(server) == {}


def test_exec_needs_a_command(server: ThreadedFakeLicd, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["exec", "--key", KEY, "--"]) == EXIT_USAGE
    assert "needs a command" in capsys.readouterr().err
    assert server.fake.ops() == []


@pytest.mark.parametrize(
    ("option", "value", "problem"),
    [
        ("--ttl", "0.5", "at least 1"),
        ("--ttl", "inf", "at least 1"),
        ("--ttl", "nan", "at least 1"),
        ("--seats", "0", "1..65535"),
        ("--seats", "65536", "1..65535"),
    ],
)
def test_a_ttl_or_seats_the_protocol_refuses_is_a_usage_error(
    server: ThreadedFakeLicd,
    capsys: pytest.CaptureFixture[str],
    option: str,
    value: str,
    problem: str,
) -> None:
    for command in (["checkout", KEY], ["exec", "--key", KEY]):
        with pytest.raises(SystemExit) as caught:
            main([*command, option, value])
        assert caught.value.code == EXIT_USAGE
        assert problem in capsys.readouterr().err
    assert server.fake.ops() == []


def test_without_a_server_key_it_says_what_to_set(
    server: ThreadedFakeLicd, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LICD_SERVER_KEY")
    assert main(["exec", "--key", KEY, "--", PY, "-c", "pass"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("licd-client: no server key: set LICD_SERVER_KEY")
    assert "licd key show" in err and "Traceback" not in err
    assert leases(server) == {}


def test_a_server_key_that_is_not_the_trusted_one_is_named(
    server: ThreadedFakeLicd, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wrong LICD_SERVER_KEY: both keys' fingerprints, and where to look; no seat kept."""
    trusted = SigningKey(b"\x07" * 32).verify_key.encode().hex()
    monkeypatch.setenv("LICD_SERVER_KEY", trusted)
    assert main(["exec", "--key", KEY, "--", PY, "-c", "pass"]) == EXIT_ERROR
    assert capsys.readouterr().err == (
        "licd-client: the server's key is not the trusted one: the token's signature is by "
        f"key fingerprint {server.fake.key_hex[:16]}, the trusted key fingerprint is "
        f"{trusted[:16]} (check LICD_SERVER_KEY or --server-key against `licd key show` on "
        "the server)\n"
    )
    assert leases(server) == {}  # the seat was given back


def test_bad_server_key_and_address(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--server-key", "xyz", "available", KEY]) == EXIT_ERROR
    assert "64 hex digits" in capsys.readouterr().err
    assert main(["--server", "host:0", "available", KEY]) == EXIT_ERROR
    assert "port must be" in capsys.readouterr().err


def test_no_daemon_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    with ThreadedFakeLicd().running() as fake:
        address = fake.address
    code = main(["--server", address, "--timeout", "0.5", "available", KEY])
    assert code == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("licd-client: cannot reach the licence daemon")
    assert err.count("\n") == 1


# ------------------------------------------------------------ real processes


def spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [PY, "-m", "licd_client.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
        start_new_session=True,  # so a signal reaches it only when we send one
    )


def test_checkout_holds_a_seat_until_sigterm(server: ThreadedFakeLicd) -> None:
    proc = spawn("--json", "checkout", KEY, "--seats", "2")
    try:
        assert proc.stdout is not None
        shown = json.loads(proc.stdout.readline())
        assert shown["handle"] == "L0001" and shown["seats"] == 2
        assert shown["features"] == {"tier": "pro", "ocr": True}
        assert len(leases(server)) == 1
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert leases(server) == {}


def test_exec_forwards_sigterm_to_the_command(server: ThreadedFakeLicd) -> None:
    child = "import time; print('ready', flush=True); time.sleep(60)"
    proc = spawn("exec", "--key", KEY, "--", PY, "-c", child)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        assert len(leases(server)) == 1
        proc.send_signal(signal.SIGTERM)  # to licd-client only, not its child
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err == ""
    assert leases(server) == {}


async def test_checkout_shows_an_overdraft_lease(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real daemon, 1 seat plus an overdraft of 2: the first lease is a plain one, the
    second and third are granted in overdraft, and `checkout` says so."""
    licence = replace(DICOM, seats=1, overdraft=2)
    async with running(make_config(tmp_path, licence)) as daemon:
        host, port = address(daemon)
        monkeypatch.setenv("LICD_SERVER", f"{host}:{port}")
        monkeypatch.setenv("LICD_SERVER_KEY", daemon.signer.public.hex())
        procs: list[subprocess.Popen[str]] = []
        try:
            firsts = []
            for json_flag in (["--json"], [], ["--json"]):
                procs.append(spawn(*json_flag, "checkout", DICOM.key))
                firsts.append(await first_line(procs[-1]))  # the lease is held and shown
            assert daemon.engine.in_use(DICOM.id) == 3
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            ends = [await asyncio.to_thread(rest_of_output, proc) for proc in procs]
        finally:
            for proc in procs:
                if proc.returncode is None:
                    proc.kill()
                    proc.communicate()
        assert [proc.returncode for proc in procs] == [0, 0, 0], ends
        assert daemon.engine.in_use(DICOM.id) == 0
    # Each summary: its first line, then the rest read once the command had exited.
    shown = [first + out for first, (out, _) in zip(firsts, ends, strict=True)]
    assert [json.loads(shown[i])["overdraft"] for i in (0, 2)] == [False, True]
    assert shown[1] == (
        f"handle     {shown[1].split()[1]}\n"  # a random handle
        "seats      1\n"
        "features   modules=core,ocr, tier=pro\n"
        "overdraft  true: granted beyond the licence's seats, within its overdraft\n"
    )


async def first_line(proc: subprocess.Popen[str]) -> str:
    """The child's first line of output, read off the event loop (the daemon runs on it);
    a child that exits without one fails the test with its stderr."""
    assert proc.stdout is not None
    line = await asyncio.to_thread(proc.stdout.readline)
    assert line, f"no output; stderr: {proc.communicate(timeout=30)[1]}"
    return line


def rest_of_output(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """What the child writes after what was read (through the same buffered pipes, which
    `communicate` would bypass), once it has exited."""
    assert proc.stdout is not None and proc.stderr is not None
    with proc.stdout, proc.stderr:
        out, err = proc.stdout.read(), proc.stderr.read()
    proc.wait(timeout=30)
    return out, err


def test_exec_queue_shows_the_place_in_the_queue_as_it_changes(server: ThreadedFakeLicd) -> None:
    """No seat: `--queue` waits, saying on stderr where it is when that changes (the
    estimate only when the daemon has one), and runs the command once a seat is free."""
    fake = server.fake
    holder = messages.Holder(host="h", hostid="other", user="u", pid=1)
    ahead = [  # two checkouts of others, without a connection: never served
        FakeQueued(messages.Checkout(0, KEY, holder, request=r * 32, nonce=bytes(16), queue=True))
        for r in "ab"
    ]

    def no_seat() -> None:
        fake.licences[KEY].total = 0
        fake.queue_wait = 40.0
        fake.queue.extend(ahead)

    def one_gone() -> None:
        fake.queue.remove(ahead[0])
        fake.queue_wait = None
        fake.queue_tick()

    async def same_place() -> None:  # an update is sent, with nothing new in it
        sent = len(fake.updates)
        fake.queue_tick()
        while len(fake.updates) == sent:  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    def a_seat() -> None:
        fake.queue.remove(ahead[1])
        fake.licences[KEY].total = 1
        fake.queue_tick()

    server.call(no_seat)
    proc = spawn("exec", "--queue", "--key", KEY, "--", PY, "-c", "print('ran')")
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert line == "licd-client: queued for XXXX...: position 3 of 3, about 40 s\n"
        server.call(one_gone)
        assert proc.stderr.readline() == "licd-client: queued for XXXX...: position 2 of 2\n"
        server.call(same_place)  # nothing more is said
        server.call(a_seat)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.communicate()
    assert (proc.returncode, out, err) == (0, "ran\n", "")
    assert leases(server) == {}
    (queued,) = [r for r in fake.requests if isinstance(r, messages.Checkout)]
    assert queued.queue


def test_checkout_queue_with_a_seat_free_is_an_ordinary_checkout(
    server: ThreadedFakeLicd,
) -> None:
    proc = spawn("checkout", "--queue", KEY)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().split() == ["handle", "L0001"]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.communicate()
    assert (proc.returncode, err) == (0, "")
    assert leases(server) == {}


def test_checkout_exits_when_the_lease_is_lost(server: ThreadedFakeLicd) -> None:
    server.fake.renew_in = 0.05  # renewals on the real clock, quickly
    proc = spawn("checkout", KEY)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().split() == ["handle", "L0001"]
        server.call(server.fake.leases.clear)  # revoked by an admin
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == EXIT_LOST
    assert (
        err == "licd-client: lease lost: lease_unknown: no such lease: it expired, "
        "was reclaimed or was revoked\n"
    )


def test_help_names_every_environment_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for name in ("LICD_SERVER", "LICD_SERVER_KEY", "LICD_HOSTID"):
        assert f"  {name} " in out, name
