"""End to end: ``flwr run .`` with the quick preset on a local simulation SuperLink (Ray)."""

from __future__ import annotations

import json
import tomllib

import pandas as pd
import pytest
import torch

from flower_app.local_superlink import LocalSuperLink
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


@pytest.fixture
def superlink(tmp_path):
    link = LocalSuperLink.start(tmp_path / "flwr-home")
    try:
        yield link
    finally:
        link.stop()


def _run(link: LocalSuperLink, tmp_path, overrides: dict, supernodes: int) -> dict:
    with open(ROOT / "configs" / "quick.toml", "rb") as f:
        config = tomllib.load(f) | overrides
    path = tmp_path / "run-config.toml"
    path.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in config.items()) + "\n")
    run_id = link.submit(ROOT, path, f"num-supernodes={supernodes}")
    return link.wait_for_run(run_id, ROOT, timeout=480)


def test_quick_preset_completes_and_learns(superlink, tmp_path):
    results = tmp_path / "results"
    run = _run(superlink, tmp_path, {"output-dir": str(results), "run-name": "quick"}, 10)
    assert run["status"] == "finished:completed", run
    summary = json.loads((results / "quick" / "summary.json").read_text())
    assert summary["final-val-accuracy"] >= 0.05  # 5x chance on 100 classes
    metrics = pd.read_csv(results / "quick" / "metrics.csv")
    assert metrics["round"].max() == 8


@pytest.mark.parametrize(
    ("overrides", "supernodes", "message"),
    [
        ({}, 3, '--federation-config "num-supernodes=10"'),
        ({"fraction-train": 1.5}, 10, "run-config key 'fraction-train' = 1.5 is not allowed"),
    ],
    ids=["federation-mismatch", "invalid-value"],
)
def test_bad_runs_are_marked_failed_with_their_one_line_error(
    superlink, tmp_path, overrides, supernodes, message
):
    results = tmp_path / "results"
    config = {"output-dir": str(results), "run-name": "bad"} | overrides
    run = _run(superlink, tmp_path, config, supernodes)
    assert run["status"] == "finished:failed", run
    assert not (results / "bad").exists()
    assert message in superlink.run_log(int(run["run-id"]), ROOT)


def test_sparse_run_through_ray_keeps_masked_entries(superlink, tmp_path):
    """Masks live in each node's context.state across Ray worker processes."""
    from safetensors.torch import load_file

    from flower_app.config import RunConfig
    from flower_app.model import create_initial_model
    from tests.conftest import quick_run_config

    results = tmp_path / "results"
    overrides = {
        "output-dir": str(results),
        "run-name": "sparse",
        "strategy": "sparse-fedavg",
        "num-server-rounds": 3,
        "calibration-rounds": 2,
        "fisher-samples": 32,
    }
    run = _run(superlink, tmp_path, overrides, 10)
    assert run["status"] == "finished:completed", run
    mask = {k: v.bool() for k, v in load_file(results / "sparse" / "mask.safetensors").items()}
    final = load_file(results / "sparse" / "final_model.safetensors")
    cfg = RunConfig.from_run_config(quick_run_config())
    initial = create_initial_model(cfg.model, 100, cfg.image_size, "random", "", cfg.seed)
    initial = initial.state_dict()
    for name, m in mask.items():
        assert torch.equal(final[name][~m], initial[name][~m]), name
    assert any(not torch.equal(final[n][m], initial[n][m]) for n, m in mask.items())
