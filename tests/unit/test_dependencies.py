"""licd depends on licd_client, never the reverse (ARCHITECTURE, "the shape in one picture").

licd_client installs with msgpack and PyNaCl only, so importing any of its modules must
not pull in the daemon, aiosqlite or click: checked at run time in a fresh interpreter,
and statically over the source.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import licd_client

FORBIDDEN = ("licd", "aiosqlite", "click")
PACKAGE_DIR = Path(licd_client.__file__).resolve().parent
ROOT = PACKAGE_DIR.parent

PROBE = """
import importlib, json, pkgutil, sys
import licd_client
names = sorted(
    m.name for m in pkgutil.walk_packages(licd_client.__path__, "licd_client.")
)
for name in names:
    importlib.import_module(name)
forbidden = {forbidden!r}
leaked = sorted(
    mod for mod in sys.modules
    if any(mod == f or mod.startswith(f + ".") for f in forbidden)
)
print(json.dumps({{"imported": names, "leaked": leaked}}))
"""


def test_importing_every_client_module_leaves_the_daemon_out() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(forbidden=FORBIDDEN)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    imported = set(report["imported"])
    # The walk really covered the package, wire layer included.
    expected = {f"licd_client.{p.stem}" for p in PACKAGE_DIR.glob("*.py") if p.stem != "__init__"}
    assert expected <= imported
    assert {"licd_client.wire", "licd_client.messages", "licd_client.tokens"} <= imported
    assert report["leaked"] == []


def forbidden_imports(source: str) -> list[str]:
    """Absolute imports of a forbidden top-level package in `source`."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.extend(n for n in names if n.split(".")[0] in FORBIDDEN)
    return found


@pytest.mark.parametrize(
    ("source", "flagged"),
    [
        ("import licd", ["licd"]),
        ("import licd.engine as e", ["licd.engine"]),
        ("from licd import engine", ["licd"]),
        ("from licd.store import Store", ["licd.store"]),
        ("def f():\n    import click\n", ["click"]),
        ("try:\n    import aiosqlite\nexcept ImportError:\n    pass\n", ["aiosqlite"]),
        ("import os, licd", ["licd"]),
        ("import licd_client", []),
        ("from licd_client.wire import encode", []),
        ("from . import wire", []),
        ("from .licd import x", []),
        ("import clickhouse", []),
        ("# import licd\nx = 'from licd import y'", []),
    ],
)
def test_the_static_check_itself(source: str, flagged: list[str]) -> None:
    assert forbidden_imports(source) == flagged


def test_no_client_source_imports_the_daemon() -> None:
    files = sorted(PACKAGE_DIR.rglob("*.py"))
    assert PACKAGE_DIR / "wire.py" in files
    offenders = {
        str(path.relative_to(ROOT)): found
        for path in files
        if (found := forbidden_imports(path.read_text(encoding="utf-8")))
    }
    assert offenders == {}
