"""The daemon's key file: created once, mode 0600, never overwritten; each bad file is a
KeyFileError naming the file and what is wrong."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from licd.store.keyfile import KeyFileError, key_path, load_key, load_or_create_key


def test_the_key_lives_in_the_state_directory(tmp_path: Path) -> None:
    assert key_path(tmp_path) == tmp_path / "daemon.key"


def test_the_first_start_creates_the_key_and_later_ones_load_it(tmp_path: Path) -> None:
    path = key_path(tmp_path)
    key = load_or_create_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text(encoding="ascii") == bytes(key).hex() + "\n"
    assert bytes(load_or_create_key(path)) == bytes(key)
    assert bytes(load_key(path)) == bytes(key)


def test_a_key_written_meanwhile_is_loaded_not_overwritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two daemons starting at once: the one that finds the file taken loads its key."""
    path = key_path(tmp_path)
    theirs = SigningKey(bytes([5]) * 32)
    path.write_text(bytes(theirs).hex() + "\n", encoding="ascii")
    monkeypatch.setattr(Path, "exists", lambda self: False)  # it was not there a moment ago
    assert bytes(load_or_create_key(path)) == bytes(theirs)
    assert path.read_text(encoding="ascii") == bytes(theirs).hex() + "\n"


def test_a_key_with_surrounding_whitespace_loads(tmp_path: Path) -> None:
    path = key_path(tmp_path)
    path.write_text("  " + "ab" * 32 + "\n\n", encoding="ascii")
    assert bytes(load_key(path)) == bytes.fromhex("ab" * 32)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not a daemon key (expected 64 hex digits)"),
        (b"ab" * 31 + b"\n", "not a daemon key (expected 64 hex digits)"),
        (b"ab" * 33 + b"\n", "not a daemon key (expected 64 hex digits)"),
        (b"zz" * 32 + b"\n", "not a daemon key (expected 64 hex digits)"),
        ("é".encode() * 32, "cannot read the daemon key"),
    ],
)
def test_a_malformed_key_file_is_refused(tmp_path: Path, content: bytes, message: str) -> None:
    path = key_path(tmp_path)
    path.write_bytes(content)
    with pytest.raises(KeyFileError, match=f"^{path}: ") as caught:
        load_or_create_key(path)  # never replaced by a new key either
    assert message in str(caught.value)
    assert path.read_bytes() == content


def test_a_missing_key_says_how_one_is_made(tmp_path: Path) -> None:
    path = key_path(tmp_path)
    with pytest.raises(KeyFileError, match="no daemon key yet; start the daemon once"):
        load_key(path)
    assert not path.exists()  # loading never creates one


def test_an_unreadable_key_file_is_refused(tmp_path: Path) -> None:
    path = key_path(tmp_path)
    path.mkdir()
    with pytest.raises(KeyFileError, match=f"^{path}: cannot read the daemon key"):
        load_key(path)
