"""A run's round figures from its ``metrics.csv``: medians, split, and ratios to the floors.

Why: one place computes them, so the printed lines and benchmark.json agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from benchmarks.round.floors import Floor
from benchmarks.round.forms import CANONICAL_EVAL_EVERY, CANONICAL_ROUNDS
from benchmarks.round.runs import RunSpec, workers_of
from flower_app.config import RunConfig


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
    task_s: float = math.nan  # the task-arithmetic measurement of a round (nan: off)
    task_share: float = math.nan  # its median share of the round time (eval excluded)

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
            "task-metrics-s": None if math.isnan(self.task_s) else self.task_s,
            "task-metrics-share": None if math.isnan(self.task_share) else self.task_share,
        }


def round_figures(spec: RunSpec, metrics: pd.DataFrame, floor: Floor) -> RoundFigures:
    """The figures of a run from its ``metrics.csv`` rows."""
    trained = metrics[metrics["round"] > spec.warmup]
    cfg = RunConfig.from_run_config(spec.config)
    median = lambda name: float(_col(trained, name).median())  # noqa: E731
    evals = _col(metrics, "seconds-eval").dropna()
    round_times = trained["seconds"] - _col(trained, "seconds-eval").fillna(0.0)
    task = _col(trained, "seconds-task-metrics")
    return RoundFigures(
        round_times=round_times,
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
        task_s=float(task.median()),
        task_share=float((task / round_times).median()),  # ratios of the same rounds
    )
