"""Data, weights and output folder are checked together, quickly, before any work."""

from __future__ import annotations

import pytest
import timm

from flower_app import client_app, server_app
from flower_app.config import RunConfig
from flower_app.data.sources import load_cifar100
from flower_app.models import factory
from flower_app.runs import prerequisites
from flower_app.runs.prerequisites import (
    PrerequisiteError,
    check_prerequisites,
    data_problem,
    output_problem,
    weights_problem,
)
from tests.conftest import InProcessGrid, quick_run_config, server_context


def _cfg(tmp_path, **overrides) -> RunConfig:
    return RunConfig.from_run_config(
        quick_run_config(output_dir=str(tmp_path / "out"), **overrides)
    )


def test_missing_cifar_offline_names_the_folder_and_the_host(tmp_path):
    cfg = _cfg(tmp_path, dataset="cifar100", data_dir=str(tmp_path / "data"), download=True)
    problem = data_problem(cfg, online=lambda url: False)
    assert f"no CIFAR-100 in {tmp_path / 'data'}" in problem
    assert "www.cs.toronto.edu is unreachable" in problem and "download=true" not in problem
    assert data_problem(cfg, online=lambda url: True) == ""
    assert data_problem(_cfg(tmp_path), online=lambda url: False) == ""  # synthetic


def test_hub_weights_missing_offline_is_reported_and_cached_weights_are_enough(tmp_path):
    cfg = _cfg(tmp_path, model="vit_small_patch16_224.dino", image_size=224, weights="pretrained")
    problem = weights_problem(cfg, cached=lambda name: False, offline=lambda: True)
    assert "not in the Hugging Face cache" in problem and "pretrained-path" in problem
    assert weights_problem(cfg, cached=lambda name: True, offline=lambda: True) == ""
    assert weights_problem(cfg, cached=lambda name: False, offline=lambda: False) == ""
    assert weights_problem(_cfg(tmp_path), cached=lambda n: False, offline=lambda: True) == ""


def test_output_problem_creates_nothing(tmp_path):
    assert output_problem(str(tmp_path / "a" / "b")) == ""
    assert not (tmp_path / "a").exists()
    (tmp_path / "file").write_text("")
    problem = output_problem(str(tmp_path / "file" / "runs"))
    assert problem.startswith("run-config key 'output-dir'") and "is not a folder" in problem
    assert "cannot write to /proc/forbidden" in output_problem("/proc/forbidden")


def test_every_missing_piece_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(prerequisites, "reachable", lambda url, timeout=3.0: False)
    monkeypatch.setattr(factory, "reachable", lambda url, timeout=3.0: False)
    monkeypatch.setattr(factory, "hub_weights_cached", lambda name: False)
    cfg = RunConfig.from_run_config(
        quick_run_config(
            output_dir="/proc/forbidden",
            dataset="cifar100",
            data_dir=str(tmp_path / "data"),
            model="vit_small_patch16_224.dino",
            image_size=224,
            weights="pretrained",
        )
    )
    with pytest.raises(PrerequisiteError) as info:
        check_prerequisites(cfg)
    message = str(info.value)
    assert "\n" not in message and message.count("; ") >= 2
    assert "'output-dir'" in message and "CIFAR-100" in message and "Hugging Face" in message


def test_offline_hub_download_fails_at_once_without_trying(monkeypatch):
    monkeypatch.setattr(factory, "reachable", lambda url, timeout=3.0: False)
    monkeypatch.setattr(factory, "hub_weights_cached", lambda name: False)

    def never(*args, **kwargs):
        raise AssertionError("timm must not try the hub when it is unreachable")

    monkeypatch.setattr(timm, "create_model", never)
    with pytest.raises(factory.WeightsNotFoundError, match=r"huggingface\.co is unreachable"):
        factory.create_initial_model("vit_small_patch16_224.dino", 100, 224, "pretrained", "", 0)


def test_failed_download_does_not_suggest_download_true(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    with pytest.raises(Exception, match="or run where that URL is reachable") as info:
        load_cifar100(tmp_path, download=True)
    assert "set download=true" not in str(info.value)


def test_server_checks_prerequisites_before_waiting_for_nodes(tmp_path, monkeypatch):
    monkeypatch.setattr(prerequisites, "reachable", lambda url, timeout=3.0: False)
    config = quick_run_config(
        output_dir=str(tmp_path), dataset="cifar100", data_dir=str(tmp_path / "data")
    )
    grid = InProcessGrid(client_app.app, config, num_nodes=10)
    context = server_context(config)
    with pytest.raises(PrerequisiteError, match=r"www\.cs\.toronto\.edu is unreachable"):
        server_app.main(grid, context)
    assert grid.sent == [] and not any(tmp_path.iterdir())
