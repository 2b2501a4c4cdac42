"""Build licd's wheels from its one source tree: `licd-client` alone, or both.

`client` builds licd_client-VERSION-py3-none-any.whl (the client library and the
`licd-client` command; it needs msgpack and PyNaCl only); `all` also builds
licd-VERSION-py3-none-any.whl (the daemon, which requires that client). The wheels are
built from a fresh copy of the files they ship, in a temporary directory, so nothing
stale (an old build/ directory) slips into one and the tree stays as it was; they reach
--outdir only once every build has succeeded. setuptools and build come from this
environment (the dev extra): nothing is downloaded.

Usage: python wheels/build_wheels.py [--outdir DIR] {client,all}
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Everything either wheel is built from, relative to ROOT.
SOURCES = (
    "LICENSE",
    "README.md",
    "pyproject.toml",
    "setup.py",
    "licd",
    "licd_client",
    "wheels/licd-client",
)
#: The project directory of each wheel, relative to ROOT, in build order.
PROJECTS = {"client": ("wheels/licd-client",), "all": ("wheels/licd-client", ".")}
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")


class BuildFailed(Exception):
    """A wheel could not be built; the message says which and why."""


def stage(into: Path) -> None:
    """Copy SOURCES into `into`, keeping their layout (links become the files they name)."""
    for name in SOURCES:
        source, target = ROOT / name, into / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=IGNORE)
        else:
            shutil.copy2(source, target)


def build(which: str, outdir: Path) -> list[Path]:
    """Build the wheels of `which` ("client" or "all") into `outdir`; their paths."""
    with tempfile.TemporaryDirectory(prefix="licd-wheels-") as tmp:
        tree, built = Path(tmp) / "tree", Path(tmp) / "dist"
        stage(tree)
        for project in PROJECTS[which]:
            result = subprocess.run(
                [sys.executable, "-m", "build", "--wheel", "--no-isolation"]
                + ["--outdir", str(built), str(tree / project)],
                cwd=tree,
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0:
                output = (result.stdout + result.stderr).strip()
                raise BuildFailed(f"building {project} failed:\n{output}")
        outdir.mkdir(parents=True, exist_ok=True)
        wheels = []
        for wheel in sorted(built.glob("*.whl")):
            partial = outdir / f".{wheel.name}.partial"
            shutil.copyfile(wheel, partial)
            wheels.append(partial.replace(outdir / wheel.name))
        return wheels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=sorted(PROJECTS), help="client: licd-client only")
    parser.add_argument("--outdir", type=Path, default=ROOT / "dist", help="default: dist/")
    args = parser.parse_args(argv)
    try:
        wheels = build(args.which, args.outdir)
    except (BuildFailed, OSError) as exc:
        print(f"build_wheels: {exc}", file=sys.stderr)
        return 1
    for wheel in wheels:
        print(wheel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
