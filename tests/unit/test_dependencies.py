"""The import rules: licd_client never imports the daemon, and licd's layers import only
downwards (the table in docs/architecture.md, which this test enforces).

licd_client installs alone, as the licd-client wheel with msgpack and PyNaCl only, so
importing any of its modules must not pull in the daemon, aiosqlite, click or
prometheus_client: checked at run time in a fresh interpreter, and statically over the
source, which may import the standard library and the wheel's declared dependencies
only. (tests/integration/test_client_wheel.py installs the wheel itself.)

licd's layers are checked statically over every module of licd: each import, absolute
or relative, at the top, inside a function or under `if TYPE_CHECKING:`, must be one
its part of licd may make (`MAY_IMPORT`); the engine imports only pure standard modules
and licd_client's pure ones; only the store imports sqlite3 or aiosqlite.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Import:
    """One import statement's target: where it is, as written, and what it imports."""

    line: int
    statement: str
    module: str  # absolute: relative imports resolved, `from X import m` as X.m for a module m


def is_module(name: str) -> bool:
    """Is `name` a module or package of this repository (licd, licd_client, tests...)?"""
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports(source: str, package: str = "licd_client") -> list[Import]:
    """Every import in `source`, a module of `package`, in order: absolute and relative,
    at the top, in functions and under `if TYPE_CHECKING:` alike."""
    found: list[Import] = []
    for node in ast.walk(ast.parse(source)):
        statement = ast.unparse(node) if isinstance(node, ast.Import | ast.ImportFrom) else ""
        if isinstance(node, ast.Import):
            found.extend(Import(node.lineno, statement, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            for alias in node.names:
                name = f"{base}.{alias.name}" if base else alias.name
                found.append(Import(node.lineno, statement, name if is_module(name) else base))
    return sorted(set(found), key=lambda i: (i.line, i.module))  # `from m import a, b`: once


def forbidden_imports(source: str) -> list[str]:
    """Imports of a forbidden top-level package in `source` (a licd_client module)."""
    return [i.module for i in imports(source) if i.module.split(".")[0] in FORBIDDEN]


@pytest.mark.parametrize(
    ("source", "flagged"),
    [
        ("import licd", ["licd"]),
        ("from prometheus_client import Counter", ["prometheus_client"]),
        ("import licd.engine as e", ["licd.engine"]),
        ("from licd import engine", ["licd.engine"]),
        ("from licd import __version__", ["licd"]),
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
        i.module.split(".")[0] for source in client_sources().values() for i in imports(source)
    }
    assert imported - allowed == set()
    assert set(IMPORT_NAMES.values()) <= imported  # no dependency declared for nothing


# ---------------------------------------------------------------- licd's layers

LICD_DIR = ROOT / "licd"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
#: What every part above the engine may use: the package itself (its version), the
#: clocks and `Deferred`.
FOUNDATIONS = frozenset({"licd", "clock", "deferred"})
#: The parts of licd each part may import, besides itself; a part is a subpackage
#: (`engine` for licd/engine/) or a top-level module (`daemon`), `licd` the package.
#: docs/architecture.md shows the same table.
MAY_IMPORT: dict[str, frozenset[str]] = {
    "licd": frozenset(),
    "clock": frozenset(),
    "deferred": frozenset(),
    "engine": frozenset({"clock"}),
    "config": FOUNDATIONS | {"engine"},
    "store": FOUNDATIONS | {"engine"},
    "core": FOUNDATIONS | {"engine", "config", "store"},
    "observe": FOUNDATIONS | {"engine", "config", "core"},
    "shells": FOUNDATIONS | {"engine", "config", "core"},
    "daemon": FOUNDATIONS | {"engine", "config", "store", "core", "observe", "shells"},
    "cli": FOUNDATIONS | {"engine", "config", "store", "core", "observe", "shells", "daemon"},
    "__main__": frozenset({"cli"}),
}
#: The standard modules the engine may import: pure ones, with no I/O, no clock, no
#: entropy, no threads (the composition root injects what reads the world).
ENGINE_STDLIB = frozenset(
    {
        "__future__",
        "base64",
        "bisect",
        "collections",
        "dataclasses",
        "datetime",  # converting the instants it is given, never `now()`
        "enum",
        "fnmatch",
        "functools",
        "heapq",
        "ipaddress",
        "itertools",
        "math",
        "operator",
        "re",
        "typing",
    }
)
#: licd_client's modules the engine may import: values, errors, a vendor's terms and the
#: timeline of a lease (pure: every time given), no wire, no I/O, no entropy.
ENGINE_CLIENT = frozenset(
    {
        "licd_client.messages",
        "licd_client.errors",
        "licd_client.safetext",
        "licd_client.terms",
        "licd_client.timeline",
    }
)
#: Modules only the store imports.
STORE_ONLY = frozenset({"sqlite3", "aiosqlite", "asyncpg"})


def module_of(path: str) -> tuple[str, str]:
    """The module a file under the root is (`licd/store/sqlite.py` -> licd.store.sqlite),
    and the package its relative imports start from."""
    names = list(Path(path).with_suffix("").parts)
    if names[-1] == "__init__":
        names.pop()
        return ".".join(names), ".".join(names)
    return ".".join(names), ".".join(names[:-1])


def part_of(module: str) -> str:
    """The part of licd a licd module belongs to."""
    names = module.split(".")
    return names[1] if len(names) > 1 else names[0]


def in_licd(module: str) -> bool:
    return module == "licd" or module.startswith("licd.")


def layer_violations(sources: dict[str, str]) -> list[str]:
    """Each import in `sources` (licd's modules, by path from the root) that breaks a
    layer rule: `path:line: statement (why)`."""
    found: list[str] = []
    for path, source in sources.items():
        module, package = module_of(path)
        part = part_of(module)
        allowed = MAY_IMPORT.get(part)
        if allowed is None:
            found.append(f"{path}: part {part!r} of licd is in no layer (name it in MAY_IMPORT)")
            continue
        for i in imports(source, package):
            top = i.module.split(".")[0]
            why = None
            if in_licd(i.module) and part_of(i.module) not in allowed | {part}:
                others = ", ".join(sorted(allowed))
                why = (
                    f"{part} may import only {others} of licd"
                    if others
                    else f"{part} imports nothing of licd"
                )
            elif top in STORE_ONLY and part != "store":
                why = f"only the store imports {top}"
            elif part == "engine" and not in_licd(i.module) and i.module not in ENGINE_CLIENT:
                if top == "licd_client":
                    why = "the engine imports only licd_client's values, errors, terms and timeline"
                elif top not in ENGINE_STDLIB:
                    why = f"the engine is pure: no {top}"
            if why is not None:
                found.append(f"{path}:{i.line}: {i.statement} ({why})")
    return found


def licd_sources() -> dict[str, str]:
    """Every module of licd: its path (from the root) and its text."""
    return {
        path.relative_to(ROOT).as_posix(): path.read_text(encoding="utf-8")
        for path in sorted(LICD_DIR.rglob("*.py"))
    }


@pytest.mark.parametrize(
    ("path", "source", "flagged"),
    [
        # The engine: pure, and nothing of licd above it.
        ("licd/engine/x.py", "import heapq\nfrom licd.clock import Instant", []),
        ("licd/engine/x.py", "from licd_client.errors import BadRequest", []),
        ("licd/engine/x.py", "from . import seats\nfrom .lease import Lease", []),
        (
            "licd/engine/x.py",
            "import asyncio",
            ["1: import asyncio (the engine is pure: no asyncio)"],
        ),
        (
            "licd/engine/x.py",
            "import os, heapq",
            ["1: import os, heapq (the engine is pure: no os)"],
        ),
        ("licd/engine/x.py", "\n\nfrom time import monotonic", ["3: from time import monotonic"]),
        ("licd/engine/x.py", "def f():\n    import secrets\n", ["2: import secrets"]),
        ("licd/engine/x.py", "import socket", ["import socket"]),
        ("licd/engine/x.py", "import sqlite3", ["only the store imports sqlite3"]),
        ("licd/engine/x.py", "import nacl.signing", ["the engine is pure: no nacl"]),
        ("licd/engine/x.py", "from licd_client.wire import encode", ["licd_client's values"]),
        ("licd/engine/x.py", "from licd_client.timeline import Timeline", []),
        ("licd/engine/x.py", "from licd_client.backoff import Backoff", ["licd_client's values"]),
        ("licd/engine/x.py", "from licd import __version__", ["engine may import only clock"]),
        ("licd/engine/x.py", "from licd.deferred import Deferred", ["only clock of licd"]),
        ("licd/engine/x.py", "from ..core import events", ["from ..core import events"]),
        (
            "licd/engine/x.py",
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n"
            "    from licd.store import sqlite\n",
            ["3: from licd.store import sqlite (engine may import only clock of licd)"],
        ),
        # The core: never the shells, observers, the command line or the daemon.
        ("licd/core/x.py", "from licd.store.sqlite import Store\nfrom licd import __version__", []),
        ("licd/core/x.py", "from licd.shells.upstream import Link", ["from licd.shells.upstream"]),
        ("licd/core/x.py", "from ..shells import server", ["from ..shells import server"]),
        (
            "licd/core/x.py",
            "from licd.observe import metrics",
            ["from licd.observe import metrics"],
        ),
        ("licd/core/x.py", "import licd.cli.main", ["import licd.cli.main"]),
        ("licd/core/x.py", "from licd import daemon", ["from licd import daemon"]),
        ("licd/core/x.py", "import time, asyncio, os", []),  # only the engine is pure
        # sqlite3 and aiosqlite: the store's alone.
        ("licd/store/x.py", "import sqlite3\nimport aiosqlite", []),
        (
            "licd/core/x.py",
            "import sqlite3",
            ["1: import sqlite3 (only the store imports sqlite3)"],
        ),
        ("licd/shells/x.py", "def f():\n    import aiosqlite", ["2: import aiosqlite (only the"]),
        ("licd/cli/x.py", "from sqlite3 import connect", ["only the store imports sqlite3"]),
        # The store: values of the engine, nothing above it.
        ("licd/store/x.py", "from licd.deferred import Deferred\nfrom licd.engine import x", []),
        ("licd/store/x.py", "from licd.core.events import Event", ["from licd.core.events"]),
        ("licd/store/x.py", "from licd.config import settings", ["store may import only"]),
        ("licd/store/migrations/__init__.py", "from ...core import events", ["from ...core"]),
        # Shells and observers: the core and below, not each other, not the store.
        ("licd/shells/x.py", "from licd.core import dispatch\nfrom licd.config import y", []),
        ("licd/shells/x.py", "from licd.observe.metrics import Metrics", ["shells may import"]),
        ("licd/shells/x.py", "from licd.store.sqlite import Store", ["shells may import"]),
        ("licd/observe/x.py", "from licd.core.events import Event", []),
        ("licd/observe/x.py", "from licd.shells import server", ["observe may import"]),
        # The composition root and the command line: only the command line imports them.
        ("licd/daemon.py", "from licd.shells import server\nfrom licd.store import sqlite", []),
        ("licd/daemon.py", "from licd.cli.main import main", ["daemon may import"]),
        ("licd/shells/x.py", "import licd.daemon", ["import licd.daemon"]),
        ("licd/cli/main.py", "from licd.daemon import Daemon\nfrom . import policy", []),
        ("licd/__main__.py", "from licd.cli.main import main", []),
        ("licd/__main__.py", "from licd.daemon import Daemon", ["__main__ may import only cli"]),
        (
            "licd/clock.py",
            "import time\nfrom licd import engine",
            ["2: from licd import engine (clock imports nothing of licd)"],
        ),
        (
            "licd/core/x.py",
            "from licd.shells.upstream import A, B",
            ["1: from licd.shells.upstream import A, B (core"],
        ),
        # A new part must be given its place first.
        ("licd/gateway/x.py", "import os", ["licd/gateway/x.py: part 'gateway' of licd is in"]),
        # Strings and comments are not imports.
        ("licd/engine/x.py", "# import os\nx = 'import socket'", []),
    ],
)
def test_the_layer_check_itself(path: str, source: str, flagged: list[str]) -> None:
    found = layer_violations({path: source})
    assert len(found) == len(flagged), found
    for message, expected in zip(found, flagged, strict=True):
        assert message.startswith(f"{path}:") and expected in message, message


def test_licd_obeys_its_layers() -> None:
    sources = licd_sources()
    assert {"licd/engine/engine.py", "licd/daemon.py", "licd/store/sqlite.py"} <= set(sources)
    assert layer_violations(sources) == []


def test_no_layer_rule_is_kept_for_a_part_that_is_gone() -> None:
    """(A part with no rule fails `layer_violations`, naming its files.)"""
    parts = {part_of(module_of(path)[0]) for path in licd_sources()}
    assert set(MAY_IMPORT) - parts == set()


def test_the_architecture_doc_shows_the_table_this_test_enforces() -> None:
    """docs/architecture.md's table: one row a part, `part` | the parts it may import."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([\w.]+)`[^|]*\| ([^|\n]*) \|", text, re.MULTILINE)
    shown = {part: frozenset(re.findall(r"`([\w.]+)`", allowed)) for part, allowed in rows}
    assert shown == MAY_IMPORT
