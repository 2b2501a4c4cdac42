"""`licd entitlement`: a site admin's side of vendor entitlements (docs/entitlements.md).

`import` sends an entitlement file to the running daemon, which verifies and applies
all of it or nothing; `list` shows what the daemon holds, with this site's daemon key and
host-id components (what a vendor needs to issue an entitlement for it); `request`
writes a renewal request, signed by the daemon, for the vendor's `licd vendor renew`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import click

from licd.cli import format as fmt
from licd.cli.admin_command import Admin, admin_command
from licd.cli.options import FILE
from licd.cli.outfile import write_output
from licd_client.safetext import escape

#: Largest entitlement file `import` sends (the daemon refuses larger ones too).
MAX_FILE = 512 * 1024


@click.group()
def entitlement() -> None:
    """Import, list and renew the vendor's entitlements."""


@entitlement.command("import")
@admin_command
@click.argument("path", metavar="FILE", type=FILE)
def import_(admin: Admin, path: Path) -> None:
    """Verify an entitlement file and serve its licences (all of it, or nothing)."""
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_FILE + 1)
    except OSError as exc:
        raise click.ClickException(f"{path}: cannot read it: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE:
        raise click.ClickException(f"{path}: too large for an entitlement file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise click.ClickException(f"{path}: not an entitlement file (not text)") from None
    result = admin.call("entitlement.import", text=text, source=str(path))
    admin.show(result, lambda: _imported_text(result["entitlements"]))


def _imported_text(outcomes: Sequence[Mapping[str, Any]]) -> str:
    rows = [
        (x["licence_id"], x["sequence"], x["result"], x["seats"], fmt.when(x["expires"]))
        for x in outcomes
    ]
    return fmt.table(("LICENCE", "SEQUENCE", "RESULT", "SEATS", "EXPIRES"), rows)


@entitlement.command("list")
@admin_command
def list_(admin: Admin) -> None:
    """The entitlements the daemon holds, and what a vendor needs to issue one for it."""
    result = admin.call("entitlement.list")
    admin.show(result, lambda: _list_text(result))


def _list_text(result: Mapping[str, Any]) -> str:
    rows = [
        (
            x["licence"],
            x["sequence"],
            x["state"],
            x.get("product", fmt.NONE),
            _seats(x),
            fmt.when(x.get("expires")),
            fmt.days_left(x.get("days_left")),
        )
        for x in result["entitlements"]
    ]
    lines = [
        fmt.table(("LICENCE", "SEQUENCE", "STATE", "PRODUCT", "SEATS", "EXPIRES", "LEFT"), rows)
        if rows
        else "no entitlement imported",
        "",
        f"daemon key:  {escape(result['key'])}",
        "vendor keys: " + (", ".join(map(escape, result["vendor_keys"])) or fmt.NONE),
        "host id:     "
        + ("\n             ".join(map(escape, result["site_components"])) or fmt.NONE),
    ]
    return "\n".join(lines)


def _seats(item: Mapping[str, Any]) -> str:
    """Seats served, and granted when the site serves fewer."""
    if "seats" not in item:
        return fmt.NONE
    seats, granted = item["seats"], item["seats_granted"]
    return str(seats) if seats == granted else f"{seats} (of {granted})"


@entitlement.command("request")
@admin_command
@click.option("--out", type=FILE, required=True, help="Write the request to this file.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def request(admin: Admin, out: Path, force: bool) -> None:
    """Write a renewal request for the vendor: signed by the daemon, with this site's
    host id, each entitlement held and the site's usage of it."""
    result = admin.call("entitlement.request")
    write_output(out, result["request"], force)
    if admin.json:
        click.echo(fmt.as_json({"out": str(out), "licences": result["licences"]}))
        return
    names = ", ".join(map(escape, result["licences"]))
    click.echo(f"wrote {escape(str(out))}: a renewal request for {names}")
    click.echo("send it to the vendor; import the file they send back (licd entitlement import)")
