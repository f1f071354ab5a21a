"""The clients' local optimizer in whole in-process runs: ``optimizer=adamw`` reaches the
clients, dense and sparse, and a sparse AdamW run leaves every frozen entry's bits alone."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from flower_app.config import RunConfig
from flower_app.models.factory import create_initial_model
from tests.conftest import quick_run_config
from tests.run_in_process import run

# one client per round, one local step, one training round: the first AdamW step moves an
# entry by lr * g / (|g| + eps), i.e. by lr whatever the size of its gradient g (SGD would
# move it by lr * g); without weight decay nothing else moves it
ONE_STEP = {
    "synthetic_train_per_class": 20,
    "synthetic_test_per_class": 10,
    "num_clients": 4,
    "fraction_train": 0.25,
    "num_server_rounds": 1,
    "eval_every": 1,
    "local_steps": 1,
    "optimizer": "adamw",
    "lr": 1e-3,
    "weight_decay": 0.0,
    "adamw_weight_decay": 0.0,
}
SPARSE = {
    "strategy": "sparse-fedavg",
    "calibration_rounds": 2,
    "fisher_samples": 16,
    "head": "train",
    "head_warmup_rounds": 0,
}


def _initial(config: dict) -> dict[str, torch.Tensor]:
    cfg = RunConfig.from_run_config(config)
    model = create_initial_model(cfg.model, cfg.num_classes, cfg.image_size, "random", "", cfg.seed)
    return model.state_dict()


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_one_adamw_step_moves_every_trained_entry_by_the_learning_rate(tmp_path, sparse):
    config = quick_run_config(
        **ONE_STEP, **(SPARSE if sparse else {}), output_dir=str(tmp_path), run_name="adamw"
    )
    run(config)
    run_dir = tmp_path / "adamw"
    assert json.loads((run_dir / "config.json").read_text())["optimizer"] == "adamw"
    metrics = pd.read_csv(run_dir / "metrics.csv")
    lr = float(metrics["lr"].iloc[-1])
    assert lr == 1e-3  # round 1 of 1 trains at the full lr
    initial, final = _initial(config), load_file(run_dir / "final_model.safetensors")
    if sparse:
        mask = {k: v.bool() for k, v in load_file(run_dir / "mask.safetensors").items()}
        for name, m in mask.items():  # frozen: the same bits
            assert torch.equal(
                final[name][~m].view(torch.int32), initial[name][~m].view(torch.int32)
            )
    else:
        mask = {}
    trained = [
        (final[k] - initial[k]).abs()[mask[k]] if k in mask else (final[k] - initial[k]).abs()
        for k in initial
        if k in mask or not sparse or k.startswith("head.")
    ]
    steps = torch.cat([t.reshape(-1) for t in trained])
    assert steps.numel() > 0
    assert steps.max() <= lr * (1 + 1e-3)  # float32 rounding of w + step
    by_lr = ((steps >= lr * (1 - 1e-2)) & (steps <= lr * (1 + 1e-3))).float().mean()
    assert by_lr > 0.9, f"only {float(by_lr):.3f} of the trained entries moved by lr"


def test_sgdm_moves_entries_by_their_gradient_not_by_the_learning_rate(tmp_path):
    """The same run with SGD (the control of the test above): steps of lr * g, mostly far
    below lr, so the assertion above tells the optimizers apart."""
    config = quick_run_config(
        **(ONE_STEP | {"optimizer": "sgdm", "momentum": 0.0}),
        output_dir=str(tmp_path),
        run_name="sgdm",
    )
    run(config)
    initial = _initial(config)
    final = load_file(tmp_path / "sgdm" / "final_model.safetensors")
    steps = torch.cat([(final[k] - initial[k]).abs().reshape(-1) for k in initial])
    assert float(((steps - 1e-3).abs() < 1e-5).float().mean()) < 0.01


def test_the_head_warm_up_trains_with_sgd_momentum_whatever_the_optimizer(tmp_path):
    """An AdamW run and an SGDM run warm the same head up: with head-warmup-lr at the SGDM
    run's lr, their warm-up rounds are bit-identical (loss and validation accuracy), and
    only the sparse training after it differs."""
    warmup = {"head_warmup_rounds": 2, "head": "frozen", "head_warmup_lr": 0.05}
    base = ONE_STEP | SPARSE | warmup | {"weight_decay": 1e-4, "num_server_rounds": 2}
    frames = {}
    for name in ("sgdm", "adamw"):
        config = quick_run_config(
            **(base | {"optimizer": name}), output_dir=str(tmp_path), run_name=name
        )
        run(config)
        frames[name] = pd.read_csv(tmp_path / name / "metrics.csv").set_index("round")
    columns = ["phase", "train-loss", "val-accuracy", "val-loss", "lr"]
    warm = frames["sgdm"]["phase"] == "head-warmup"
    assert warm.sum() == 2 and (frames["sgdm"].loc[warm, "lr"] == 0.05).all()
    pd.testing.assert_frame_equal(
        frames["sgdm"].loc[warm, columns], frames["adamw"].loc[warm, columns]
    )
    trained = frames["sgdm"]["phase"] == "train"
    assert (
        not frames["sgdm"].loc[trained, "val-loss"].equals(frames["adamw"].loc[trained, "val-loss"])
    )
