"""What the `licd` command groups share about their options: a file path parameter and
option callbacks that parse a value (its ValueError a usage error naming the option)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

FILE = click.Path(dir_okay=False, path_type=Path)


def parsed(parse: Callable[[str], Any]) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """An option callback reading each value given with `parse` (a ValueError from it
    becomes a usage error naming the option)."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        try:
            if isinstance(value, tuple):
                return tuple(parse(v) for v in value)
            return None if value is None else parse(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc).removeprefix("duration: "), ctx, param) from None

    return callback
