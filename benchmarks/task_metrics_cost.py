"""The task-arithmetic measurement's share of the round time, in one in-process run.

Why: ``task-metrics-examples`` adds up to (clients + 2) forward passes over that many
validation examples to every measured round; whether that is a few percent or most of a
round depends on the model, the clients' local work and their label distributions. This
runs a preset (default: the miniature, ``configs/miniature.toml``) with the in-process
engine and the measurement on in every round, and prints per phase the median of each
round's own ratio ``seconds-task-metrics / seconds`` (one run, so a busy machine slows
both parts of a round alike), with the load average before and after. On a busy machine
run it with ``OMP_NUM_THREADS=1``: torch's thread pool, contended, slowed the clients'
small training steps far more than the measurement's large evaluation batches.

    python benchmarks/task_metrics_cost.py [PRESET] [key=value ...]
    python benchmarks/task_metrics_cost.py configs/miniature.toml task-metrics-examples=1000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the app's root

from flower_app.cli.run import merged_run_config
from flower_app.studies.in_process import run_in_process

APP = Path(__file__).resolve().parents[1]
DEFAULTS = ["task-metrics-examples=1000", "task-metrics-every=1"]


def shares(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per phase: measured rounds, median round seconds, median measurement seconds and the
    median of each round's own share (round 0 and unmeasured rounds left out)."""
    measured = metrics.dropna(subset=["seconds-task-metrics"])
    ratio = measured["seconds-task-metrics"] / measured["seconds"]
    frame = measured.assign(share=ratio)
    return frame.groupby("phase", sort=False).agg(
        rounds=("round", "count"),
        round_s=("seconds", "median"),
        task_s=("seconds-task-metrics", "median"),
        share=("share", "median"),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", nargs="?", default=str(APP / "configs" / "miniature.toml"))
    parser.add_argument("overrides", nargs="*", help="key=value run-config overrides")
    args = parser.parse_args(argv)
    out = Path(tempfile.mkdtemp(prefix="task-metrics-cost-"))
    items = [args.preset, *DEFAULTS, *args.overrides, f"output-dir={out}", "run-name=cost"]
    config = merged_run_config(APP, items)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    run_in_process(config)
    wall = time.perf_counter() - t0
    metrics = pd.read_csv(out / "cost" / "metrics.csv")
    print(f"\n{args.preset} {' '.join(args.overrides)}: {wall:.0f} s in process")
    threads = torch.get_num_threads()
    print(f"{os.cpu_count()} CPU cores, {threads} torch threads, load average ", end="")
    print(f"{load_before:.2f} before, ", end="")
    print(f"{os.getloadavg()[0]:.2f} after")
    print(shares(metrics).to_string(float_format=lambda v: f"{v:.3f}"))
    print(f"run folder: {out / 'cost'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
