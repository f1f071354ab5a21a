"""Checkpoints: everything a run needs to continue exactly, written atomically.

A checkpoint holds the global weights, the initial weights (for the task vector) and the
state of every stateful component of the run (the round clock, the strategy, the tables,
the best model, the stopwatch), each saved by the component itself
(``state_dict``) and loaded by it (``load_state_dict``): the checkpoint only collects
them. Client sampling and client batches are seeded from (seed, purpose, round, ...), so
no generator state needs saving. The file is written to a temporary name, fsynced and
renamed, so a crash while writing leaves the previous checkpoint intact.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from flwr.app import ArrayRecord

from flower_app.runs.results import atomic_write_bytes
from strategies.plan import RoundClock
from strategies.record import RoundRecord

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 2  # 2: components' own state dicts, one global round counter


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, corrupt, or from another experiment."""


class Saveable(Protocol):
    """A component that saves and loads its own state."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@dataclass
class Checkpoint:
    """The weights and the components' states after ``completed_rounds`` global rounds."""

    identity: dict[str, Any]
    arrays: dict[str, torch.Tensor]
    initial: dict[str, torch.Tensor]
    components: dict[str, dict[str, Any]]
    format_version: int = FORMAT_VERSION

    @property
    def completed_rounds(self) -> int:
        return int(self.components["clock"]["completed"])


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    buffer = io.BytesIO()
    torch.save(asdict(checkpoint), buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint whole; anything unreadable or incomplete is reported as corrupt."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(raw, dict) or raw.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"not a checkpoint of format {FORMAT_VERSION}")
        checkpoint = Checkpoint(**raw)
        if not checkpoint.arrays or not isinstance(checkpoint.completed_rounds, int):
            raise ValueError("weights or round missing")
    except Exception as exc:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise CheckpointError(
            f"checkpoint {path} is corrupt ({reason}); nothing was loaded from it"
        ) from exc
    return checkpoint


def check_identity(saved: Mapping[str, Any], current: Mapping[str, Any], path: Path) -> None:
    """Refuse a checkpoint written by another experiment, naming every difference."""
    keys = sorted(set(saved) | set(current))
    diffs = [
        f"{k}={saved.get(k)!r} in the checkpoint, {current.get(k)!r} now"
        for k in keys
        if saved.get(k) != current.get(k)
    ]
    if diffs:
        raise CheckpointError(f"checkpoint {path} is from a different config: {'; '.join(diffs)}")


def restore(checkpoint: Checkpoint, components: Mapping[str, Saveable], path: Path) -> None:
    """Load every component's state from the checkpoint; a missing one is refused."""
    missing = sorted(set(components) - set(checkpoint.components))
    if missing:
        raise CheckpointError(f"checkpoint {path} holds no state for {', '.join(missing)}")
    for name, component in components.items():
        component.load_state_dict(checkpoint.components[name])


class Checkpointer:
    """Round hook: a checkpoint every ``every`` rounds and after the last one."""

    def __init__(
        self,
        path: Path,
        every: int,
        identity: dict[str, Any],
        initial: dict[str, torch.Tensor],
        clock: RoundClock,
        components: Mapping[str, Saveable],
    ) -> None:
        self.path = path
        self.every = every
        self.identity = identity
        self.initial = initial
        self.clock = clock
        self.components = dict(components)

    def due(self, record: RoundRecord) -> bool:
        return record.round > 0 and (record.round % self.every == 0 or self.clock.finished)

    def collect(self, arrays: ArrayRecord) -> Checkpoint:
        return Checkpoint(
            identity=self.identity,
            arrays=dict(arrays.to_torch_state_dict()),
            initial=self.initial,
            components={name: c.state_dict() for name, c in self.components.items()},
        )

    def __call__(self, record: RoundRecord, arrays: ArrayRecord) -> None:
        if self.due(record):
            save_checkpoint(self.path, self.collect(arrays))
