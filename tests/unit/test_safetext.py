"""Tests of licd_client.safetext: control characters made visible, key=value quoting,
CSV cells no spreadsheet evaluates, and one log record per line."""

from __future__ import annotations

import ast
import logging
import re
import sys

from hypothesis import given
from hypothesis import strategies as st

from licd_client.safetext import OneLineFormatter, csv_cell, escape, kv_line, one_line, quoted

# Every character the rule covers, spelled out here independently of the module.
CONTROLS = [
    *map(chr, range(0x00, 0x20)),
    "\x7f",
    *map(chr, range(0x80, 0xA0)),
    "\u061c",  # arabic letter mark
    "\u200e",  # left-to-right mark
    "\u200f",  # right-to-left mark
    "\u2028",  # line separator
    "\u2029",  # paragraph separator
    *map(chr, range(0x202A, 0x202F)),  # embeddings, overrides, pop
    *map(chr, range(0x2066, 0x206A)),  # isolates
    "\ud800",  # a lone surrogate
]
SHOWN_AS_IS = "alice müller 日本 Ωmega ~!#$%^&*()_+-=[]{};:'\",.<>/?|` ZWJ:\u200d"
ESCAPE = re.compile(r"\\(\\|n|t|r|x[0-9a-f]{2}|u[0-9a-f]{4})")


def unescape(text: str) -> str:
    """The reverse of `escape`, written from its documented output alone."""

    def one(m: re.Match[str]) -> str:
        code = m.group(1)
        named = {"\\": "\\", "n": "\n", "t": "\t", "r": "\r"}
        return named[code] if code in named else chr(int(code[1:], 16))

    assert "\\" not in ESCAPE.sub("", text), text  # every backslash starts an escape
    return ESCAPE.sub(one, text)


def has_control(text: str) -> bool:
    return any(c in CONTROLS for c in text)


def test_escape_makes_each_control_character_visible() -> None:
    assert escape("a\nb") == "a\\nb"
    assert escape("\x1b[31mred") == "\\x1b[31mred"
    assert escape("evil\u202etxt.exe") == "evil\\u202etxt.exe"
    assert escape("\t\r\x00\x7f\x85\x9b\u2028") == "\\t\\r\\x00\\x7f\\x85\\x9b\\u2028"
    assert escape("CORP\\alice") == "CORP\\\\alice"
    assert escape(SHOWN_AS_IS) == SHOWN_AS_IS
    for c in CONTROLS:
        shown = escape(f"a{c}b")
        assert not has_control(shown) and shown.isascii(), repr(c)
        assert unescape(shown) == f"a{c}b"


@given(st.text())
def test_escape_is_unambiguous_and_never_shows_a_control(text: str) -> None:
    shown = escape(text)
    assert not has_control(shown)
    assert unescape(shown) == text


@given(st.text())
def test_one_line_keeps_backslashes_and_shows_no_control(text: str) -> None:
    line = one_line(text)
    assert not has_control(line)
    assert line == text or has_control(text)
    assert one_line("error='a\\nb' path=C:\\x") == "error='a\\nb' path=C:\\x"
    assert one_line("a\nb\x1b") == "a\\nb\\x1b"


def test_quoted_leaves_plain_values_bare_and_quotes_the_rest() -> None:
    assert quoted("ws-17.example") == "ws-17.example"
    assert quoted("müller") == "müller"
    assert quoted(None) == "None" and quoted(3) == "3"
    assert quoted("x event=checkout") == "'x event=checkout'"
    assert quoted("") == "''"
    assert quoted("a\nb") == "'a\\nb'"
    assert quoted("it's") == '"it\'s"'
    for c in [*CONTROLS, " ", "=", "'", '"', "\\", "\u3000"]:
        value = quoted(f"a{c}b")
        assert value[0] in "'\"" and not has_control(value), repr(c)


@given(st.text())
def test_a_quoted_value_is_one_token_that_reads_back(text: str) -> None:
    value = quoted(text)
    assert not has_control(value)
    if value != text:  # repr: Python reads it back as exactly the value
        assert ast.literal_eval(value) == text
    else:
        assert value and " " not in value and "=" not in value


def test_csv_cells_never_start_a_formula() -> None:
    for formula in ('=HYPERLINK("http://x","y")', "+1+cmd|' /C calc'!A0", "-2+3", "@SUM(A1)"):
        assert csv_cell(formula) == "'" + formula
    assert csv_cell("\t=1+1") == "\\t=1+1"  # OWASP's tab and CR: escaped first
    assert csv_cell("\r=1+1") == "\\r=1+1"
    assert csv_cell("a\nb=c") == "a\\nb=c"
    assert csv_cell("plain") == "plain" and csv_cell(None) == "" and csv_cell(7) == "7"
    assert csv_cell("x=1") == "x=1"  # only a leading prefix is a formula


@given(st.text())
def test_no_csv_cell_starts_a_formula_or_holds_a_control(text: str) -> None:
    cell = csv_cell(text)
    assert not cell.startswith(("=", "+", "-", "@", "\t", "\r"))
    assert not has_control(cell)


def test_a_log_record_is_one_line_even_with_a_traceback() -> None:
    formatter = OneLineFormatter("level=%(levelname)s %(message)s")
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord(
        "licd", logging.ERROR, __file__, 1, "host=%s", ("a\nlevel=INFO forged\x1b[2J",), exc_info
    )
    text = formatter.format(record)
    assert "\n" not in text and "\x1b" not in text
    assert text.startswith("level=ERROR host=a\\nlevel=INFO forged\\x1b[2J\\nTraceback")
    assert "ValueError: bad\\nvalue" in text


def test_kv_line_leaves_absent_fields_out_and_quotes_the_rest() -> None:
    line = kv_line([("event", "denied"), ("licence", None)], seats=0, user="a b", ip=None)
    assert line == "event=denied seats=0 user='a b'"
    assert kv_line() == ""
