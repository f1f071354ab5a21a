"""The centralized baseline: schedule, config errors, and a quick run that learns."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
import tomllib

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from flower_app.centralized import lr_at_step, main
from flower_app.config import ConfigError, RunConfig
from flower_app.model import create_initial_model
from flower_app.results import METRIC_COLUMNS
from tests.conftest import ROOT

QUICK = ROOT / "configs" / "centralized_quick.toml"
RUN_FILES = {
    "config.json",
    "metrics.csv",
    "metrics.png",
    "summary.json",
    "final_model.safetensors",
    "best_model.safetensors",
    "task_vector.safetensors",
}
SUMMARY_KEYS = {  # flower_app/server_app.py's summary, plus "mode"
    "run-name",
    "status",
    "rounds",
    "final-val-accuracy",
    "best-val-accuracy",
    "best-val-round",
    "final-test-accuracy",
    "final-test-loss",
    "best-model-test-accuracy",
    "best-model-test-loss",
    "bytes-down",
    "bytes-up",
    "wall-time-s",
    "mode",
}


# ---- schedule ------------------------------------------------------------------------------
def test_warmup_is_linear_then_cosine_to_min_lr():
    total, warm, lr = 100, 10, 0.1
    assert lr_at_step(0, total, warm, lr, 0.0) == pytest.approx(0.01)
    assert lr_at_step(4, total, warm, lr, 0.0) == pytest.approx(0.05)
    assert lr_at_step(9, total, warm, lr, 0.0) == pytest.approx(0.1)
    assert lr_at_step(10, total, warm, lr, 0.0) == pytest.approx(0.1)  # cosine starts at lr
    assert lr_at_step(55, total, warm, lr, 0.0) == pytest.approx(0.05)  # half way: (lr+min)/2
    assert lr_at_step(100, total, warm, lr, 0.0) == pytest.approx(0.0, abs=1e-15)
    assert lr_at_step(55, total, warm, lr, 0.01) == pytest.approx(0.055)
    assert lr_at_step(100, total, warm, lr, 0.01) == pytest.approx(0.01)


def test_cosine_without_warmup_hand_computed():
    # step 25 of 100: 0.05 * (1 + cos(pi / 4))
    assert lr_at_step(0, 100, 0, 0.1, 0.0) == pytest.approx(0.1)
    assert lr_at_step(25, 100, 0, 0.1, 0.0) == pytest.approx(0.0853553390593)
    assert lr_at_step(75, 100, 0, 0.1, 0.0) == pytest.approx(0.0146446609407)
    lrs = [lr_at_step(s, 100, 0, 0.1, 0.001) for s in range(101)]
    assert all(a > b for a, b in itertools.pairwise(lrs))
    assert lrs[-1] == pytest.approx(0.001) and min(lrs[:-1]) > 0.001


def test_constant_schedule_and_bad_steps():
    assert {lr_at_step(s, 50, 5, 0.2, 0.0, "constant") for s in range(5, 51)} == {0.2}
    assert lr_at_step(1, 50, 5, 0.2, 0.0, "constant") == pytest.approx(0.08)
    with pytest.raises(ValueError):
        lr_at_step(101, 100, 0, 0.1, 0.0)
    with pytest.raises(ValueError):
        lr_at_step(0, 100, 100, 0.1, 0.0)


# ---- config --------------------------------------------------------------------------------
def test_epoch_keys_are_validated():
    RunConfig.from_run_config({"epochs": 3, "warmup-epochs": 2})
    with pytest.raises(ConfigError, match=r"'epochs' = 0 is not allowed: must be an integer >= 1"):
        RunConfig.from_run_config({"epochs": 0, "warmup-epochs": 0})
    with pytest.raises(ConfigError, match=r"'warmup-epochs' = -1 is not allowed"):
        RunConfig.from_run_config({"warmup-epochs": -1})
    with pytest.raises(ConfigError, match=r"must be smaller than epochs \(3\)"):
        RunConfig.from_run_config({"epochs": 3, "warmup-epochs": 3})


def test_console_script_is_declared():
    with open(ROOT / "pyproject.toml", "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts["fl-centralized"] == "flower_app.centralized:main"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("epochs=0", "run-config key 'epochs' = 0 is not allowed: must be an integer >= 1"),
        ("warmup-epochs=5", "'warmup-epochs' = 5 is not allowed: must be smaller than epochs"),
        ("lr=fast", "run-config key 'lr' = 'fast' is not allowed: must be a number"),
        ("local_steps=3", "run-config key 'local_steps' is unknown"),
        ("resume=true", "'resume' = True is not allowed: the centralized baseline"),
    ],
)
def test_bad_config_exits_2_with_one_line_and_no_run_dir(tmp_path, capsys, override, expected):
    out = tmp_path / "out"
    rc = main(["--run-config", str(QUICK), f"output-dir={out}", "run-name=bad", override])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err
    assert not (out / "bad").exists()


def test_module_exits_2_on_bad_value(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "flower_app.centralized", f"output-dir={tmp_path}", "epochs=-1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        "error: run-config key 'epochs' = -1 is not allowed: must be an integer >= 1"
    )
    assert list(tmp_path.iterdir()) == []


# ---- the quick run -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The quick preset, run once (about 20 s on 2 idle cores)."""
    out = tmp_path_factory.mktemp("centralized")
    rc = main(["--run-config", str(QUICK), f"output-dir={out}", "run-name=quick"])
    assert rc == 0
    return out


def test_quick_run_learns_and_writes_the_run_directory(quick_run):
    run_dir = quick_run / "quick"
    assert {p.name for p in run_dir.iterdir()} >= RUN_FILES
    with open(QUICK, "rb") as f:
        preset = tomllib.load(f)
    epochs = preset["epochs"]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary) == SUMMARY_KEYS
    assert summary["status"] == "completed" and summary["mode"] == "centralized"
    assert summary["rounds"] == epochs and summary["run-name"] == "quick"
    assert summary["bytes-down"] == 0 and summary["bytes-up"] == 0
    chance = 1 / 100
    assert summary["final-test-accuracy"] >= 5 * chance, summary
    assert summary["final-val-accuracy"] >= 5 * chance, summary
    assert summary["best-model-test-accuracy"] >= 5 * chance, summary
    assert 1 <= summary["best-val-round"] <= epochs

    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert list(metrics.columns[: len(METRIC_COLUMNS)]) == METRIC_COLUMNS
    assert list(metrics["round"]) == list(range(1, epochs + 1))
    assert (metrics["bytes-down"] == 0).all() and (metrics["bytes-up"] == 0).all()
    assert metrics["val-accuracy"].notna().all() and metrics["train-loss"].notna().all()
    assert metrics["train-loss"].iloc[-1] < metrics["train-loss"].iloc[0]
    assert metrics["lr"].iloc[0] > metrics["lr"].iloc[-1]
    assert summary["best-val-accuracy"] == pytest.approx(metrics["val-accuracy"].max())

    config = json.loads((run_dir / "config.json").read_text())
    assert config["mode"] == "centralized" and config["run-name"] == "quick"
    assert config["epochs"] == epochs and config["dataset"] == "synthetic"


def test_quick_run_starts_from_the_federated_initial_weights(quick_run):
    cfg = RunConfig.from_run_config(tomllib.loads(QUICK.read_text()))
    initial = create_initial_model(
        cfg.model, cfg.num_classes, cfg.image_size, cfg.weights, cfg.pretrained_path, cfg.seed
    ).state_dict()
    final = load_file(str(quick_run / "quick" / "final_model.safetensors"))
    vector = load_file(str(quick_run / "quick" / "task_vector.safetensors"))
    assert set(vector) == {k for k, v in initial.items() if v.is_floating_point()}
    for key, delta in vector.items():
        torch.testing.assert_close(final[key] - delta, initial[key], atol=1e-6, rtol=0)
    assert math.isfinite(sum(float(v.abs().sum()) for v in vector.values()))


def test_existing_run_name_is_refused(quick_run, capsys):
    before = (quick_run / "quick" / "summary.json").read_bytes()
    rc = main(["--run-config", str(QUICK), f"output-dir={quick_run}", "run-name=quick"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "'run-name' = 'quick' is not allowed" in err and "exists already" in err
    assert err.count("\n") == 1
    assert (quick_run / "quick" / "summary.json").read_bytes() == before
