"""licd depends on licd_client, never the reverse (ARCHITECTURE, "the shape in one picture").

licd_client installs alone, as the licd-client wheel with msgpack and PyNaCl only, so
importing any of its modules must not pull in the daemon, aiosqlite, click or
prometheus_client: checked at run time in a fresh interpreter, and statically over the
source, which may import the standard library and the wheel's declared dependencies
only. (tests/integration/test_client_wheel.py installs the wheel itself.)
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import licd_client

FORBIDDEN = ("licd", "aiosqlite", "click", "prometheus_client")
PACKAGE_DIR = Path(licd_client.__file__).resolve().parent
ROOT = PACKAGE_DIR.parent
CLIENT_PROJECT = ROOT / "wheels" / "licd-client" / "pyproject.toml"
#: The top-level module each distribution the client may depend on provides.
IMPORT_NAMES = {"msgpack": "msgpack", "pynacl": "nacl"}

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


def absolute_imports(source: str) -> list[str]:
    """The modules `source` imports by absolute name, in order (relative imports left out)."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append(node.module)
    return found


def forbidden_imports(source: str) -> list[str]:
    """Absolute imports of a forbidden top-level package in `source`."""
    return [n for n in absolute_imports(source) if n.split(".")[0] in FORBIDDEN]


@pytest.mark.parametrize(
    ("source", "flagged"),
    [
        ("import licd", ["licd"]),
        ("from prometheus_client import Counter", ["prometheus_client"]),
        ("import licd.engine as e", ["licd.engine"]),
        ("from licd import engine", ["licd"]),
        ("from licd.store.sqlite import Store", ["licd.store.sqlite"]),
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


def client_sources() -> dict[str, str]:
    """Every module of licd_client: its path (from the root) and its text."""
    return {
        str(path.relative_to(ROOT)): path.read_text(encoding="utf-8")
        for path in sorted(PACKAGE_DIR.rglob("*.py"))
    }


def test_no_client_source_imports_the_daemon() -> None:
    sources = client_sources()
    assert "licd_client/wire.py" in sources
    offenders = {
        name: found for name, source in sources.items() if (found := forbidden_imports(source))
    }
    assert offenders == {}


def test_the_client_imports_the_standard_library_and_its_declared_dependencies_only() -> None:
    project = tomllib.loads(CLIENT_PROJECT.read_text(encoding="utf-8"))["project"]
    declared = {
        re.split(r"[^A-Za-z0-9._-]", dep, maxsplit=1)[0].lower() for dep in project["dependencies"]
    }
    assert declared == set(IMPORT_NAMES)  # msgpack and PyNaCl, and nothing else
    allowed = set(sys.stdlib_module_names) | {"licd_client"} | set(IMPORT_NAMES.values())
    imported = {
        name.split(".")[0]
        for source in client_sources().values()
        for name in absolute_imports(source)
    }
    assert imported - allowed == set()
    assert set(IMPORT_NAMES.values()) <= imported  # no dependency declared for nothing
