"""`licd-client`: licence seats for shell scripts (available, checkout, exec).

Parses arguments (argparse), calls the blocking client API, prints the result (plain
text for people, `--json` for scripts) and maps failures to exit codes with a one-line
message, never a stack trace; a checkout waiting in the daemon's queue (`--queue`) says
its place on stderr as it changes. What the daemon sent (its error texts, handles,
features) is shown through safetext, never raw. It holds no protocol logic of its own.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from .client import DEFAULT_CLIENT_NAME, SERVER_KEY_ENV
from .connection import SERVER_ENV
from .errors import ClientError, LicdError, UntrustedKey
from .identity import HOSTID_ENV
from .messages import MAX_SEATS, MIN_TTL
from .safetext import OneLineFormatter, escape, one_line
from .sync import Client, Lease

EXIT_OK = 0
EXIT_ERROR = 1  # no daemon reached, bad configuration, a token that failed verification
EXIT_USAGE = 2  # bad command line (argparse)
EXIT_REFUSED = 3  # the daemon answered with an error, e.g. no seat free
EXIT_LOST = 4  # `checkout`: the lease was lost while it was held

EPILOG = f"""\
environment:
  {SERVER_ENV}      daemon address(es), host:port[,host:port...] (default 127.0.0.1:27500)
  {SERVER_KEY_ENV}  the daemon's public key, 64 hex digits (from `licd key show`);
                   a comma-separated list is allowed
  {HOSTID_ENV}      this machine's host id, up to 255 characters (default: a salted
                   hash of the machine id); set it in containers, which share one
exit status:
  0 success; 1 no daemon reached or bad configuration; 2 usage error;
  3 the daemon refused (e.g. seats_exhausted); 4 the lease was lost while held.
  `exec` exits with the command's status (128+N when signal N killed it;
  127 when the command is not found, 126 when it cannot be run).
"""


class _Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _say(text: str) -> None:
    print(f"licd-client: {one_line(text)}", file=sys.stderr, flush=True)


def _emit(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    print(json.dumps(data, sort_keys=True) if args.json else text, flush=True)


def _client(args: argparse.Namespace) -> Client:
    return Client(
        args.server,
        args.server_key,
        client_name=DEFAULT_CLIENT_NAME,
        io_timeout=args.timeout,
        retry_for=args.timeout,
    )


class _Signals:
    """SIGINT/SIGTERM/SIGHUP while this is active: before `target` is set they interrupt
    (raise _Interrupted); after, `target(signum)` is called."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.target: Callable[[int], None] | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.target is None:
            raise _Interrupted(signum)
        self.target(signum)

    def __enter__(self) -> _Signals:
        for sig in self.SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ------------------------------------------------------------------- commands


def cmd_available(args: argparse.Namespace) -> int:
    with _client(args) as client:
        reply = client.available(args.key)
    data = {"total": reply.total, "in_use": reply.in_use, "available": reply.available}
    if reply.reserved:  # free seats only a reservation's group may take
        data["reserved"] = reply.reserved
    _emit(args, data, "\n".join(f"{k:<10} {v}" for k, v in data.items()))
    return EXIT_OK


def _describe_lease(lease: Lease) -> tuple[dict[str, Any], str]:
    data = {
        "handle": lease.handle,
        "seats": lease.seats,
        "features": lease.features,
        "expires": lease.expires,
        "overdraft": lease.overdraft,
    }
    features = ", ".join(f"{k}={v}" for k, v in sorted(lease.features.items())) or "-"
    text = f"handle     {escape(lease.handle)}\nseats      {lease.seats}\n"
    text += f"features   {escape(features)}"
    if lease.overdraft:
        text += "\noverdraft  true: granted beyond the licence's seats, within its overdraft"
    return data, text


class _QueuePlace:
    """`on_queued` for the commands: says where the checkout is in the daemon's queue,
    each time its place or the queue's length changes. The licence key is a secret: only
    its start is shown, as in a lease's repr."""

    def __init__(self, key: str) -> None:
        self._key = key[:4]
        self._shown: tuple[int, int] | None = None

    def __call__(self, position: int, waiting: int, wait: float | None) -> None:
        if (position, waiting) == self._shown:
            return
        self._shown = (position, waiting)
        about = "" if wait is None else f", about {max(0.0, wait):.0f} s"
        _say(f"queued for {self._key}...: position {position} of {waiting}{about}")


def _checkout(client: Client, args: argparse.Namespace, **callbacks: Any) -> Lease:
    return client.checkout(
        args.key,
        seats=args.seats,
        ttl=args.ttl,
        wait=args.wait,
        app=args.app,
        queue=args.queue,
        on_queued=_QueuePlace(args.key),
        **callbacks,
    )


def cmd_checkout(args: argparse.Namespace) -> int:
    stop = threading.Event()
    lost: list[Exception] = []

    def on_lost(reason: Exception) -> None:
        lost.append(reason)
        stop.set()

    with _Signals() as signals, _client(args) as client:
        lease = _checkout(client, args, on_lost=on_lost)
        signals.target = lambda _signum: stop.set()
        data, text = _describe_lease(lease)
        _emit(args, data, text)
        while not stop.wait(1.0):
            pass
        lease.release()
    if lost:
        _say(f"lease lost: {_message(lost[0])}")
        return EXIT_LOST
    return EXIT_OK


def _child_got_it(signum: int) -> bool:
    """True when a terminal's ^C also reached the child (same foreground process group),
    so forwarding SIGINT would deliver it twice."""
    if signum != signal.SIGINT:
        return False
    try:
        return os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        return False


def cmd_exec(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise _UsageError("exec needs a command after --")

    def on_lost(reason: Exception) -> None:
        _say(f"lease lost while {command[0]} runs: {_message(reason)}")

    with _Signals() as signals, _client(args) as client:
        lease = _checkout(client, args, on_lost=on_lost)
        try:
            child = subprocess.Popen(command)
        except FileNotFoundError:
            lease.release()
            _say(f"{command[0]}: command not found")
            return 127
        except OSError as exc:
            lease.release()
            _say(f"{command[0]}: {exc.strerror or exc}")
            return 126

        def forward(signum: int) -> None:
            if not _child_got_it(signum):
                child.send_signal(signum)

        signals.target = forward
        code = child.wait()
        lease.release()
    return code if code >= 0 else 128 - code


# ----------------------------------------------------------------------- main


class _UsageError(Exception):
    pass


def _message(exc: BaseException) -> str:
    if isinstance(exc, LicdError):
        return f"{exc.code}: {exc.message}"
    if isinstance(exc, UntrustedKey):
        return (
            f"{exc} (check {SERVER_KEY_ENV} or --server-key against `licd key show` on the server)"
        )
    return str(exc) or type(exc).__name__


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def _ttl(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= MIN_TTL):
        raise argparse.ArgumentTypeError(f"must be a number of seconds, at least {MIN_TTL:g}")
    return value


def _seats(text: str) -> int:
    value = int(text)
    if not 1 <= value <= MAX_SEATS:
        raise argparse.ArgumentTypeError(f"must be 1..{MAX_SEATS}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="licd-client",
        description="Take and hold licd licence seats from scripts.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--server", default=None, help=f"host:port[,host:port...] (default: ${SERVER_ENV})"
    )
    parser.add_argument(
        "--server-key", default=None, help=f"daemon public key, hex (default: ${SERVER_KEY_ENV})"
    )
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log renewals and retries to stderr"
    )
    parser.add_argument(
        "--timeout",
        type=_positive,
        default=5.0,
        help="seconds to wait for a daemon before giving up (default 5)",
    )
    sub = parser.add_subparsers(dest="command_name", required=True, metavar="COMMAND")

    p = sub.add_parser("available", help="how many seats of a licence are free")
    p.add_argument("key", metavar="KEY", help="the licence key")
    p.set_defaults(func=cmd_available)

    def lease_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--seats", type=_seats, default=1, help="seats to hold (default 1)")
        p.add_argument(
            "--ttl",
            type=_ttl,
            default=None,
            help="the lease's length in seconds (default: the licence's; at most its max_ttl)",
        )
        p.add_argument(
            "--wait",
            type=float,
            default=0.0,
            metavar="S",
            help="keep trying for S seconds while no seat is free (default: fail at once); "
            "with --queue, while the queue is full",
        )
        p.add_argument(
            "--queue",
            action="store_true",
            help="when no seat is free, wait in the daemon's queue for one, as long as it "
            "takes (the place in the queue is shown on stderr; Ctrl-C leaves the queue)",
        )
        p.add_argument("--app", default=None, help="application name recorded with the lease")

    p = sub.add_parser("checkout", help="hold a seat until interrupted (SIGINT/SIGTERM)")
    p.add_argument("key", metavar="KEY", help="the licence key")
    lease_options(p)
    p.set_defaults(func=cmd_checkout)

    p = sub.add_parser(
        "exec",
        help="hold a seat while a command runs",
        usage="licd-client exec --key KEY [options] -- CMD [ARG ...]",
    )
    p.add_argument("--key", required=True, help="the licence key")
    lease_options(p)
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD", help="the command")
    p.set_defaults(func=cmd_exec)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    library_log = logging.getLogger("licd_client")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter("licd-client: %(message)s"))
    if args.verbose:
        library_log.addHandler(handler)
        library_log.setLevel(logging.INFO)
    try:
        return _run(parser, args)
    finally:
        library_log.removeHandler(handler)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except _UsageError as exc:
        parser.print_usage(sys.stderr)
        _say(str(exc))
        return EXIT_USAGE
    except _Interrupted as exc:
        return 128 + exc.signum
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except LicdError as exc:
        _say(_message(exc))
        return EXIT_REFUSED
    except (ClientError, ValueError, OSError) as exc:
        _say(_message(exc))
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
