"""The record of one round: created when the round starts, filled by the parts that know.

The round driver fills what it sees on the wire (bytes, replies, failures, waiting
time), the strategy what it computes (loss, examples, interference, mask density),
and the hooks what they measure (evaluation, wall time). A row of ``metrics.csv`` or
``calibration.csv`` is this record flattened.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from strategies.plan import RoundPosition

FAILURE_REASONS = "failure-reasons"  # the CSV column: each failed client's one-line reason
REASON_SEPARATOR = "; "


State = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class ClientModel:
    """One aggregated client's own model of the round, w + t_k, built when asked: the
    strategy holds its reply's tensors already, so only a call makes a full state."""

    partition_id: int
    state: Callable[[], State]


@dataclass(frozen=True)
class TaskModels:
    """What task-arithmetic metrics of a round need, as references to tensors the strategy
    holds: the weights sent (w), the new global weights after the server rule (w + t) and
    each aggregated client's own model (w + t_k)."""

    base: State
    merged: State
    clients: list[ClientModel]


@dataclass
class RoundRecord:
    """Everything known about one round; ``values`` holds the metrics by column name."""

    position: RoundPosition
    started: float = field(default_factory=time.perf_counter)
    values: dict[str, float] = field(default_factory=dict)
    failure_reasons: list[str] = field(default_factory=list)
    # per aggregated client that said where it trained (a Ray actor): partition-id and
    # the placement keys of strategies/protocol.py, as its reply sent them
    clients: list[dict[str, Any]] = field(default_factory=list)
    # set by the strategy on rounds due for task metrics; the hook that reads it drops it
    task_models: TaskModels | None = None

    @property
    def round(self) -> int:
        return self.position.round

    @property
    def phase(self) -> str:
        return self.position.phase

    def add(self, metrics: dict[str, float]) -> None:
        """Record metrics (a later value of the same name replaces the earlier one)."""
        self.values.update(metrics)

    def count(self, name: str, amount: float) -> None:
        """Add ``amount`` to a running total such as bytes or failures."""
        self.values[name] = self.values.get(name, 0.0) + float(amount)

    def get(self, name: str, default: float | None = None) -> float | None:
        return self.values.get(name, default)

    def row(self) -> dict[str, float | str]:
        """The flat row: round, phase, the metrics, and (if any client failed) why.

        ``failure-reasons`` appears only in rounds with failures, so runs without any
        write the same columns as before.
        """
        row = {"round": self.round, "phase": self.phase} | dict(self.values)
        if self.failure_reasons:
            row[FAILURE_REASONS] = REASON_SEPARATOR.join(self.failure_reasons)
        return row
