"""Where the daemon's time goes under load: py-spy samples turned into costs per request.

`Profiler` runs `py-spy record --format raw` (collapsed stacks) against the daemon for a
bounded number of seconds. Only the event loop's thread is ranked (stacks through
`asyncio.Runner.run` or `run_forever`: uvloop's loop runs in C, so under it a
callback's frames sit right below `Runner.run`; the store's writer thread and
aiosqlite's reader are counted apart: they mostly wait), by self and inclusive share of
samples (system calls included: no --gil). Each share becomes microseconds of daemon
CPU per request using the *unprofiled* run's CPU per request: py-spy pauses the daemon
at each sample, so the profiled run is slower and is never the measured one. py-spy is
optional: without it only the profile is skipped.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")
ROOT_SHARE = 0.9
#: A frame only the event loop's thread has: the daemon runs its loop in asyncio.Runner.
LOOP_FRAMES = ("Runner.run ", "BaseEventLoop.run_forever ")
IDLE_FRAME = "EpollSelector.select "
_TRIM = ("/site-packages/", "/lib/python3.11/", "/lib/python3.12/", "/lib/python3.13/")


def _short(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    path = match.group("file")
    for marker in _TRIM:
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        for root in ("/licd/", "/licd_client/", "/benchmarks/"):
            if root in path:
                path = root[1:] + path.split(root, 1)[1]
                break
    return f"{match.group('func')} ({path})"


def parse_collapsed(text: str) -> tuple[int, int, int, Counter[str], Counter[str]]:
    """(busy event-loop samples, other threads' samples, event-loop samples waiting in
    epoll, self counts, inclusive counts) by function, from collapsed stacks; the counts
    are of the busy event loop's samples."""
    total = others = idle = 0
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_short(f) for f in stack.split(";") if f]
        if not frames:
            continue
        if not any(f.startswith(LOOP_FRAMES) for f in frames):
            others += n
            continue
        if frames[-1].startswith(IDLE_FRAME):
            idle += n  # the loop waiting in epoll: not CPU spent on requests
            continue
        total += n
        own[frames[-1]] += n
        for name in set(frames):
            inclusive[name] += n
    return total, others, idle, own, inclusive


class Profiler:
    def __init__(self, pid: int, out: Path, seconds: float, rate: int = 100) -> None:
        self.pid = pid
        self.out = out
        self.seconds = max(1, math.ceil(seconds))
        self.rate = rate
        local = Path(sys.executable).parent / "py-spy"
        self.exe = str(local) if local.exists() else shutil.which("py-spy")
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = out.with_suffix(".log")

    @property
    def available(self) -> bool:
        return self.exe is not None

    def start(self) -> None:
        assert self.exe is not None
        with self._log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    self.exe,
                    "record",
                    "--pid",
                    str(self.pid),
                    "--duration",
                    str(self.seconds),
                    "--rate",
                    str(self.rate),
                    "--format",
                    "raw",
                    "--output",
                    str(self.out),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

    def finish(
        self, measured: dict[str, Any], profiled: dict[str, Any], top: int = 20
    ) -> dict[str, Any]:
        """Wait (bounded) for py-spy, then rank. `measured` and `profiled` are the
        summaries of the unprofiled and the profiled load runs."""
        if self.proc is None:
            return {"error": "py-spy was not started"}
        try:
            self.proc.wait(self.seconds + 60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        try:
            text = self.out.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            log = self._log.read_text(encoding="utf-8", errors="replace")[-500:]
            return {"error": f"py-spy wrote no profile: {log}"}
        total, others, idle, own, inclusive = parse_collapsed(text)
        rate = float(measured["rate"])
        per_req = float(measured["cpu_us_per_request"])
        # The daemon's CPU as the kernel counted it per thread: the event loop's (main
        # thread) part, the rest is the store's threads (samples there include fsync
        # waits, which are no CPU, so they are not used for this).
        cpu = float(measured["cpu_percent"])
        loop_part = float(measured.get("loop_cpu_percent", cpu)) / cpu if cpu else 1.0
        loop_part = min(1.0, max(0.0, loop_part))  # tick-rounding can overshoot

        def ranked(counts: Counter[str]) -> list[dict[str, Any]]:
            # Frames under nearly every sample (the interpreter, click, the event loop's
            # run_forever) say nothing; leave them out of the ranking.
            return [
                {
                    "function": name,
                    "share": n / total,
                    "us_per_request": n / total * per_req * loop_part,
                }
                for name, n in counts.most_common()
                if n < ROOT_SHARE * total
            ][:top]

        return {
            "samples": total,
            "other_thread_samples": others,
            "idle_samples": idle,
            "per_s": rate,
            "per_s_profiled": profiled["rate"],
            "daemon_cpu_percent": measured["cpu_percent"],
            "us_per_request": per_req,
            "us_other_threads": (1.0 - loop_part) * per_req,
            "self": ranked(own) if total else [],
            "inclusive": ranked(inclusive) if total else [],
            "raw": str(self.out),
        }


def render(profile: dict[str, Any], top: int = 15) -> str:
    if "error" in profile:
        return f"profile: {profile['error']}"
    lines = [
        f"== profile: licd under the {profile['what']} load (py-spy, {profile['samples']}"
        f" busy event-loop samples, {profile['idle_samples']} waiting in epoll,"
        f" {profile['other_thread_samples']} in other threads;"
        f" unprofiled: {profile['per_s']:,.0f}/s, {profile['us_per_request']:.1f} us of"
        " daemon CPU each) ==",
    ]
    lines.append(
        f"-- other threads (the store's writer and reader: big or slow COMMITs, reads): "
        f" {profile['us_other_threads']:.1f} us of CPU each (kernel's per-thread count) --"
    )
    for title, key in (("self time", "self"), ("inclusive time", "inclusive")):
        lines.append(f"-- event loop, {title}: share of its busy samples, us each --")
        for row in profile[key][:top]:
            lines.append(
                f"  {row['share'] * 100:5.1f} %  {row['us_per_request']:6.1f} us  {row['function']}"
            )
    lines.append(f"(collapsed stacks: {profile['raw']})")
    return "\n".join(lines)


class SyncCounter:
    """fsync + fdatasync calls of a process (or of several, together) over a window,
    counted by `perf stat` on the syscall tracepoints (cheap: no ptrace stops).
    Optional: without a working perf the count is None. One SQLite commit in WAL mode
    with synchronous=FULL is one sync; so is a PostgreSQL WAL flush."""

    EVENTS = ("syscalls:sys_enter_fsync", "syscalls:sys_enter_fdatasync")

    def __init__(self, pid: int | Sequence[int], seconds: float) -> None:
        self.pids = [pid] if isinstance(pid, int) else list(pid)
        self.seconds = seconds
        self.exe = shutil.which("perf")
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        if self.exe is None or not self.pids:
            return
        cmd = [self.exe, "stat", "-x", ",", "-p", ",".join(str(p) for p in self.pids)]
        for event in self.EVENTS:
            cmd += ["-e", event]
        cmd += ["--", "sleep", f"{self.seconds:.3f}"]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def finish(self) -> int | None:
        """The syncs counted, or None when perf is missing or refused."""
        if self.proc is None:
            return None
        try:
            _, err = self.proc.communicate(timeout=self.seconds + 30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            return None
        total = 0
        seen = False
        for line in err.splitlines():
            fields = line.split(",")
            if len(fields) > 2 and fields[2] in self.EVENTS and fields[0].isdigit():
                total += int(fields[0])
                seen = True
        return total if seen else None
