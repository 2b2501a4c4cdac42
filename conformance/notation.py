"""What every family of vectors shares: the typed JSON notation, `Disagreement`, and
the helpers that make msgpack bodies and vary maps.

JSON cannot tell an integer from a float, has no binary type and no NaN, and loses
integers beyond 2**53 in many languages; so every value names its msgpack type (see
conformance/README.md). Generator side only: the replay in the tests reads it back with
its own code, as a client in another language would.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack

DROP = object()  # in `changed()`: remove the key


def tagged(value: Any) -> dict[str, Any]:
    """`value` (as msgpack-python decodes it) in the typed notation."""
    if value is None:
        return {"nil": None}
    if isinstance(value, bool):
        return {"bool": value}
    if isinstance(value, int):
        return {"int": str(value)}
    if isinstance(value, float):
        if math.isnan(value):
            return {"float": "nan"}
        if math.isinf(value):
            return {"float": "inf" if value > 0 else "-inf"}
        return {"float": value}
    if isinstance(value, str):
        return {"str": value}
    if isinstance(value, bytes):
        return {"bin": value.hex()}
    if isinstance(value, list | tuple):
        return {"array": [tagged(v) for v in value]}
    if isinstance(value, dict):
        return {"map": [[tagged(k), tagged(v)] for k, v in value.items()]}
    raise TypeError(f"no msgpack type for {type(value).__name__}")


class Disagreement(Exception):
    """The real code's verdict on a vector is not the one the vector was written for."""


def packed(value: Any) -> bytes:
    """`value` as licd_client encodes msgpack (binaries as bin, strings as str)."""
    body: bytes = msgpack.packb(value, use_bin_type=True)
    return body


def changed(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """`base` with keys set (or removed, for DROP), in the base's order."""
    out = {**base, **changes}
    return {k: v for k, v in out.items() if v is not DROP}
