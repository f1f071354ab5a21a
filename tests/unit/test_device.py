"""``device = "auto"``: the GPU where this process may use one, asked of Ray in its actors."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from flower_app.cli.local_superlink import RAY_ENV, _superlink_env
from flower_app.cli.run import child_env
from flower_app.runs.runtime import resolve_device


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
