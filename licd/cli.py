"""`licd`: the daemon's command line. Commands parse, call one function, print.

`serve` runs the daemon (signals wired here); `key show` prints the public key clients
pin; `check-config` validates a file. Errors are one sentence on stderr and a non-zero
exit, never a stack trace.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import click

from . import __version__
from .config import Config, ConfigError, default_config, load_config
from .daemon import Daemon, StartupError, setup_logging
from .keys import KeyFileError, key_path, load_key
from .store import StoreError

CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The TOML config file (default: the embedded defaults).",
)


def _config(path: Path | None) -> Config:
    try:
        return default_config() if path is None else load_config(path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="licd")
def main() -> None:
    """licd: a floating-licence daemon."""


@main.command()
@CONFIG_OPTION
def serve(config_path: Path | None) -> None:
    """Run the daemon until SIGTERM or SIGINT."""
    config = _config(config_path)
    setup_logging(config.server.log_level)
    try:
        asyncio.run(_serve(config))
    except (StartupError, StoreError, KeyFileError) as exc:
        raise click.ClickException(str(exc)) from None


async def _serve(config: Config) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    daemon = await Daemon.open(config)
    await daemon.run(stop)


@main.group()
def key() -> None:
    """The daemon's signing key."""


@key.command("show")
@CONFIG_OPTION
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The daemon's state directory (instead of --config).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def key_show(config_path: Path | None, state_dir: Path | None, as_json: bool) -> None:
    """Print the public key clients pin (LICD_SERVER_KEY): 64 hex digits."""
    if state_dir is None:
        state_dir = _config(config_path).server.state_dir
    try:
        public = bytes(load_key(key_path(state_dir)).verify_key).hex()
    except KeyFileError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps({"key": public, "state_dir": str(state_dir)}))
    else:
        click.echo(public)


@main.command("check-config")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def check_config(path: Path) -> None:
    """Validate a config file; print a summary or the first error."""
    config = _config(path)
    addrs = ", ".join(f"{h}:{p}" for h, p in config.server.listen)
    click.echo(f"{path}: ok: listen {addrs}; {len(config.licences)} licence(s)")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
