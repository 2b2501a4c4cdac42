"""`licd serve` as a real process: signals, restarts, the state directory, CLI errors."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from licd.core.service import LicenceService
from licd.daemon import Daemon, StartupError
from licd_client.errors import Unavailable
from tests.integration.procs import (
    DICOM_TOML,
    Daemons,
    lease_fields,
    one_line_error,
    run_licd,
    write_config,
)
from tests.support import RawPeer, holder, make_config, running

KEY = str(DICOM_TOML["key"])
SEATS = int(str(DICOM_TOML["seats"]))
#: How soon a daemon told to exit now (a second signal) is gone, at most: its store gets
#: 1 s, a commit stuck on a write lock held elsewhere up to 5 s more (SQLite's busy wait
#: on the store's thread, which the exit waits for).
EXIT_NOW_WITHIN = 20.0


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    with Daemons(tmp_path) as d:
        yield d


async def connected(addr: tuple[str, int]) -> RawPeer:
    peer = await RawPeer.connect(addr)
    await peer.hello()
    return peer


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_graceful_stop_keeps_every_lease(daemons: Daemons, sig: int) -> None:
    config = daemons.config()
    first = await daemons.astart(config)
    peers = [await connected(first.addr) for _ in range(2)]
    leases = [
        lease_fields(await peers[0].checkout(h=holder("machine-a"), seats=2)),
        lease_fields(await peers[1].checkout(h=holder("machine-b"))),
    ]
    before = await peers[0].call("available", key=KEY)
    assert before["ok"] is True and before["in_use"] == SEATS

    # Stop while both clients are still connected and holding their leases.
    await first.aterminate(sig=sig)
    log = first.stderr()
    assert "Traceback" not in log, log
    assert "event=stopped" in log
    assert " loop=uvloop" in log  # installed (the dev extra has it): used, event_loop = "auto"
    for peer in peers:
        assert await peer.closed()

    second = await daemons.astart(config)
    assert "event=restored leases=2" in second.stderr()
    peer = await connected(second.addr)
    for secret, seats in leases:
        reply = await peer.call("heartbeat", lease=secret, nonce=os.urandom(16))
        assert reply["ok"] is True, reply
        assert reply["seats"] == seats
    after = await peer.call("available", key=KEY)
    assert after == {**before, "id": after["id"]}
    # No seat was freed by the restart: the licence is still full.
    refused = await peer.checkout(h=holder("machine-c"))
    assert refused["ok"] is False and refused["error"] == "seats_exhausted", refused
    await peer.close()
    await second.aterminate()
    assert "Traceback" not in second.stderr()


async def test_second_daemon_on_the_same_state_dir_is_refused(daemons: Daemons) -> None:
    config = daemons.config()
    first = await daemons.astart(config)
    state_dir = daemons.directory / "state"

    result = run_licd("serve", "--config", str(config))
    assert result.returncode != 0
    line = one_line_error(result.stderr)
    assert "already running" in line and str(state_dir) in line, line

    # The first daemon is untouched and still serving.
    assert first.running()
    peer = await connected(first.addr)
    assert lease_fields(await peer.checkout())[1] == 1
    await peer.close()
    await first.aterminate()


async def test_key_show_prints_the_key_the_daemon_serves(daemons: Daemons) -> None:
    config = daemons.config()
    daemon = await daemons.astart(config)
    peer = await connected(daemon.addr)
    hello = await peer.call("hello", protocol=1, client="tests/1")
    await peer.close()

    shown = run_licd("key", "show", "--config", str(config))
    assert shown.returncode == 0, shown.stderr
    assert re.fullmatch(r"[0-9a-f]{64}\n", shown.stdout), shown.stdout
    assert shown.stdout.strip() == hello["key"].hex()
    assert f"key={shown.stdout.strip()}" in daemon.stderr()  # the ready line agrees

    state_dir = daemons.directory / "state"
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((state_dir / "daemon.key").stat().st_mode) == 0o600

    # The key is kept across a restart: clients' pinned key stays valid.
    await daemon.aterminate()
    again = await daemons.astart(config)
    peer = await connected(again.addr)
    assert (await peer.hello())["key"] == hello["key"]
    await peer.close()
    await again.aterminate()


async def test_lease_secrets_stay_private_in_an_existing_state_dir(daemons: Daemons) -> None:
    state_dir = daemons.directory / "state"
    state_dir.mkdir()
    state_dir.chmod(0o755)  # as `install -d` or a package's postinst would leave it
    daemon = await daemons.astart(daemons.config())
    peer = await connected(daemon.addr)
    lease_fields(await peer.checkout())  # a secret is now on disk
    await peer.close()

    # Whatever holds lease secrets must be closed to group and others: either the
    # directory (the daemon tightens it, or refuses to start) or every file in it.
    dir_private = stat.S_IMODE(state_dir.stat().st_mode) & 0o077 == 0
    db_files = [f for f in state_dir.iterdir() if f.name.startswith("licd.db")]
    files_private = all(stat.S_IMODE(f.stat().st_mode) & 0o077 == 0 for f in db_files)
    assert stat.S_IMODE((state_dir / "daemon.key").stat().st_mode) == 0o600
    assert dir_private or files_private, [
        (f.name, oct(stat.S_IMODE(f.stat().st_mode))) for f in [state_dir, *db_files]
    ]
    await daemon.aterminate()


async def test_key_show_before_first_start_is_one_clear_line(daemons: Daemons) -> None:
    config = daemons.config()
    result = run_licd("key", "show", "--config", str(config))
    assert result.returncode != 0
    assert "daemon.key" in one_line_error(result.stderr)


BAD_CONFIGS = {
    "unknown-server-key": ('[server]\nlistn = ["127.0.0.1:0"]\n', "server.listn"),
    "seats-not-an-integer": (
        '[[licence]]\nkey = "A-B"\nid = "a"\nproduct = "p"\nseats = "three"\n',
        "licence[0].seats",
    ),
    "missing-product": ('[[licence]]\nkey = "A-B"\nid = "a"\nseats = 1\n', "licence[0].product"),
    "bad-listen-address": ('[server]\nlisten = ["localhost"]\n', "server.listen[0]"),
    "bad-duration": ('[server]\nidle_timeout = "ten minutes"\n', "server.idle_timeout"),
}


@pytest.mark.parametrize(("text", "key"), BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_bad_config_is_one_line_naming_file_and_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    result = run_licd("serve", "--config", str(path))
    assert result.returncode != 0
    line = one_line_error(result.stderr)
    assert str(path) in line and key in line, line
    assert not (tmp_path / "state").exists()


def test_unreadable_toml_and_missing_file_are_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[server\n", encoding="utf-8")
    missing = tmp_path / "missing.toml"
    for path in (broken, missing):
        result = run_licd("serve", "--config", str(path))
        assert result.returncode != 0
        assert str(path) in one_line_error(result.stderr)


async def test_port_in_use_is_a_clear_error(daemons: Daemons, tmp_path: Path) -> None:
    first = await daemons.astart(daemons.config())
    other = tmp_path / "other"
    other.mkdir()
    config = write_config(other, listen=[f"127.0.0.1:{first.port}"])
    result = run_licd("serve", "--config", str(config))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: cannot listen"), result.stderr
    assert first.running()
    await first.aterminate()


def test_what_the_config_names_outside_itself_is_checked_by_serve_and_check_config(
    tmp_path: Path,
) -> None:
    path = write_config(tmp_path)
    base = path.read_text(encoding="utf-8")
    missing_ca = tmp_path / "missing-ca.pem"
    cases = {
        '\n[admin]\ngroup = "licd-no-such-group"\n': (
            "admin.group: no group named 'licd-no-such-group'"
        ),
        (
            f'\n[upstream]\nservers = ["127.0.0.1:1"]\ntrust = ["{"ab" * 32}"]\n'
            f'tls = true\nca_file = "{missing_ca}"\n'
        ): f"cannot load the upstream CA file {missing_ca}: No such file or directory",
    }
    precious = tmp_path / "precious.db"
    precious.write_bytes(b"an operator's file")
    long_path = tmp_path / ("s" * 120)
    cases[f'\n[admin]\nsocket = "{precious}"\n'] = (
        f"admin socket {precious}: something that is not a socket is there; name a path of its own"
    )
    cases[f'\n[admin]\nsocket = "{long_path}"\n'] = (
        f"admin socket {long_path}: the path is longer than a Unix socket allows (107 bytes)"
    )
    for extra, message in cases.items():
        path.write_text(base + extra, encoding="utf-8")
        for args in (("check-config", str(path)), ("serve", "--config", str(path))):
            result = run_licd(*args)
            assert result.returncode == 1, (args, result.stderr)
            assert one_line_error(result.stderr) == f"Error: {message}", args
    # Nothing was left behind: not even the state directory was made.
    assert not (tmp_path / "state").exists()
    assert precious.read_bytes() == b"an operator's file"


async def test_the_state_directory_itself_is_locked_and_never_a_shared_one(
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "state"
    config = make_config(state_dir)
    async with running(config):
        # No file in it to delete that would let a second daemon in.
        for path in state_dir.iterdir():
            assert path.name.startswith(("licd.db", "daemon.key", "admin.sock")), path
        with pytest.raises(StartupError, match="another licd is already running"):
            await Daemon.open(config)
    shared = tmp_path / "shared"
    shared.mkdir()
    for mode in (0o1777, 0o777):
        shared.chmod(mode)
        with pytest.raises(StartupError, match=r"is shared \(mode 1?777\), like /tmp"):
            await Daemon.open(make_config(shared))
        assert stat.S_IMODE(shared.stat().st_mode) == mode  # left as it was
        assert list(shared.iterdir()) == []


async def test_a_database_whose_key_is_gone_is_not_given_a_new_key(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    async with running(make_config(state_dir)) as daemon:
        key = daemon.signer.public
    (state_dir / "daemon.key").rename(tmp_path / "daemon.key")
    with pytest.raises(StartupError, match=r"daemon\.key is missing: clients trust that key"):
        await Daemon.open(make_config(state_dir))
    assert not (state_dir / "daemon.key").exists()
    (tmp_path / "daemon.key").rename(state_dir / "daemon.key")  # restored from the backup
    async with running(make_config(state_dir)) as daemon:
        assert daemon.signer.public == key


async def test_a_config_licence_that_cannot_be_saved_stops_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def failing(*args: object, **kwargs: object) -> str:
        raise Unavailable("the licence was not saved")

    monkeypatch.setattr(LicenceService, "put_licence", failing)
    with pytest.raises(StartupError) as refused:
        async with running(make_config(tmp_path)):
            pass
    assert str(refused.value) == (
        "cannot save licence 'dicom-hq' from the config: the licence was not saved"
    )
    monkeypatch.undo()
    async with running(make_config(tmp_path)):  # the state directory was let go
        pass


async def test_a_second_signal_exits_now_while_requests_wait_on_the_disk(
    daemons: Daemons,
) -> None:
    """SIGTERM, then SIGINT during the drain: the daemon exits at once instead of waiting
    for requests whose commits are held (an operator's shell holds the database's write
    lock: each commit waits 5 s for it, then fails, so the drain alone would take 40 s),
    cuts their connection, and leaves the database whole: nothing it never acknowledged
    was granted."""
    config = daemons.config({**DICOM_TOML, "seats": 10}, shutdown_timeout=300)
    daemon = await daemons.astart(config)
    shell = sqlite3.connect(config.parent / "state" / "licd.db", isolation_level=None)
    try:
        shell.execute("BEGIN IMMEDIATE")
        peer, probe = await connected(daemon.addr), await connected(daemon.addr)
        for n in range(8):  # as many as one connection may have in flight
            request = {"key": KEY, "holder": holder(f"m{n}").to_wire(), "seats": 1}
            await peer.send(
                {"op": "checkout", "id": n, "request": f"{n:02}" * 11, "nonce": os.urandom(16)}
                | request
            )
        async with asyncio.timeout(10):  # the engine has granted them, the disk has not
            while (await probe.call("available", key=KEY))["in_use"] < 8:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(daemon.wait_for, "event=stopping")
        daemon.proc.send_signal(signal.SIGINT)
        code = await asyncio.to_thread(daemon.proc.wait, EXIT_NOW_WITHIN)
        log = daemon.stderr()
        assert code == 0, log
        assert await peer.closed(), log  # cut off
        await probe.close()
    finally:
        shell.rollback()
        shell.close()
    assert "Traceback" not in log, log
    assert "event=exit_now" in log and log.rstrip().endswith("event=stopped"), log
    again = await daemons.astart(config)
    probe = await connected(again.addr)
    assert (await probe.call("available", key=KEY))["in_use"] == 0
    await probe.close()
    await again.aterminate()
