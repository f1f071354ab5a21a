"""Runs of a sweep side by side: ``--jobs N`` worker processes, each with its share of the
cores.

A miniature run trains a model so small that a second torch thread does not halve its
time: on the 2-core development machine one run took 44-49 s with two threads, and two runs
with one thread each 71-73 s side by side (docs/performance.md#sweeps-side-by-side). So the
in-process engine runs one run per core by default. Each worker is a fresh process
(``spawn``: torch's thread pools do not survive ``fork``) that sets its torch threads before
its first run; runs that differ only in their thread count agree to float rounding, not bit
for bit. Only the sweep's own process writes a study's files (``sweep.csv``, tables); each
worker writes the run folder of the run it was given, as ``flwr run`` would.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

from flower_app.config import ConfigError

AUTO = "auto"


def usable_cores() -> int:
    """The cores this process may run on (its affinity, not the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def parse_jobs(value: str, engine: str) -> int:
    """``--jobs``: ``auto`` is one run per core in-process and one at a time through
    ``flwr run`` (Ray already spreads a run's clients over the cores)."""
    if value == AUTO:
        return usable_cores() if engine == "in-process" else 1
    try:
        jobs = int(value)
    except ValueError:
        jobs = 0
    if jobs < 1:
        raise ConfigError(f"--jobs {value} is not allowed: a whole number >= 1, or {AUTO}")
    if jobs > 1 and engine != "in-process":
        raise ConfigError(
            f"--jobs {value} is not allowed with --engine {engine}: runs side by side need "
            "--engine in-process (flwr run spreads one run's clients over the cores itself)"
        )
    return jobs


def threads_per_job(jobs: int) -> int:
    """The torch threads each of ``jobs`` workers uses: its share of the cores, at least 1."""
    return max(1, usable_cores() // jobs)


def _start_worker(threads: int) -> None:
    """A worker's first act: its share of the cores, unless the user chose the threads."""
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)


def timed(work: Callable[..., tuple[bool, str]], *args: Any) -> tuple[bool, str, float]:
    """``work(*args)`` with the seconds it took where it ran."""
    start = time.perf_counter()
    ok, detail = work(*args)
    return ok, detail, time.perf_counter() - start


class SerialPool:
    """One run at a time in this process: ``submit`` runs it before it returns."""

    jobs = 1

    def submit(self, work: Callable[..., tuple[bool, str]], *args: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(timed(work, *args))
        except Exception as exc:
            future.set_exception(exc)
        return future

    def shutdown(self) -> None:
        """Nothing runs after ``submit`` returns: nothing to stop."""


class ProcessPool:
    """``jobs`` worker processes, each with ``threads_per_job(jobs)`` torch threads."""

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs
        self.executor = ProcessPoolExecutor(
            max_workers=jobs,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(threads_per_job(jobs),),
        )

    def submit(self, work: Callable[..., tuple[bool, str]], *args: Any) -> Future:
        return self.executor.submit(timed, work, *args)

    def shutdown(self) -> None:
        """Wait for the runs under way (an interrupt reaches them too), start no more."""
        self.executor.shutdown(wait=True, cancel_futures=True)


def make_pool(jobs: int) -> SerialPool | ProcessPool:
    return SerialPool() if jobs == 1 else ProcessPool(jobs)
