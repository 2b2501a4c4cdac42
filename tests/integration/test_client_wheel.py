"""licd's two wheels, built and installed as a vendor would: licd-client works alone.

wheels/build_wheels.py (what `make wheels` runs) builds both wheels into a temporary
directory. A fresh virtual environment gets the licd-client wheel alone: it cannot import
the daemon or the daemon's dependencies, and its `licd-client` command talks to a daemon
installed from the licd wheel into a second fresh environment. pip installs offline,
from the built wheels and the dependencies' wheels that `make` saved in .venv/wheelhouse,
and sees nothing else (no index, no pip configuration); no process in those environments
sees this tree (no PYTHONPATH, working directory elsewhere).
"""

from __future__ import annotations

import configparser
import json
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path

import pytest

import licd_client
from tests.integration.procs import ROOT, DaemonProcess, TomlValue, write_config
from tests.unit.test_dependencies import FORBIDDEN

pytestmark = pytest.mark.slow

VERSION = licd_client.__version__
BUILD_WHEELS = ROOT / "wheels" / "build_wheels.py"
#: Where `make` (the .venv/.installed step) saves the wheels of licd's dependencies.
WHEELHOUSE = Path(sys.prefix) / "wheelhouse"
#: Bound on one build, install or command (seconds on an idle machine).
STEP_TIMEOUT = 180.0
#: The demo licence of `make run`'s embedded defaults.
DEMO: dict[str, TomlValue] = {
    "key": "DEMO-0000-0000",
    "id": "demo",
    "product": "demo",
    "seats": 3,
    "lease_ttl": 90,
    "grace": 15,
}


@dataclass(frozen=True)
class Wheels:
    client: Path
    daemon: Path


def outside_env(**extra: str) -> dict[str, str]:
    """A vendor's machine: no PYTHON*, PIP_* or LICD_* settings of this test run."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTHON", "PIP_", "LICD_")) and k != "VIRTUAL_ENV"
    }
    env.update(extra)
    return env


def run(
    command: Sequence[str | Path], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=outside_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT,
        check=False,
    )


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Wheels:
    dist = tmp_path_factory.mktemp("dist")
    built = run([sys.executable, BUILD_WHEELS, "--outdir", dist, "all"], dist, dict(os.environ))
    assert built.returncode == 0, built.stderr
    found = Wheels(
        client=dist / f"licd_client-{VERSION}-py3-none-any.whl",
        daemon=dist / f"licd-{VERSION}-py3-none-any.whl",
    )
    assert built.stdout.split() == [str(found.daemon), str(found.client)]
    assert sorted(dist.iterdir()) == [found.daemon, found.client]  # nothing else left there
    return found


@pytest.fixture(scope="module")
def wheelhouse() -> Path:
    if not any(WHEELHOUSE.glob("*.whl")):
        pytest.fail(f"no dependency wheels in {WHEELHOUSE}: run `make` (.venv/.installed)")
    return WHEELHOUSE


# ---------------------------------------------------------------- what the wheels hold


def dist_info(wheel: Path) -> str:
    return f"{wheel.name.split('-')[0]}-{VERSION}.dist-info"


def read(wheel: Path, name: str) -> str:
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(name).decode("utf-8")


def shipped(wheel: Path) -> set[str]:
    """The files `wheel` installs, its metadata left out."""
    with zipfile.ZipFile(wheel) as archive:
        return {n for n in archive.namelist() if not n.startswith(dist_info(wheel) + "/")}


def in_tree(package: str) -> set[str]:
    return {
        str(path.relative_to(ROOT))
        for path in (ROOT / package).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }


def requirements(wheel: Path) -> list[str]:
    metadata = Parser().parsestr(read(wheel, f"{dist_info(wheel)}/METADATA"))
    return [r for r in metadata.get_all("Requires-Dist", []) if "extra ==" not in r]


def requirement_name(requirement: str) -> str:
    return re.split(r"[^A-Za-z0-9._-]", requirement, maxsplit=1)[0].lower()


def commands(wheel: Path) -> dict[str, str]:
    entry_points = configparser.ConfigParser()
    entry_points.read_string(read(wheel, f"{dist_info(wheel)}/entry_points.txt"))
    return dict(entry_points["console_scripts"])


def test_the_client_wheel_is_licd_client_needing_msgpack_and_pynacl_only(wheels: Wheels) -> None:
    assert shipped(wheels.client) == in_tree("licd_client")  # py.typed too; no licd
    assert [requirement_name(r) for r in requirements(wheels.client)] == ["msgpack", "pynacl"]
    assert all(";" not in r for r in requirements(wheels.client))  # on every platform
    assert commands(wheels.client) == {"licd-client": "licd_client.cli:main"}
    assert "Apache" in read(wheels.client, f"{dist_info(wheels.client)}/licenses/LICENSE")


def test_the_daemon_wheel_requires_the_client_of_its_own_version(wheels: Wheels) -> None:
    assert shipped(wheels.daemon) == in_tree("licd")  # migrations too; licd_client is not
    assert f"licd-client=={VERSION}" in requirements(wheels.daemon)
    assert commands(wheels.daemon) == {"licd": "licd.cli.main:main"}
    assert "Apache" in read(wheels.daemon, f"{dist_info(wheels.daemon)}/licenses/LICENSE")


# ---------------------------------------------------------------- installed and running


def install(where: Path, wheel: Path, *find_links: Path) -> Path:
    """A fresh virtual environment at `where` with `wheel` and its dependencies; its bin/."""
    made = run([sys.executable, "-m", "venv", "--without-pip", where], where.parent)
    assert made.returncode == 0, made.stderr
    pip: list[str | Path] = [sys.executable, "-m", "pip", "--python", where / "bin" / "python"]
    links = [f"--find-links={directory}" for directory in find_links]
    done = run(
        [*pip, "install", "--quiet", "--no-index", *links, wheel],
        where.parent,
        outside_env(PIP_CONFIG_FILE=os.devnull),
    )
    assert done.returncode == 0, done.stderr
    return where / "bin"


#: Run by a fresh environment's interpreter: where licd_client comes from, which of the
#: modules named in argv cannot be imported, and the distributions installed.
PROBE = """
import importlib, importlib.metadata, json, sys
unimportable = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        unimportable.append(name)
import licd_client
print(json.dumps({
    "licd_client": licd_client.__file__,
    "unimportable": unimportable,
    "installed": sorted(d.metadata["Name"].lower() for d in importlib.metadata.distributions()),
}))
"""


def test_licd_client_alone_talks_to_a_daemon_installed_from_the_licd_wheel(
    wheels: Wheels, wheelhouse: Path, tmp_path: Path
) -> None:
    app = install(tmp_path / "app", wheels.client, wheelhouse)
    probe = run([app / "python", "-c", PROBE, *FORBIDDEN], tmp_path)
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    assert found["unimportable"] == list(FORBIDDEN)  # licd, aiosqlite, click, prometheus
    assert Path(found["licd_client"]).is_relative_to(tmp_path / "app")
    assert {"licd-client", "msgpack", "pynacl"} <= set(found["installed"])
    assert "licd" not in found["installed"]

    server = install(tmp_path / "server", wheels.daemon, wheelhouse, wheels.daemon.parent)
    probe = run([server / "python", "-c", "import licd; print(licd.__file__)"], tmp_path)
    assert probe.returncode == 0, probe.stderr
    assert Path(probe.stdout.strip()).is_relative_to(tmp_path / "server")  # not this tree
    config = write_config(tmp_path, DEMO)
    daemon = DaemonProcess(
        config,
        tmp_path / "licd.stderr",
        command=[str(server / "licd"), "serve", "--config", str(config)],
        env=outside_env(),
    )
    try:
        daemon.start()
        key = run([server / "licd", "key", "show", "--config", config], tmp_path)
        assert key.returncode == 0, key.stderr
        env = outside_env(
            LICD_SERVER="{}:{}".format(*daemon.addr), LICD_SERVER_KEY=key.stdout.strip()
        )
        shown = run([app / "licd-client", "available", "DEMO-0000-0000"], tmp_path, env)
        assert shown.returncode == 0, shown.stderr
        assert [line.split() for line in shown.stdout.splitlines()] == [
            ["total", "3"],
            ["in_use", "0"],
            ["available", "3"],
        ]
        # A checkout verifies the daemon's signed token (PyNaCl), then checks the seat in.
        command: list[str | Path] = [app / "licd-client", "exec", "--key", "DEMO-0000-0000"]
        held = run([*command, "--", app / "python", "-c", "raise SystemExit(7)"], tmp_path, env)
        assert (held.returncode, held.stderr) == (7, "")
        daemon.terminate()
    finally:
        daemon.kill()


def test_building_without_the_build_tools_fails_in_one_clear_message(tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    made = run([sys.executable, "-m", "venv", "--without-pip", bare], tmp_path)
    assert made.returncode == 0, made.stderr
    dist = tmp_path / "dist"
    failed = run([bare / "bin" / "python", BUILD_WHEELS, "--outdir", dist, "client"], tmp_path)
    assert failed.returncode == 1
    assert failed.stderr.startswith("build_wheels: building wheels/licd-client failed:\n")
    assert "No module named build" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert not dist.exists()  # nothing half-written
