"""The centralized baseline: its SGD step, config errors, and a quick run that learns."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tomllib

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from clients.training import sgd_step
from flower_app.centralized.baseline import _prepare, main
from flower_app.config import ConfigError, RunConfig, load_preset
from flower_app.models.factory import create_initial_model
from flower_app.runs.hooks import METRIC_COLUMNS
from flower_app.runs.results import WEIGHTS_CONTENT, WEIGHTS_FORMAT
from flower_app.runs.task_vectors import apply_task_vector, initial_weights, load_task_vector
from tests.conftest import ROOT
from tests.invalid_configs import INVALID
from tests.unit.test_results import SUMMARY_KEYS, file_modes, umask, weights_metadata

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


# ---- the SGD step (shared with clients.training.train_local) -----------------------------
def _model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    return model, optimizer


def test_sgd_step_is_the_old_inline_step_bit_for_bit():
    batches = [(torch.randn(5, 6), torch.randint(0, 3, (5,))) for _ in range(4)]
    model, optimizer = _model_and_optimizer()
    losses = [sgd_step(model, optimizer, x, y, bf16=False) for x, y in batches]
    ref_model, ref_optimizer = _model_and_optimizer()
    ref_losses = []
    for x, y in batches:  # the loop body train_local and train_centralized each had
        loss = F.cross_entropy(ref_model(x), y)
        ref_optimizer.zero_grad(set_to_none=False)
        loss.backward()
        ref_optimizer.step()
        ref_losses.append(loss.detach())
    assert all(not loss.requires_grad for loss in losses)
    assert torch.equal(torch.stack(losses), torch.stack(ref_losses))
    for key, value in model.state_dict().items():
        assert torch.equal(value, ref_model.state_dict()[key]), key


@pytest.mark.parametrize("name", ["sgdm", "adamw"])
def test_the_baseline_trains_with_the_run_configs_optimizer(name):
    """The clients' dense optimizer: SGD momentum, or AdamW as TaLoS's dense fine-tuning."""
    keys = {"optimizer": name, "lr": 1e-4, "adamw-beta-2": 0.99}
    keys |= {"weight-decay" if name == "sgdm" else "adamw-weight-decay": 0.1}
    cfg = RunConfig.from_run_config(load_preset(QUICK) | keys, check_files=False)
    trainer, _ = _prepare(cfg)
    group = trainer.optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (1e-4, 0.1)
    if name == "adamw":
        assert type(trainer.optimizer) is torch.optim.AdamW
        assert (group["betas"], group["eps"]) == ((0.9, 0.99), 1e-8)
    else:
        assert type(trainer.optimizer) is torch.optim.SGD and group["momentum"] == 0.9


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
    assert scripts["fl-centralized"] == "flower_app.centralized.baseline:main"


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


@pytest.mark.parametrize("case", INVALID, ids=str)
def test_every_invalid_run_config_value_exits_2_before_work(tmp_path, capsys, case):
    out = tmp_path / "out"
    rc = main(["--run-config", str(QUICK), f"output-dir={out}", "run-name=bad", *case.as_cli()])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and case.allowed in err and f"'{case.key}'" in err
    assert not (out / "bad").exists()


def test_module_exits_2_on_bad_value(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "flower_app.centralized.baseline",
            f"output-dir={tmp_path}",
            "epochs=-1",
        ],
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
    with umask(0o027):  # not the usual 022, so a file that ignores the umask shows
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
    assert set(summary) == SUMMARY_KEYS | {"mode"}
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


def test_quick_run_files_are_readable_and_describe_their_weights(quick_run):
    run_dir = quick_run / "quick"
    modes = file_modes(run_dir)
    assert set(modes) == RUN_FILES and modes == dict.fromkeys(modes, 0o640)  # 0o666 & ~0o027
    summary = json.loads((run_dir / "summary.json").read_text())
    epochs = summary["rounds"]
    rounds = {"final": epochs, "best": summary["best-val-round"], "task_vector": epochs}
    for name, round_ in rounds.items():
        file = f"{name}_model.safetensors" if name != "task_vector" else f"{name}.safetensors"
        assert weights_metadata(run_dir / file) == {
            "format": WEIGHTS_FORMAT,
            "run-name": "quick",
            "round": str(round_),
            "content": WEIGHTS_CONTENT[file],
            "model": "vit_tiny_test",
        }


def test_task_vector_of_a_centralized_run_gives_its_final_model(quick_run):
    run_dir = quick_run / "quick"  # config.json also holds "mode", which is no run-config key
    rebuilt = apply_task_vector(initial_weights(run_dir), load_task_vector(run_dir))
    final = load_file(str(run_dir / "final_model.safetensors"))
    assert set(rebuilt) == set(final)
    for key, weight in final.items():
        torch.testing.assert_close(rebuilt[key], weight, rtol=1e-6, atol=1e-6, msg=key)


def test_existing_run_name_is_refused(quick_run, capsys):
    before = (quick_run / "quick" / "summary.json").read_bytes()
    rc = main(["--run-config", str(QUICK), f"output-dir={quick_run}", "run-name=quick"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "'run-name' = 'quick' is not allowed" in err and "exists already" in err
    assert err.count("\n") == 1
    assert (quick_run / "quick" / "summary.json").read_bytes() == before
