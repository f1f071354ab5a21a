"""Data sets added through the registry train in a quick in-process run: the ServerApp, the
ClientApp and the shards read the entry, nothing else names the set; an image folder of PNG
files also feeds node data and the centralized baseline (all through ``run_splits``)."""

from __future__ import annotations

import json

import pandas as pd
from safetensors.torch import load_file

from tests.conftest import ROOT, quick_run_config, run_quick
from tests.toy_datasets import TOY_CLASSES, TOY_TRAIN, fresh_registry, toy, write_image_folder

__all__ = ["fresh_registry", "toy"]  # fixtures
CENTRAL = ROOT / "configs" / "centralized_quick.toml"

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
    run_quick(tmp_path, name, **(TINY | overrides))
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


def test_an_image_folder_trains_in_process_on_non_iid_shards(tmp_path):
    root = write_image_folder(tmp_path / "images", train=10, test=3)
    folder = {"dataset": "image-folder", "data_dir": str(root), "val_fraction": 0.2}
    summary = run_tiny(tmp_path, "pets", **folder, sharding="non-iid", classes_per_client=2)
    assert summary["status"] == "completed"
    run = tmp_path / "pets"
    assert load_file(run / "final_model.safetensors")["head.weight"].shape[0] == 4
    partitions = pd.read_csv(run / "partitions.csv")
    assert (partitions["num-classes"] == 2).all()
    assert partitions["num-examples"].tolist() == [8, 8, 8, 8]  # 4 classes x (10 - 2) / 4
    held = [set(map(int, str(c).split())) for c in partitions["classes"]]
    assert set().union(*held) == {0, 1, 2, 3}
    assert json.loads((run / "config.json").read_text())["data-dir"] == str(root)


def test_node_data_and_the_centralized_baseline_read_an_image_folder(tmp_path):
    from flower_app.centralized.baseline import main as centralized
    from flower_app.config import RunConfig
    from flower_app.data.node_data import write_node_data
    from flower_app.data.sources import load_node_data

    root = write_image_folder(tmp_path / "pets", train=10, test=3)
    config = quick_run_config(dataset="image-folder", data_dir=str(root), num_clients=2)
    cfg = RunConfig.from_run_config(config | {"classes-per-client": 2, "val-fraction": 0.2})
    paths = write_node_data(cfg, tmp_path / "nodes")
    shards = [load_node_data(path.parent) for path in paths]
    assert [len(shard) for shard in shards] == [16, 16]
    assert all(shard.images.shape[1:] == (3, 32, 32) for shard in shards)
    args = ["dataset=image-folder", f"data-dir={root}", "num-clients=4", "classes-per-client=4"]
    args.append("epochs=1")
    out = f"output-dir={tmp_path / 'central'}"
    assert centralized(["--run-config", str(CENTRAL), *args, out, "run-name=pets"]) == 0
    summary = json.loads((tmp_path / "central" / "pets" / "summary.json").read_text())
    assert summary["status"] == "completed" and 0.0 <= summary["final-test-accuracy"] <= 1.0
