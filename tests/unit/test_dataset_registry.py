"""The data set registry: one entry is all the schema, the checks and loading know of a set.

A toy set is registered here through the registry alone (no other module edited): its
classes, images per class and files reach the run-config checks and the prerequisites.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flower_app.config import ConfigError, RunConfig
from flower_app.data.registry import (
    DatasetSpec,
    Download,
    SourceOptions,
    dataset_names,
    load_source,
    load_splits,
    register_dataset,
)
from flower_app.runs.prerequisites import data_problem
from tests.conftest import ROOT, quick_run_config
from tests.toy_datasets import TOY_TRAIN, fresh_registry, load_toy, toy, toy_counts

__all__ = ["fresh_registry", "toy"]  # fixtures


def test_every_entry_is_an_allowed_dataset_value_and_documented():
    with pytest.raises(ConfigError) as info:
        RunConfig.from_run_config(quick_run_config(dataset="nope"))
    assert str(info.value).endswith(f"must be one of {', '.join(dataset_names())}")
    assert dataset_names()[:3] == ("cifar100", "synthetic", "synthetic-pretrain")
    text = (ROOT / "docs" / "configuration.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `dataset` |"))
    allowed = row.split("|")[3]
    assert [name for name in dataset_names() if f"`{name}`" not in allowed] == []


def test_a_registered_set_is_a_dataset_value_with_its_own_classes_and_counts(toy, tmp_path):
    cfg = RunConfig.from_run_config(
        quick_run_config(dataset="toy", num_clients=4, classes_per_client=2, sharding="non-iid")
    )
    assert cfg.num_classes == 4 and cfg.class_counts == (24, 24, 24, 24)
    splits = load_splits("toy", SourceOptions(tmp_path, False), 0.25, seed=0)
    assert splits.num_classes == 4 and (len(splits.train), len(splits.val)) == (72, 24)
    assert torch.equal(torch.bincount(splits.val.labels), torch.full((4,), 6))
    # the shard checks count the entry's images before anything is loaded: 4 x (24 - 2)
    with pytest.raises(ConfigError, match=r"'num-clients' = 100 .* exceeds the 88 training"):
        RunConfig.from_run_config(
            quick_run_config(dataset="toy", num_clients=100, classes_per_client=2)
        )
    with pytest.raises(ConfigError, match=r"'classes-per-client' = 10 .* must be in 1\.\.4"):
        RunConfig.from_run_config(
            quick_run_config(dataset="toy", num_clients=4, sharding="non-iid")
        )
    # IID shards do not read classes-per-client: the default 10 is no error on 4 classes
    assert (
        RunConfig.from_run_config(quick_run_config(dataset="toy", num_clients=4)).num_classes == 4
    )


def test_names_are_taken_once_and_spelled_as_run_config_values(toy):
    with pytest.raises(ValueError, match="'toy' is registered already"):
        register_dataset(toy)
    with pytest.raises(ValueError, match="lowercase letters, digits and '-'"):
        register_dataset(DatasetSpec(name="My Set", class_counts=toy_counts, load=load_toy))
    assert "My Set" not in dataset_names()


def test_a_loader_that_breaks_its_entrys_promise_is_one_line(fresh_registry, tmp_path):

    def three_classes(options: SourceOptions) -> tuple[int, ...]:
        return (TOY_TRAIN,) * 3  # load_toy gives 4

    register_dataset(DatasetSpec(name="liar", class_counts=three_classes, load=load_toy))
    with pytest.raises(ValueError, match=r"'liar' loaded labels outside 0\.\.2"):
        load_source("liar", SourceOptions(tmp_path, False))
    small = DatasetSpec(name="small", class_counts=toy_counts, load=load_toy, image_size=16)
    register_dataset(small)
    with pytest.raises(ValueError, match="'small' loaded images of 32x32 px, its entry says 16"):
        load_source("small", SourceOptions(tmp_path, False))


def test_a_downloaded_sets_files_and_host_come_from_its_entry(fresh_registry, tmp_path):
    url = "https://data.example.org/toy.tar.gz"

    def present(data_dir: Path) -> bool:
        return (data_dir / "toy-folder").is_dir()

    fetched = Download("Toy", url, "toy-folder", "toy.tar.gz", present)
    register_dataset(
        DatasetSpec(name="toy-dl", class_counts=toy_counts, load=load_toy, download=fetched)
    )
    offline = quick_run_config(dataset="toy-dl", data_dir=str(tmp_path), num_clients=4)
    offline |= {"classes-per-client": 2, "download": False}
    with pytest.raises(ConfigError) as info:
        RunConfig.from_run_config(offline)
    assert str(info.value) == (
        f"run-config key 'data-dir' = '{tmp_path}' is not allowed: no Toy at {tmp_path}: put "
        f"the folder toy-folder/ or toy.tar.gz ({url}) there, or set download=true"
    )
    cfg = RunConfig.from_run_config(offline | {"download": True})
    assert data_problem(cfg, online=lambda u: True) == ""
    assert data_problem(cfg, online=lambda u: False) == (
        f"no Toy in {tmp_path} and data.example.org is unreachable: put toy-folder/ or "
        f"toy.tar.gz ({url}) there"
    )
    (tmp_path / "toy-folder").mkdir()
    assert data_problem(cfg, online=lambda u: False) == ""  # a local copy needs no host
    RunConfig.from_run_config(offline)


def test_the_task_arithmetic_study_cuts_the_entrys_classes_into_tasks(toy):
    from flower_app.studies.catalog import arithmetic_settings

    base = {"dataset": "toy", "num-server-rounds": 4, "local-steps": 4, "lr": 0.05}
    blocks = {s.overrides["task-classes"] for s in arithmetic_settings(base, 2)}
    assert blocks == {"0-1", "2-3"}
    assert RunConfig.data_only({"num-server-rounds": 4}).dataset_classes == 100  # cifar100


def test_source_options_carry_the_keys_an_entry_reads(tmp_path):
    config = quick_run_config(data_dir=str(tmp_path / "d"), download=False)
    cfg = RunConfig.from_run_config(config, check_files=False)
    assert cfg.source_options == SourceOptions(Path(tmp_path / "d"), False, 100)
