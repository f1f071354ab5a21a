"""Host memory of a simulation, sampled (psutil) while a run goes.

Why: the memory of the SuperLink, ServerApp, Ray and its workers has to stay flat over
the rounds; a sampler thread reads it with the round count so it can be fitted per round.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import psutil

from flower_app.cli.local_superlink import is_run_process, pids_with_env
from strategies.transport.shared_weights import shared_root


def _read_memory_mb(pid: int) -> tuple[float, float] | None:
    """(RSS, PSS) of one process in MB, or None when it is gone or unreadable. Where the
    system has no PSS (macOS, Windows), USS stands in: both count shared pages once."""
    try:
        info = psutil.Process(pid).memory_full_info()
    except psutil.Error:
        return None
    return info.rss / 2**20, getattr(info, "pss", info.uss) / 2**20


def _parent_pid(pid: int) -> int:
    try:
        return psutil.Process(pid).ppid()
    except psutil.Error:
        return -1


def simulation_pids(marker: bytes, keep: int) -> list[int]:
    """Processes whose environment holds ``marker`` (``FLWR_HOME=...``).

    Short-lived ``flwr`` commands this script starts (``flwr ls``) carry the marker
    too; they are this process's children and are left out, except ``keep`` (the
    SuperLink, which everything else of the simulation descends from).
    """
    me = os.getpid()
    return [pid for pid in pids_with_env(marker) if pid == keep or _parent_pid(pid) != me]


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
                    server += mem[1] if is_run_process(pid) else 0.0
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
