"""Data sets added through the registry train in a quick in-process run: the ServerApp, the
ClientApp and the shards read the entry, nothing else names the set."""

from __future__ import annotations

import json

import pandas as pd
from safetensors.torch import load_file

from flower_app import client_app, server_app
from tests.conftest import InProcessGrid, quick_run_config, server_context
from tests.toy_datasets import TOY_CLASSES, TOY_TRAIN, fresh_registry, toy

__all__ = ["fresh_registry", "toy"]  # fixtures

TINY = {
    "num_clients": 4,
    "fraction_train": 1.0,
    "num_server_rounds": 2,
    "local_steps": 2,
    "batch_size": 8,
    "eval_every": 1,
}


def run_tiny(tmp_path, name: str, **overrides) -> dict:
    """A two-round run of four clients in process; its summary."""
    config = quick_run_config(**TINY, output_dir=str(tmp_path), run_name=name, **overrides)
    server_app.main(InProcessGrid(client_app.app, config, num_nodes=4), server_context(config))
    return json.loads((tmp_path / name / "summary.json").read_text())


def test_a_set_registered_in_a_test_trains_in_process(toy, tmp_path):
    summary = run_tiny(tmp_path, "toy", dataset="toy", classes_per_client=2, sharding="non-iid")
    assert summary["status"] == "completed" and summary["rounds"] == 2
    run = tmp_path / "toy"
    assert load_file(run / "final_model.safetensors")["head.weight"].shape[0] == TOY_CLASSES
    partitions = pd.read_csv(run / "partitions.csv")
    train_per_class = TOY_TRAIN - round(0.1 * TOY_TRAIN)
    assert partitions["num-examples"].sum() == TOY_CLASSES * train_per_class
    assert (partitions["num-classes"] == 2).all()
    assert summary["final-test-accuracy"] > 1 / TOY_CLASSES  # flat colours: above chance
