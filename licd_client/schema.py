"""Strict schema checks for decoded maps: typed fields out, leftovers refused.

`Fields` takes one field at a time out of a decoded msgpack map (text, unsigned
integers, numbers, binaries, flags, maps, arrays) and raises the given error naming
the field when its type, length or range is wrong; `done()` rejects unknown keys. Used
for requests, replies and admin requests alike; it knows no message.
"""

from __future__ import annotations

from typing import Any, TypeAlias

MAX_UINT = 2**64 - 1
#: An error names at most this many unknown keys, each cut to NAME_CHARS characters:
#: the reply stays small whatever the request carried.
MAX_NAMED = 5
NAME_CHARS = 40

FeatureValue: TypeAlias = str | int | bool | float
Features: TypeAlias = dict[str, FeatureValue]

_ABSENT: Any = object()  # what a reader takes out for a key the map does not have
_INF = float("inf")


class Fields:
    """Takes typed fields out of one decoded map; `done()` rejects what is left over.

    Each reader takes its key out with one `pop` and tests the value once, scalars by
    exact type (msgpack decodes to exact str, bytes, int, float and bool, and
    `type(v) is int` also refuses a bool). An absent key, an explicit nil and a value of
    the wrong type all fail that test; only then does `_refusal` tell them apart.
    """

    __slots__ = ("_data", "_what", "_error")

    def __init__(self, data: dict[str, Any], what: str, error: type[Exception]) -> None:
        self._data = dict(data)
        self._what = what
        self._error = error

    def _fail(self, name: str, problem: str) -> Exception:
        return self._error(f"{self._what}: '{name}' {problem}")

    def _refusal(self, name: str, value: Any, problem: str) -> Exception:
        """The error for a value that is absent, nil (an explicit nil is not an absent
        optional key) or not what the reader wants (`problem`)."""
        if value is _ABSENT:
            return self._fail(name, "is required")
        if value is None:
            return self._fail(name, "must not be nil")
        return self._fail(name, problem)

    def text(self, name: str, *, max_len: int = 1024, required: bool = True) -> Any:
        value = self._data.pop(name, _ABSENT)
        if type(value) is not str:
            if value is _ABSENT and not required:
                return None
            raise self._refusal(name, value, "must be a string")
        if len(value) > max_len:
            raise self._fail(name, f"must be at most {max_len} characters")
        return value

    def nonempty_str(self, name: str, *, max_len: int = 1024, min_len: int = 1) -> str:
        value = self._data.pop(name, _ABSENT)
        if type(value) is not str:
            raise self._refusal(name, value, "must be a string")
        if not min_len <= len(value) <= max_len:
            if len(value) > max_len:
                raise self._fail(name, f"must be at most {max_len} characters")
            if not value:
                raise self._fail(name, "must not be empty")
            raise self._fail(name, f"must be at least {min_len} characters")
        return value

    def uint(
        self, name: str, *, required: bool = True, minimum: int = 0, maximum: int = MAX_UINT
    ) -> Any:
        value = self._data.pop(name, _ABSENT)
        if type(value) is not int or not 0 <= value <= MAX_UINT:
            if value is _ABSENT and not required:
                return None
            raise self._refusal(name, value, "must be an unsigned integer")
        if value < minimum:
            raise self._fail(name, f"must be at least {minimum}")
        if value > maximum:
            raise self._fail(name, f"must be at most {maximum}")
        return value

    def number(
        self,
        name: str,
        *,
        required: bool = True,
        positive: bool = False,
        minimum: float | None = None,
    ) -> Any:
        value = self._data.pop(name, _ABSENT)
        if type(value) is not float and type(value) is not int:
            if value is _ABSENT and not required:
                return None
            raise self._refusal(name, value, "must be a number")
        value = float(value)
        if not -_INF < value < _INF:  # NaN too
            raise self._fail(name, "must be a finite number")
        if positive and value <= 0:
            raise self._fail(name, "must be positive")
        if minimum is not None and value < minimum:
            raise self._fail(name, f"must be at least {minimum:g}")
        return value

    def binary(
        self,
        name: str,
        *,
        length: int | None = None,
        required: bool = True,
        max_len: int | None = None,
    ) -> Any:
        value = self._data.pop(name, _ABSENT)
        if type(value) is not bytes:
            if value is _ABSENT and not required:
                return None
            raise self._refusal(name, value, "must be binary")
        if length is not None and len(value) != length:
            raise self._fail(name, f"must be {length} bytes of binary")
        if max_len is not None and not 1 <= len(value) <= max_len:
            raise self._fail(name, f"must be 1 to {max_len} bytes of binary")
        return value

    def flag(self, name: str, default: bool | None = None) -> bool:
        value = self._data.pop(name, _ABSENT)
        if type(value) is not bool:
            if value is _ABSENT and default is not None:
                return default
            raise self._refusal(name, value, "must be a boolean")
        return value

    def mapping(self, name: str, *, required: bool = True) -> Any:
        value = self._data.pop(name, _ABSENT)
        if not isinstance(value, dict):
            if value is _ABSENT and not required:
                return None
            raise self._refusal(name, value, "must be a map")
        return value

    def bins(self, name: str) -> list[bytes]:
        value = self._data.pop(name, _ABSENT)
        if not isinstance(value, list) or not all(isinstance(v, bytes) for v in value):
            raise self._refusal(name, value, "must be an array of binaries")
        return value

    def array(self, name: str, *, required: bool = True) -> list[Any]:
        """An array of anything (its items are the caller's to check); an optional one
        is empty when absent."""
        value = self._data.pop(name, _ABSENT)
        if not isinstance(value, list):
            if value is _ABSENT and not required:
                return []
            raise self._refusal(name, value, "must be an array")
        return value

    def strings(self, name: str, *, max_len: int = 1024) -> list[str]:
        """An optional array of strings (empty when absent)."""
        value = self._data.pop(name, _ABSENT)
        if value is _ABSENT:
            return []
        if not isinstance(value, list) or not all(
            isinstance(v, str) and 0 < len(v) <= max_len for v in value
        ):
            raise self._refusal(name, value, "must be an array of non-empty strings")
        return value

    def features(self, name: str) -> Features:
        value = self.mapping(name)
        for k, v in value.items():
            if not isinstance(k, str) or not isinstance(v, str | int | bool | float):
                raise self._fail(name, "must map strings to str, int, bool or float")
        return dict(value)

    def rename(self, what: str) -> None:
        self._what = what

    def done(self) -> None:
        if self._data:
            names = sorted(_shortened(repr(k)) for k in self._data)
            more = len(names) - MAX_NAMED
            listed = ", ".join(names[:MAX_NAMED]) + (f" and {more} more" if more > 0 else "")
            raise self._error(f"{self._what}: unknown keys {listed}")


def _shortened(name: str) -> str:
    return name if len(name) <= NAME_CHARS else name[: NAME_CHARS - 1] + "…"
