"""Round hooks: small objects with one job each, called after every round with its record.

The ServerApp declares them as a list (``server_app.round_hooks``); the run loop
(``strategies/rounds.py``) calls each as ``hook(record, arrays)`` in that order, so a
hook sees what the hooks before it added to the record. Stateful hooks save and load
themselves (``state_dict`` / ``load_state_dict``); a checkpoint only collects them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

import pandas as pd
import torch
from flwr.app import ArrayRecord

from flower_app.runs.results import RunDirectory
from strategies.plan import CALIBRATION, HEAD_WARMUP, INITIAL, TRAIN, RoundClock
from strategies.record import RoundRecord

METRIC_COLUMNS = [
    "round",
    "phase",
    "lr",
    "clients",
    "failures",
    "num-examples",
    "train-loss",
    "val-loss",
    "val-accuracy",
    "bytes-down",
    "bytes-up",
    "update-cosine",
    "update-norm-ratio",
    "update-norm",
    "head-update-cosine",
    "head-update-norm-ratio",
    "head-update-norm",
    "seconds-send",
    "seconds-clients",
    "seconds-client-load-sum",
    "seconds-client-compute",
    "seconds-client-compute-sum",
    "seconds-client-encode-sum",
    "gpu-memory-mb",
    "seconds-decode",
    "seconds-aggregate",
    "seconds-eval",
    "seconds",
]
CALIBRATION_COLUMNS = [
    "round",
    "phase",
    "clients",
    "failures",
    "num-examples",
    "bytes-down",
    "bytes-up",
    "density",
    "target-density",
    "seconds-clients",
    "seconds",
]
TRAINING_PHASES = frozenset({INITIAL, HEAD_WARMUP, TRAIN})  # rows of metrics.csv


class CentralEvaluation:
    """Validation loss and accuracy of the global model, at round 0, every ``every`` rounds of
    a training phase and at the end of each training phase."""

    def __init__(self, evaluate: Callable[[ArrayRecord], tuple[float, float]], every: int) -> None:
        self.evaluate = evaluate
        self.every = every

    def due(self, record: RoundRecord) -> bool:
        position = record.position
        if position.phase not in TRAINING_PHASES:
            return False
        return (
            position.round == 0
            or position.phase_round % self.every == 0
            or (position.last_of_phase)
        )

    def __call__(self, record: RoundRecord, arrays: ArrayRecord) -> None:
        if not self.due(record):
            return
        t0 = time.perf_counter()
        loss, accuracy = self.evaluate(arrays)
        record.add(
            {"val-loss": loss, "val-accuracy": accuracy, "seconds-eval": time.perf_counter() - t0}
        )


class Stopwatch:
    """Each round's wall time (``seconds``) and the run's wall time summed over resumes."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.before = 0.0  # wall time of earlier segments (runs that were resumed)
        self.segments = 1

    def total(self) -> float:
        return self.before + time.perf_counter() - self.started

    def __call__(self, record: RoundRecord, arrays: ArrayRecord) -> None:
        if record.round > 0:
            record.add({"seconds": time.perf_counter() - record.started})

    def state_dict(self) -> dict[str, Any]:
        return {"elapsed": self.total(), "segments": self.segments}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.before = float(state["elapsed"])
        self.segments = int(state["segments"]) + 1


class MetricsTable:
    """The rows of the records of some phases, rewritten to a CSV atomically after each."""

    def __init__(
        self,
        run_dir: RunDirectory,
        name: str = "metrics.csv",
        columns: list[str] | None = None,
        phases: Collection[str] = TRAINING_PHASES,
    ) -> None:
        self.run_dir = run_dir
        self.name = name
        self.columns = METRIC_COLUMNS if columns is None else columns
        self.phases = phases
        self.rows: list[dict[str, Any]] = []

    def __call__(self, record: RoundRecord, arrays: ArrayRecord) -> None:
        if record.phase in self.phases:
            self.append(record.row())

    def append(self, row: Mapping[str, Any]) -> None:
        self.rows.append(dict(row))
        self.run_dir.write_csv(self.name, self.frame())

    def frame(self) -> pd.DataFrame:
        frame = pd.DataFrame(self.rows)
        extra = [c for c in frame.columns if c not in self.columns]
        return frame.reindex(columns=self.columns + extra)

    def state_dict(self) -> dict[str, Any]:
        return {"rows": [dict(r) for r in self.rows]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rows = [dict(r) for r in state["rows"]]


def calibration_table(run_dir: RunDirectory) -> MetricsTable:
    return MetricsTable(run_dir, "calibration.csv", CALIBRATION_COLUMNS, {CALIBRATION})


PLACEMENT_COLUMNS = [
    "round",
    "phase",
    "partition-id",
    "worker-pid",
    "ray-gpu-ids",
    "cuda-visible-devices",
    "cuda-device-count",
]
UNSET = "unset"  # the cuda-visible-devices cell of a worker without the variable


def placement_cell(value: int | list[int]) -> str:
    """A cell as text (pandas would turn a column of integers with a missing cell into
    floats); a list of device ids as CUDA_VISIBLE_DEVICES spells it ("0", "0,1", "")."""
    return ",".join(str(v) for v in value) if isinstance(value, list) else str(value)


class PlacementTable(MetricsTable):
    """``placement.csv``: per round and aggregated client, the worker (PID) that trained it,
    the GPU ids Ray gave that worker, its CUDA_VISIBLE_DEVICES and torch's device count.

    Only a simulation's clients (Ray actors) report these, so only such runs write the file.
    """

    def __init__(self, run_dir: RunDirectory) -> None:
        super().__init__(run_dir, "placement.csv", PLACEMENT_COLUMNS)

    def __call__(self, record: RoundRecord, arrays: ArrayRecord) -> None:
        if not record.clients:
            return
        for client in record.clients:
            cells = {key: placement_cell(value) for key, value in client.items()}
            cells.setdefault("cuda-visible-devices", UNSET)
            self.rows.append({"round": record.round, "phase": record.phase} | cells)
        self.run_dir.write_csv(self.name, self.frame())


class BestModel:
    """A copy of the weights with the best validation accuracy so far, and its round."""

    def __init__(self) -> None:
        self.accuracy = -math.inf
        self.round = -1
        self.state: dict[str, torch.Tensor] | None = None

    def offer(
        self, round_: int, accuracy: float | None, state: Callable[[], dict[str, torch.Tensor]]
    ) -> bool:
        """Keep ``state()`` if ``accuracy`` beats the best so far; says whether it did."""
        if accuracy is None or math.isnan(accuracy) or accuracy <= self.accuracy:
            return False
        self.accuracy, self.round = float(accuracy), round_
        self.state = {k: v.detach().clone() for k, v in state().items()}
        return True

    def __call__(self, record: RoundRecord, arrays: ArrayRecord) -> None:
        self.offer(record.round, record.get("val-accuracy"), arrays.to_torch_state_dict)

    def state_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "round": self.round, "state": self.state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.accuracy, self.round = float(state["accuracy"]), int(state["round"])
        self.state = state["state"]


def _clock_time(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class ProgressLog:
    """One line per round: where it is in the plan, its metrics, elapsed time and an ETA.

    The ETA is the mean wall time of the rounds of this process so far times the rounds
    left (calibration and training rounds differ, so it settles once a phase has run).
    """

    KEYS = ("train-loss", "val-loss", "val-accuracy", "density", "task-normalized-accuracy")

    def __init__(
        self, clock: RoundClock, elapsed: Callable[[], float], write: Callable[[str], None] = print
    ) -> None:
        self.clock = clock
        self.elapsed = elapsed
        self.write = write
        self.seconds: list[float] = []

    def line(self, record: RoundRecord) -> str:
        position = record.position
        parts = [f"round {position.round}/{self.clock.total_rounds}"]
        if position.round > 0:
            parts[0] += f" ({position.phase} {position.phase_round}/{position.phase_rounds})"
        for key in self.KEYS:
            value = record.get(key)
            if value is not None:
                parts.append(f"{key} {value:.4f}")
        seconds = record.get("seconds")
        if seconds is not None:
            self.seconds.append(seconds)
            parts.append(f"{seconds:.1f} s")
        parts.append(f"elapsed {_clock_time(self.elapsed())}")
        left = self.clock.total_rounds - position.round
        if self.seconds and left > 0:
            parts.append(f"eta {_clock_time(left * sum(self.seconds) / len(self.seconds))}")
        return " | ".join(parts)

    def __call__(self, record: RoundRecord, arrays: ArrayRecord) -> None:
        self.write(self.line(record))
