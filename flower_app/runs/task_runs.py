"""Finished runs as tasks of task arithmetic: their vector, initial weights, head and data.

A run directory holds ``config.json`` and ``task_vector.safetensors``; from them this module
rebuilds the run's initial model (same factory and seed) and its splits (restricted to its
``task-classes``), and scores a state dict on them. Vectors are combined only when they
come from the same model and base weights, with the same mask rule and the same backbone
tensors; anything else is a one-line ``TaskVectorMismatch``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from flower_app.config import SOURCE_KEYS, RunConfig
from flower_app.runs.runtime import ModelEvaluator, initial_model, resolve_device, run_splits
from flower_app.runs.strategy_registry import STRATEGIES
from flower_app.runs.task_arithmetic import State, Task, is_head
from flower_app.runs.task_vectors import load_task_vector, saved_run_config

# run-config keys that must agree, by what they decide
SAME_MODEL = ("model", "image-size")
SAME_BASE = ("weights", "pretrained-path", "dataset")
SAME_MASK = ("strategy", "mask-strategy", "sparsity", "mask-scope")


class TaskVectorMismatch(ValueError):
    """Task vectors that cannot be combined; the message is one line."""


@dataclass(frozen=True)
class TaskRun:
    """A finished run, ready for arithmetic."""

    run_dir: Path
    config: RunConfig
    task: Task


def load_task_run(run_dir: str | Path, device: str = "cpu") -> TaskRun:
    """The run's task: initial weights, task vector, and accuracy on its own val/test split."""
    run_dir = Path(run_dir)
    config = saved_run_config(run_dir)
    vector = load_task_vector(run_dir)
    model = initial_model(config)
    initial = {n: t.detach().clone() for n, t in model.state_dict().items()}
    evaluator = ModelEvaluator(model, config, resolve_device(device))
    splits = run_splits(config)

    def score(state: State, split: str) -> float:
        return evaluator(state, getattr(splits, split))[1]

    task = Task(run_dir.name, initial, vector, score)
    key = _pretrained_key(config, task)
    for split in ("val", "test"):
        if (key, split) in _PRETRAINED:
            task.remember("pretrained", split, _PRETRAINED[key, split])
    return TaskRun(run_dir, config, task)


# Accuracy of w0 with a given head on a task's split, shared between runs: in the study
# every arm of one seed and task warms up the same head, so its pretrained model is one
_PRETRAINED: dict[tuple[str, str], float] = {}
# what the data set's entry reads (an image folder's data-dir is its images; the synthetic
# sizes decide the splits; download changes no image), then the split and the task
_DATA_KEYS = (
    *(key for key in SOURCE_KEYS if key != "download"),
    "seed",
    "val-fraction",
    "task-classes",
)
_MODEL_KEYS = ("model", "image-size", "weights", "pretrained-path", "eval-batch-size")


def _pretrained_key(config: RunConfig, task: Task) -> str:
    """The identity of (w0 with this head, this task's data): the keys that decide them and
    a digest of the head's bytes."""
    values = config.to_dict()
    digest = hashlib.sha256(repr([values[k] for k in (*_DATA_KEYS, *_MODEL_KEYS)]).encode())
    for name, tensor in sorted(task.own_head().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def remember_pretrained(runs: Sequence[TaskRun]) -> None:
    """Keep the runs' pretrained accuracies for later runs with the same head and data."""
    for run in runs:
        key = _pretrained_key(run.config, run.task)
        for split in ("val", "test"):
            value = run.task.known("pretrained", split)
            if value is not None:
                _PRETRAINED[key, split] = value


def _mask_rule(cfg: dict) -> dict:
    """What decides a run's mask: nothing for dense FedAvg."""
    if not STRATEGIES[cfg["strategy"]].masked:
        return {"strategy": cfg["strategy"]}
    return {key: cfg[key] for key in SAME_MASK}


def check_compatible(runs: Sequence[TaskRun]) -> None:
    """Same model, base weights, mask rule and backbone tensors, else one line naming both
    runs and what differs."""
    first = runs[0]
    a = first.config.to_dict()
    for other in runs[1:]:
        b = other.config.to_dict()
        for what, keys in (("models", SAME_MODEL), ("base weights", SAME_BASE)):
            for key in keys:
                if a[key] != b[key]:
                    raise _mismatch(what, first, other, f"{key}={a[key]!r} against {b[key]!r}")
        if _mask_rule(a) != _mask_rule(b):
            raise _mismatch("masks", first, other, f"{_mask_rule(a)} against {_mask_rule(b)}")
        _check_backbones(first, other)


def _check_backbones(first: TaskRun, other: TaskRun) -> None:
    """Same backbone tensors, shapes and initial values (w0 must be one point)."""
    ours = {n: v for n, v in first.task.vector.items() if not is_head(n)}
    theirs = {n: v for n, v in other.task.vector.items() if not is_head(n)}
    if set(ours) != set(theirs):
        name = sorted(set(ours) ^ set(theirs))[0]
        raise _mismatch("shapes", first, other, f"tensor {name!r} is in one vector only")
    for name, delta in ours.items():
        if delta.shape != theirs[name].shape:
            shapes = f"{tuple(delta.shape)} against {tuple(theirs[name].shape)}"
            raise _mismatch("shapes", first, other, f"tensor {name!r} has shape {shapes}")
        if not torch.equal(first.task.initial[name], other.task.initial[name]):
            raise _mismatch("base weights", first, other, f"initial {name!r} differs")


def _mismatch(what: str, first: TaskRun, other: TaskRun, detail: str) -> TaskVectorMismatch:
    return TaskVectorMismatch(
        f"task vectors of different {what}: {first.run_dir} and {other.run_dir} ({detail}); "
        "combine runs of one model, one base, one mask rule"
    )
