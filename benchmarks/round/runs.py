"""The runs: each through ``flwr run`` on a local SuperLink of its own, memory sampled.

Why: the benchmark measures the real app as a user runs it, not an in-process copy.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from benchmarks.round.forms import SPARSE, TINY_FORM
from benchmarks.round.memory import MemorySample, MemorySampler
from flower_app.cli.local_superlink import LocalSuperLink
from flower_app.config import RunConfig, write_run_config

APP_DIR = Path(__file__).resolve().parents[2]  # the repository root: the Flower app


@dataclass(frozen=True)
class RunSpec:
    name: str
    config: dict[str, Any]
    federation: str  # without num-supernodes
    warmup: int
    rounds: int

    @property
    def num_clients(self) -> int:
        return int(self.config["num-clients"])


@dataclass
class RunResult:
    spec: RunSpec
    ok: bool
    detail: str
    metrics: pd.DataFrame | None = None
    summary: dict[str, Any] | None = None
    memory: list[MemorySample] = field(default_factory=list)
    wall_s: float = 0.0


def run_one(link: LocalSuperLink, spec: RunSpec, out: Path, timeout: float) -> RunResult:
    """Submit one run, sample memory while it goes, read its results; never raises on failure."""
    config = spec.config | {
        "num-server-rounds": spec.warmup + spec.rounds,
        "output-dir": str(out),
        "run-name": spec.name,
    }
    RunConfig.from_run_config(config)  # a bad benchmark config fails here, in one line
    toml = write_run_config(out / f"{spec.name}.toml", config)
    federation = f"num-supernodes={spec.num_clients} {spec.federation}".strip()
    sampler = MemorySampler(link.marker, link.process.pid, out / spec.name / "metrics.csv")
    try:
        with sampler:
            outcome = link.run_to_end(APP_DIR, toml, federation, timeout=timeout)
    except RuntimeError as exc:  # flwr run refused the run
        return RunResult(spec, False, str(exc), memory=sampler.samples)
    run_dir = out / spec.name
    summary_path = run_dir / "summary.json"
    if not outcome.completed or not summary_path.is_file():
        status = f"timed out after {timeout:.0f} s" if outcome.timed_out else outcome.status
        tail = outcome.log.strip()[-3000:]
        detail = f"flwr run {outcome.run_id}: {status}; last lines of its log:\n{tail}"
        return RunResult(spec, False, detail, memory=sampler.samples, wall_s=outcome.seconds)
    return RunResult(
        spec,
        True,
        f"flwr run {outcome.run_id}",
        pd.read_csv(run_dir / "metrics.csv"),
        json.loads(summary_path.read_text()),
        sampler.samples,
        outcome.seconds,
    )


def _resources(federation: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in federation.split() if "=" in item)


def workers_of(federation: str, clients_per_round: int) -> int:
    """Client workers running at once: min(CPUs / num-cpus, 1 / num-gpus, clients)."""
    opts = _resources(federation)
    cpus = float(opts.get("client-resources-num-cpus", 2))
    gpus = float(opts.get("client-resources-num-gpus", 0))
    workers = int((os.cpu_count() or 1) // cpus)
    if gpus > 0:
        workers = min(workers, int(1 / gpus))
    return max(1, min(workers, clients_per_round))


def run_specs(
    args: argparse.Namespace,
    form: dict[str, Any],
    federation: str,
    device: torch.device,
    tiny: bool,
) -> list[RunSpec]:
    """Dense and sparse runs of ``form``; unless --skip-k1000, the quick model at K=1000
    (and, in the GPU form, at K=100 as its memory reference)."""
    transports = [t.strip() for t in args.weights_transport.split(",") if t.strip()] or [""]
    specs = []
    for transport in transports:
        suffix = f"-{transport}" if len(transports) > 1 else ""
        chosen = form | ({"weights-transport": transport} if transport else {})
        specs += [
            RunSpec(f"dense{suffix}", chosen, federation, args.warmup, args.rounds),
            RunSpec(f"sparse{suffix}", chosen | SPARSE, federation, args.warmup, args.rounds),
        ]
    if args.skip_k1000:
        return specs
    quick = TINY_FORM | {"device": device.type}
    quick_fed = "client-resources-num-cpus=1"
    if device.type == "cuda":
        quick_fed = federation
    k1000_rounds = args.k1000_rounds or args.rounds
    if not tiny:  # the K=100 reference for memory, with the same quick model
        specs.append(RunSpec("quick-k100", quick, quick_fed, args.warmup, k1000_rounds))
    specs.append(
        RunSpec(
            "quick-k1000",
            quick | {"num-clients": 1000, "fraction-train": 0.01},
            quick_fed,
            args.warmup,
            k1000_rounds,
        )
    )
    return specs


def run_all(specs: list[RunSpec], out: Path, timeout: float) -> list[RunResult]:
    """Every spec through ``flwr run`` on a SuperLink of its own, stopped by PID after."""
    link = LocalSuperLink.start(out / ".flwr-home")
    results: list[RunResult] = []
    try:
        for spec in specs:
            print(f"\nrunning {spec.name} ({spec.warmup} + {spec.rounds} rounds) ...", flush=True)
            results.append(run_one(link, spec, out, timeout))
    finally:
        link.stop()
    return results


MODEL_FILE_SUFFIXES = (".safetensors", ".pt")


def prune_model_files(out: Path, run_names: list[str]) -> int:
    """Delete the runs' model files, keep their metrics; return the bytes freed.

    Why: the benchmark reads only metrics.csv and summary.json, but every run writes its
    checkpoint, best/final weights and task vector; left in a temp folder, a few CI runs
    fill a small disk.
    """
    freed = 0
    for name in run_names:
        run_dir = out / name
        if not run_dir.is_dir():
            continue
        for path in run_dir.iterdir():
            if path.is_file() and path.suffix in MODEL_FILE_SUFFIXES:
                freed += path.stat().st_size
                path.unlink()
    return freed
