"""`licd why`: which rule would grant or refuse a checkout, and why, for one holder now.

It asks the running daemon to run every checkout rule for that holder, in the order a
checkout asks them, without granting anything (the admin op `why`, engine.explain),
and prints each rule's verdict; the first refusal is the one a real checkout would get.
"""

from __future__ import annotations

from typing import Any

import click

from licd.cli.admin_command import Admin, admin_command
from licd.cli.options import parsed
from licd.config.settings import parse_duration
from licd_client.safetext import escape


@click.command()
@admin_command
@click.option("--licence", required=True, help="The licence's id.")
@click.option("--host", required=True, help="The holder's host name.")
@click.option("--hostid", help="The holder's host id (default: the host name).")
@click.option("--user", default="", help="The holder's user name.")
@click.option("--ip", help="The address it would come from (for ip: rules).")
@click.option("--seats", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--ttl",
    callback=parsed(parse_duration),
    metavar="DURATION",
    help="The lease length asked for (longer than borrow_after: a borrow).",
)
def why(
    admin: Admin,
    licence: str,
    host: str,
    hostid: str | None,
    user: str,
    ip: str | None,
    seats: int,
    ttl: float | None,
) -> None:
    """Explain what a checkout by this holder would get now, rule by rule."""
    result = admin.call(
        "why", licence=licence, host=host, hostid=hostid, user=user, ip=ip, seats=seats, ttl=ttl
    )
    admin.show(result, lambda: why_text(result))


def why_text(result: dict[str, Any]) -> str:
    holder = result["holder"]
    who = f"host {escape(holder['host'])}"
    if holder["hostid"] != holder["host"]:
        who += f" (hostid {escape(holder['hostid'])})"
    if holder["user"]:
        who += f", user {escape(holder['user'])}"
    if result["ip"]:
        who += f", ip {escape(result['ip'])}"
    decision = result["decision"]
    head = f"licence {escape(result['licence'])}, {who}, {result['seats']} seat(s): {decision}"
    if result["rule"] is not None:
        head += f" (decided by the rule {result['rule']!r})"
    lines = [head]
    for v in result["verdicts"]:
        mark = "refused" if not v["passed"] else ("flagged" if v.get("flagged") else "ok")
        decides = "   <- decides" if v["rule"] == result["rule"] and not v["passed"] else ""
        lines.append(f"  {v['rule']:<12} {mark:<8} {escape(v['reason'])}{decides}")
    return "\n".join(lines)
