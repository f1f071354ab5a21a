"""Round-time benchmark: the real app through ``flwr run``, against the compute floor.

Why this exists: a FedAvg round of the canonical setup (10 clients x 4 steps x 64
images of ViT-S/16 at 224 px) is 2,560 images, about 0.35 s of H100 compute at the
best measured rate; everything else in a round (Ray scheduling, message encoding,
aggregation, the SuperLink) is overhead. This script measures how far the app is from
that floor, where the rest of the round goes, and whether host memory stays flat.

What it does (the floors are measured after the runs, when their processes are gone):

1. The compute floor, in this process on the same device: a tight loop of the app's
   own ``train_local`` (same model, preprocessing and precision) over the round's
   number of images, at a few batch sizes (plus ``torch.compile`` on a GPU); the
   best rate is the floor. It also times the bare client work of a round: each
   client's J steps of its batch size, one after another, without Flower; and the copy
   floor: 20 copies of the model's weights (a round's messages, down and up) into
   preallocated buffers, one thread, best of 5.
2. A SuperLink of its own (``LocalSuperLink``, own FLWR_HOME, stopped by PID at the
   end) and, through ``flwr run``, a dense FedAvg run and a sparse run (mask without
   calibration, so every round is a training round), with K=100, C=0.1, J=4, batch 64
   on synthetic CIFAR-100-shaped data and random weights (nothing is downloaded).
3. Optionally a K=1000 run of the quick model, for host memory at scale.

While a run goes, a sampler thread reads the resident (RSS) and proportional (PSS)
memory of every process that carries this FLWR_HOME (SuperLink, ServerApp, Ray and
its workers) and how many rounds ``metrics.csv`` holds, so memory can be fitted
against rounds. After each run it reads ``metrics.csv`` and ``summary.json`` and
prints the median and spread of the round time after warm-up, its split into client
compute, communication/scheduling, aggregation and evaluation, images/s, peak GPU
memory per worker, the ratio to the floor, the projected wall time of the canonical
500-round run, and the memory slope in MB per round.

With ``--payload`` it runs the payload form: the ViT-S/16 weights (87 MB) at 32 px, J=1,
batch 1, so a round is mostly the cost of carrying the model; every form prints that
carrying cost (median round - bare client compute) over the copy floor, and the split
of the round the app times itself (server send, client load / compute / encode,
transport, server decode + check, aggregation).

Without a GPU (or with ``--tiny``) it runs the tiny CPU form: the quick preset's tiny
ViT at 32 px with the same K, C, J and batch (its carrying cost is the Flower path's
overhead over the bare client compute of the same images). Timings are never asserted:
a shared or busy machine changes them.

    python benchmarks/round_benchmark.py --tiny --rounds 3 --skip-k1000   # CI smoke
    python benchmarks/round_benchmark.py --payload --rounds 15 --skip-k1000   # carrying cost
    python benchmarks/round_benchmark.py --rounds 20                      # GPU, canonical
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from clients.training import train_local
from flower_app.allocator import keep_freed_memory
from flower_app.config import RunConfig, write_run_config
from flower_app.local_superlink import LocalSuperLink, pids_with_env
from flower_app.model import build_model
from flower_app.preprocessing import batch_preprocessor
from flower_app.runtime import use_bf16
from strategies.shared_weights import shared_root

APP_DIR = Path(__file__).resolve().parents[1]
CANONICAL_ROUNDS, CANONICAL_EVAL_EVERY = 500, 10

# The canonical round (K=100, C=0.1, J=4, batch 64) on synthetic CIFAR-100-shaped data
# with the ViT-S/16 architecture at random weights: no download, same shapes and cost.
GPU_FORM: dict[str, Any] = {
    "dataset": "synthetic",
    "synthetic-train-per-class": 500,
    "model": "vit_small_patch16_224.dino",
    "weights": "random",
    "image-size": 224,
    "num-clients": 100,
    "fraction-train": 0.1,
    "local-steps": 4,
    "batch-size": 64,
    "eval-every": CANONICAL_EVAL_EVERY,
}
# The tiny CPU form: the quick preset's model and image size, the canonical federation.
TINY_FORM: dict[str, Any] = GPU_FORM | {
    "synthetic-train-per-class": 100,  # the quick preset's: 9,000 training images
    "model": "vit_tiny_test",
    "image-size": 32,
    "eval-batch-size": 500,
}
# The payload form: the canonical federation and the ViT-S/16 weights (87 MB), but one
# step of batch 1 at 32 px per client, so a round is mostly the cost of carrying the model.
PAYLOAD_FORM: dict[str, Any] = GPU_FORM | {
    "synthetic-train-per-class": 100,
    "image-size": 32,
    "local-steps": 1,
    "batch-size": 1,
    "eval-batch-size": 500,
}
SPARSE: dict[str, Any] = {
    "strategy": "sparse-fedavg",
    "mask-strategy": "lowest_magnitude",  # no calibration rounds: every round trains
    "sparsity": 0.9,
    "head": "train",  # the dense head trains with the mask's entries (and travels with them)
    "head-warmup-rounds": 0,  # no warm-up phase: every measured round is a training round
}


# ---- host memory of the simulation --------------------------------------------------------
def _read_memory_mb(pid: int) -> tuple[float, float] | None:
    """(RSS, PSS) of one process in MB, or None when it is gone or unreadable."""
    try:
        rss_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        pss_kb = 0.0
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss_kb = float(line.split()[1])
                break
    except (OSError, ValueError, IndexError):
        return None
    return rss_pages * os.sysconf("SC_PAGE_SIZE") / 2**20, pss_kb / 1024


def _parent_pid(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def simulation_pids(marker: bytes, keep: int) -> list[int]:
    """Processes whose environment holds ``marker`` (``FLWR_HOME=...``).

    Short-lived ``flwr`` commands this script starts (``flwr ls``) carry the marker
    too; they are this process's children and are left out, except ``keep`` (the
    SuperLink, which everything else of the simulation descends from).
    """
    me = os.getpid()
    return [pid for pid in pids_with_env(marker) if pid == keep or _parent_pid(pid) != me]


SERVER_PROCESSES = (b"flwr-simulation", b"flwr-serverapp")  # where the ServerApp runs


def _is_server(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(name in arg for arg in argv[:2] for name in SERVER_PROCESSES)


def folder_mb(root: Path) -> float:
    """Bytes of the files under ``root`` (the shared-memory weights), in MB."""
    if not root.is_dir():
        return 0.0
    total = 0
    for path in root.rglob("*"):
        with contextlib.suppress(OSError):  # removed while walking
            total += path.stat().st_size if path.is_file() else 0
    return total / 2**20


@dataclass
class MemorySample:
    seconds: float
    rounds_done: int  # rows in metrics.csv beyond round 0
    rss_mb: float
    pss_mb: float
    processes: int
    server_pss_mb: float = 0.0  # the process that runs the ServerApp (and, simulated, Ray's driver)
    shared_mb: float = 0.0  # files of the shared-memory weight folder (tmpfs, in no process)


@dataclass
class MemorySampler:
    """Samples the simulation's host memory every ``interval`` seconds in a thread."""

    marker: bytes
    keep_pid: int
    metrics_csv: Path
    interval: float = 1.0
    samples: list[MemorySample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> MemorySampler:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _rounds_done(self) -> int:
        try:
            with open(self.metrics_csv) as f:
                return max(0, sum(1 for _ in f) - 2)  # header and round 0
        except OSError:
            return -1  # run not started yet

    def _loop(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            rss = pss = server = 0.0
            pids = simulation_pids(self.marker, self.keep_pid)
            for pid in pids:
                mem = _read_memory_mb(pid)
                if mem is not None:
                    rss, pss = rss + mem[0], pss + mem[1]
                    server += mem[1] if _is_server(pid) else 0.0
            rounds = self._rounds_done()
            sample = MemorySample(time.monotonic() - start, rounds, rss, pss, len(pids))
            sample.server_pss_mb, sample.shared_mb = server, folder_mb(shared_root())
            self.samples.append(sample)
            self._stop.wait(self.interval)


def memory_per_round(samples: list[MemorySample], warmup: int) -> pd.DataFrame:
    """Per completed round after warm-up: the first sample after its row was written.

    The first, not the last: after the final round the run evaluates, writes results
    and its processes exit while the round count stays the same.
    """
    frame = pd.DataFrame([s.__dict__ for s in samples])
    if frame.empty:
        return frame
    frame = frame[frame["rounds_done"] > warmup]
    return frame.groupby("rounds_done", as_index=False).first()


def slope_per_round(per_round: pd.DataFrame, column: str) -> float:
    """Least-squares slope of ``column`` against rounds (MB/round); nan with < 3 rounds."""
    if len(per_round) < 3:
        return math.nan
    return float(np.polyfit(per_round["rounds_done"], per_round[column], 1)[0])


# ---- the compute floor ----------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Floor:
    """Best training rate of the tight loop, and the bare client work of one round."""

    rates: dict[str, float]  # "batch 64" / "batch 256 compiled" -> images/s of one process
    best: str
    images: int
    parallel: int  # processes that add up: client workers on a CPU, 1 on a GPU (time slicing)
    bare_round_s: float  # clients x J steps of batch B, shared by ``parallel`` processes
    copy_floor_s: float = math.nan  # ``copies`` copies of the weights, one thread
    model_mb: float = math.nan  # the model's weights
    copies: int = 0  # 2 x clients of a round: every message down and up

    @property
    def seconds(self) -> float:
        return self.images / (self.rates[self.best] * self.parallel)


def _timed_train(
    model: torch.nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    steps: int,
    batch: int,
    cfg: RunConfig,
    device: torch.device,
    seed: int,
) -> float:
    """Seconds of ``steps`` steps of the app's ``train_local`` with a fresh optimizer."""
    images, labels = data
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        foreach=True,
    )
    batches = torch.Generator().manual_seed(seed)
    augment = torch.Generator(device=device).manual_seed(seed)
    synchronize(device)
    start = time.perf_counter()
    train_local(
        model,
        optimizer,
        images,
        labels,
        torch.arange(len(labels)),
        steps,
        batch,
        batch_preprocessor(cfg.image_size),
        batches,
        augment,
        use_bf16(cfg.precision, device),
    )
    synchronize(device)
    return time.perf_counter() - start


def measure_floor(
    cfg: RunConfig,
    device: torch.device,
    batch_sizes: list[int],
    compile_floor: bool,
    threads: int,
    parallel: int,
) -> Floor:
    """The tight loop: same model, data path, precision and allocator settings as a client
    (``keep_freed_memory``), no Flower.

    On a CPU it runs with the threads of one client worker (Ray gives each worker
    ``client-resources-num-cpus`` threads) and counts ``parallel`` workers as adding
    up, since each has its own cores; on a GPU workers take turns, so ``parallel`` is 1.
    """
    keep_freed_memory()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _measure_floor(cfg, device, batch_sizes, compile_floor, parallel)
    finally:
        torch.set_num_threads(previous_threads)


def _measure_floor(
    cfg: RunConfig, device: torch.device, batch_sizes: list[int], compile_floor: bool, parallel: int
) -> Floor:
    images_per_round = cfg.clients_per_round * cfg.local_steps * cfg.batch_size
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.num_classes, cfg.image_size).to(device)
    g = torch.Generator().manual_seed(0)
    pool = max([*batch_sizes, cfg.batch_size]) * 2
    data = (
        torch.randint(0, 256, (pool, 3, 32, 32), dtype=torch.uint8, generator=g).to(device),
        torch.randint(0, cfg.num_classes, (pool,), generator=g).to(device),
    )
    rates: dict[str, float] = {}

    def rate(step_model: torch.nn.Module, batch: int) -> float:
        _timed_train(step_model, data, 3, batch, cfg, device, 1)  # warm-up (and compile)
        steps = max(2, math.ceil(images_per_round / batch))
        return steps * batch / _timed_train(step_model, data, steps, batch, cfg, device, 2)

    for batch in batch_sizes:
        rates[f"batch {batch}"] = rate(model, batch)
    if compile_floor:
        batch = max(batch_sizes, key=lambda b: rates[f"batch {b}"])
        rates[f"batch {batch} compiled"] = rate(torch.compile(model), batch)
    bare = sum(
        _timed_train(model, data, cfg.local_steps, cfg.batch_size, cfg, device, 10 + client)
        for client in range(cfg.clients_per_round)
    )
    best = max(rates, key=lambda k: rates[k])
    return Floor(rates, best, images_per_round, parallel, bare / parallel)


def measure_copy_floor(cfg: RunConfig, copies: int, repeats: int = 5) -> tuple[float, float]:
    """(seconds, MiB): ``copies`` copies of the model's weights into preallocated, touched
    buffers, best of ``repeats``, one thread: a round's messages moved as plain copies."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        state = build_model(cfg.model, cfg.num_classes, cfg.image_size).state_dict()
        sources = [t.detach().contiguous() for t in state.values()]
        targets = [torch.zeros_like(t) for t in sources]
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(copies):
                for target, source in zip(targets, sources, strict=True):
                    target.copy_(source)
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous_threads)
    return best, sum(t.numel() * t.element_size() for t in sources) / 2**20


# ---- one run through flwr run ----------------------------------------------------------------
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


# ---- figures ---------------------------------------------------------------------------------
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


def _median_spread(values: pd.Series) -> str:
    v = values.dropna()
    if v.empty:
        return "n/a"
    q1, q3 = np.percentile(v, [25, 75])
    return f"{v.median():.3f} s (IQR {q1:.3f}-{q3:.3f}, min {v.min():.3f}, max {v.max():.3f})"


def _col(frame: pd.DataFrame, name: str) -> pd.Series:
    return frame[name] if name in frame else pd.Series(np.nan, index=frame.index)


@dataclass(frozen=True)
class RoundFigures:
    """A run's training rounds after warm-up: medians in seconds, and the floor they face."""

    round_times: pd.Series  # per measured round, evaluation excluded
    images: int  # per round: clients x J steps x batch
    workers: int  # client workers running at once
    eval_every: int
    client_phase: float
    compute_sum: float  # the clients' compute of a round, summed
    slowest_client: float
    aggregate: float
    send: float  # server: building the messages (and writing the shared weights file)
    load_sum: float  # clients: decoding and loading the received weights, summed
    encode_sum: float  # clients: encoding their replies, summed
    decode: float  # server: decoding (or mapping) and checking the replies
    eval_s: float  # nan without an evaluation
    gpu_mb: float  # peak allocated per worker; nan on a CPU
    floor: Floor

    @property
    def median_round(self) -> float:
        return float(self.round_times.median())

    @property
    def client_compute(self) -> float:
        return self.compute_sum / self.workers

    @property
    def communication(self) -> float:
        return self.client_phase - self.client_compute

    @property
    def transport(self) -> float:
        """The client phase minus what clients time themselves (spread over the workers):
        moving messages to and from the workers, scheduling, polling."""
        return self.client_phase - (self.load_sum + self.compute_sum + self.encode_sum) / (
            self.workers
        )

    @property
    def carrying(self) -> float:
        """Everything in a round but the bare client compute: the cost of carrying the model."""
        return self.median_round - self.floor.bare_round_s

    @property
    def carrying_ratio(self) -> float:
        return self.carrying / self.floor.copy_floor_s

    @property
    def ratio_to_floor(self) -> float:
        return self.median_round / self.floor.seconds

    @property
    def canonical_evals(self) -> int:
        return CANONICAL_ROUNDS // CANONICAL_EVAL_EVERY

    @property
    def projected_canonical(self) -> float:
        return CANONICAL_ROUNDS * self.median_round + self.canonical_evals * self.eval_s

    def as_dict(self) -> dict[str, Any]:
        return {
            "rounds-measured": len(self.round_times),
            "median-round-s": self.median_round,
            "images-per-s": self.images / self.median_round,
            "client-phase-s": self.client_phase,
            "client-compute-s": self.client_compute,
            "communication-s": self.communication,
            "aggregate-s": self.aggregate,
            "eval-s": self.eval_s,
            "gpu-memory-mb": None if math.isnan(self.gpu_mb) else self.gpu_mb,
            "floor-s": self.floor.seconds,
            "ratio-to-floor": self.ratio_to_floor,
            "bare-round-s": self.floor.bare_round_s,
            "send-s": self.send,
            "client-load-s": self.load_sum / self.workers,
            "client-encode-s": self.encode_sum / self.workers,
            "transport-s": self.transport,
            "decode-s": self.decode,
            "copy-floor-s": self.floor.copy_floor_s,
            "carrying-s": self.carrying,
            "carrying-over-copy-floor": self.carrying_ratio,
            "projected-canonical-s": self.projected_canonical,
        }


def round_figures(spec: RunSpec, metrics: pd.DataFrame, floor: Floor) -> RoundFigures:
    """The figures of a run from its ``metrics.csv`` rows."""
    trained = metrics[metrics["round"] > spec.warmup]
    cfg = RunConfig.from_run_config(spec.config)
    median = lambda name: float(_col(trained, name).median())  # noqa: E731
    evals = _col(metrics, "seconds-eval").dropna()
    return RoundFigures(
        round_times=trained["seconds"] - _col(trained, "seconds-eval").fillna(0.0),
        images=cfg.clients_per_round * cfg.local_steps * cfg.batch_size,
        workers=workers_of(spec.federation, cfg.clients_per_round),
        eval_every=cfg.eval_every,
        client_phase=median("seconds-clients"),
        compute_sum=median("seconds-client-compute-sum"),
        slowest_client=median("seconds-client-compute"),
        aggregate=median("seconds-aggregate"),
        send=median("seconds-send"),
        load_sum=median("seconds-client-load-sum"),
        encode_sum=median("seconds-client-encode-sum"),
        decode=median("seconds-decode"),
        eval_s=float(evals.median()) if len(evals) else math.nan,
        gpu_mb=float(_col(metrics, "gpu-memory-mb").max()),
        floor=floor,
    )


def write_round_split(fig: RoundFigures, warmup: int, write: Callable[[str], None]) -> None:
    """Round time, images/s, where a round's time goes, and peak GPU memory."""
    write(f"   rounds measured: {len(fig.round_times)} after {warmup} warm-up")
    write(f"   round time (training, eval excluded): {_median_spread(fig.round_times)}")
    write(f"   images/round {fig.images}, images/s {fig.images / fig.median_round:.1f}")
    w = fig.workers
    server = fig.send + fig.decode + fig.aggregate
    write(
        f"   split (medians, client parts summed over clients / {w} workers): server send "
        f"{fig.send:.3f} s; client phase {fig.client_phase:.3f} s = load "
        f"{fig.load_sum / w:.3f} + compute {fig.client_compute:.3f} + encode "
        f"{fig.encode_sum / w:.3f} + transport/scheduling {fig.transport:.3f}"
    )
    write(
        f"                    server receive/decode+check {fig.decode:.3f} s, aggregation "
        f"{fig.aggregate:.3f} s, other server {fig.median_round - fig.client_phase - server:.3f}"
        f" s; evaluation {fig.eval_s:.3f} s (every {fig.eval_every} rounds, not in the round)"
    )
    write(f"   slowest client's compute {fig.slowest_client:.3f} s")
    write(
        "   GPU memory per worker (peak allocated): "
        + (f"{fig.gpu_mb:.0f} MB" if not math.isnan(fig.gpu_mb) else "n/a (CPU run)")
    )


def write_against_floor(fig: RoundFigures, write: Callable[[str], None]) -> None:
    """The median round against the compute floor, and the projected canonical run."""
    floor, median_round = fig.floor, fig.median_round
    write(
        f"   compute floor {floor.seconds:.3f} s ({floor.best}, {floor.rates[floor.best]:.0f} "
        f"img/s x{floor.parallel}): median round / floor = {fig.ratio_to_floor:.2f}x"
    )
    write(
        f"   carrying cost {fig.carrying:.3f} s (median round {median_round:.3f} s - bare client "
        f"compute {floor.bare_round_s:.3f} s) / copy floor {floor.copy_floor_s:.4g} s "
        f"({floor.copies} copies of {floor.model_mb:.3g} MiB) = {fig.carrying_ratio:.2f}x"
    )
    write(
        f"   projected canonical wall time: {CANONICAL_ROUNDS} x {median_round:.3f} s + "
        f"{fig.canonical_evals} x {fig.eval_s:.3f} s eval = {fig.projected_canonical:.0f} s "
        f"({fig.projected_canonical / 3600:.2f} h; start-up and checkpoints not included)"
    )


def report_run(result: RunResult, floor: Floor, write: Callable[[str], None]) -> dict:
    """Print the figures of one run; return them as a dict (for the JSON report)."""
    spec = result.spec
    write(f"\n== {spec.name}: K={spec.num_clients} ({spec.config['model']}) ==")
    write(f"   {result.detail}; wall {result.wall_s:.1f} s end to end")
    if not result.ok or result.metrics is None:
        return {"run": spec.name, "ok": False, "detail": result.detail}
    figures = round_figures(spec, result.metrics, floor)
    write_round_split(figures, spec.warmup, write)
    write_against_floor(figures, write)
    memory = report_memory(result, write)
    return {
        "run": spec.name,
        "ok": True,
        "num-clients": spec.num_clients,
        "model": spec.config["model"],
        **figures.as_dict(),
        **memory,
    }


def report_memory(result: RunResult, write: Callable[[str], None]) -> dict[str, float]:
    """Host memory of the simulation's processes, and its slope over the measured rounds."""
    per_round = memory_per_round(result.memory, result.spec.warmup)
    if per_round.empty:
        write("   host memory: no samples")
        return {}
    rss_slope = slope_per_round(per_round, "rss_mb")
    pss_slope = slope_per_round(per_round, "pss_mb")
    peak = max(result.memory, key=lambda s: s.pss_mb)
    last = per_round.iloc[-1]
    write(
        f"   host memory of the simulation ({int(last['processes'])} processes): "
        f"PSS {last['pss_mb']:.0f} MB, RSS sum {last['rss_mb']:.0f} MB after round "
        f"{int(last['rounds_done'])}; PSS peak {peak.pss_mb:.0f} MB"
    )
    write(
        f"   memory slope over {len(per_round)} rounds: PSS {pss_slope:+.2f} MB/round, "
        f"RSS {rss_slope:+.2f} MB/round"
    )
    server = per_round["server_pss_mb"]
    shared_peak = max(s.shared_mb for s in result.memory)
    write(
        f"   ServerApp process PSS {last['server_pss_mb']:.0f} MB after the last round (min "
        f"{server.min():.0f}, max {server.max():.0f} over the rounds; slope "
        f"{slope_per_round(per_round, 'server_pss_mb'):+.2f} MB/round); shared weight files "
        f"{last['shared_mb']:.0f} MB after the last round, peak {shared_peak:.0f} MB"
    )
    return {
        "server-pss-mb": float(last["server_pss_mb"]),
        "server-pss-slope-mb-per-round": slope_per_round(per_round, "server_pss_mb"),
        "shared-files-peak-mb": shared_peak,
        "host-pss-mb": float(last["pss_mb"]),
        "host-rss-mb": float(last["rss_mb"]),
        "host-pss-peak-mb": peak.pss_mb,
        "pss-slope-mb-per-round": pss_slope,
        "rss-slope-mb-per-round": rss_slope,
    }


# ---- main -----------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--tiny", action="store_true", help="the CPU form: tiny ViT at 32 px (default without GPU)"
    )
    parser.add_argument(
        "--payload",
        action="store_true",
        help="ViT-S/16 weights at 32 px, J=1, batch 1: the cost of carrying the model",
    )
    parser.add_argument(
        "--weights-transport",
        default="",
        help="run-config weights-transport of the runs (default: the app's, auto); several, "
        "comma-separated, run one after the other",
    )
    parser.add_argument("--rounds", type=int, default=10, help="measured rounds per run")
    parser.add_argument("--warmup", type=int, default=1, help="rounds dropped before measuring")
    parser.add_argument("--skip-k1000", action="store_true", help="no K=1000 memory run")
    parser.add_argument("--k1000-rounds", type=int, default=0, help="default: --rounds")
    parser.add_argument(
        "--federation-config",
        default="",
        help="client resources (default: num-cpus=1 on CPU; num-cpus=4 num-gpus=0.5 on a GPU)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="run-config compile=true for the runs"
    )
    parser.add_argument("--no-floor-compile", action="store_true", help="eager floor on a GPU")
    parser.add_argument("--output-dir", type=Path, default=None, help="default: a temp folder")
    parser.add_argument(
        "--keep-models",
        action="store_true",
        help="keep the runs' model files (checkpoint, weights, mask); by default they are "
        "deleted once the runs are read (about 1 GB for the payload form)",
    )
    parser.add_argument("--run-timeout", type=float, default=1800.0)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds must be >= 1 and --warmup >= 0")
    return args


def pick_device(choice: str) -> torch.device | None:
    """The device of ``--device``; None for ``cuda`` on a machine without a GPU."""
    cuda = torch.cuda.is_available()
    if choice == "cuda" and not cuda:
        return None
    return torch.device("cuda" if choice != "cpu" and cuda else "cpu")


def default_federation(device: torch.device) -> str:
    """Client resources: one CPU per client worker on a CPU, two workers per GPU."""
    if device.type == "cpu":
        return "client-resources-num-cpus=1"
    return (
        f"client-resources-num-cpus={max(1, (os.cpu_count() or 2) // 4)} "
        "client-resources-num-gpus=0.5"
    )


def print_setup(
    device: torch.device, tiny: bool, args: argparse.Namespace, cfg: RunConfig, federation: str
) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    form = "payload" if args.payload else "tiny (CPU)" if tiny else "canonical (GPU)"
    print(
        f"device: {device.type} ({name}), {os.cpu_count()} CPU cores, torch "
        f"{torch.__version__}; form: {form}; load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    if device.type == "cpu" and not args.tiny and not args.payload:
        print("no GPU: running the tiny CPU form (vit_tiny_test, 32 px)", flush=True)
    print(
        f"setup: {cfg.model} at {cfg.image_size} px, K={cfg.num_clients}, C={cfg.fraction_train}, "
        f"J={cfg.local_steps}, batch {cfg.batch_size}; federation: {federation}",
        flush=True,
    )


def floor_of_round(
    cfg: RunConfig,
    device: torch.device,
    federation: str,
    compile_floor: bool,
    batch_sizes: list[int],
) -> Floor:
    """Measure the compute floor with one client worker's threads and the copy floor of a
    round's messages, and print them."""
    workers = workers_of(federation, cfg.clients_per_round)
    threads = max(1, int(float(_resources(federation).get("client-resources-num-cpus", 2))))
    parallel = workers if device.type == "cpu" else 1
    floor = measure_floor(cfg, device, batch_sizes, compile_floor, threads, parallel)
    copies = 2 * cfg.clients_per_round
    copy_s, model_mb = measure_copy_floor(cfg, copies)
    floor = dataclasses.replace(floor, copy_floor_s=copy_s, model_mb=model_mb, copies=copies)
    print(
        f"copy floor: {copies} copies of the weights ({model_mb:.1f} MiB) into preallocated "
        f"buffers, one thread, best of 5: {copy_s:.4g} s",
        flush=True,
    )
    rates = ", ".join(f"{k} {v:.0f}" for k, v in floor.rates.items())
    print(f"compute floor, one process with {threads} thread(s) (img/s): {rates}", flush=True)
    print(
        f"floor of a round: {floor.images} images in {floor.seconds:.3f} s ({floor.best}, "
        f"x{parallel} process(es)); bare client compute ({cfg.clients_per_round} clients x "
        f"{cfg.local_steps} steps x {cfg.batch_size}, shared by {parallel}): "
        f"{floor.bare_round_s:.3f} s",
        flush=True,
    )
    return floor


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


def print_memory_by_k(report: list[dict]) -> None:
    memory = [r for r in report if r.get("ok") and "pss-slope-mb-per-round" in r]
    if memory:
        print("\nhost memory by K (after the last round; slope = linear fit over rounds):")
        for r in memory:
            print(
                f"   K={r['num-clients']:>5} {r['run']:<12} PSS {r['host-pss-mb']:7.0f} MB  "
                f"RSS {r['host-rss-mb']:7.0f} MB  slope {r['pss-slope-mb-per-round']:+.2f} "
                "MB/round (PSS)"
            )


def write_benchmark_json(out: Path, device: torch.device, floor: Floor, report: list[dict]) -> None:
    floor_info = {"rates": floor.rates, "best": floor.best, "seconds": floor.seconds}
    floor_info["bare-round-s"] = floor.bare_round_s
    floor_info |= {"copy-floor-s": floor.copy_floor_s, "copies": floor.copies}
    floor_info["model-mb"] = floor.model_mb
    (out / "benchmark.json").write_text(
        json.dumps({"device": device.type, "floor": floor_info, "runs": report}, indent=2) + "\n"
    )


MODEL_FILE_SUFFIXES = (".safetensors", ".pt")


def prune_model_files(out: Path, run_names: list[str]) -> int:
    """Delete the runs' model files, keep their metrics; return the bytes freed.

    Why: the benchmark reads only metrics.csv and summary.json, but every run writes its
    checkpoint, best/final weights and task vector (about 0.5 GB a run in the payload
    form); left in a temp folder, a few CI runs fill a small disk.
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


def main(argv: list[str] | None = None) -> int:
    """Floor, dense and sparse runs (and K=1000); exit 1 if a run failed."""
    args = parse_args(argv)
    device = pick_device(args.device)
    if device is None:
        print("error: --device cuda but this machine sees no GPU", file=sys.stderr)
        return 2
    tiny = not args.payload and (args.tiny or device.type == "cpu")
    form = PAYLOAD_FORM if args.payload else TINY_FORM if tiny else GPU_FORM
    form = form | {"device": device.type, "compile": args.compile}
    federation = args.federation_config or default_federation(device)
    cfg = RunConfig.from_run_config(form)
    print_setup(device, tiny, args, cfg, federation)

    out = args.output_dir or Path(tempfile.mkdtemp(prefix="round-benchmark-"))
    out = out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    specs = run_specs(args, form, federation, device, tiny)
    try:
        results = run_all(specs, out, args.run_timeout)
    finally:  # also when a run fails or the benchmark is interrupted
        if not args.keep_models:
            freed = prune_model_files(out, [spec.name for spec in specs])
            mb = freed / 2**20
            print(f"deleted the runs' model files ({mb:.0f} MB; --keep-models keeps them)")

    # measured right after the runs, in this process, with the runs' processes gone
    compile_floor = device.type == "cuda" and not args.no_floor_compile and not args.payload
    batch_sizes = [cfg.batch_size] if args.payload else [64, 128, 256]
    floor = floor_of_round(cfg, device, federation, compile_floor, batch_sizes)
    report = [report_run(r, floor, lambda line: print(line, flush=True)) for r in results]
    print_memory_by_k(report)
    write_benchmark_json(out, device, floor, report)
    print(f"\nresults: {out} (benchmark.json, one folder per run)")
    failed = [r.spec.name for r in results if not r.ok]
    if failed:
        print(f"FAILED runs: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
