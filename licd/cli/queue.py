"""`licd queue`: the checkouts waiting for a seat in the licences' queues, in order.

It asks the running daemon (the admin op `queue`) and prints each queue in the order
it is served: position, who waits, for how long, and the daemon's estimate of the wait.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import click

from licd.cli import format as fmt
from licd.cli.admin_command import Admin, admin_command


@click.command()
@admin_command
@click.option("--licence", help="Only this licence's queue (its id).")
def queue(admin: Admin, licence: str | None) -> None:
    """List the checkouts waiting for a seat, in the order they are served."""
    result = admin.call("queue", licence=licence)
    admin.show(result, lambda: queue_text(result["queue"]))


def queue_text(waiters: Sequence[Mapping[str, Any]]) -> str:
    if not waiters:
        return "(nobody waits)"
    head = ("LICENCE", "POS", "HOST", "HOSTID", "USER", "SEATS", "PRIORITY", "WAITED", "WAIT")
    rows = [
        (x["licence"], x["position"], x["host"], x["hostid"], x["user"], x["seats"])
        + (x["priority"], fmt.duration(x["waited"]), _wait(x))
        for x in waiters
    ]
    return fmt.table(head, rows)


def _wait(waiter: Mapping[str, Any]) -> str:
    if not waiter["connected"]:
        return "(disconnected)"
    return "?" if waiter["wait"] is None else f"~{fmt.duration(waiter['wait'])}"
