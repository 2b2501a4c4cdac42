"""Figures and their presentation: percentiles, targets, the terminal table, machine info.

A `Figure` is one measured number with its unit, optionally the floor it is compared
with and a target it is judged against (PASS / MISS; a MISS never fails the run). This
module measures nothing and starts nothing.
"""

from __future__ import annotations

import math
import operator
import os
import platform
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of already sorted values, nearest-rank; NaN if none."""
    if not sorted_values:
        return math.nan
    rank = math.ceil(q / 100.0 * len(sorted_values))
    return sorted_values[min(max(rank, 1), len(sorted_values)) - 1]


def latency_summary(values: Iterable[float]) -> dict[str, float]:
    """count, mean and p50 / p90 / p99 / p99.9 / max of latencies, in milliseconds."""
    ordered = sorted(values)
    n = len(ordered)
    ms = 1000.0
    return {
        "count": float(n),
        "mean_ms": (sum(ordered) / n * ms) if n else math.nan,
        "p50_ms": percentile(ordered, 50) * ms,
        "p90_ms": percentile(ordered, 90) * ms,
        "p99_ms": percentile(ordered, 99) * ms,
        "p99.9_ms": percentile(ordered, 99.9) * ms,
        "max_ms": (ordered[-1] * ms) if n else math.nan,
    }


_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}


@dataclass(frozen=True)
class Target:
    """`value op threshold` (op is ">=", "<" or "<="), on the figure's value or on its
    ratio to the floor."""

    op: str
    threshold: float
    on_ratio: bool = False

    def __post_init__(self) -> None:
        if self.op not in _OPS:
            raise ValueError(f"a target's op is one of {', '.join(_OPS)}, not {self.op!r}")

    def judge(self, value: float, ratio: float | None) -> bool | None:
        x = ratio if self.on_ratio else value
        if x is None or math.isnan(x):
            return None
        return _OPS[self.op](x, self.threshold)

    def text(self, unit: str) -> str:
        if self.on_ratio:
            return f"ratio {self.op} {self.threshold:g}"
        return f"{self.op} {_num(self.threshold)} {unit}".rstrip()


@dataclass
class Figure:
    scenario: str
    name: str
    value: float
    unit: str = ""
    floor: float | None = None
    floor_name: str = ""
    target: Target | None = None
    lower_is_better: bool = False
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.floor is None or self.floor == 0 or math.isnan(self.floor):
            return None
        return self.value / self.floor

    @property
    def verdict(self) -> str:
        if self.target is None:
            return ""
        ok = self.target.judge(self.value, self.ratio)
        return "n/a" if ok is None else ("PASS" if ok else "MISS")

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["target"] = None if self.target is None else self.target.text(self.unit)
        out["ratio"] = self.ratio
        out["verdict"] = self.verdict or None
        for key in ("value", "floor", "ratio"):
            if isinstance(out[key], float) and not math.isfinite(out[key]):
                out[key] = None  # JSON has no NaN
        return out


def _num(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "-"
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def render_table(title: str, figures: Sequence[Figure]) -> str:
    header = ("figure", "value", "floor", "ratio", "target", "")
    rows = [header]
    for f in figures:
        value = f"{_num(f.value)} {f.unit}".rstrip()
        floor = "" if f.floor is None else f"{_num(f.floor)} {f.unit}".rstrip()
        if f.floor_name:
            floor = f"{floor} ({f.floor_name})"
        ratio = "" if f.ratio is None else f"{f.ratio:.2f}x"
        target = "" if f.target is None else f.target.text(f.unit)
        rows.append((f.name, value, floor, ratio, target, f.verdict))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [f"== {title} =="]
    for i, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])]
        cells += [
            c.rjust(w) if j in (1, 3) else c.ljust(w)
            for j, (c, w) in enumerate(zip(row[1:], widths[1:], strict=True), start=1)
        ]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    notes = [f"  note: {f.name}: {f.note}" for f in figures if f.note]
    return "\n".join(lines + notes)


def machine_info() -> dict[str, Any]:
    model = "?"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 0
    import msgpack

    return {
        "nproc": usable,
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "msgpack": getattr(msgpack, "version", ("?",)),
    }


def render_machine(info: dict[str, Any]) -> str:
    msgpack_version = ".".join(str(x) for x in info["msgpack"])
    return (
        f"machine: {info['nproc']} usable cores ({info['cpu_model']}), "
        f"{info['implementation']} {info['python']}, Linux {info['kernel']}, "
        f"msgpack {msgpack_version}"
        + (f", event loop {info['event_loop']}" if "event_loop" in info else "")
    )
