"""Checks of systemd/licd.service: its notify contract, systemd's own verdicts on it, and
that the daemon's stack runs under the memory protection the unit imposes.

`systemd-analyze` (Debian's systemd package; .ci/run installs it) checks the file
offline: no running systemd is needed. Where it is missing those tests skip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "licd.service"
EXEC_START = "ExecStart=/usr/local/bin/licd serve --config /etc/licd/licd.toml"
MAX_EXPOSURE = 1.5

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None,
    reason="systemd-analyze is not installed (Debian package: systemd; .ci/run installs it)",
)


def directives(text: str) -> dict[str, list[str]]:
    """The unit's assignments, each key with its values in order (keys may repeat)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not an assignment: {line!r}"
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "LC_ALL": "C.UTF-8"}
    return subprocess.run(
        [ANALYZE, "--no-pager", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_unit_keeps_the_notify_contract() -> None:
    """What licd/shells/notify.py and the daemon rely on; no systemd needed to check it."""
    unit = directives(UNIT.read_text(encoding="utf-8"))
    assert unit["Type"] == ["notify"]
    assert unit["NotifyAccess"] == ["main"]
    assert unit["WatchdogSec"] == ["30s"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["ExecStart"] == [EXEC_START.partition("=")[2]]
    assert unit["DynamicUser"] == ["yes"]
    assert unit["StateDirectory"] == ["licd"]
    assert unit["StateDirectoryMode"] == ["0700"]
    assert unit["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    assert unit["CapabilityBoundingSet"] == [""]


@needs_analyze
def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    # verify insists that ExecStart's binary exists: point a copy at one that does.
    binary = Path(sys.executable).parent / "licd"
    if not os.access(binary, os.X_OK):
        binary = Path(shutil.which("true") or "/bin/true")
    text = UNIT.read_text(encoding="utf-8")
    assert text.count(EXEC_START) == 1
    copy = tmp_path / "licd.service"
    copy.write_text(
        text.replace(EXEC_START, f"ExecStart={binary} serve --config /etc/licd/licd.toml"),
        encoding="utf-8",
    )
    result = analyze("verify", str(copy))
    output = result.stdout + result.stderr
    about_us = [line for line in output.splitlines() if "licd.service" in line]
    assert about_us == [], output
    assert result.returncode == 0, output


def overall_exposure(output: str) -> float:
    """The "Overall exposure level for licd.service: 1.1 OK" figure of a security report."""
    plain = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", output)
    found = re.findall(
        r"overall exposure level for \S+?:\s*([0-9]+(?:[.,][0-9]+)?)", plain, re.IGNORECASE
    )
    assert len(found) == 1, f"no single overall exposure level in:\n{output}"
    return float(found[0].replace(",", "."))


def test_overall_exposure_parser() -> None:
    report = textwrap.dedent(
        """\
          NAME          DESCRIPTION                      EXPOSURE
        \u2717 PrivateNetwork=  Service has access to the host's network   0.5

        \x1b[1m\u2192 Overall exposure level for licd.service: 1.1 \x1b[32mOK\x1b[0m \U0001f642
        """
    )
    assert overall_exposure(report) == 1.1
    assert overall_exposure("-> Overall exposure level for a.service: 10.0 UNSAFE :-{\n") == 10.0
    with pytest.raises(AssertionError):
        overall_exposure("Unit licd.service not found.\n")


@needs_analyze
def test_systemd_analyze_security_rates_the_unit_at_most_1_5() -> None:
    # --threshold takes the exposure level times ten (0..100): 15 is 1.5.
    threshold = round(MAX_EXPOSURE * 10)
    result = analyze("security", "--offline=true", f"--threshold={threshold}", str(UNIT))
    output = result.stdout + result.stderr
    exposure = overall_exposure(output)
    assert exposure <= MAX_EXPOSURE, output
    assert result.returncode == 0, output


# MemoryDenyWriteExecute=yes would kill (or fail) a daemon whose libraries map memory
# writable and executable. Linux >= 6.3 enforces the same rule per process with
# prctl(PR_SET_MDWE): run the daemon's native-code paths under it.
MDWE_CHILD = """
import ctypes, mmap, os, sys
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    print("unsupported:", os.strerror(ctypes.get_errno()))
    sys.exit(0)
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except OSError:
    pass
else:
    sys.exit("PR_SET_MDWE is on but a writable executable mapping was allowed")

import asyncio, sqlite3
import msgpack, nacl.signing
import licd.cli.main, licd.daemon, licd.shells.notify  # the daemon's whole import graph

key = nacl.signing.SigningKey.generate()
assert key.verify_key.verify(key.sign(b"lease")) == b"lease"
assert msgpack.unpackb(msgpack.packb({"seats": 3})) == {"seats": 3}
db = sqlite3.connect(sys.argv[1])
db.execute("PRAGMA journal_mode=WAL")
db.execute("CREATE TABLE t (x)")
db.execute("INSERT INTO t VALUES (1)")
db.commit()
db.close()

async def echo() -> None:
    async def serve(reader, writer):
        writer.write(await reader.readexactly(4))
        await writer.drain()
        writer.close()
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"ping")
    assert await reader.readexactly(4) == b"ping"
    writer.close()
    server.close()
    await server.wait_closed()

asyncio.run(echo())
print("ok")
"""


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_MDWE is Linux's")
def test_daemon_stack_runs_without_writable_executable_memory(tmp_path: Path) -> None:
    unit = directives(UNIT.read_text(encoding="utf-8"))
    assert unit.get("MemoryDenyWriteExecute") == ["yes"]
    result = subprocess.run(
        [sys.executable, "-c", MDWE_CHILD, str(tmp_path / "mdwe.db")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    if result.stdout.startswith("unsupported:"):
        pytest.skip(f"this kernel has no PR_SET_MDWE (Linux >= 6.3): {result.stdout.strip()}")
    assert result.stdout.strip() == "ok"
