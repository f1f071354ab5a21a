"""What a quick run leaves for others: readable files, self-describing weights, a task vector
that gives the final model back."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from flower_app.config import RunConfig
from flower_app.data.partitioners import partition_indices
from flower_app.runs.checkpoint import CHECKPOINT_NAME, load_checkpoint
from flower_app.runs.results import WEIGHTS_CONTENT, WEIGHTS_FORMAT, label_counts
from flower_app.runs.runtime import run_splits
from flower_app.runs.task_vectors import apply_task_vector, initial_weights, load_task_vector
from tests.conftest import quick_run_config
from tests.run_in_process import run
from tests.unit.test_results import file_modes, umask, weights_metadata

SMALL = {
    "synthetic_train_per_class": 20,
    "synthetic_test_per_class": 10,
    "num_clients": 4,
    "fraction_train": 0.5,
    "num_server_rounds": 3,
    "eval_every": 1,
    "local_steps": 2,
}
SPARSE = {  # 1 warm-up and 1 calibration round: the global rounds differ from the training's
    "strategy": "sparse-fedavg",
    "head_warmup_rounds": 1,
    "calibration_rounds": 1,
    "fisher_samples": 16,
    "head": "train",
}
UMASK = 0o027  # not the usual 022, so a file that ignores the umask shows


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory) -> dict[str, Path]:
    """A quick dense and a quick sparse run, both under ``UMASK``."""
    out = tmp_path_factory.mktemp("runs")
    with umask(UMASK):
        dense = quick_run_config(**SMALL, output_dir=str(out), run_name="dense")
        run(dense | {"sharding": "dirichlet", "dirichlet-alpha": 0.3})
        run(quick_run_config(**SMALL, **SPARSE, output_dir=str(out), run_name="sparse"))
    return {"dense": out / "dense", "sparse": out / "sparse"}


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_every_run_file_has_the_mode_of_an_ordinary_file(quick_runs, kind):
    modes = file_modes(quick_runs[kind])
    expected = {"summary.json", "metrics.png", "partitions.png", CHECKPOINT_NAME}
    assert expected | {"final_model.safetensors"} <= set(modes)
    assert modes == dict.fromkeys(modes, 0o640)  # 0o666 & ~0o027


def test_the_partition_picture_shows_the_dirichlet_shards_the_nodes_reported(quick_runs):
    run_dir = quick_runs["dense"]
    shards = pd.read_csv(run_dir / "partitions.csv")
    saved = json.loads((run_dir / "config.json").read_text())
    cfg = RunConfig.from_run_config({k: v for k, v in saved.items() if k in set(RunConfig.keys())})
    labels = run_splits(cfg).train.labels.numpy()
    parts = partition_indices(labels, 4, "dirichlet", 1, cfg.seed, **cfg.shard_options)
    expected = np.stack([np.bincount(labels[p], minlength=100) for p in parts])
    assert np.array_equal(label_counts(shards, 100), expected)  # the nodes' own shards
    assert (expected > 0).sum(axis=1).min() < 80  # skewed: at alpha 0.3 some miss many classes
    picture = matplotlib.image.imread(run_dir / "partitions.png")
    assert picture.shape[:2] == (700, 1000)  # 10 x 7 inches at 100 dpi


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_weights_say_what_they_hold(quick_runs, kind):
    run_dir = quick_runs[kind]
    summary = json.loads((run_dir / "summary.json").read_text())
    last = summary["total-rounds"]
    assert last == (3 if kind == "dense" else 1 + 1 + 3)
    expected = {
        "final_model.safetensors": last,
        "best_model.safetensors": summary["best-val-round"],
        "task_vector.safetensors": last,
    } | ({"mask.safetensors": last} if kind == "sparse" else {})
    assert {p.name for p in run_dir.glob("*.safetensors")} == set(expected)
    for name, round_ in expected.items():
        assert weights_metadata(run_dir / name) == {
            "format": WEIGHTS_FORMAT,
            "run-name": kind,
            "round": str(round_),
            "content": WEIGHTS_CONTENT[name],
            "model": "vit_tiny_test",
        }, name


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_task_vector_added_to_the_initial_weights_gives_the_final_model(quick_runs, kind):
    run_dir = quick_runs[kind]
    initial = initial_weights(run_dir)
    saved = load_checkpoint(run_dir / CHECKPOINT_NAME).initial  # what the run started from
    assert set(initial) == set(saved) and all(torch.equal(initial[k], saved[k]) for k in saved)
    tau = load_task_vector(run_dir)
    final = load_file(str(run_dir / "final_model.safetensors"))
    rebuilt = apply_task_vector(initial, tau, 1.0)
    assert set(rebuilt) == set(final)
    for name, weight in final.items():
        torch.testing.assert_close(rebuilt[name], weight, rtol=1e-6, atol=1e-6, msg=name)
    assert any(not torch.equal(rebuilt[k], initial[k]) for k in tau)  # the run moved
    untouched = apply_task_vector(initial, tau, 0.0)
    assert all(torch.equal(untouched[k], initial[k]) for k in initial)


def test_apply_task_vector_scales_and_refuses_another_model():
    initial = {"w": torch.ones(2, 3), "steps": torch.tensor(4)}
    tau = {"w": torch.full((2, 3), 2.0)}
    edited = apply_task_vector(initial, tau, -0.5)
    assert torch.equal(edited["w"], torch.zeros(2, 3)) and torch.equal(
        edited["steps"], initial["steps"]
    )
    with pytest.raises(
        ValueError, match=r"^task vector tensor 'w' has shape \(3, 2\), the initial"
    ):
        apply_task_vector(initial, {"w": torch.zeros(3, 2)})
    with pytest.raises(ValueError, match="task vector tensor 'b' is not in the initial weights"):
        apply_task_vector(initial, tau | {"b": torch.zeros(1)})
    with pytest.raises(ValueError, match="initial tensor 'w' is not in the task vector"):
        apply_task_vector(initial, {})


def test_load_task_vector_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no task_vector.safetensors in {tmp_path}"):
        load_task_vector(tmp_path)
