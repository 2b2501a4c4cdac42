"""The scenarios: each starts what it measures, drives it, stops it, returns figures.

heartbeat, churn and site run a real licd and, with the same load generator, each floor
server of `floor.FLOORS` (bare Protocol, bare streams, signing, batched signing): their
rates and CPU per request are set beside each floor's; scale runs licd and the bare
streams server; restart times a daemon coming up on a state directory full of leases.
A scenario returns its figures (each beside its floor and target) and a details map for
the JSON file. It never decides PASS / MISS itself (stats.Target does) and never fails
the run on a MISS. With `--backend postgres` the daemons store in a PostgreSQL primary
with a synchronous standby (benchmarks/pgstore.py): churn and site then take the
cluster's targets, churn its floor, and both add the servers' CPU and WAL flushes.
"""

from __future__ import annotations

import math
import re
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from licd_client.wire import REPLY_LIMITS, FrameDecoder, encode

from .daemon import (
    ROOT,
    LicdProcess,
    add_leases,
    child_env,
    licence,
    rss_bytes,
    write_config,
)
from .flood import flood
from .floor import FloorServer
from .harness import (
    MIB,
    Context,
    Measure,
    Options,
    Run,
    against_floors,
    cpu_us,
    drive,
    drive_floors,
    errors,
    lat,
    noise,
    per_req,
    profile,
    rate,
)
from .renewals import renewals
from .stats import Figure, Target

__all__ = ["POSTGRES_SCENARIOS", "SCENARIOS", "Context", "Options"]


# ------------------------------------------------------------------------- heartbeat


def heartbeat(ctx: Context) -> tuple[list[Figure], dict[str, Any]]:
    o = ctx.opts
    d = ctx.directory("heartbeat")
    config = write_config(
        d, licence(seats=o.connections + 100, lease_ttl=90), store=ctx.store_table("heartbeat")
    )
    details: dict[str, Any] = {}
    with LicdProcess(config, d) as licd:
        licd.start()
        run = drive(licd.port, licd.pid, "heartbeat", o.connections, o)
        if o.profile:
            details["profile"] = profile(licd, o, d, run, "heartbeat", o.connections)
    ctx.reply_size = run.results.reply_bytes or ctx.reply_size
    lic = run.summary("heartbeat")
    floors = drive_floors(ctx.reply_size, "heartbeat", o.connections, o, "heartbeat")
    streams = floors["streams"]
    details.update({"licd": lic, "floors": floors, "reply_bytes": ctx.reply_size})
    s = "heartbeat"
    figs = against_floors(
        s,
        lic,
        floors,
        Measure(
            f"renewals/s, {o.connections} conns",
            "req/s",
            rate,
            {
                "protocol": [Target(">=", 15000)],
                "streams": [Target(">=", 0.5, on_ratio=True)],
                "signing": [Target(">=", 1.0, on_ratio=True)],
            },
        ),
        Measure("CPU per renewal", "us", per_req, lower_is_better=True),
    )
    for q in ("p50_ms", "p99_ms", "p99.9_ms"):
        figs.append(
            Figure(
                s,
                f"latency {q[:-3]}",
                lat(lic, q),
                "ms",
                lat(streams, q),
                "bare streams",
                lower_is_better=True,
            )
        )
    figs += [
        Figure(s, "daemon CPU", lic["cpu_percent"], "%", streams["cpu_percent"], "bare streams"),
        Figure(
            s,
            "generator CPU (all workers)",
            lic["gen_cpu_percent"],
            "%",
            streams["gen_cpu_percent"],
            "bare streams",
        ),
        noise(s, lic, streams),
        batching(s, floors),
    ]
    return figs + errors(s, run, "licd"), details


def batching(s: str, floors: dict[str, dict[str, Any]]) -> Figure:
    """How many replies the batched-signing floor signed with each signature (over its
    whole run, setup included; 1 when every reply was alone in its loop iteration)."""
    return Figure(
        s, "batched floor: replies per signature", floors["batched"]["replies_per_signature"]
    )


# ----------------------------------------------------------------------------- churn


def churn(ctx: Context) -> tuple[list[Figure], dict[str, Any]]:
    o = ctx.opts
    pg = ctx.pg_floor() if ctx.postgres else None
    sq = None if pg is not None else ctx.sqlite_floor()
    d = ctx.directory("churn")
    config = write_config(
        d, licence(seats=o.churn_connections + 100, lease_ttl=90), store=ctx.store_table("churn")
    )
    details: dict[str, Any] = {}
    with LicdProcess(config, d) as licd:
        licd.start()
        run = drive(
            licd.port,
            licd.pid,
            "churn",
            o.churn_connections,
            o,
            count_syncs=sq is not None,
            during=ctx.db_window(),
        )
        if o.profile:
            details["profile"] = profile(licd, o, d, run, "churn", o.churn_connections)
    cyc = run.summary("cycle")
    out = run.summary("checkout")
    back = run.summary("checkin")
    floors = drive_floors(ctx.reply_size, "churn", o.churn_connections, o, "cycle")
    s = "churn"
    name = f"cycles/s, {o.churn_connections} conns"
    if pg is not None:
        floor = (pg["fenced_commits_per_s"], "PG fenced 1-row commits/s", Target(">=", 3000))
        commit = (pg["fenced_commit_ms"], "one fenced PG commit")
    else:
        assert sq is not None
        floor = (sq["commits_per_s"], "SQLite 1-row commits/s", Target(">=", 5000))
        commit = (sq["fsync_ms"], "one SQLite FULL commit")
    figs = [Figure(s, name, cyc["rate"], "cyc/s", *floor)]
    figs += against_floors(
        s,
        cyc,
        floors,
        Measure(name, "cyc/s", rate),
        Measure(
            "CPU per cycle", "us", per_req, {"protocol": [Target("<=", 120)]}, lower_is_better=True
        ),
    )
    figs.append(Figure(s, "checkout p50", lat(out, "p50_ms"), "ms", *commit, lower_is_better=True))
    for label, summ, qs in (
        ("checkout", out, ("p99_ms", "p99.9_ms")),
        ("checkin", back, ("p50_ms", "p99_ms", "p99.9_ms")),
        ("cycle", cyc, ("p50_ms", "p99_ms", "p99.9_ms")),
    ):
        for q in qs:
            figs.append(Figure(s, f"{label} {q[:-3]}", lat(summ, q), "ms", lower_is_better=True))
    figs.append(Figure(s, "daemon CPU", run.cpu_percent, "%"))
    figs += database_figures(s, run, cyc["rate"], "cycle")
    figs.append(noise(s, cyc, floors["streams"]))
    figs += commit_figures(s, run, 2 * cyc["rate"], sq)
    figs.append(batching(s, floors))
    details.update({"cycle": cyc, "checkout": out, "checkin": back, "floors": floors})
    details.update({"pg_floor": pg} if pg is not None else {"sqlite_floor": sq})
    return figs + errors(s, run, "licd"), details


def database_figures(s: str, run: Run, per_second: float, what: str) -> list[Figure]:
    """With `--backend postgres`: the servers' CPU (primary and standby, all their
    processes) over the window, and per `what` at `per_second` of them."""
    db = run.extra.get("db")
    if db is None:
        return []
    cpu = db["primary_cpu_percent"] + db["standby_cpu_percent"]
    return [
        Figure(s, "PostgreSQL CPU, primary", db["primary_cpu_percent"], "%"),
        Figure(s, "PostgreSQL CPU, standby", db["standby_cpu_percent"], "%"),
        Figure(
            s,
            f"PostgreSQL CPU per {what} (both)",
            cpu_us(cpu, per_second),
            "us",
            lower_is_better=True,
        ),
        Figure(
            s,
            f"daemon + PostgreSQL CPU per {what}",
            cpu_us(run.cpu_percent + cpu, per_second),
            "us",
            lower_is_better=True,
        ),
    ]


def commit_figures(
    s: str, run: Run, durable_per_s: float, sq: dict[str, float] | None
) -> list[Figure]:
    """Commits (fsync + fdatasync calls, counted by perf: the daemon's on SQLite, the
    primary's WAL flushes on PostgreSQL) per second and durable requests (checkouts +
    checkins) per commit: how well group commit batches. On SQLite, the daemon CPU those
    commits cost at the floor's CPU per commit: what no Python could save."""
    db = run.extra.get("db")
    if db is not None:
        flushes = db["primary_syncs_per_s"]
        if flushes is None:
            return []
        standby = db["standby_syncs_per_s"]
        return [
            Figure(s, "commits (primary WAL flushes) / s", flushes, "/s", lower_is_better=True),
            Figure(s, "standby WAL flushes / s", math.nan if standby is None else standby, "/s"),
            Figure(
                s, "durable requests per commit", durable_per_s / flushes if flushes else math.nan
            ),
        ]
    if run.syncs is None:
        return []
    syncs = run.syncs / run.results.window
    return [
        Figure(
            s,
            "commits (fsyncs) / s",
            syncs,
            "/s",
            None if sq is None else sq["commits_per_s"],
            "" if sq is None else "SQLite 1-row commits/s",
            lower_is_better=True,
        ),
        Figure(s, "durable requests per commit", durable_per_s / syncs if syncs else math.nan),
        Figure(
            s,
            "daemon CPU in the commits alone",
            math.nan if sq is None else syncs * sq["cpu_us_per_commit"] / 1e4,
            "%",
            lower_is_better=True,
        ),
    ]


# ------------------------------------------------------------------------------ site


def site(ctx: Context) -> tuple[list[Figure], dict[str, Any]]:
    o = ctx.opts
    scale = o.site_scale
    interval = 30.0 / scale  # ttl 90 s, renewing every 30 s, sped up
    churn_rate = 20.0 * scale  # checkout + checkin cycles per second, sped up
    churn_conns = o.site_churn_connections
    offered = o.site_clients / interval + 2 * churn_rate
    kw: dict[str, Any] = {
        "churn_connections": churn_conns,
        "interval": interval,
        "churn_interval": churn_conns / churn_rate,  # seconds between one conn's cycles
        "duration": o.site_duration,
        "warmup": max(o.warmup, min(interval, 3.0)),
    }
    d = ctx.directory("site")
    seats = o.site_clients + churn_conns + 100
    config = write_config(d, licence(seats=seats, lease_ttl=90), store=ctx.store_table("site"))
    with LicdProcess(config, d) as licd:
        licd.start()
        run = drive(
            licd.port,
            licd.pid,
            "site",
            o.site_clients,
            o,
            count_syncs=not ctx.postgres,
            during=ctx.db_window(),
            **kw,
        )
    floors = drive_floors(ctx.reply_size, "site", o.site_clients, o, None, **kw)
    flo = floors["streams"]
    lic = run.summary()
    hb, co = run.summary("heartbeat"), run.summary("checkout")
    s = "site"
    what = f"{o.site_clients} clients x{scale:g}"
    figs = [Figure(s, f"requests/s ({what})", lic["rate"], "req/s", offered, "offered")]
    figs += against_floors(
        s,
        lic,
        floors,
        Measure(
            "p99, all requests",
            "ms",
            lambda summary: lat(summary, "p99_ms"),
            {"protocol": [Target("<", 10.0 if ctx.postgres else 5.0)]},
            lower_is_better=True,
        ),
        Measure(
            f"daemon CPU at x{scale:g}",
            "%",
            lambda summary: float(summary["cpu_percent"]),
            {"protocol": [Target("<", 25.0), Target("<=", 2.0, on_ratio=True)]},
            lower_is_better=True,
        ),
        Measure("CPU per request", "us", per_req, lower_is_better=True),
    )
    figs += [
        Figure(
            s,
            "p50, all requests",
            lat(lic, "p50_ms"),
            "ms",
            lat(flo, "p50_ms"),
            "bare streams",
            lower_is_better=True,
        ),
        Figure(
            s,
            "p99.9, all requests",
            lat(lic, "p99.9_ms"),
            "ms",
            lat(flo, "p99.9_ms"),
            "bare streams",
            lower_is_better=True,
        ),
        Figure(s, "heartbeat p99", lat(hb, "p99_ms"), "ms", lower_is_better=True),
        Figure(s, "checkout p99", lat(co, "p99_ms"), "ms", lower_is_better=True),
        Figure(
            s,
            "daemon CPU, real-time site (/scale)",
            lic["cpu_percent"] / scale,
            "%",
            lower_is_better=True,
        ),
    ]
    figs += database_figures(s, run, lic["rate"], "request")
    figs.append(noise(s, lic, flo))
    figs += commit_figures(s, run, 2 * co["rate"], None if ctx.postgres else ctx.sqlite_floor())
    details = {
        "licd": lic,
        "heartbeat": hb,
        "checkout": co,
        "checkin": run.summary("checkin"),
        "floors": floors,
        "offered_req_per_s": offered,
        "scale": scale,
    }
    return figs + errors(s, run, "licd"), details


# ----------------------------------------------------------------------------- scale


def _hold(port: int, pid: int, o: Options) -> tuple[Run, int, int]:
    """Baseline RSS, then o.scale_connections connections each holding a lease, idle (or
    renewing every o.scale_interval s)."""
    time.sleep(1.0)
    baseline = rss_bytes(pid)
    run = drive(
        port,
        pid,
        "hold",
        o.scale_connections,
        o,
        interval=o.scale_interval,
        warmup=max(2.0, o.scale_interval),
        duration=o.idle_seconds,
    )
    return run, baseline, run.rss


def scale(ctx: Context) -> tuple[list[Figure], dict[str, Any]]:
    o = ctx.opts
    n = o.scale_connections
    d = ctx.directory("scale")
    config = write_config(d, licence(seats=n + 100, lease_ttl="1h"), store=ctx.store_table("scale"))
    with LicdProcess(config, d) as licd:
        licd.start()
        run, base, rss = _hold(licd.port, licd.pid, o)
    with FloorServer("streams", ctx.reply_size) as floor:
        frun, fbase, frss = _hold(floor.port, floor.pid, o)
    held = run.setup["connections"]
    fheld = frun.setup["connections"]
    s = "scale"
    figs = [
        Figure(
            s,
            f"daemon RSS, {held} conns + leases",
            rss / MIB,
            "MiB",
            frss / MIB,
            "bare streams",
            Target("<", 300.0),
            lower_is_better=True,
        ),
        Figure(
            s,
            "RSS per connection + lease",
            (rss - base) / max(held, 1) / 1024,
            "KiB",
            (frss - fbase) / max(fheld, 1) / 1024,
            "bare streams",
            lower_is_better=True,
        ),
        Figure(
            s,
            "daemon RSS before connections",
            base / MIB,
            "MiB",
            fbase / MIB,
            "bare streams",
            lower_is_better=True,
        ),
        Figure(
            s,
            f"idle CPU, {o.idle_seconds:g} s"
            if not o.scale_interval
            else f"CPU, renewing every {o.scale_interval:g} s",
            run.cpu_percent,
            "%",
            frun.cpu_percent,
            "bare streams",
            lower_is_better=True,
        ),
        Figure(
            s,
            "setup time (connect+hello+checkout)",
            run.setup["setup_seconds"],
            "s",
            frun.setup["setup_seconds"],
            "bare streams",
            lower_is_better=True,
        ),
    ]
    details = {
        "licd": run.summary(),
        "floor": frun.summary(),
        "baseline_rss": base,
        "floor_baseline_rss": fbase,
        "connections": held,
    }
    return figs + errors(s, run, "licd"), details


# --------------------------------------------------------------------------- restart


def _call(sock: socket.socket, decoder: FrameDecoder, message: dict[str, Any]) -> Any:
    sock.sendall(encode(message))
    while (frame := decoder.next_frame()) is None:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("licd closed the connection")
        decoder.feed(data)
    return frame


def first_heartbeat(port: int, lease: str) -> dict[str, Any]:
    with socket.create_connection(("127.0.0.1", port), timeout=10.0) as sock:
        decoder = FrameDecoder(65536, REPLY_LIMITS)
        _call(sock, decoder, {"op": "hello", "id": 1, "protocol": 1, "client": "bench"})
        reply: dict[str, Any] = _call(
            sock, decoder, {"op": "heartbeat", "id": 2, "lease": lease, "nonce": bytes(16)}
        )
        return reply


def _restart_floor(state_db: Path) -> dict[str, float]:
    """Interpreter start + `import licd.cli.main` (a child process), plus reading every lease
    row with raw sqlite3: what any daemon in Python must pay before READY."""
    t0 = time.monotonic()
    subprocess.run(
        [sys.executable, "-c", "import licd.cli.main"],
        env=child_env(),
        cwd=ROOT,
        check=True,
        timeout=60,
    )
    t_import = time.monotonic() - t0
    db = sqlite3.connect(f"{state_db.resolve().as_uri()}?mode=ro", uri=True)
    try:
        t0 = time.monotonic()
        rows = db.execute("SELECT * FROM lease").fetchall()
        t_select = time.monotonic() - t0
    finally:
        db.close()
    return {"import_s": t_import, "select_s": t_select, "rows": float(len(rows))}


def restart(ctx: Context) -> tuple[list[Figure], dict[str, Any]]:
    if ctx.postgres:
        raise RuntimeError("restart writes its leases into SQLite's file: --backend sqlite only")
    o = ctx.opts
    n = o.restart_leases
    d = ctx.directory("restart")
    config = write_config(d, licence(seats=n + 1000, lease_ttl="1h"), log_level="info")
    with LicdProcess(config, d, "first") as licd:
        empty_ready = licd.start()
        licd.stop()
    t0 = time.monotonic()
    secrets = add_leases(d / "state", n, 3600.0)
    build_s = time.monotonic() - t0
    floor = _restart_floor(d / "state" / "licd.db")
    floor_s = floor["import_s"] + floor["select_s"]
    with LicdProcess(config, d, "second") as licd:
        ready_s = licd.start()
        reply = first_heartbeat(licd.port, secrets[0])
        hb_s = time.monotonic() - licd.started_at
        log_s = licd.log_ready_at - licd.started_at if licd.log_ready_at else math.nan
        rss = rss_bytes(licd.pid)
        restored = re.search(r"event=restored leases=(\d+)", licd.stderr())
    ok = reply.get("ok") is True
    s = "restart"
    figs = [
        Figure(
            s,
            f"start -> READY, {n:,} leases",
            ready_s,
            "s",
            floor_s,
            "python+import+SELECT",
            Target("<", 2.0),
            lower_is_better=True,
        ),
        Figure(
            s,
            "start -> `event=ready` seen in the log",
            log_s,
            "s",
            floor_s,
            "python+import+SELECT",
            lower_is_better=True,
            note="polled every 5 ms",
        ),
        Figure(
            s,
            "start -> first answered heartbeat",
            hb_s,
            "s",
            floor_s,
            "python+import+SELECT",
            lower_is_better=True,
            note="" if ok else f"heartbeat refused: {reply.get('error')}",
        ),
        Figure(
            s,
            "start -> READY, empty state",
            empty_ready,
            "s",
            floor["import_s"],
            "python+import",
            lower_is_better=True,
        ),
        Figure(
            s,
            "leases restored",
            float(restored.group(1)) if restored else math.nan,
            "",
            float(n),
            "inserted",
        ),
        Figure(s, "daemon RSS after restore", rss / MIB, "MiB", lower_is_better=True),
    ]
    details = {
        "ready_s": ready_s,
        "log_ready_s": log_s,
        "first_heartbeat_s": hb_s,
        "heartbeat_ok": ok,
        "empty_ready_s": empty_ready,
        "floor": floor,
        "build_s": build_s,
        "rss": rss,
    }
    return figs, details


#: The scenarios `--backend postgres` runs (restart and flood write or read SQLite's
#: file themselves); "all" means these with that backend.
POSTGRES_SCENARIOS = ("heartbeat", "churn", "site", "scale", "renewals")

SCENARIOS = {
    "heartbeat": heartbeat,
    "churn": churn,
    "site": site,
    "scale": scale,
    "restart": restart,
    "flood": flood,
    "renewals": renewals,
}
