"""`licd`: the daemon's command line. Commands parse, call one function, print.

`serve` runs the daemon (signals wired here); `check-config` validates a file; every
other command is one or a few admin requests on the daemon's Unix socket (chosen by
--socket, --config, LICD_SOCKET, LICD_CONFIG or the embedded default, in that order),
printed as a table for people or as JSON (`--json`) for scripts. It never opens the
database. Errors are one sentence on stderr and exit 1, never a stack trace (usage
errors exit 2). What the daemon sends is printed through cli_format (values escaped,
licd_client.safetext).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import click
from click.core import ParameterSource

from licd import __version__
from licd.cli import demand
from licd.cli import format as fmt
from licd.cli import report as reports
from licd.cli.admin_command import (
    CONFIG_ENV,
    CONFIG_OPTION,
    DEFAULT_ORIGIN,
    Admin,
    admin_command,
    config_file,
)
from licd.cli.cluster import cluster
from licd.cli.entitlement import entitlement
from licd.cli.options import FILE, parsed
from licd.cli.policy import policy_changes, policy_options
from licd.cli.queue import queue
from licd.cli.vendor import vendor
from licd.cli.why import why
from licd.config.settings import Config, parse_duration
from licd.core.cluster import LeadershipLost
from licd.daemon import (
    Daemon,
    StartupError,
    event_loop_factory,
    resolve_surroundings,
    setup_logging,
)
from licd.shells.notify import Notifier
from licd.store.base import StoreError
from licd.store.keyfile import KeyFileError, key_path, load_key
from licd_client.connection import format_address
from licd_client.safetext import escape

#: `licd serve`'s exit status when a cluster leader lost the leadership (EX_TEMPFAIL).
EXIT_LEADERSHIP_LOST = 75
GC_YOUNG_THRESHOLD = 50_000  # allocations between young collections (CPython: 700)
PAGE = 1000  # entries asked for per admin request when paging
FOLLOW_WAIT = 10.0  # seconds the daemon holds an `audit --follow` poll open
CLEAR = "none"  # `licence update --expires none`: remove the date

TIME_OR_NONE = parsed(lambda v: CLEAR if v == CLEAR else fmt.parse_time(v))
WHEN = parsed(lambda text: fmt.parse_since(text, time.time()))  # ISO, or 1h ago
TTL_OPTION = click.option(
    "--ttl", callback=parsed(parse_duration), metavar="DURATION", help="Lease TTL (90s, 5m)."
)
GRACE_OPTION = click.option(
    "--grace",
    callback=parsed(functools.partial(parse_duration, allow_zero=True)),
    metavar="DURATION",
    help="How long a lapsed lease keeps its seat.",
)
FEATURE_OPTION = click.option(
    "--feature",
    "feature",
    multiple=True,
    metavar="NAME=VALUE",
    callback=parsed(fmt.parse_feature),
    help="A feature (true/false, integers and numbers are typed). Repeatable.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="licd")
def main() -> None:
    """licd: a floating-licence daemon."""


main.add_command(vendor)
main.add_command(entitlement)
main.add_command(cluster)
main.add_command(why)
main.add_command(queue)


@main.command()
@CONFIG_OPTION
def serve(config_path: Path | None) -> None:
    """Run the daemon until SIGTERM or SIGINT (a second one: exit now, without waiting
    for the requests in flight); SIGHUP reloads the config file."""
    # Until the event loop takes them over: a SIGHUP is not fatal, and a SIGINT ends
    # the process as SIGTERM would, without a KeyboardInterrupt traceback.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    config = config_file(config_path)
    setup_logging(config.server.log_level)
    try:
        with asyncio.Runner(loop_factory=event_loop_factory(config.server.event_loop)) as runner:
            runner.run(_serve(config))
    except (StartupError, StoreError, KeyFileError) as exc:
        raise click.ClickException(str(exc)) from None
    except LeadershipLost as exc:
        # A cluster node that led and may lead no more: it has stopped answering; its
        # service manager starts it again, as a standby (docs/ha.md).
        click.echo(f"licd: the leadership was lost ({exc}); stopped", err=True)
        sys.exit(EXIT_LEADERSHIP_LOST)


async def _serve(config: Config) -> None:
    stop, exit_now = asyncio.Event(), asyncio.Event()

    def on_stop_signal() -> None:
        """The first SIGTERM or SIGINT shuts down in order; a second one exits now."""
        (exit_now if stop.is_set() else stop).set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop_signal)
    # Until the daemon exists a SIGHUP is ignored (the file was only just read), not fatal.
    loop.add_signal_handler(signal.SIGHUP, lambda: None)
    notifier = Notifier.from_environ()  # systemd's NOTIFY_SOCKET, when it started us
    # Requests make no reference cycles (their objects go by reference counting), so the
    # cycle collector is run less often, and once serving it no longer walks what was
    # built to start (code, config, licences, restored leases): docs/benchmarks.md.
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    try:
        # Opening may migrate the database: systemd is kept from timing that out. A
        # cluster node waits as a standby meanwhile, until it leads or is told to stop.
        opening = asyncio.ensure_future(
            notifier.while_starting(
                Daemon.open(config, on_standby=notifier.ready),
                "opening the state (a schema migration can take a while)",
            )
        )
        stopped = asyncio.ensure_future(stop.wait())
        # A standby may wait long: its loop pings the watchdog meanwhile (the daemon
        # pings on its own once it serves).
        watchdog = asyncio.ensure_future(notifier.run_watchdog())
        await asyncio.wait({opening, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        watchdog.cancel()
        if not opening.done():
            opening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await opening
            return
        daemon = opening.result()
        loop.add_signal_handler(signal.SIGHUP, daemon.request_reload)
        await daemon.run(stop, exit_now=exit_now, notifier=notifier, on_ready=lambda _: gc.freeze())
    finally:
        notifier.close()


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
@click.option("--socket", "socket_path", type=FILE, metavar="PATH", help="Ask the running daemon.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def key_show(
    config_path: Path | None, state_dir: Path | None, socket_path: Path | None, as_json: bool
) -> None:
    """Print the public key clients pin (LICD_SERVER_KEY): 64 hex digits."""
    if socket_path is not None:
        result = Admin(socket_path, "from --socket", as_json).call("key")
        click.echo(fmt.as_json(result) if as_json else result["key"])
        return
    if state_dir is None:
        state_dir = config_file(config_path).server.state_dir
    try:
        public = bytes(load_key(key_path(state_dir)).verify_key).hex()
    except KeyFileError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(fmt.as_json({"key": public, "state_dir": str(state_dir)}) if as_json else public)


@main.command("check-config")
@click.argument("path", type=FILE, envvar=CONFIG_ENV)
def checkconfig_file(path: Path) -> None:
    """Validate a config file (PATH, else $LICD_CONFIG) and what it names (certificates,
    CA file, admin group and socket, alert hook); print a summary or the first error."""
    config = config_file(path, "path")
    try:
        resolve_surroundings(config)
    except StartupError as exc:
        raise click.ClickException(str(exc)) from None
    addrs = ", ".join(format_address(a) for a in config.server.listen)
    relayed = f", {len(config.relayed)} relayed" if config.relayed else ""
    click.echo(f"{path}: ok: listen {addrs}; {len(config.licences)} licence(s){relayed}")


# ------------------------------------------------------------------ admin commands


@main.command()
@admin_command
def status(admin: Admin) -> None:
    """The daemon's state and every licence's seats and expiry."""
    result = admin.call("status")
    # Which daemon this is: a `make run` one is never shown as if it were the one meant.
    hint = "; --config, --socket or LICD_CONFIG choose another"
    where = f"{admin.socket} ({admin.origin}{hint if admin.origin == DEFAULT_ORIGIN else ''})"
    admin.show(result | {"admin_socket": str(admin.socket)}, lambda: fmt.status_text(result, where))


@main.command()
@admin_command
@click.option("--licence", help="Only this licence's leases (its id).")
@click.option("--host", help="Only leases held from this host.")
@click.option("--user", help="Only leases held by this user.")
@click.option("--borrowed", is_flag=True, help="Only borrows (leases past borrow_after).")
def leases(
    admin: Admin, licence: str | None, host: str | None, user: str | None, borrowed: bool
) -> None:
    """The live leases (never their secrets), in handle order."""
    found: list[dict[str, Any]] = []
    after = None
    while True:
        page = admin.call(
            "leases",
            licence=licence,
            host=host,
            user=user,
            borrowed=borrowed,
            after=after,
            limit=PAGE,
        )
        found += page["leases"]
        after = page["next"]
        if after is None:
            break
    admin.show({"leases": found}, lambda: fmt.leases_text(found))


@main.command()
@admin_command
@click.argument("handles", nargs=-1)
@click.option("--host", help="Revoke every lease held from this host.")
@click.option("--user", help="Revoke every lease held by this user.")
@click.option("--reason", default=None, help="Why (kept in the audit log).")
def revoke(
    admin: Admin, handles: tuple[str, ...], host: str | None, user: str | None, reason: str | None
) -> None:
    """Revoke leases by handle, host or user.

    The holder's next heartbeat gets lease_unknown, and the seat is free at once.
    """
    if not handles and host is None and user is None:
        raise click.UsageError("name lease handles, --host or --user")
    result = admin.call("revoke", handles=list(handles), host=host, user=user, reason=reason)
    admin.show(result, lambda: fmt.revoked_text(result["revoked"]))


@main.group()
def licence() -> None:
    """List and edit licences, live."""


@licence.command("list")
@admin_command
@click.option("--show-keys", is_flag=True, help="Also print each licence's key (a secret).")
def licence_list(admin: Admin, show_keys: bool) -> None:
    """Every licence with its seats, lease terms, validity and features."""
    result = admin.call("licence.list", show_keys=show_keys)
    admin.show(result, lambda: fmt.licences_text(result["licences"], show_keys))


@licence.command("add")
@admin_command
@click.argument("licence_id", metavar="ID")
@click.option("--key", required=True, help="The licence key clients present (a secret).")
@click.option("--product", required=True, help="The product it licenses.")
@click.option("--seats", type=click.IntRange(min=1), required=True, help="Concurrent seats.")
@TTL_OPTION
@GRACE_OPTION
@click.option("--not-before", callback=parsed(fmt.parse_time), metavar="ISO", help="Valid from.")
@click.option("--expires", callback=parsed(fmt.parse_time), metavar="ISO", help="Valid until.")
@FEATURE_OPTION
@policy_options
def licence_add(admin: Admin, licence_id: str, **opts: Any) -> None:
    """Add a licence, served at once.

    Times are ISO 8601 with an offset or Z, e.g. 2027-01-01T00:00:00Z. The policy options
    are those of docs/policies.md.
    """
    data = {"id": licence_id, "key": opts["key"], "product": opts["product"], **_terms(opts)}
    data |= {k: v for k, v in policy_changes(opts).items() if v is not None}
    if opts["feature"]:
        data["features"] = dict(opts["feature"])
    result = admin.call("licence.add", licence=data)
    admin.show(result, lambda: fmt.licence_text(result["licence"], result["result"]))


@licence.command("update")
@admin_command
@click.argument("licence_id", metavar="ID")
@click.option("--key", help="A new licence key (clients must present it from now on).")
@click.option("--product", help="A new product name.")
@click.option("--seats", type=click.IntRange(min=1), help="Concurrent seats.")
@TTL_OPTION
@GRACE_OPTION
@click.option("--not-before", callback=TIME_OR_NONE, metavar="ISO|none", help="Valid from.")
@click.option("--expires", callback=TIME_OR_NONE, metavar="ISO|none", help="Valid until.")
@FEATURE_OPTION
@click.option("--drop-feature", multiple=True, metavar="NAME", help="Remove a feature.")
@click.option("--clear-features", is_flag=True, help="Remove every feature first.")
@policy_options
def licence_update(admin: Admin, licence_id: str, **opts: Any) -> None:
    """Change a licence, live.

    Features given are merged into the licence's (after --clear-features, they replace
    them); `none` removes a date.
    """
    changes = {k: opts[k] for k in ("key", "product") if opts[k] is not None}
    changes |= {k: None if v == CLEAR else v for k, v in _terms(opts).items()}
    changes |= policy_changes(opts)
    if opts["clear_features"]:
        changes["features"] = {}
    drop, put = list(opts["drop_feature"]), dict(opts["feature"])
    if not (changes or drop or put):
        raise click.UsageError("nothing to change: give at least one option")
    result = admin.call(
        "licence.update",
        licence=licence_id,
        changes=changes,
        drop_features=drop or None,
        set_features=put or None,
    )
    admin.show(result, lambda: fmt.licence_text(result["licence"], result["result"]))


def _terms(opts: dict[str, Any]) -> dict[str, Any]:
    """The licence fields given as options, by their config-file names."""
    names = {"seats": "seats", "ttl": "lease_ttl", "grace": "grace", "expires": "expires"}
    names["not_before"] = "not_before"
    return {key: opts[opt] for opt, key in names.items() if opts[opt] is not None}


@licence.command("remove")
@admin_command
@click.argument("licence_id", metavar="ID")
@click.option("--force", is_flag=True, help="Revoke its live leases first.")
def licence_remove(admin: Admin, licence_id: str, force: bool) -> None:
    """Remove a licence; one with live leases needs --force."""
    result = admin.call("licence.remove", licence=licence_id, force=force)
    revoked = f" ({fmt.revoked_text(result['revoked'])})" if result["revoked"] else ""
    admin.show(result, lambda: fmt.licence_text(result["removed"], "removed") + revoked)


@main.command()
@admin_command
@click.option(
    "--since",
    callback=parsed(lambda text: fmt.parse_since(text, time.time())),
    metavar="TIME",
    help="From this ISO time, or this long ago (1h, 2d).",
)
@click.option("--follow", is_flag=True, help="Keep printing new entries until Ctrl-C.")
@click.option(
    "--format",
    "style",
    type=click.Choice(["table", "csv", "json"]),
    default=None,
    help="table (default; json with --json), csv with a header row, json: one entry a line.",
)
@click.option("--follow-polls", type=int, default=None, hidden=True)  # tests: stop after N
def audit(
    admin: Admin, since: float | None, follow: bool, style: str | None, follow_polls: int | None
) -> None:
    """Print the audit log; --follow for new entries.

    Seats taken, returned, reclaimed and denied, revokes, licence edits and reloads.
    """
    style = style or ("json" if admin.json else "table")
    line = {"table": fmt.audit_line, "csv": fmt.audit_csv, "json": fmt.as_json}[style]
    if style != "json":
        click.echo(fmt.AUDIT_HEADER if style == "table" else fmt.audit_csv_header())
    try:
        for entry in audit_entries(admin.call, since, follow=follow, polls=follow_polls):
            click.echo(line(entry))
    except KeyboardInterrupt:  # the way to stop --follow: not an error
        pass


def audit_entries(
    call: Callable[..., dict[str, Any]],
    since: float | None,
    *,
    follow: bool = False,
    polls: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Every entry (from `since`), page by page; with `follow`, then new ones as the
    daemon reports them (a long poll each), for `polls` rounds or forever."""
    after = 0
    while True:
        page = call("audit", after=after, since=since, limit=PAGE)
        yield from page["entries"]
        after = page["last"]
        if len(page["entries"]) < PAGE:
            break
    rounds = 0
    while follow and (polls is None or rounds < polls):
        page = call("audit", after=after, since=since, limit=PAGE, wait=FOLLOW_WAIT)
        yield from page["entries"]
        after = page["last"]
        rounds += 1


@main.command()
@admin_command
def reload(admin: Admin) -> None:
    """Re-read the daemon's config file.

    Licences are added or updated live, and the entitlement files it names imported;
    other settings need a restart (listed).
    """
    result = admin.call("reload")
    admin.show(result, lambda: fmt.reload_text(result))
    outcomes: dict[str, str] = result["licences"]
    failed = sorted(name for name, outcome in outcomes.items() if outcome.startswith("error"))
    files: dict[str, str] = result.get("entitlements", {})
    refused = sorted(path for path, outcome in files.items() if outcome.startswith("error"))
    if failed or refused:
        what = [f"licence(s) {', '.join(map(escape, failed))}"] if failed else []
        what += [f"entitlement file(s) {', '.join(map(escape, refused))}"] if refused else []
        raise click.ClickException(f"not applied: {'; '.join(what)}")


@main.group()
def report() -> None:
    """Reports from the audit log, for sizing licences."""


@report.command("usage")
@admin_command
@click.option("--licence", help="Only this licence (its id); default: all of them, summed.")
@click.option("--from", "start", callback=WHEN, metavar="TIME", help="ISO time, or 1h, 2d ago.")
@click.option("--to", "end", callback=WHEN, metavar="TIME", help="ISO time, or 1h, 2d ago.")
@click.option("--slot", default="3m", callback=parsed(reports.parse_slot), help="Slot length.")
@click.option("--format", "style", type=click.Choice(reports.FORMATS), help="Default table.")
@click.option("--svg", type=click.File("w", encoding="utf-8"), help="Also write an SVG chart.")
@click.option(
    "--by", type=click.Choice(demand.BY), help="Instead: one row per user, host, group or app."
)
@click.option("--suggest", is_flag=True, help="Instead: the seats each licence needed.")
@click.option(
    "--within",
    callback=parsed(parse_duration),
    metavar="DURATION",
    help="--by, --suggest: a refusal the holder checked out this soon after was later"
    " served (default 10m).",
)
@click.option(
    "--max-denial-rate",
    "target",
    callback=parsed(demand.parse_rate),
    metavar="PERCENT",
    help="--suggest: the share of requests the seats may refuse (default 1%).",
)
def report_usage(admin: Admin, licence: str | None, svg: TextIO | None, **opts: Any) -> None:
    """Peak seats in use, denials and overdraft checkouts per time slot; or, with --by,
    each holder's use and refusals; or, with --suggest, the seats each licence needed.

    Slots are absolute (3m: 480 a day from 00:00 UTC); the default range: the last 24h.
    """
    style = opts["style"] or ("json" if admin.json else "table")
    by, suggest = opts["by"], opts["suggest"]
    _check_report_options(by, suggest, svg is not None, opts)
    now = time.time()
    try:
        if by is None and not suggest:
            start, end = reports.window(opts["start"], opts["end"], opts["slot"], now)
        else:
            start, end = reports.bounds(opts["start"], opts["end"], 1.0, now)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    within = opts["within"] or demand.DEFAULT_WITHIN
    period = demand.Period(start, end, licence, within)
    if by is not None:
        rows = demand.fetch_by(admin.call, by, licence, start, end, within)
        click.echo(demand.by_text(rows, by, style, period))
    elif suggest:
        target = demand.DEFAULT_TARGET if opts["target"] is None else opts["target"]
        items = demand.fetch_suggestions(admin.call, licence, start, end, within, target)
        click.echo(demand.suggestions_text(items, style, period, target))
    else:
        usage = reports.fetch(admin.call, licence, start, end, opts["slot"])
        click.echo(reports.render(usage, style))
        if svg is not None:
            svg.write(reports.svg_text(usage))


def _check_report_options(by: str | None, suggest: bool, svg: bool, opts: dict[str, Any]) -> None:
    """Usage errors for options that do not go together in `report usage`."""
    slot = click.get_current_context().get_parameter_source("slot") is not ParameterSource.DEFAULT
    if by is not None and suggest:
        raise click.UsageError("give --by or --suggest, not both")
    if (by is not None or suggest) and (slot or svg):
        raise click.UsageError(
            "--slot and --svg are for the report per slot, not --by or --suggest"
        )
    if by is None and not suggest and opts["within"] is not None:
        raise click.UsageError("--within is for --by and --suggest")
    if not suggest and opts["target"] is not None:
        raise click.UsageError("--max-denial-rate is for --suggest")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
