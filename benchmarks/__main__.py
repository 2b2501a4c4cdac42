"""`python -m benchmarks` (`make bench`): run the scenarios, print tables, write JSON.

Parses the options, runs each chosen scenario in order (a scenario that crashes is
reported and the others still run), prints one table per scenario with every figure
beside its floor and target, and writes every number to a JSON file. A MISS never fails
the run; only a scenario that could not run makes the exit status 1.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import fields
from pathlib import Path
from typing import Any

from licd.daemon import event_loop_factory

from .daemon import SystemMeter
from .loadgen import raise_nofile
from .profile import render as render_profile
from .scenarios import POSTGRES_SCENARIOS, SCENARIOS, Context, Options
from .stats import Figure, machine_info, render_machine, render_table

#: Sizes and durations for `--quick` (the whole set in well under a minute).
QUICK: dict[str, Any] = {
    "duration": 2.5,
    "warmup": 0.5,
    "site_clients": 500,
    "site_duration": 3.0,
    "scale_connections": 2000,
    "idle_seconds": 2.0,
    "restart_leases": 20_000,
    "sqlite_seconds": 1.0,
    "profile_seconds": 3.0,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="licd benchmarks: figures beside their floors and targets.",
    )
    p.add_argument(
        "--scenarios",
        default="all",
        help=f"comma-separated, from {','.join(SCENARIOS)} (default: all)",
    )
    p.add_argument("--quick", action="store_true", help="small sizes, short durations")
    p.add_argument(
        "--backend",
        choices=("sqlite", "postgres"),
        default="sqlite",
        help="the daemons' store: SQLite in the state directory (default), or a throwaway "
        "PostgreSQL primary with a synchronous standby (needs its server binaries; "
        f"runs {','.join(POSTGRES_SCENARIOS)})",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/results/latest.json"),
        help="the JSON results file (default: %(default)s)",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where state directories go (default: a temp dir, removed after)",
    )
    p.add_argument("--keep", action="store_true", help="keep the workdir")
    p.add_argument("--workers", type=int, default=2, help="load generator processes")
    p.add_argument("--connections", type=int, help="heartbeat: connections (100)")
    p.add_argument("--churn-connections", type=int, help="churn: connections (100)")
    p.add_argument("--duration", type=float, help="heartbeat/churn seconds measured (10)")
    p.add_argument("--warmup", type=float, help="seconds of load before measuring (1)")
    p.add_argument("--site-clients", type=int, help="site: renewing clients (2000)")
    p.add_argument("--site-scale", type=float, help="site: speed-up factor (10)")
    p.add_argument("--site-duration", type=float, help="site: seconds measured (20)")
    p.add_argument("--scale-connections", type=int, help="scale: connections (10000)")
    p.add_argument("--idle-seconds", type=float, help="scale: idle seconds sampled (5)")
    p.add_argument(
        "--scale-interval",
        type=float,
        help="scale: seconds between each connection's heartbeats while idle (0: none)",
    )
    p.add_argument("--restart-leases", type=int, help="restart: leases in the state (100000)")
    p.add_argument(
        "--sqlite-seconds",
        type=float,
        help="the store's floor (SQLite, or PostgreSQL with --backend postgres): seconds per "
        "mode (3)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="profile the daemon with py-spy under the heartbeat and churn loads",
    )
    p.add_argument("--profile-seconds", type=float, help="profile length (8)")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=None,
        help="seconds to wait for an idle machine before each scenario (30; --quick: 0)",
    )
    return p.parse_args(argv)


def options(args: argparse.Namespace, workdir: Path) -> Options:
    values: dict[str, Any] = dict(QUICK) if args.quick else {}
    for f in fields(Options):
        given = getattr(args, f.name, None)
        if given is not None and f.name != "workdir":
            values[f.name] = given
    return Options(workdir=workdir, results_dir=args.out.parent, **values)


def finite(value: Any) -> Any:
    """`value` with NaN and infinities replaced by None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def wait_for_quiet(limit: float, threshold: float = 25.0) -> float:
    """Wait (at most `limit` s) until the machine is nearly idle: other programs' CPU
    would be charged to whatever runs next. The busy % of one core last seen."""
    deadline = time.monotonic() + limit
    meter = SystemMeter()
    while True:
        meter.start()
        time.sleep(0.5)
        busy = meter.stop()["busy"]
        if busy < threshold or time.monotonic() >= deadline:
            return busy


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quiet_wait is None:
        args.quiet_wait = 0.0 if args.quick else 30.0
    known = list(SCENARIOS) if args.backend == "sqlite" else list(POSTGRES_SCENARIOS)
    names = known if args.scenarios == "all" else args.scenarios.split(",")
    unknown = [n for n in names if n not in known]
    if unknown:
        print(
            f"unknown scenario(s) for --backend {args.backend}: {', '.join(unknown)}; "
            f"choose from {', '.join(known)}",
            file=sys.stderr,
        )
        return 2
    nofile = raise_nofile()  # the daemon and the floor server inherit it
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="licd-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    opts = options(args, workdir)
    ctx = Context(opts)
    info = machine_info()
    info["nofile"] = nofile
    factory = event_loop_factory("auto")  # what the daemons and the floor servers run on
    info["event_loop"] = "asyncio" if factory is None else factory.__module__.partition(".")[0]
    print(render_machine(info))
    started = time.time()
    report: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "machine": info,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()},
        "scenarios": {},
    }
    failed = False
    try:
        try:
            print(ctx.start_store())
        except (RuntimeError, ImportError) as exc:
            print(f"cannot start the {args.backend} store: {exc}", file=sys.stderr)
            return 2
        if ctx.pg is not None:
            report["postgres"] = ctx.pg.settings
        print(
            f"load generator: {opts.workers} worker processes, one request in flight per "
            f"connection; state in {workdir}\n",
            flush=True,
        )
        for name in names:
            busy = wait_for_quiet(args.quiet_wait)
            if busy >= 25.0:
                print(f"(warning: the machine is {busy:.0f} % busy before {name}: noisy figures)")
            t0 = time.monotonic()
            try:
                figures, details = SCENARIOS[name](ctx)
            except Exception as exc:
                failed = True
                print(f"== {name} == FAILED: {type(exc).__name__}: {exc}\n", flush=True)
                report["scenarios"][name] = {"error": traceback.format_exc()}
                continue
            elapsed = time.monotonic() - t0
            print(render_table(f"{name} ({elapsed:.0f} s)", figures))
            if "profile" in details:
                print()
                print(render_profile(details["profile"]))
            print(flush=True)
            report["scenarios"][name] = {
                "seconds": elapsed,
                "machine_busy_before": busy,
                "figures": [f.to_json() for f in figures],
                "details": details,
            }
        if ctx.sqlite is not None:
            sq = ctx.sqlite
            floors = [
                Figure(
                    "floors", "SQLite WAL FULL, 1 row per commit", sq["commits_per_s"], "commits/s"
                ),
                Figure(
                    "floors",
                    "SQLite WAL FULL, CPU per 1-row commit",
                    sq["cpu_us_per_commit"],
                    "us",
                    lower_is_better=True,
                ),
                Figure(
                    "floors",
                    "SQLite WAL FULL, 100 rows per commit",
                    sq["rows_per_s_batch100"],
                    "rows/s",
                ),
            ]
            print(render_table("floors", floors) + "\n")
            report["floors"] = {"sqlite": sq}
        if ctx.pg_floor_figures is not None:
            pg = ctx.pg_floor_figures
            floors = [
                Figure(
                    "floors",
                    "PostgreSQL + sync standby, 1-row INSERT commits",
                    pg["single_commits_per_s"],
                    "commits/s",
                ),
                Figure(
                    "floors",
                    "the same, BEGIN + FOR SHARE + INSERT + COMMIT",
                    pg["fenced_commits_per_s"],
                    "commits/s",
                ),
            ]
            print(render_table("floors", floors) + "\n")
            report.setdefault("floors", {})["postgres"] = pg
    finally:
        ctx.close()
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report["seconds"] = time.time() - started
    verdicts = [
        f["verdict"]
        for s in report["scenarios"].values()
        for f in s.get("figures", [])
        if f.get("verdict")
    ]
    print(
        f"targets: {verdicts.count('PASS')} PASS, {verdicts.count('MISS')} MISS; "
        f"{report['seconds']:.0f} s in all"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(finite(report), indent=2, default=str, allow_nan=False)
    args.out.write_text(text + "\n", encoding="utf-8")
    print(f"results: {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
