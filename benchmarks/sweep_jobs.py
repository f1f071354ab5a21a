"""A sweep one run at a time against the same sweep with runs side by side (``--jobs``).

Why this exists: a miniature run's model is so small that torch's threads wait on each
other, so ``fl-experiments`` runs one run per core by default with the in-process engine
(``flower_app/studies/run_pool.py``). This script shows what that buys on this machine.

What it does: runs the same ``fl-experiments`` sweep (a fresh ``sys.executable`` process
and output folder each time) with ``--jobs 1`` (one run at a time, all threads) and with
``--jobs N`` (default: the usable cores), alternating ``--repeats`` times, and prints each
sweep's wall time, the machine's busy share while it ran, and the ratio. The default sweep
is four runs of the mask study (dense and three masks, SGDM, seed 0); the backbone of
``fl-pretrain`` must exist (``fl-pretrain``).

    python benchmarks/sweep_jobs.py
    python benchmarks/sweep_jobs.py --jobs 2 --repeats 2 -- heterogeneity --quick --seeds 2
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
SWEEP = [
    "mask-strategies",
    "--quick",
    "--settings",
    "nc5-sgdm-dense,nc5-sgdm-least_sensitive,nc5-sgdm-lowest_magnitude,nc5-sgdm-random",
]


def cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of all cores since boot (psutil's ``cpu_times``)."""
    times = psutil.cpu_times()
    total = sum(times)
    return total - times.idle - getattr(times, "iowait", 0.0), total


def one_sweep(sweep: list[str], jobs: str) -> tuple[float, float]:
    """Wall seconds and busy share of the cores for one sweep in a fresh process."""
    with tempfile.TemporaryDirectory() as out:
        argv = [sys.executable, "-m", "flower_app.studies.experiments", *sweep]
        argv += ["--output-dir", out, "--jobs", jobs, "--app", str(ROOT)]
        busy0, total0 = cpu_seconds()
        start = time.perf_counter()
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - start
        busy1, total1 = cpu_seconds()
    if proc.returncode != 0:
        sys.exit(f"the sweep with --jobs {jobs} failed:\n{proc.stdout[-2000:]}{proc.stderr}")
    return wall, (busy1 - busy0) / max(1e-9, total1 - total0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", default="auto", help="the side-by-side setting (default auto)")
    parser.add_argument("--repeats", type=int, default=1, help="A/B pairs, alternated")
    parser.add_argument("sweep", nargs="*", help="fl-experiments arguments (after --)")
    args = parser.parse_args(argv)
    sweep = args.sweep or SWEEP
    print(f"sweep: fl-experiments {' '.join(sweep)}", flush=True)
    walls: dict[str, list[float]] = {"1": [], args.jobs: []}
    for repeat in range(args.repeats):
        for jobs in ("1", args.jobs):
            wall, busy = one_sweep(sweep, jobs)
            walls[jobs].append(wall)
            line = f"  repeat {repeat + 1}: --jobs {jobs}: {wall:.1f} s, cores {busy:.0%} busy"
            print(line, flush=True)
    one, many = statistics.median(walls["1"]), statistics.median(walls[args.jobs])
    print(f"median: --jobs 1 {one:.1f} s, --jobs {args.jobs} {many:.1f} s: {one / many:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
