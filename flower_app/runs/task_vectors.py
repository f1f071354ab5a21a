"""Use a run's task vector: load it, rebuild the run's initial weights, add it back scaled.

A run saves ``task_vector.safetensors`` = final minus initial weights (floating tensors
only). Task arithmetic edits a model by adding a task vector times a coefficient:
``apply_task_vector(initial, tau, 1.0)`` gives the run's final weights back (within
float32 rounding), 0.5 goes half way, -1.0 negates the task. Example::

    from flower_app.runs.task_vectors import apply_task_vector, initial_weights, load_task_vector
    tau = load_task_vector("results/my-run")
    edited = apply_task_vector(initial_weights("results/my-run"), tau, coefficient=0.5)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

from flower_app.config import RunConfig
from flower_app.runs.runtime import initial_model

TASK_VECTOR_FILE = "task_vector.safetensors"
NOT_RUN_CONFIG = ("run-name", "mode")  # config.json keys that the run added to its run-config


def load_task_vector(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """The task vector a run saved (name -> float32 tensor), read from its run directory."""
    path = Path(run_dir) / TASK_VECTOR_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {TASK_VECTOR_FILE} in {Path(run_dir)}: has the run finished?")
    return load_file(str(path))


def saved_run_config(run_dir: str | Path) -> RunConfig:
    """The run-config a run saved in its ``config.json``."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {Path(run_dir)}: is it a run directory?")
    config = json.loads(path.read_text())
    for key in NOT_RUN_CONFIG:
        config.pop(key, None)
    return RunConfig.from_run_config(config)


def initial_weights(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """The run's round-0 weights, rebuilt from its ``config.json`` (same factory and seed).

    Pretrained weights are loaded as the run loaded them (``weights``, ``pretrained-path``).
    """
    return initial_model(saved_run_config(run_dir)).state_dict()


def apply_task_vector(
    initial: Mapping[str, torch.Tensor],
    task_vector: Mapping[str, torch.Tensor],
    coefficient: float = 1.0,
) -> dict[str, torch.Tensor]:
    """``initial + coefficient * task_vector``, with the keys and dtypes of ``initial``.

    Integer tensors (buffers, which a task vector never holds) are kept as they are. A
    vector tensor that ``initial`` lacks, a floating tensor the vector lacks, or another
    shape is an error naming the tensor: a vector is never applied to the wrong model.
    """
    unknown = sorted(set(task_vector) - set(initial))
    if unknown:
        raise ValueError(f"task vector tensor {unknown[0]!r} is not in the initial weights")
    out = {}
    for name, weight in initial.items():
        if name not in task_vector:
            if weight.is_floating_point():
                raise ValueError(f"initial tensor {name!r} is not in the task vector")
            out[name] = weight.clone()
            continue
        delta = task_vector[name]
        if delta.shape != weight.shape:
            raise ValueError(
                f"task vector tensor {name!r} has shape {tuple(delta.shape)}, "
                f"the initial weights {tuple(weight.shape)}"
            )
        out[name] = (weight.float() + coefficient * delta.float()).to(weight.dtype)
    return out
