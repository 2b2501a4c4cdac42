"""Writing a command's output file (an entitlement, a renewal request, a key): whole or
not at all, mode 0600, never over an existing file unless asked.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import click


def write_output(path: Path, text: str, force: bool) -> None:
    """Write `text` to `path` whole or not at all, mode 0600: a temporary file beside it,
    fsynced, then linked to `path` (which fails if it exists) or, with `force`, renamed
    over it."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise click.ClickException(f"{path}: cannot write it: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        if force:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    except FileExistsError:
        raise click.ClickException(f"{path} already exists: not replaced (give --force)") from None
    except OSError as exc:
        raise click.ClickException(f"{path}: cannot write it: {exc.strerror}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
