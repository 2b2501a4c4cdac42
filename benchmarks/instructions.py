"""`python -m benchmarks.instructions`: the CPU instructions a churn cycle or a renewal
costs the daemon, counted, not timed, for comparing two versions of the code.

Timing moves with everything else the machine does: two in-process runs of the same
code differ by up to 15 % here, which hides any change worth a few percent. This runs
`benchmarks.inprocess` under valgrind's callgrind, which counts the instructions the
process executes (whatever else runs, however fast the disk), twice: with `--small`
and with `--large` operations. The difference over the difference in operations is the
cost of one operation, with start-up, imports and warm-up cancelled out. Repeated runs
agree within about 0.3 % (hash seeds are fixed; secrets, nonces and fsync waits still
vary). Instructions are not time (a cache miss or a syscall's wait costs more than its
count), so this is for A/B, and the timed figures stay the ones to report.

`--tree DIR` (repeatable) measures another checkout of the project (a `git worktree`
of the base, say): each tree's code is imported from that tree, and the last line
gives each tree's cost as a ratio to the first one's. Needs valgrind (Debian: `apt
install valgrind`); a run of the defaults takes about a minute a tree on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent  # this checkout
COLLECTED = re.compile(r"Collected\s*:\s*(\d+)")


def count(tree: Path, what: str, ops: int, protocol: int) -> int:
    """Instructions the whole `benchmarks.inprocess` run with `ops` operations took."""
    command = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        "-m",
        "benchmarks.inprocess",
        what,
        "--count",
        str(ops),
        "--protocol",
        str(protocol),
    ]
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"}
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    found = COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
        raise SystemExit(f"{tree}: the run under valgrind failed:\n" + "\n".join(tail))
    return int(found.group(1))


def per_op(tree: Path, what: str, small: int, large: int, protocol: int) -> float:
    """Instructions one operation costs in `tree`: both runs at once (two cores)."""
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda n: count(tree, what, n, protocol), (small, large))
    return (b - a) / (large - small)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.instructions",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("what", choices=("churn", "heartbeat"))
    parser.add_argument("--protocol", type=int, choices=(1, 2), default=2)
    parser.add_argument("--small", type=int, default=2_000, help="operations in the first run")
    parser.add_argument("--large", type=int, default=6_000, help="operations in the second")
    parser.add_argument(
        "--tree",
        action="append",
        type=Path,
        default=[],
        help="a checkout to measure (repeatable; default: this one)",
    )
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("needs valgrind (Debian: apt install valgrind)")
    if not 0 < args.small < args.large:
        raise SystemExit("--small must be positive and below --large")
    unit = "cycle" if args.what == "churn" else "renewal"
    trees = [tree.resolve() for tree in args.tree] or [HERE]
    costs = []
    for tree in trees:
        cost = per_op(tree, args.what, args.small, args.large, args.protocol)
        costs.append(cost)
        print(f"{tree}: {cost:,.0f} instructions per {unit} (protocol {args.protocol})")
    if len(costs) > 1:
        print("ratio to the first: " + ", ".join(f"{c / costs[0]:.3f}" for c in costs))


if __name__ == "__main__":
    main()
