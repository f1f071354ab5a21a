"""``device = "auto"``: the GPU where this process may use one, asked of Ray in its actors;
a worker given a GPU that CUDA does not show stops; where a worker trained, as it reports it."""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch

from flower_app.cli.local_superlink import RAY_ENV, _superlink_env
from flower_app.cli.run import child_env
from flower_app.runs.runtime import resolve_device
from flower_app.runs.worker_gpus import GpuMismatchError, worker_placement
from strategies import protocol


def _fake_ray(actor_id: str | None, gpus: list[int]) -> types.ModuleType:
    ray = types.ModuleType("ray")
    ray.is_initialized = lambda: True
    context = types.SimpleNamespace(get_actor_id=lambda: actor_id)
    ray.get_runtime_context = lambda: context
    ray.get_gpu_ids = lambda: gpus
    return ray


@pytest.mark.parametrize(
    ("ray", "expected"),
    [
        (None, "cuda"),  # no Ray: a SuperNode of a deployment, the baseline
        (_fake_ray(None, []), "cuda"),  # Ray's driver: the ServerApp of a simulation
        (_fake_ray("actor", [0]), "cuda"),  # a ClientApp worker given a GPU share
        (_fake_ray("actor", []), "cpu"),  # a worker given none, though it sees the GPU
    ],
    ids=["no-ray", "driver", "actor-with-gpu", "actor-without-gpu"],
)
def test_auto_device_follows_what_ray_gave_the_actor(monkeypatch, ray, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    if ray is None:
        monkeypatch.delitem(sys.modules, "ray", raising=False)
    else:
        monkeypatch.setitem(sys.modules, "ray", ray)
    assert resolve_device("auto").type == expected


def test_a_ray_still_being_imported_is_no_actor(monkeypatch):
    """The simulation process: its ServerApp thread asks while the engine's thread is still
    importing Ray, whose module then lacks most of its names."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "ray", types.ModuleType("ray"))
    assert resolve_device("auto").type == "cpu"
    assert worker_placement() == {}


def test_no_gpu_means_cpu_and_an_explicit_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(RuntimeError, match="'device' = 'cuda' but this process sees no GPU"):
        resolve_device("cuda")


def test_superlinks_the_app_starts_choose_rays_coming_default_unless_the_user_did(
    monkeypatch, tmp_path
):
    monkeypatch.delenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", raising=False)
    assert RAY_ENV == {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    assert child_env()["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] == "0"
    assert _superlink_env(tmp_path, 1, tmp_path)["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] == "0"
    monkeypatch.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "1")
    assert child_env()["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] == "1"
    assert _superlink_env(tmp_path, 1, tmp_path)["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] == "1"


@pytest.mark.parametrize(("given", "visible"), [([0], "0"), (["1"], "1"), ([1], None)])
def test_a_worker_given_a_gpu_that_cuda_does_not_show_stops_with_one_line(
    monkeypatch, given, visible
):
    """A Ray node that declares GPUs it lacks (or a CPU build of torch): never the CPU in
    silence with device=auto; device=cpu is the user's explicit choice."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setitem(sys.modules, "ray", _fake_ray("actor", given))
    with pytest.raises(GpuMismatchError) as caught:
        resolve_device("auto")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        f"run-config key 'device' = 'auto' but Ray gave this ClientApp worker GPU ids "
        f"{[str(g) for g in given]} (CUDA_VISIBLE_DEVICES={visible!r}) and torch sees 0 CUDA "
        "devices (torch "
    )
    assert message.endswith("or train on the CPU with client-resources-num-gpus=0 or device=cpu")
    assert resolve_device("cpu").type == "cpu"
    monkeypatch.setitem(sys.modules, "ray", _fake_ray("actor", []))  # given none: the CPU
    assert resolve_device("auto").type == "cpu"


@pytest.mark.parametrize(
    ("given", "visible", "reported"),
    [
        ([1], "1", {protocol.RAY_GPU_IDS: [1], protocol.CUDA_VISIBLE_DEVICES: [1]}),
        (
            ["GPU-5d3c"],
            "GPU-5d3c",
            {protocol.RAY_GPU_IDS: [-1], protocol.CUDA_VISIBLE_DEVICES: [-1]},
        ),
        ([], "", {protocol.RAY_GPU_IDS: [], protocol.CUDA_VISIBLE_DEVICES: []}),
        ([], None, {protocol.RAY_GPU_IDS: []}),  # unset: left out
        (["0", "2"], "0, 2", {protocol.RAY_GPU_IDS: [0, 2], protocol.CUDA_VISIBLE_DEVICES: [0, 2]}),
    ],
    ids=["one-gpu", "uuid", "hidden", "unset", "two-gpus"],
)
def test_a_worker_reports_its_pid_rays_gpu_ids_and_cuda_visible_devices(
    monkeypatch, given, visible, reported
):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setitem(sys.modules, "ray", _fake_ray("actor", given))
    expected = {protocol.WORKER_PID: os.getpid(), protocol.CUDA_DEVICE_COUNT: 3} | reported
    assert worker_placement() == expected
    monkeypatch.setitem(sys.modules, "ray", _fake_ray(None, given))  # the driver: no report
    assert worker_placement() == {}
    monkeypatch.delitem(sys.modules, "ray")  # no Ray (deployment, in-process engine)
    assert worker_placement() == {}
