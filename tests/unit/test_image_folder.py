"""The image-folder data set: the user's own PNG/JPEG files, one folder per class.

Classes and images per class come from file names before anything is decoded, so every
layout problem is a one-line ``data-dir`` error of the run-config; images are decoded as
RGB at the stored 32 px.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from flower_app.config import ConfigError, RunConfig
from flower_app.data.image_folder import list_image_folder, train_counts
from flower_app.data.registry import (
    STORED_SIZE,
    SourceOptions,
    dataset_spec,
    load_source,
    load_splits,
)
from flower_app.data.sources import DataNotFoundError
from flower_app.runs.prerequisites import data_problem
from tests.conftest import quick_run_config
from tests.toy_datasets import FOLDER_COLOURS, write_image_folder

CLASSES = sorted(FOLDER_COLOURS)


def folder_config(root, **overrides) -> dict:
    """The quick preset on an image folder of 4 classes (Nc must fit in them)."""
    keys = {"dataset": "image-folder", "data_dir": str(root), "num_clients": 4}
    return quick_run_config(**(keys | {"classes_per_client": 2} | overrides))


def test_classes_and_counts_come_from_file_names(tmp_path):
    root = write_image_folder(tmp_path / "pets", train=5, test=2)
    (root / "train" / "owl" / "notes.txt").write_text("not an image")
    (root / "train" / "owl" / "more").mkdir()  # sub-folders belong to their class
    (root / "train" / "cat" / "0.png").rename(root / "train" / "owl" / "more" / "A.PNG")
    (root / "train" / ".ipynb_checkpoints").mkdir()  # hidden: no class
    (root / "test" / ".ipynb_checkpoints").mkdir()
    listing = list_image_folder(root)
    assert list(listing["train"]) == list(listing["test"]) == CLASSES
    assert train_counts(root) == (4, 5, 6, 5)  # cat dog owl yak
    cfg = RunConfig.from_run_config(folder_config(root))
    assert cfg.num_classes == 4 and cfg.class_counts == (4, 5, 6, 5)


def test_images_are_rgb_uint8_at_the_stored_size_labelled_by_sorted_class(tmp_path):
    root = write_image_folder(tmp_path / "pets", train=3, test=2)
    train, test = load_source("image-folder", SourceOptions(root, download=False))
    assert STORED_SIZE == dataset_spec("image-folder").image_size == 32
    assert train.images.shape == (12, 3, 32, 32) and test.images.shape == (8, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    for label, name in enumerate(CLASSES):  # RGB, RGBA and greyscale files alike
        mean = train.images[train.labels == label].float().mean(dim=(0, 2, 3))
        expected = torch.tensor(FOLDER_COLOURS[name], dtype=torch.float32) + 3.5
        assert torch.allclose(mean, expected, atol=2.0), name
    splits = load_splits("image-folder", SourceOptions(root, False), 1 / 3, seed=0)
    assert splits.num_classes == 4 and (len(splits.train), len(splits.val)) == (8, 4)


def test_folder_that_does_not_fit_is_one_data_dir_line(tmp_path):
    def error(root) -> str:
        with pytest.raises(ConfigError) as info:  # nodes count the classes too
            RunConfig.from_run_config(folder_config(root), check_files=False)
        message = str(info.value)
        assert "\n" not in message
        assert message.startswith(f"run-config key 'data-dir' = '{root}' is not allowed: ")
        return message

    assert f"image folder {tmp_path / 'none'} does not exist: put the images in " in error(
        tmp_path / "none"
    )
    root = write_image_folder(tmp_path / "pets")
    shutil.rmtree(root / "test")
    assert "has no test/ folder" in error(root)
    root = write_image_folder(tmp_path / "extra")
    (root / "train" / "emu").mkdir()
    shutil.copy(root / "train" / "cat" / "0.png", root / "train" / "emu" / "0.png")
    assert "only in train/: emu; only in test/: none" in error(root)
    root = write_image_folder(tmp_path / "empty")
    for png in (root / "test" / "dog").iterdir():
        png.unlink()
    (root / "test" / "dog" / "readme.txt").write_text("no images")
    assert "class folders with no image file (.jpg .jpeg .png" in error(root)
    assert error(root).endswith("): test/dog")
    root = write_image_folder(tmp_path / "one", classes={"cat": (1, 2, 3)})
    assert "1 class folder(s) in train/, a classifier needs at least 2" in error(root)


def test_partition_checks_count_each_class_before_loading(tmp_path):
    colours = {"cat": (200, 0, 0), "dog": (0, 200, 0)}
    root = write_image_folder(tmp_path / "pets", train=6, test=1, classes=colours)
    for png in sorted((root / "train" / "dog").iterdir())[3:]:
        png.unlink()
    assert train_counts(root) == (6, 3)
    # 1 of each class held out: 5 + 2 training images, IID shards for 7 clients, not 8
    base = {"val_fraction": 0.2, "classes_per_client": 1, "sharding": "non-iid"}
    RunConfig.from_run_config(folder_config(root, **base | {"sharding": "iid", "num_clients": 7}))
    with pytest.raises(ConfigError, match="num-clients=8 exceeds the 7 training images"):
        RunConfig.from_run_config(
            folder_config(root, **base | {"sharding": "iid", "num_clients": 8})
        )
    # Nc = 1 on 2 classes: 6 clients put 3 on "dog", which keeps 2 training images
    with pytest.raises(ConfigError, match="up to 3 clients on one class of 2 training images"):
        RunConfig.from_run_config(folder_config(root, **base | {"num_clients": 6}))


def test_data_dir_is_part_of_an_image_folder_runs_identity(tmp_path):
    root = write_image_folder(tmp_path / "pets")
    folder = RunConfig.from_run_config(folder_config(root))
    assert folder.experiment_identity()["data-dir"] == str(root)
    cifar = RunConfig.from_run_config(quick_run_config(dataset="cifar100"), check_files=False)
    assert "data-dir" not in cifar.experiment_identity()  # a copy of CIFAR is the same data
    assert data_problem(folder, online=lambda url: False) == ""  # nothing to download
    folder.check_data_dir()


def test_a_broken_image_file_is_named(tmp_path):
    root = write_image_folder(tmp_path / "pets")
    (root / "test" / "owl" / "1.png").write_bytes(b"not a png")
    with pytest.raises(DataNotFoundError, match=r"test/owl/1\.png is not a readable image"):
        load_source("image-folder", SourceOptions(root, download=False))


def test_a_folder_is_listed_again_only_when_it_changed(tmp_path, monkeypatch):
    """A ClientApp checks its run-config for every message: the listing is reused until a
    split or class folder changes, then the new images are counted."""
    from flower_app.data import image_folder

    root = write_image_folder(tmp_path / "pets", train=5, test=2)
    listed = []
    real = image_folder._list
    monkeypatch.setattr(image_folder, "_list", lambda r: listed.append(r) or real(r))
    assert train_counts(root) == train_counts(root) == (5, 5, 5, 5)
    assert len(listed) == 1
    shutil.copy(root / "train" / "dog" / "0.png", root / "train" / "dog" / "extra.png")
    assert train_counts(root) == (5, 6, 5, 5) and len(listed) == 2
    shutil.rmtree(root / "test")
    with pytest.raises(DataNotFoundError, match="has no test/ folder"):
        list_image_folder(root)
