"""The harness the scenarios share: options, the run context, and one measured load run.

`drive()` spawns the load generator against a server (licd or a floor), waits for its
connections, opens the measurement window and samples the server's CPU, the generator's
CPU, the machine's CPU and the server's RSS over it, then merges the workers' results;
a run's summary has the server's CPU per request beside its rate. `drive_floors()`
drives every floor server of `floor.FLOORS` with a scenario's load, and
`against_floors()` sets a licd summary's figures beside each of theirs. `Context` holds
what one run measures once (the SQLite floor) and, with `--backend postgres`, the
PostgreSQL primary and synchronous standby the daemons store in (benchmarks/pgstore.py)
and its floor. Nothing here knows which scenario it serves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .daemon import LICENCE_KEY, CpuMeter, LicdProcess, SystemMeter, rss_bytes, sleep_until
from .floor import FLOORS, FloorServer, sqlite_floor
from .loadgen import LoadGen, Plan, Results, split
from .pgstore import PgCluster
from .profile import Profiler, SyncCounter
from .stats import Figure, Target, latency_summary

MIB = 1024 * 1024


@dataclass
class Options:
    workdir: Path
    workers: int = 2
    warmup: float = 1.0
    duration: float = 10.0
    connections: int = 100
    churn_connections: int = 100
    site_clients: int = 2000
    site_scale: float = 10.0
    site_duration: float = 20.0
    site_churn_connections: int = 20
    scale_connections: int = 10000
    idle_seconds: float = 5.0
    scale_interval: float = 0.0  # heartbeats while "idle" (0: none)
    restart_leases: int = 100_000
    sqlite_seconds: float = 3.0
    profile: bool = False
    profile_seconds: float = 8.0
    results_dir: Path | None = None  # where the profile's collapsed stacks are kept
    backend: str = "sqlite"  # the daemons' store: "sqlite" or "postgres" (+ sync standby)


@dataclass
class Context:
    """What scenarios share within one run: options, the SQLite floor measured once,
    the size of licd's heartbeat reply (once heartbeat measured it; the floors answer
    with replies that size)."""

    opts: Options
    sqlite: dict[str, float] | None = None
    reply_size: int = 400
    pg: PgCluster | None = None  # --backend postgres: the servers, once started
    pg_floor_figures: dict[str, float] | None = None
    _n: int = 0

    @property
    def postgres(self) -> bool:
        return self.opts.backend == "postgres"

    def start_store(self) -> str:
        """Start what the daemons store in (with `--backend postgres`, the primary and
        its synchronous standby); a line saying what that is."""
        if not self.postgres:
            return "store: SQLite in each daemon's state directory (WAL, synchronous=FULL)"
        if self.pg is None:
            self.pg = PgCluster()
            self.pg.start()
        return self.pg.describe()

    def store_table(self, name: str) -> dict[str, Any] | None:
        """The [store] table of a daemon's config: None (SQLite, the default), or a
        fresh database on the PostgreSQL primary."""
        if not self.postgres:
            return None
        self.start_store()
        assert self.pg is not None
        return self.pg.store_table(name)

    def db_window(self) -> Callable[[float], dict[str, Any]] | None:
        """For `drive(during=...)`: the PostgreSQL servers' CPU and fsyncs over the
        window (None on SQLite: the daemon's own fsyncs are counted instead)."""
        return None if self.pg is None else self.pg.window()

    def pg_floor(self) -> dict[str, float]:
        if self.pg_floor_figures is None:
            self.start_store()
            assert self.pg is not None
            self.pg_floor_figures = self.pg.floor(self.opts.sqlite_seconds)
        return self.pg_floor_figures

    def close(self) -> None:
        if self.pg is not None:
            self.pg.cleanup()
            self.pg = None

    def directory(self, name: str) -> Path:
        self._n += 1
        path = self.opts.workdir / f"{self._n:02d}-{name}"
        path.mkdir(parents=True)
        return path

    def sqlite_floor(self) -> dict[str, float]:
        if self.sqlite is None:
            self.sqlite = sqlite_floor(self.directory("sqlite"), self.opts.sqlite_seconds)
        return self.sqlite


@dataclass
class Run:
    results: Results
    setup: dict[str, Any]
    cpu_percent: float
    gen_cpu_percent: float
    rss: int
    machine: dict[str, float] = field(default_factory=dict)
    syncs: int | None = None  # fsync/fdatasync calls in the window (perf), if counted
    loop_cpu_percent: float = 0.0  # the main thread's share (the event loop's)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def others_percent(self) -> float:
        """Machine CPU neither the measured process nor the generator (nor, with
        `--backend postgres`, the database servers) used: other programs, plus softirq
        time of loopback traffic; a noise indicator."""
        busy = self.machine.get("busy", 0.0)
        db = self.extra.get("db") or {}
        servers = float(db.get("primary_cpu_percent", 0.0) + db.get("standby_cpu_percent", 0.0))
        return max(0.0, busy - self.cpu_percent - self.gen_cpu_percent - servers)

    def summary(self, kind: str | None = None) -> dict[str, Any]:
        r = self.results
        values = r.latencies.get(kind, []) if kind else r.requests()
        rate = len(values) / r.window if r.window else 0.0
        return {
            "rate": rate,
            "latency": latency_summary(values),
            "cpu_percent": self.cpu_percent,
            "cpu_us_per_request": cpu_us(self.cpu_percent, rate),
            "loop_cpu_percent": self.loop_cpu_percent,
            "gen_cpu_percent": self.gen_cpu_percent,
            "errors": dict(r.errors),
            "setup": self.setup,
            "rss": self.rss,
            "machine": self.machine,
            "syncs_per_s": None if self.syncs is None else self.syncs / r.window,
            "others_percent": self.others_percent,
            **self.extra,
        }


def drive(
    port: int,
    pid: int,
    mode: str,
    connections: int,
    o: Options,
    *,
    churn_connections: int = 0,
    interval: float = 0.0,
    churn_interval: float = 0.0,
    warmup: float | None = None,
    duration: float | None = None,
    during: Any = None,
    count_syncs: bool = False,
) -> Run:
    """Run the load generator against 127.0.0.1:`port` (process `pid`) and measure."""
    workers = max(1, min(o.workers, connections + churn_connections))
    shares = split(connections, workers)
    churn = split(churn_connections, workers)
    plans = [
        Plan(
            mode=mode,
            host="127.0.0.1",
            port=port,
            key=LICENCE_KEY,
            worker=i,
            connections=shares[i],
            churn_connections=churn[i],
            interval=interval,
            churn_interval=churn_interval,
        )
        for i in range(workers)
    ]
    warmup = o.warmup if warmup is None else warmup
    duration = o.duration if duration is None else duration
    with LoadGen(plans) as gen:
        setup = gen.setup(timeout=180.0)
        start, end = gen.go(warmup, duration)
        meter = CpuMeter(pid)
        loop_meter = CpuMeter(pid, thread=pid)  # the main thread runs the event loop
        gen_meters = [CpuMeter(p) for p in gen.pids]
        system = SystemMeter()
        syncs = SyncCounter(pid, duration) if count_syncs else None
        sleep_until(start)
        if syncs is not None:
            syncs.start()
        meter.start()
        loop_meter.start()
        system.start()
        for m in gen_meters:
            m.start()
        extra = during(end) if during is not None else {}
        sleep_until(end)
        cpu = meter.stop()
        loop_cpu = loop_meter.stop()
        gen_cpu = sum(m.stop() for m in gen_meters)
        machine = system.stop()
        rss = rss_bytes(pid)
        results = gen.collect(timeout=30.0)
    synced = None if syncs is None else syncs.finish()
    return Run(results, setup, cpu, gen_cpu, rss, machine, synced, loop_cpu, extra or {})


def drive_floors(
    reply_size: int, mode: str, connections: int, o: Options, kind: str | None, **kw: Any
) -> dict[str, dict[str, Any]]:
    """Every floor server of `FLOORS`, one after the other, under the load
    `drive(..., mode, connections, o, **kw)` puts on licd: each one's summary of `kind`
    (None: all requests), with its signing figures (`FloorServer.stats`) and its event
    loop, by floor."""
    out: dict[str, dict[str, Any]] = {}
    for floor_mode in FLOORS:
        with FloorServer(floor_mode, reply_size) as floor:
            run = drive(floor.port, floor.pid, mode, connections, o, **kw)
        out[floor_mode] = {**run.summary(kind), **floor.stats, "event_loop": floor.loop}
    return out


@dataclass(frozen=True)
class Measure:
    """A figure of a summary to set beside each floor's: its name and unit, how to read
    it from a summary, and its targets, by floor (an absolute target goes with the first
    floor, the bare Protocol's)."""

    name: str
    unit: str
    read: Callable[[dict[str, Any]], float]
    targets: Mapping[str, Sequence[Target]] = field(default_factory=dict)
    lower_is_better: bool = False


def against_floors(
    scenario: str, lic: dict[str, Any], floors: dict[str, dict[str, Any]], *measures: Measure
) -> list[Figure]:
    """For each floor of `FLOORS`, each measure of licd's summary beside the floor's
    (one figure per target, or one without)."""
    figures = []
    for mode, label in FLOORS.items():
        for m in measures:
            for target in m.targets.get(mode) or (None,):
                figures.append(
                    Figure(
                        scenario,
                        m.name,
                        m.read(lic),
                        m.unit,
                        m.read(floors[mode]),
                        label,
                        target,
                        m.lower_is_better,
                    )
                )
    return figures


def rate(s: dict[str, Any]) -> float:
    return float(s["rate"])


def per_req(s: dict[str, Any]) -> float:
    """The server's CPU per request (or per cycle, in a summary of cycles), in us."""
    return float(s["cpu_us_per_request"])


def cpu_us(cpu_percent: float, rate: float) -> float:
    """CPU us per request, from CPU in % of one core and requests/s."""
    return cpu_percent / 100.0 / rate * 1e6 if rate else math.nan


def lat(s: dict[str, Any], key: str) -> float:
    return float(s["latency"][key])


def errors(scenario: str, run: Run, what: str) -> list[Figure]:
    errors = dict(run.results.errors)
    for code, n in run.setup.get("errors", {}).items():
        errors[f"setup:{code}"] = errors.get(f"setup:{code}", 0) + n
    if not errors:
        return []
    text = ", ".join(f"{k}={v}" for k, v in sorted(errors.items()))
    return [Figure(scenario, f"errors ({what})", float(sum(errors.values())), note=text)]


def noise(scenario: str, s: dict[str, Any], floor: dict[str, Any] | None = None) -> Figure:
    """Machine CPU used by neither side: softirq of loopback traffic, and whatever else
    runs on the machine (a high figure means a noisy run)."""
    return Figure(
        scenario,
        "machine CPU, not daemon/generator" + ("/PostgreSQL" if "db" in s else ""),
        s["others_percent"],
        "%",
        None if floor is None else floor["others_percent"],
        "" if floor is None else "bare streams",
        lower_is_better=True,
    )


def profile(
    licd: LicdProcess, o: Options, d: Path, measured: Run, mode: str, connections: int
) -> dict[str, Any]:
    """A second run of the same load with py-spy sampling the daemon, so the measured
    run is not perturbed by the sampler. Costs per request come from the measured run."""
    kind = "heartbeat" if mode == "heartbeat" else "cycle"
    profiler = Profiler(licd.pid, (o.results_dir or d) / f"{mode}-profile.txt", o.profile_seconds)
    if not profiler.available:
        return {"error": "py-spy not found (pip install py-spy)"}

    def start_sampling(end: float) -> dict[str, Any]:
        profiler.start()
        return {}

    run = drive(
        licd.port, licd.pid, mode, connections, o, duration=o.profile_seconds, during=start_sampling
    )
    out = profiler.finish(measured.summary(kind), run.summary(kind))
    out["what"] = f"{mode} ({'renewal' if mode == 'heartbeat' else 'checkout+checkin cycle'})"
    return out
