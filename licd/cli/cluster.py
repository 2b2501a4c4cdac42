"""`licd cluster status`: a cluster node's view of the cluster (docs/ha.md), read from the
shared PostgreSQL database the config names, whether or not a daemon runs here.

It shows this node's role (the leader as the database says, else a standby when its
port accepts connections, else not running), the leader (node, address, epoch, how long
since it renewed) and the database's standbys with their replication state and lag.
"""

from __future__ import annotations

import asyncio
import math
import socket
from pathlib import Path
from typing import Any

import click

from licd.cli import format as fmt
from licd.cli.admin_command import CONFIG_OPTION, config_file
from licd.config.settings import default_site
from licd.store.base import StoreError
from licd_client.safetext import escape

PROBE_TIMEOUT = 1.0  # seconds to wait for this node's own port to accept


@click.group()
def cluster() -> None:
    """A cluster of nodes sharing one PostgreSQL database."""


@cluster.command("status")
@CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def status(config_path: Path | None, as_json: bool) -> None:
    """This node's role, the leader, and the database's standbys."""
    config = config_file(config_path)
    s = config.store
    if s.backend != "postgres":
        raise click.ClickException(
            'this node is not in a cluster: its [store] backend is "sqlite" (docs/ha.md)'
        )
    try:
        from licd.store.postgres import cluster_view, read_dsn
    except ImportError:
        raise click.ClickException(
            "the PostgreSQL driver is missing: pip install 'licd[postgres]'"
        ) from None
    try:
        leader, standbys = asyncio.run(cluster_view(read_dsn(s.dsn, s.dsn_file)))
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    node = s.node or default_site()
    live = bool(leader.node) and leader.age <= s.leader_ttl + s.lock_delay
    out: dict[str, Any] = {
        "node": node,
        "role": _role(live and leader.node == node, config.server.listen[0]),
        "epoch": leader.epoch,
        "leader": (
            {"node": leader.node, "address": leader.address, "renewed_ago": round(leader.age, 3)}
            if live
            else None
        ),
        "database_standbys": [
            {"name": name, "sync_state": state, "replay_lag": lag} for name, state, lag in standbys
        ],
    }
    if as_json:
        click.echo(fmt.as_json(out))
        return
    click.echo(f"node      {escape(node)} ({out['role']})")
    if live:
        click.echo(
            f"leader    {escape(leader.node)} at {escape(leader.address)}, epoch "
            f"{leader.epoch}, renewed {leader.age:.1f} s ago"
        )
    else:
        why = "released" if not leader.node else f"{escape(leader.node)} overdue"
        click.echo(f"leader    none ({why}; epoch {leader.epoch}): a standby takes over")
    if not standbys:
        click.echo("database  no standbys visible (none, or this user may not see them)")
    for name, state, lag in standbys:
        shown = "unknown" if lag is None or math.isnan(lag) else f"{lag:.3f} s"
        click.echo(f"database  standby {escape(name)}: {state}, replay lag {shown}")


def _role(leads: bool, listen: tuple[str, int]) -> str:
    """This node's role: "leader" as the database says; else "standby" when something
    accepts connections on its first listen address, "not running" when nothing does."""
    if leads:
        return "leader"
    host, port = listen
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT):
            return "standby"
    except OSError:
        return "not running"
