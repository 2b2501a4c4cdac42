"""`licd vendor`: the vendor's commands, with no daemon (docs/entitlements.md).

`keygen` creates a vendor signing key; `issue` signs the terms of one licence for one
site daemon's public key into an entitlement file; `renew` answers a site's renewal
request with the same terms, `sequence` + 1, valid for longer. The key file has the
daemon's format (`licd.store.keyfile`: the seed in hex, mode 0600, created with O_EXCL);
entitlements, their files and the requests are `licd_client.entitlements`'. An output
file is written whole or not at all (a temporary file beside it, then linked or renamed
into place), mode 0600, and never replaces a file without --force. Errors are one
sentence and exit 1 (usage errors exit 2), never a stack trace, and write nothing.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
from nacl.signing import SigningKey

from licd.cli import format as fmt
from licd.cli.options import FILE, parsed
from licd.cli.outfile import write_output
from licd.clock import SystemClock
from licd.config.settings import parse_duration
from licd.store.keyfile import KeyFileError, load_key, load_or_create_key
from licd_client.entitlements import (
    MAX_KEY,
    REQUEST_VALID,
    RESETS,
    AddonTerm,
    Binding,
    CounterTerm,
    Entitlement,
    LicenceUsage,
    Request,
    Terms,
    issue,
    key_hash,
    open_entitlement,
    read_request,
    read_request_file,
    write_file,
)
from licd_client.errors import TokenInvalid, UntrustedKey
from licd_client.messages import MAX_SEATS
from licd_client.safetext import escape, one_line
from licd_client.statements import fingerprint, key_from_text, key_to_text

#: How long a renewed entitlement is valid, unless --valid says otherwise.
DEFAULT_VALID = "35d"
#: Permission bits a vendor key file must not have: any access by group or others.
SHARED_BITS = 0o077
_DIGITS = re.compile(r"[0-9]+")


def parse_counter(text: str) -> CounterTerm:
    """`NAME=LIMIT` or `NAME=LIMIT/RESET` (reset: never, daily or monthly)."""
    name, sep, rest = text.partition("=")
    limit, slash, reset = rest.partition("/")
    if not sep or not name:
        raise ValueError(f"{text!r}: write a counter as NAME=LIMIT or NAME=LIMIT/RESET")
    if not _DIGITS.fullmatch(limit):
        raise ValueError(f"{text!r}: the limit must be a whole number of units")
    if slash and reset not in RESETS:
        raise ValueError(f"{text!r}: the reset must be one of {', '.join(RESETS)}")
    return CounterTerm(name, int(limit), reset if slash else "never")


def parse_addon(text: str) -> AddonTerm:
    """`SEATS` (for as long as the entitlement), `SEATS:FROM..TO`, `SEATS:FROM..` or
    `SEATS:..TO`, FROM and TO ISO date-times (from FROM, until before TO)."""
    seats, colon, span = text.partition(":")
    if not _DIGITS.fullmatch(seats) or int(seats) < 1:
        raise ValueError(f"{text!r}: write an add-on as SEATS or SEATS:FROM..TO, SEATS >= 1")
    if not colon:
        return AddonTerm(int(seats))
    start, dots, end = span.partition("..")
    if not dots or not (start or end):
        raise ValueError(f"{text!r}: write the add-on's dates as FROM..TO, FROM.. or ..TO")
    try:
        starts = fmt.parse_time(start) if start else None
        ends = fmt.parse_time(end) if end else None
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc}") from None
    if starts is not None and ends is not None and ends <= starts:
        raise ValueError(f"{text!r}: the add-on must end after it starts")
    return AddonTerm(int(seats), starts=starts, ends=ends)


TIME = parsed(fmt.parse_time)
DURATION = parsed(parse_duration)
KEY_OPTION = click.option(
    "--key",
    "key_file",
    type=FILE,
    required=True,
    metavar="VENDOR_KEY_FILE",
    help="The vendor signing key (`licd vendor keygen`).",
)
OUT_OPTION = click.option(
    "--out", type=FILE, required=True, help="The entitlement file to write (mode 0600)."
)
FORCE_OPTION = click.option("--force", is_flag=True, help="Replace --out if it exists.")


@click.group()
def vendor() -> None:
    """The vendor's commands: a signing key, entitlements for sites, their renewals."""


@vendor.command()
@click.argument("file", type=FILE)
def keygen(file: Path) -> None:
    """Create a new vendor signing key in FILE (mode 0600) and print its public key.

    An existing FILE is never replaced: a vendor key overwritten is lost for good.
    """
    if os.path.lexists(file):
        raise click.ClickException(
            f"{file} already exists: not replaced (a vendor key cannot be recovered once "
            "overwritten); choose another file"
        )
    try:
        key = load_or_create_key(file)
    except OSError as exc:
        raise click.ClickException(f"{file}: cannot write the key: {exc.strerror}") from None
    except KeyFileError as exc:  # someone else created the file meanwhile
        raise click.ClickException(_vendor_message(exc)) from None
    click.echo(f"wrote a new vendor signing key to {file} (mode 0600): keep it secret, back it up")
    click.echo("sites trust its public key ([vendor] keys), and so do clients (LICD_SERVER_KEY):")
    click.echo(key_to_text(bytes(key.verify_key)))


@vendor.command("issue")
@KEY_OPTION
@click.option(
    "--for",
    "daemon",
    callback=parsed(key_from_text),
    metavar="DAEMON_PUBLIC_HEX",
    required=True,
    help="The site daemon's public key (`licd key show` on the site): 64 hex digits.",
)
@click.option("--licence-id", required=True, metavar="ID", help="The licence's id.")
@click.option("--licence-key", required=True, metavar="KEY", help="The key clients present.")
@click.option("--product", required=True, help="The product it licenses.")
@click.option("--seats", type=click.IntRange(1, MAX_SEATS), required=True, help="Seats.")
@click.option(
    "--expires",
    callback=TIME,
    metavar="DATETIME",
    required=True,
    help="Valid until (ISO, with a zone).",
)
@click.option(
    "--sequence",
    type=click.IntRange(min=1),
    required=True,
    help="Above every earlier one's for this licence (a site imports only a higher one).",
)
@OUT_OPTION
@FORCE_OPTION
@click.option(
    "--feature",
    "features",
    callback=parsed(fmt.parse_feature),
    metavar="NAME=VALUE",
    multiple=True,
    help="A feature (true/false, integers and numbers are typed). Repeatable.",
)
@click.option(
    "--counter",
    "counters",
    callback=parsed(parse_counter),
    metavar="NAME=LIMIT[/RESET]",
    multiple=True,
    help="A metered counter; RESET never (default), daily or monthly. Repeatable.",
)
@click.option(
    "--addon",
    "addons",
    callback=parsed(parse_addon),
    metavar="SEATS[:FROM..TO]",
    multiple=True,
    help="Extra seats, from FROM until TO (either may be left out). Repeatable.",
)
@click.option(
    "--not-before",
    callback=TIME,
    metavar="DATETIME",
    help="Valid from (ISO); default: when issued.",
)
@click.option(
    "--max-ttl",
    callback=DURATION,
    metavar="DURATION",
    help="The longest lease the site may grant (8h).",
)
@click.option(
    "--bind",
    multiple=True,
    metavar="COMPONENT",
    help="A host-id component of the site the entitlement is bound to. Repeatable.",
)
@click.option(
    "--bind-need",
    type=click.IntRange(min=1),
    metavar="K",
    help="Components that must match (default: all but one of 3 or more, else all).",
)
@click.option(
    "--issued",
    callback=TIME,
    metavar="DATETIME",
    hidden=True,
    help="The issue time (default: now).",
)
def issue_command(
    key_file: Path,
    daemon: bytes,
    licence_id: str,
    licence_key: str,
    product: str,
    seats: int,
    expires: float,
    sequence: int,
    out: Path,
    force: bool,
    features: Sequence[tuple[str, Any]],
    counters: Sequence[CounterTerm],
    addons: Sequence[AddonTerm],
    not_before: float | None,
    max_ttl: float | None,
    bind: Sequence[str],
    bind_need: int | None,
    issued: float | None,
) -> None:
    """Sign the terms of one licence for one site daemon's key into an entitlement file.

    The file holds the licence key beside the signed terms (which hold only its hash):
    send it to the site, which imports it with `licd entitlement import FILE`.
    """
    now = SystemClock().now().wall if issued is None else issued
    if expires <= now:
        raise click.BadParameter(
            f"{_when(expires)} is not after the issue time, {_when(now)}",
            param_hint="'--expires'",
        )
    if not_before is not None and not_before >= expires:
        raise click.BadParameter(
            f"{_when(not_before)} is not before --expires, {_when(expires)}",
            param_hint="'--not-before'",
        )
    if not 0 < len(licence_key) <= MAX_KEY:
        raise click.BadParameter(f"1 to {MAX_KEY} characters", param_hint="'--licence-key'")
    for addon in addons:
        if addon.ends is not None and addon.ends <= now:
            raise click.BadParameter(
                f"an add-on ending {_when(addon.ends)} ends before the issue time",
                param_hint="'--addon'",
            )
    if bind_need is not None and not bind:
        raise click.UsageError("--bind-need needs the components: give --bind")
    binding = None
    if bind:
        need = bind_need or (len(bind) - 1 if len(bind) >= 3 else len(bind))
        binding = Binding(tuple(bind), need)
    _refuse_existing(out, force)
    terms = Terms(
        licence_id=licence_id,
        key_hash=key_hash(licence_key),
        product=product,
        seats=seats,
        expires=expires,
        sequence=sequence,
        features=dict(features),
        counters=tuple(counters),
        addons=tuple(addons),
        not_before=not_before,
        max_ttl=max_ttl,
        binding=binding,
    )
    ent = _issue(_vendor_key(key_file), daemon, now, terms)
    write_output(out, _file_text([(licence_key, ent)]), force)
    valid = f"{_when(not_before or now)} .. {_when(expires)}"
    click.echo(
        f"wrote {out}: licence {escape(licence_id)}, product {escape(product)}, "
        f"{seats} seat(s), sequence {sequence}, valid {valid}, "
        f"for daemon key {fingerprint(daemon)}, signed by vendor key {fingerprint(ent.vendor)}"
    )


@vendor.command()
@KEY_OPTION
@click.option(
    "--request",
    "request_file",
    type=FILE,
    required=True,
    help="The site's renewal request (`licd entitlement request`).",
)
@OUT_OPTION
@FORCE_OPTION
@click.option(
    "--valid",
    callback=DURATION,
    metavar="DURATION",
    default=DEFAULT_VALID,
    show_default=True,
    help="How long the renewed entitlements hold, from now.",
)
@click.option(
    "--seats",
    type=click.IntRange(1, MAX_SEATS),
    help="New seats for every renewed licence (default: unchanged).",
)
@click.option(
    "--now", callback=TIME, metavar="DATETIME", hidden=True, help="The issue time (default: now)."
)
def renew(
    key_file: Path,
    request_file: Path,
    out: Path,
    force: bool,
    valid: float,
    seats: int | None,
    now: float | None,
) -> None:
    """Answer a site's renewal request: each of its entitlements signed by this vendor
    key, again, with sequence + 1 and valid for --valid from now.

    Prints what the site reports it used of each licence. The file holds no licence key
    (the site has it): send it to the site, which imports it with `licd entitlement
    import FILE`.
    """
    at = SystemClock().now().wall if now is None else now
    signer = _vendor_key(key_file)
    request = _request(request_file, at)
    held = _held(request, bytes(signer.verify_key), request_file)
    _refuse_existing(out, force)
    renewed = [
        (old, _issue(signer, request.daemon, at, _renewed(old.terms, at, at + valid, seats)))
        for old in held
    ]
    write_output(out, _file_text([(None, new) for _, new in renewed]), force)
    click.echo(
        f"request of site {escape(request.site) or fmt.NONE}, "
        f"daemon key {fingerprint(request.daemon)}, made {_when(request.made)}"
    )
    usage = {u.licence_id: u for u in request.usage}
    for old, new in renewed:
        t = new.terms
        click.echo(
            f"licence {escape(t.licence_id)}: sequence {t.sequence}, {t.seats} seat(s), "
            f"expires {_when(t.expires)} (was {_when(old.expires)})"
        )
        click.echo(f"  used: {_usage_text(t, usage.get(t.licence_id))}")
        if t.expires < old.expires:
            click.echo("  warning: it expires before the entitlement it renews (a longer --valid?)")
        if t.binding is not None and not t.binding.holds(request.components):
            click.echo(
                f"  warning: the site's host id matches {t.binding.matched(request.components)}"
                f" of the components bound, {t.binding.need} needed: the site cannot import it"
            )
    click.echo(f"wrote {out}: {len(renewed)} entitlement(s) for the site to import")


# --------------------------------------------------------------------------- helpers


def _when(epoch: float) -> str:
    """An epoch time for people (fmt.when), even one out of its range (a site sent it)."""
    try:
        return fmt.when(epoch)
    except (OverflowError, ValueError, OSError):
        return f"{epoch:.0f} (epoch seconds, out of range)"


def _vendor_message(exc: KeyFileError) -> str:
    """A key file error about the vendor's key (the reader names the daemon's)."""
    return str(exc).replace("daemon key", "vendor key")


def _vendor_key(path: Path) -> SigningKey:
    """The vendor signing key in `path`, or exit 1 saying why not: missing, not a file,
    open to others than its owner (it signs every entitlement), or not a key."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise click.ClickException(
            f"{path}: no such vendor key file; create one with `licd vendor keygen FILE`"
        ) from None
    except OSError as exc:
        raise click.ClickException(f"{path}: cannot read the vendor key: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise click.ClickException(f"{path}: not a vendor key file (not a regular file)")
    if mode & SHARED_BITS:
        raise click.ClickException(
            f"{path}: the vendor key is open to others (mode {stat.S_IMODE(mode):04o}): "
            f"make it private with `chmod 600 {path}`"
        )
    try:
        return load_key(path)
    except KeyFileError as exc:
        raise click.ClickException(_vendor_message(exc)) from None


def _issue(key: SigningKey, daemon: bytes, now: float, terms: Terms) -> Entitlement:
    """An entitlement of `terms`, or exit 1 naming what the format refuses in them."""
    try:
        return issue(key, daemon, now, terms)
    except (ValueError, TokenInvalid) as exc:
        raise click.ClickException(
            f"licence {escape(terms.licence_id)}: cannot issue it: {one_line(str(exc))}"
        ) from None


def _file_text(entries: Sequence[tuple[str | None, Entitlement]]) -> str:
    try:
        return write_file(entries)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


def _refuse_existing(path: Path, force: bool) -> None:
    if not force and os.path.lexists(path):
        raise click.ClickException(f"{path} already exists: not replaced (give --force)")


def _request(path: Path, now: float) -> Request:
    """The renewal request in file `path`, verified (signed by the daemon key it names)
    and made no more than REQUEST_VALID before `now`; or exit 1 saying why not."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise click.ClickException(f"{path}: not a renewal request file (not text)") from None
    except OSError as exc:
        raise click.ClickException(f"{path}: cannot read it: {exc.strerror}") from None
    try:
        request = read_request(read_request_file(text))
    except ValueError as exc:
        raise click.ClickException(f"{path}: {exc}") from None
    except TokenInvalid as exc:
        raise click.ClickException(
            f"{path}: not a valid renewal request: {one_line(str(exc))}"
        ) from None
    if now > min(request.expires, request.made + REQUEST_VALID):
        raise click.ClickException(
            f"{path}: the request was made {_when(request.made)}, more than "
            f"{fmt.duration(REQUEST_VALID)} ago: ask the site for a new one"
        )
    return request


def _held(request: Request, vendor: bytes, path: Path) -> list[Entitlement]:
    """The entitlements of `request` signed by `vendor` (the latest of each licence), or
    exit 1: one that does not verify, one issued for another daemon key than the one
    that signed the request, or none of this vendor's. Other vendors' are left out."""
    latest: dict[str, Entitlement] = {}
    for i, blob in enumerate(request.entitlements, 1):
        try:
            ent = open_entitlement(blob, [vendor])
        except UntrustedKey:
            continue
        except TokenInvalid as exc:
            raise click.ClickException(
                f"{path}: entitlement {i} of the request does not verify: {one_line(str(exc))}"
            ) from None
        lic = ent.terms.licence_id
        if ent.daemon != request.daemon:
            raise click.ClickException(
                f"licence {escape(lic)}: its entitlement was issued for daemon key "
                f"{fingerprint(ent.daemon)}, but the request is signed by daemon key "
                f"{fingerprint(request.daemon)}: not renewed (for a site's new daemon key, "
                "issue a new entitlement with `licd vendor issue`)"
            )
        if lic not in latest or ent.terms.sequence > latest[lic].terms.sequence:
            latest[lic] = ent
    if not latest:
        raise click.ClickException(
            f"{path}: the request holds no entitlement signed by this vendor key "
            f"({fingerprint(vendor)}): nothing to renew"
        )
    return [latest[lic] for lic in sorted(latest)]


def _renewed(terms: Terms, now: float, expires: float, seats: int | None) -> Terms:
    """`terms` renewed at `now`: the next sequence, the new expiry, `seats` if given; a
    start date already past and add-ons already ended are left out."""
    return replace(
        terms,
        sequence=terms.sequence + 1,
        expires=expires,
        seats=terms.seats if seats is None else seats,
        not_before=terms.not_before if terms.not_before and terms.not_before > now else None,
        addons=tuple(a for a in terms.addons if a.ends is None or a.ends > now),
    )


def _usage_text(terms: Terms, usage: LicenceUsage | None) -> str:
    """What the site reports it used of a licence: peak seats (over which slots),
    checkouts refused, each counter's units (of its limit)."""
    if usage is None:
        return "not reported"
    peaks = usage.peaks
    parts = [f"peak {max((n for _, n in peaks), default=0)} seat(s)"]
    if peaks:
        first, last = min(t for t, _ in peaks), max(t for t, _ in peaks) + usage.slot
        parts[0] += f" ({_when(first)} .. {_when(last)})"
    parts.append(f"{usage.denials} checkout(s) refused")
    limits = {c.name: c for c in terms.counters}
    for name, used in sorted(usage.counters.items()):
        c = limits.get(name)
        of = "" if c is None else f" of {c.limit} ({c.reset})"
        parts.append(f"counter {escape(name)} {used}{of}")
    return ", ".join(parts)
