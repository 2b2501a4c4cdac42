"""The conformance vectors (conformance/, docs/protocol.md "Conformance vectors").

(a) The generator, run into a temporary directory, writes the checked-in files byte for
byte, so the vectors never go stale. (b) Every vector is replayed from its JSON alone,
the way a client in another language would: the typed notation is read back here (not
by the generator's code), and licd_client's decoder, schemas and verifier must give
each vector's verdict.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from conformance import generate
from licd_client.errors import LicdError, ProtocolViolation, TokenInvalid, UntrustedKey
from licd_client.messages import BatchProof, parse_reply, parse_request, request_id
from licd_client.tokens import Statement, verify_lease
from licd_client.wire import (
    MAX_FRAME_AFTER_HELLO,
    MAX_FRAME_BEFORE_HELLO,
    REPLY_LIMITS,
    REQUEST_LIMITS,
    FrameDecoder,
    decode_body,
)

KIT = Path(__file__).resolve().parents[2] / "conformance"
FAMILIES = ("frames", "requests", "replies", "chains")
MAX_FRAME = {"before_hello": MAX_FRAME_BEFORE_HELLO, "after_hello": MAX_FRAME_AFTER_HELLO}


def load(family: str) -> list[dict[str, Any]]:
    data = json.loads((KIT / f"{family}.json").read_text(encoding="ascii"))
    assert (data["format"], data["family"]) == ("licd-conformance/1", family)
    vectors: list[dict[str, Any]] = data["vectors"]
    return vectors


VECTORS = {family: load(family) for family in FAMILIES}


def vectors(family: str) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("v", VECTORS[family], ids=lambda v: v["name"])


def value(typed: dict[str, Any]) -> Any:
    """A value of the typed notation (conformance/README.md) as msgpack-python gives it."""
    ((kind, v),) = typed.items()
    if kind == "nil":
        assert v is None
        return None
    if kind == "bool":
        assert isinstance(v, bool)
        return v
    if kind == "int":
        assert isinstance(v, str)
        return int(v)
    if kind == "float":
        assert isinstance(v, float) or v in ("nan", "inf", "-inf")
        return float(v)
    if kind == "str":
        assert isinstance(v, str)
        return v
    if kind == "bin":
        return bytes.fromhex(v)
    if kind == "array":
        return [value(item) for item in v]
    if kind == "map":
        return {value(k): value(item) for k, item in v}
    raise AssertionError(f"no such type in the notation: {kind!r}")


def same(a: Any, b: Any) -> bool:
    """Equal, and of the same types all the way down (1, 1.0 and True differ; NaN is NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return bool(a == b)


# ------------------------------------------------------------------ (a) up to date


def test_the_generator_writes_the_checked_in_files(tmp_path: Path) -> None:
    assert generate.main([str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{f}.json" for f in FAMILIES)
    for family in FAMILIES:
        name = f"{family}.json"
        assert (tmp_path / name).read_bytes() == (KIT / name).read_bytes(), (
            f"conformance/{name} is stale: run `python -m conformance.generate`"
        )


def test_the_generator_refuses_a_directory_that_is_not_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert generate.main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err == f"conformance: {tmp_path / 'missing'}: not a directory\n"


def test_a_case_the_code_disagrees_with_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A verifier that accepts every token disagrees with the chains' rejections: the
    # families built before them are not written either.
    anything = Statement("lease", bytes(32), 0.0, 1.0, None, {})
    monkeypatch.setattr("conformance.chain_vectors.verify_lease", lambda *a, **k: anything)
    assert generate.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("conformance: chains/") and "licd_client accepts it" in err
    assert err.endswith("; nothing was written\n")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------- (b) frames


def replay_frames(stream: bytes, max_frame: int, step: int) -> tuple[list[Any], str]:
    """Feed `stream` `step` bytes at a time, pulling maps after each: (maps, outcome)."""
    decoder = FrameDecoder(max_frame, REQUEST_LIMITS)
    frames: list[Any] = []
    for start in range(0, len(stream), step):
        decoder.feed(stream[start : start + step])
        try:
            while (item := decoder.next_frame()) is not None:
                frames.append(item)
        except LicdError as exc:
            assert decoder.failed  # dead: the stream cannot be resynchronised
            return frames, exc.code
    return frames, "complete" if decoder.buffered == 0 else "incomplete"


@vectors("frames")
@pytest.mark.parametrize("step", [1 << 20, 1], ids=["whole", "bytewise"])
def test_frames(v: dict[str, Any], step: int) -> None:
    assert v["max_frame"] == MAX_FRAME[v["phase"]]
    frames, outcome = replay_frames(bytes.fromhex(v["stream"]), MAX_FRAME[v["phase"]], step)
    expected = [value(f) for f in v["frames"]]
    assert len(frames) == len(expected)
    assert all(same(got, want) for got, want in zip(frames, expected, strict=True))
    if v["outcome"] == "error":
        assert (outcome, v["closes"]) == (v["error"], True)
    else:
        assert outcome == v["outcome"]


# --------------------------------------------------------------------- (b) requests


@vectors("requests")
def test_requests(v: dict[str, Any]) -> None:
    data = decode_body(bytes.fromhex(v["body"]), REQUEST_LIMITS)
    assert same(data, value(v["value"]))
    if v["verdict"] == "valid":
        assert same(parse_request(data).to_wire(), value(v["request"]))
    else:
        assert v["verdict"] == "bad_request"
        with pytest.raises(LicdError) as caught:
            parse_request(data)
        assert caught.value.code == "bad_request"
        assert same(request_id(data), value(v["reply_id"]))


# ---------------------------------------------------------------------- (b) replies


@vectors("replies")
def test_replies(v: dict[str, Any]) -> None:
    data = decode_body(bytes.fromhex(v["body"]), REPLY_LIMITS)
    assert same(data, value(v["value"]))
    if v["verdict"] == "result":
        assert same(parse_reply(v["op"], data).to_wire(), value(v["reply"]))
    elif v["verdict"] == "violation":
        with pytest.raises(ProtocolViolation):
            parse_reply(v["op"], data)
    else:
        assert v["verdict"] == "error"
        with pytest.raises(LicdError) as caught:
            parse_reply(v["op"], data)
        err = caught.value
        assert (err.code, err.retry_after) == (v["error"], v["retry_after"])
        assert same(err.detail, None if v["detail"] is None else value(v["detail"]))


# ----------------------------------------------------------------------- (b) chains


def batch_proof(batch: dict[str, Any] | None) -> BatchProof | None:
    """A chain vector's optional `batch`, as the reply carried it."""
    if batch is None:
        return None
    path = [bytes.fromhex(p) for p in batch["path"]]
    return BatchProof(bytes.fromhex(batch["sig"]), batch["size"], batch["index"], path)


@vectors("chains")
def test_chains(v: dict[str, Any]) -> None:
    def run() -> Any:
        return verify_lease(
            [bytes.fromhex(a) for a in v["anchors"]],
            [bytes.fromhex(link) for link in v["chain"]],
            bytes.fromhex(v["token"]),
            nonce=bytes.fromhex(v["nonce"]),
            handle=v["handle"],
            batch=batch_proof(v.get("batch")),
            at=v["at"],
        )

    if v["verdict"] == "accepted":
        leaf = run()
        assert leaf.iss == bytes.fromhex(v["signer"])
        assert same(leaf.payload, value(v["lease"]))
        assert (leaf.proof is not None) == ("batch" in v)
    else:
        assert v["verdict"] == "rejected"
        with pytest.raises(TokenInvalid) as caught:
            run()
        # licd_client names an untrusted key as such, and only that.
        assert isinstance(caught.value, UntrustedKey) == (v["reason"] == "untrusted")
