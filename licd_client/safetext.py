"""The one rule for showing strings someone else chose (a client's host and user, a
daemon's error text): how they leave a process for a terminal, a log or a spreadsheet.

Control characters become visible escapes (`\\n`, `\\x1b`, `\\u202e`), so no value can
start a line, move the cursor, colour the terminal or reorder what is shown; a CSV cell
never starts a formula. Pure text in, text out: no I/O, and it never refuses or judges a
value. It lives in licd_client, which must not import licd, so both packages share it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

# What a terminal or a log reader would act on instead of showing: C0 (newline, ESC...),
# DEL, C1 (NEL, CSI...), the line and paragraph separators, the bidirectional formatting
# characters (marks, embeddings, overrides, isolates: they reorder a line as displayed)
# and lone surrogates (which no UTF-8 stream can carry).
_CONTROLS = (
    "\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff"
)
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r", "\\": "\\\\"}
_VALUE = re.compile(f"[{_CONTROLS}\\\\]")
_LINE = re.compile(f"[{_CONTROLS}]")
# A spreadsheet reads a cell starting with one of these as a formula (OWASP, "CSV
# injection"). OWASP's other two, tab and carriage return, never lead a cell here: they
# are escaped first.
FORMULA_PREFIXES = ("=", "+", "-", "@")
# A key=value log value left bare: no control, space, quote, backslash or `=`.
_BARE = re.compile(f"[^{_CONTROLS}\\s=\"'\\\\]+")


def _escaped(char: re.Match[str]) -> str:
    c = char.group()
    if c in _NAMED:
        return _NAMED[c]
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """One value for a person: each control character as a visible escape (`\\n`,
    `\\t`, `\\x1b`, `\\x85`, `\\u202e`) and `\\` as `\\\\`, so what is shown stays on one
    line and is unambiguous (it maps back to exactly one string)."""
    return _VALUE.sub(_escaped, text) if _VALUE.search(text) else text


def one_line(text: str) -> str:
    """A whole message (a log record, an error sentence) on one line: its control
    characters escaped as by `escape`, its backslashes kept (the message quotes its own
    values, with repr, and doubling would garble them)."""
    return _LINE.sub(_escaped, text) if _LINE.search(text) else text


def quoted(value: object) -> str:
    """A value for a `key=value` line: bare when nothing in it could be read as a space,
    an `=`, a quote or a control character; else its repr (`'x event=checkout'`), so no
    value can forge another key or another line."""
    if not isinstance(value, str):
        return str(value)
    return value if _BARE.fullmatch(value) else repr(value)


def kv_line(pairs: Iterable[tuple[str, object]] = (), /, **more: object) -> str:
    """A `key=value` log line from `pairs`, then `more`, in order: each value `quoted`,
    and a key whose value is None (absent, unknown) left out rather than shown as
    `None`, so `licence=None` can never be read as a licence of that name."""
    items = [*pairs, *more.items()]
    return " ".join(f"{key}={quoted(value)}" for key, value in items if value is not None)


def csv_cell(value: object) -> str:
    """A CSV cell a spreadsheet shows as text: the value escaped (`escape`; None is
    empty), with a `'` put before one that would start a formula."""
    text = "" if value is None else escape(str(value))
    return "'" + text if text.startswith(FORMULA_PREFIXES) else text


class OneLineFormatter(logging.Formatter):
    """A log formatter whose every record is one line without escape sequences: the
    formatted message, traceback included, goes through `one_line`, whatever was logged."""

    def format(self, record: logging.LogRecord) -> str:
        return one_line(super().format(record))
