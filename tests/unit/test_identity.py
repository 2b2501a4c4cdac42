"""Unit tests of licd_client.identity: the holder map and the privacy of the host id."""

from __future__ import annotations

import getpass
import os
import socket
import uuid
from pathlib import Path

import pytest

from licd_client import identity

MACHINE_ID = "0123456789abcdef0123456789abcdef"


def machine_id_file(tmp_path: Path, text: str = MACHINE_ID + "\n") -> str:
    path = tmp_path / "machine-id"
    path.write_text(text)
    return str(path)


def test_env_override_wins(tmp_path: Path) -> None:
    env = {"LICD_HOSTID": "  container-42 "}
    assert identity.hostid(env, [machine_id_file(tmp_path)]) == "container-42"


def test_env_override_too_long_is_an_error() -> None:
    with pytest.raises(ValueError, match="LICD_HOSTID"):
        identity.hostid({"LICD_HOSTID": "x" * 256}, [])


def test_machine_id_is_hashed_never_sent_raw(tmp_path: Path) -> None:
    hid = identity.hostid({}, [machine_id_file(tmp_path)])
    assert MACHINE_ID not in hid
    assert len(hid) == 32 and int(hid, 16) >= 0
    # Stable: the same machine id gives the same host id; another gives another.
    assert identity.hostid({}, [machine_id_file(tmp_path)]) == hid
    other = tmp_path / "other"
    other.mkdir()
    assert identity.hostid({}, [machine_id_file(other, "f" * 32)]) != hid


def test_falls_through_missing_and_empty_files(tmp_path: Path) -> None:
    empty = machine_id_file(tmp_path, "\n")
    second = tmp_path / "dbus-machine-id"
    second.write_text(MACHINE_ID)
    paths = [str(tmp_path / "missing"), empty, str(second)]
    assert identity.hostid({}, paths) == identity.hostid({}, [str(second)])


def test_falls_back_to_a_hash_of_the_mac_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(uuid, "getnode", lambda: 0x0242AC110002)
    hid = identity.hostid({}, [str(tmp_path / "missing")])
    assert len(hid) == 32
    assert "0242ac110002" not in hid
    monkeypatch.setattr(uuid, "getnode", lambda: 0x0242AC110003)
    assert identity.hostid({}, [str(tmp_path / "missing")]) != hid


def test_holder_describes_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LICD_HOSTID", "box-1")
    h = identity.holder(app="scanner", instance="ward-3")
    assert h.host == socket.gethostname()[:255]
    assert h.hostid == "box-1"
    assert h.pid == os.getpid()
    assert h.user
    assert (h.app, h.instance) == ("scanner", "ward-3")
    # It is a valid holder map on the wire.
    assert type(h).from_wire(h.to_wire()) == h


def test_user_falls_back_to_the_uid(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_user() -> str:
        raise KeyError("getpwuid(): uid not found")

    monkeypatch.setattr(getpass, "getuser", no_user)
    assert identity.username() == str(os.getuid())
