"""What every admin command of `licd` shares: the daemon's admin socket it talks to
(chosen by --socket, --config, LICD_SOCKET, LICD_CONFIG or the embedded default, in that
order), `--json`, and the one call and print each command makes (`admin_command`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from licd.cli import format as fmt
from licd.cli.admin_client import AdminClient, AdminError
from licd.cli.options import FILE
from licd.config.settings import Config, ConfigError, default_config, load_config
from licd_client.safetext import one_line

CONFIG_ENV = "LICD_CONFIG"  # the config file, wherever --config is not given
SOCKET_ENV = "LICD_SOCKET"  # the admin socket, for the admin commands
DEFAULT_ORIGIN = "the embedded default"
CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    type=FILE,
    envvar=CONFIG_ENV,
    show_envvar=True,
    help="The TOML config file (default: built in).",
)
_ADMIN_OPTIONS = (
    click.option(
        "--config",
        "config_path",
        type=FILE,
        envvar=CONFIG_ENV,
        show_envvar=True,
        help="The file `licd serve` was given; the daemon's admin socket is read from it.",
    ),
    click.option(
        "--socket",
        "socket_path",
        type=FILE,
        envvar=SOCKET_ENV,
        show_envvar=True,
        metavar="PATH",
        help="The daemon's admin socket.",
    ),
    click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts."),
)


def _from_env(param: str) -> bool:
    """Whether the current command's `param` was taken from its environment variable."""
    source = click.get_current_context().get_parameter_source(param)
    return source is ParameterSource.ENVIRONMENT


def config_file(path: Path | None, param: str = "config_path") -> Config:
    """The config file at `path` (None: the embedded defaults), or exit 1 naming the
    error, and LICD_CONFIG when the path came from there."""
    try:
        return default_config() if path is None else load_config(path)
    except ConfigError as exc:
        raise click.ClickException(
            f"{CONFIG_ENV}: {exc}" if _from_env(param) else str(exc)
        ) from None


def _admin_socket(config_path: Path | None, socket_path: Path | None) -> tuple[Path, str]:
    """The admin socket and where its path came from. The command line beats the
    environment, which beats the embedded default; at each, a socket beats a config file
    (both on the command line is an error)."""
    given_socket = socket_path is not None and not _from_env("socket_path")
    given_config = config_path is not None and not _from_env("config_path")
    if given_socket and given_config:
        raise click.UsageError("give --config or --socket, not both")
    if socket_path is not None and (given_socket or not given_config):
        return socket_path, "from --socket" if given_socket else f"from {SOCKET_ENV}"
    if config_path is not None:
        name = "--config " if given_config else f"{CONFIG_ENV}="
        return config_file(config_path).admin_socket, f"from {name}{config_path}"
    return default_config().admin_socket, DEFAULT_ORIGIN


@dataclass
class Admin:
    """The daemon's admin socket (and where its path came from), as one command sees it."""

    socket: Path
    origin: str
    json: bool

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """The op's results (the reply without its envelope); refusals become exit 1."""
        try:
            reply = AdminClient(self.socket, origin=self.origin).call(op, **args)
        except AdminError as exc:
            raise click.ClickException(one_line(str(exc))) from None
        return {k: v for k, v in reply.items() if k not in ("id", "ok")}

    def show(self, result: Any, human: Callable[[], str]) -> None:
        click.echo(fmt.as_json(result) if self.json else human())


def admin_command(f: Callable[..., None]) -> Callable[..., None]:
    """Adds --config / --socket / --json; the command gets an `Admin` first."""

    @functools.wraps(f)
    def wrapper(
        *args: Any, config_path: Path | None, socket_path: Path | None, as_json: bool, **kw: Any
    ) -> None:
        f(Admin(*_admin_socket(config_path, socket_path), as_json), *args, **kw)

    for option in reversed(_ADMIN_OPTIONS):
        wrapper = option(wrapper)
    return wrapper
