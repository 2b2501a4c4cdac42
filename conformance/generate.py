"""Write the conformance vectors: `python -m conformance.generate [DIRECTORY]`.

Builds every family in memory from the real code (each builder refuses a case the code
judges otherwise than the case says: then no file is touched), then writes one JSON file
per family into DIRECTORY (default: this package's directory), each by a rename, so no
file is ever half-written. The output is the same bytes on every run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import chain_vectors, frame_vectors, reply_vectors, request_vectors
from .notation import Disagreement

FORMAT = "licd-conformance/1"
HERE = Path(__file__).resolve().parent

#: Family -> (what its vectors are, the builder). The files are named after the family.
FAMILIES: dict[str, tuple[str, Callable[[], list[dict[str, Any]]]]] = {
    "frames": (
        "Byte streams fed to a frame decoder with the daemon's limits (section 1), and the "
        "maps or error they give.",
        frame_vectors.build,
    ),
    "requests": (
        "Request maps received after hello (sections 2 and 3): a valid request, with its "
        "defaults filled in, or a bad_request.",
        request_vectors.build,
    ),
    "replies": (
        "Reply maps a client receives for an op (sections 2 and 3): a result, a wire "
        "error, or a protocol violation.",
        reply_vectors.build,
    ),
    "chains": (
        "Lease tokens with their chains and the client's trust anchors (section 4): "
        "accepted, with the lease a client reads, or rejected, with a reason class.",
        chain_vectors.build,
    ),
}


def render(family: str) -> str:
    """One family's file: readable, one field of a vector per line, ASCII only."""
    about, builder = FAMILIES[family]
    vectors = builder()
    names = [v["name"] for v in vectors]
    if len(set(names)) != len(names):
        raise Disagreement(f"{family}: two vectors share a name")
    lines = [
        "{",
        f'  "format": {json.dumps(FORMAT)},',
        f'  "family": {json.dumps(family)},',
        f'  "about": {json.dumps(about)},',
        '  "vectors": [',
    ]
    for i, vector in enumerate(vectors):
        fields = [
            f"      {json.dumps(k)}: {json.dumps(v, allow_nan=False)}" for k, v in vector.items()
        ]
        lines += ["    {", ",\n".join(fields), "    }" + ("," if i < len(vectors) - 1 else "")]
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


def write(directory: Path) -> list[Path]:
    """Every family's file in `directory`; nothing is written unless all were built."""
    texts = {family: render(family) for family in FAMILIES}
    written: list[Path] = []
    for family, text in texts.items():
        path = directory / f"{family}.json"
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{family}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o644)  # mkstemp's 0600 is for secrets; these are published
            with os.fdopen(fd, "w", encoding="ascii", newline="\n") as fh:
                fh.write(text)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m conformance.generate",
        description="Write the conformance vectors (one JSON file per family).",
    )
    parser.add_argument(
        "directory",
        nargs="?",
        type=Path,
        default=HERE,
        help="where to write them (default: the conformance directory)",
    )
    args = parser.parse_args(argv)
    directory: Path = args.directory
    if not directory.is_dir():
        print(f"conformance: {directory}: not a directory", file=sys.stderr)
        return 2
    try:
        written = write(directory)
    except Disagreement as exc:
        print(f"conformance: {exc}; nothing was written", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"conformance: cannot write to {directory}: {exc.strerror}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
