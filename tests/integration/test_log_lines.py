"""The daemon's log as journald gets it (setup_logging's stderr handler): one line per
record, `key=value` pairs no client string can forge, whatever host and user it sends."""

from __future__ import annotations

import ast
import io
import logging
import re
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from licd.daemon import setup_logging
from tests.support import RawPeer, address, holder, make_config, running

START = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d level=[A-Z]+ "
VALUE = r"""(?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[^\s'"=]*)"""
PAIR = re.compile(rf"(\w+)=({VALUE})")
FORGED_HOST = "ws1\n2026-01-01T00:00:00 level=INFO event=revoke host=ws2\x1b[2K\u2028x"
FORGED_USER = "x event=checkout seats=99"


@pytest.fixture
def stderr(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """What setup_logging's handler writes, instead of the process's stderr."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level, logging.getLogger("aiosqlite").level
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    try:
        setup_logging("info")
        yield stream
    finally:
        root.handlers[:], level, sql_level = saved
        root.setLevel(level)
        logging.getLogger("aiosqlite").setLevel(sql_level)


def pairs(line: str) -> dict[str, str]:
    """A `key=value` log line's keys and values (quoted ones read back). It fails unless
    the whole line is such pairs, each key once."""
    assert re.fullmatch(rf"{START}\w+={VALUE}(?: \w+={VALUE})*", line), line
    found = PAIR.findall(line)
    keys = [key for key, _ in found]
    assert len(keys) == len(set(keys)), line
    return {k: ast.literal_eval(v) if v[:1] in "'\"" else v for k, v in found}


async def test_a_denial_with_a_newline_in_its_host_is_one_log_line(
    tmp_path: Path, stderr: io.StringIO
) -> None:
    async with running(make_config(tmp_path)) as daemon:
        peer = await RawPeer.connect(address(daemon))
        await peer.hello()
        reply = await peer.checkout(
            "NO-SUCH-KEY", holder(FORGED_HOST, user=FORGED_USER), request=secrets.token_hex(16)
        )
        assert reply["error"] == "unknown_licence"
        await peer.close()
        # Any module's record, however careless its format, stays on its line too.
        logging.getLogger("licd.anywhere").warning("event=careless peer=%s", FORGED_HOST)
    lines = stderr.getvalue().splitlines()
    assert "\x1b" not in stderr.getvalue()
    assert all(re.match(START, line) for line in lines)  # each line a whole record
    assert [line for line in lines if "careless" in line][0].endswith(
        "peer=ws1\\n2026-01-01T00:00:00 level=INFO event=revoke host=ws2\\x1b[2K\\u2028x"
    )
    [line] = [line for line in lines if " event=denied " in line]
    assert pairs(line) == {
        "level": "INFO",
        "event": "denied",
        "seats": "1",
        "host": FORGED_HOST,
        "user": FORGED_USER,
        "ip": "127.0.0.1",
        "reason": "unknown_licence",
    }
