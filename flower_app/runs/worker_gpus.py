"""The GPUs a ClientApp worker was given by Ray and the ones it sees: the rule ``device=auto``
follows, and the placement each training reply reports.

In a simulation every ClientApp worker is a Ray actor. Ray gives it GPU ids (its share of
``client-resources-num-gpus``) and sets ``CUDA_VISIBLE_DEVICES`` to them, but Ray only
counts GPUs: a node may declare GPUs it does not have (``ray start --num-gpus``) or torch
may be a CPU build. A worker given a GPU that CUDA does not show stops with one line rather
than training on the CPU in silence.
"""

from __future__ import annotations

import os
import sys

import torch

from strategies import protocol

VISIBLE_DEVICES_ENV = "CUDA_VISIBLE_DEVICES"
NOT_AN_INDEX = -1  # a device entry that is no integer (a GPU UUID such as "GPU-5d3c...")


class GpuMismatchError(RuntimeError):
    """Ray gave this worker GPUs that CUDA does not show it; the message is one line."""


def ray_actor_gpus() -> list | None:
    """The GPUs Ray gave this process's actor (a simulated ClientApp's worker), or None
    outside a Ray actor (a deployment's SuperNode, the ServerApp, the baseline)."""
    ray = sys.modules.get("ray")  # a Ray worker has imported it; nothing else needs it
    try:
        if ray is None or not ray.is_initialized():
            return None
        if ray.get_runtime_context().get_actor_id() is None:
            return None
    except AttributeError:
        # Ray half imported: a simulation's ServerApp thread can look while the engine's
        # thread is still importing Ray (seen in tests/e2e/test_ray_gpus.py); an actor
        # runs a ClientApp only once Ray is imported, so this process is no actor
        return None
    return list(ray.get_gpu_ids())


def device_indices(entries: list) -> list[int]:
    """GPU ids as integers (Ray gives ints, or the entries of a CUDA_VISIBLE_DEVICES set
    before it started, as strings); an entry that is no integer becomes ``NOT_AN_INDEX``."""
    out = []
    for entry in entries:
        text = str(entry).strip()
        out.append(int(text) if text.isdigit() else NOT_AN_INDEX)
    return out


def visible_devices() -> list[int] | None:
    """``CUDA_VISIBLE_DEVICES`` as indices (``[]`` when set empty), None when unset."""
    value = os.environ.get(VISIBLE_DEVICES_ENV)
    if value is None:
        return None
    return device_indices([entry for entry in value.split(",") if entry.strip()])


def gpu_mismatch(given: list) -> str:
    """The one line a worker stops with when Ray gave it ``given`` but CUDA shows none."""
    shown = os.environ.get(VISIBLE_DEVICES_ENV)
    build = torch.version.cuda or "none"
    return (
        f"run-config key 'device' = 'auto' but Ray gave this ClientApp worker GPU ids "
        f"{[str(g) for g in given]} (CUDA_VISIBLE_DEVICES={shown!r}) and torch sees "
        f"{torch.cuda.device_count()} CUDA devices (torch {torch.__version__}, CUDA build: "
        f"{build}): declare to Ray only GPUs the machine has (ray start --num-gpus), install "
        "a CUDA build of torch, or train on the CPU with client-resources-num-gpus=0 or "
        "device=cpu"
    )


def auto_device() -> torch.device:
    """``device=auto``: the GPU when this process sees one, except in a Ray actor that Ray
    gave no GPU (client-resources-num-gpus=0; Ray's own hiding of the GPU from such actors
    is going away, its RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO warning). An actor given a GPU
    that CUDA does not show raises ``GpuMismatchError``."""
    given = ray_actor_gpus()
    if given == []:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if given:
        raise GpuMismatchError(gpu_mismatch(given))
    return torch.device("cpu")


def worker_placement() -> dict[str, int | list[int]]:
    """Where this worker runs, for its training replies: its PID, Ray's GPU ids,
    ``CUDA_VISIBLE_DEVICES`` (left out when unset) and torch's CUDA device count.
    Empty outside a Ray actor: only a simulation's workers are placed by Ray."""
    given = ray_actor_gpus()
    if given is None:
        return {}
    placement: dict[str, int | list[int]] = {
        protocol.WORKER_PID: os.getpid(),
        protocol.RAY_GPU_IDS: device_indices(given),
        protocol.CUDA_DEVICE_COUNT: torch.cuda.device_count(),
    }
    visible = visible_devices()
    if visible is not None:
        placement[protocol.CUDA_VISIBLE_DEVICES] = visible
    return placement
