"""Data sources: CIFAR-100 and CIFAR-10 from files or a download, the synthetic set, the
stratified split.

Nothing here touches the network: CIFAR-100 and CIFAR-10 are tiny fakes in the official
pickle formats, and the download path runs against stand-ins for torchvision's classes.
"""

from __future__ import annotations

import pickle
import socket
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets

from flower_app.config import ConfigError, RunConfig
from flower_app.data.registry import SourceOptions, load_source, load_splits
from flower_app.data.sources import (
    CIFAR100,
    DOWNLOAD_SOCKET_TIMEOUT_S,
    DataNotFoundError,
    DatasetSplits,
    ImageSplit,
    split_train_val,
    synthetic_cifar100,
)
from flower_app.runs.prerequisites import data_problem
from flower_app.runs.runtime import run_splits
from tests.conftest import quick_run_config


# ---- train / validation split ------------------------------------------------------------------
def test_stratified_split_exact_counts():
    counts = np.array([500] * 50 + [7] * 25 + [15] * 25)  # round(0.1 * 15) = 2, of 7: 1
    labels = np.random.default_rng(1).permutation(np.repeat(np.arange(100), counts))
    train, val = split_train_val(labels, 0.1, seed=0)
    expected = [round(0.1 * n) for n in counts]
    assert np.bincount(labels[val], minlength=100).tolist() == expected
    assert train.dtype == val.dtype == np.int64
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)
    assert np.intersect1d(train, val).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels)))
    again = split_train_val(labels, 0.1, seed=0)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    assert not np.array_equal(val, split_train_val(labels, 0.1, seed=1)[1])


def test_split_edge_cases():
    labels = np.repeat(np.arange(100), 5)
    train, val = split_train_val(labels, 0.0, seed=0)
    assert len(val) == 0 and np.array_equal(train, np.arange(500))
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_val(labels, 1.0, seed=0)


# ---- synthetic source ----------------------------------------------------------------------
def test_synthetic_is_fixed_cifar_shaped_and_class_conditional():
    train, test = synthetic_cifar100(train_per_class=20)
    assert train.images.shape == (2000, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (10000, 3, 32, 32) and test.labels.dtype == torch.int64
    assert train.images.is_contiguous() and test.images.is_contiguous()
    assert torch.equal(torch.bincount(train.labels), torch.full((100,), 20))
    assert train.images.float().std() > 30  # images, not a constant
    again_train, again_test = synthetic_cifar100(train_per_class=20)
    assert torch.equal(train.images, again_train.images)
    assert torch.equal(test.images, again_test.images)
    _, other_test = synthetic_cifar100(train_per_class=3)
    assert torch.equal(test.images, other_test.images)  # the test set is one fixed set
    means = torch.stack([train.images[train.labels == c].float().mean(0) for c in range(100)])
    dist = torch.cdist(test.images.float().flatten(1), means.flatten(1))
    accuracy = (dist.argmin(1) == test.labels).float().mean().item()
    assert accuracy > 0.05  # 5x chance for a nearest-class-mean rule on raw pixels


def test_synthetic_splits(tmp_path):
    splits = load_splits(
        "synthetic", SourceOptions(tmp_path, False, synthetic_train_per_class=20), 0.1, seed=0
    )
    assert isinstance(splits, DatasetSplits) and splits.num_classes == 100
    assert len(splits.train) == 1800 and len(splits.val) == 200 and len(splits.test) == 10000
    assert torch.equal(torch.bincount(splits.val.labels), torch.full((100,), 2))
    assert splits.train.images.is_contiguous() and splits.val.images.is_contiguous()
    # the validation images are training images the training split no longer has
    full, _ = load_source("synthetic", SourceOptions(tmp_path, False, 20))
    _, val_idx = split_train_val(full.labels.numpy(), 0.1, seed=0)
    assert torch.equal(splits.val.images, full.images[torch.from_numpy(val_idx)])
    assert list(tmp_path.iterdir()) == []  # the synthetic source writes nothing


def test_synthetic_test_split_size_is_its_own_key(tmp_path):
    """``synthetic-test-per-class`` sizes the test split only: the training images stay."""
    full = load_splits(
        "synthetic", SourceOptions(tmp_path, False, synthetic_train_per_class=20), 0.1, seed=0
    )
    small = load_splits(
        "synthetic", SourceOptions(tmp_path, False, 20, synthetic_test_per_class=3), 0.1, 0
    )
    assert torch.equal(small.train.images, full.train.images)
    assert torch.equal(torch.bincount(small.test.labels), torch.full((100,), 3))
    cfg = RunConfig.from_run_config({"dataset": "synthetic", "synthetic-test-per-class": 3})
    assert len(run_splits(cfg).test) == 300


def test_unknown_dataset_is_refused(tmp_path):
    with pytest.raises(ValueError, match="cifar100, synthetic"):
        load_source("mnist", SourceOptions(tmp_path, False))


def test_image_split_checks_types():
    with pytest.raises(ValueError, match="uint8"):
        ImageSplit(torch.zeros(2, 3, 32, 32), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="int64"):
        ImageSplit(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))


# ---- CIFAR-100 from local files --------------------------------------------------------------
def _write_fake_cifar(folder: Path, n_train: int = 20, n_test: int = 10) -> dict:
    """The official python layout: pickled dicts with b"data" (N, 3072, CHW) and fine labels."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    entries = {}
    for name, n in (("train", n_train), ("test", n_test)):
        entries[name] = {
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"fine_labels": [int(x) for x in rng.integers(0, 100, n)],
            b"coarse_labels": [int(x) for x in rng.integers(0, 20, n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entries[name], f)
    return entries


def test_local_cifar_folder_is_read(tmp_path):
    raw = _write_fake_cifar(tmp_path / "cifar-100-python")
    assert CIFAR100.files_present(tmp_path)
    train, test = load_source("cifar100", SourceOptions(tmp_path, download=False))
    assert train.images.shape == (20, 3, 32, 32) and train.images.dtype == torch.uint8
    assert len(test) == 10 and test.labels.dtype == torch.int64
    assert train.images.is_contiguous()
    assert train.labels.tolist() == raw["train"][b"fine_labels"]
    # CHW order: pixel (c, y, x) of image i is byte c*1024 + y*32 + x of row i
    data = raw["test"][b"data"]
    assert test.images[4, 2, 5, 7] == data[4, 2 * 1024 + 5 * 32 + 7]
    assert test.images[9, 0, 31, 0] == data[9, 31 * 32]


def test_tarball_is_extracted_offline(tmp_path):
    _write_fake_cifar(tmp_path / "src" / "cifar-100-python")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with tarfile.open(data_dir / "cifar-100-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-100-python", arcname="cifar-100-python")
    assert CIFAR100.files_present(data_dir)
    splits = load_splits("cifar100", SourceOptions(data_dir, False), 0.5, seed=0)
    assert len(splits.train) + len(splits.val) == 20 and len(splits.test) == 10
    assert (data_dir / "cifar-100-python" / "train").is_file()


def test_missing_cifar_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not CIFAR100.files_present(Path("nowhere"))
    with pytest.raises(DataNotFoundError) as info:
        load_splits("cifar100", SourceOptions(Path("nowhere"), False), 0.1, 0)
    message = str(info.value)
    absolute = str(tmp_path / "nowhere")  # a relative data_dir is reported absolute
    assert f"in {absolute}:" in message and f"{absolute}/cifar-100-python " in message
    assert f"{absolute}/cifar-100-python.tar.gz" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in message
    assert "download=true" in message and "\n" not in message
    assert isinstance(info.value, FileNotFoundError)


def test_half_a_folder_is_not_enough(tmp_path):
    _write_fake_cifar(tmp_path / "cifar-100-python")
    (tmp_path / "cifar-100-python" / "test").unlink()
    assert not CIFAR100.files_present(tmp_path)
    with pytest.raises(DataNotFoundError, match="CIFAR-100 not found"):
        load_source("cifar100", SourceOptions(tmp_path, download=False))


def test_corrupt_file_is_a_clear_error(tmp_path):
    _write_fake_cifar(tmp_path / "cifar-100-python")
    (tmp_path / "cifar-100-python" / "train").write_bytes(b"not a pickle")
    with pytest.raises(DataNotFoundError, match="not a CIFAR-100 python file"):
        load_source("cifar100", SourceOptions(tmp_path, download=False))


def test_failed_download_is_one_line_with_the_reason(tmp_path, monkeypatch):
    calls = []

    def offline(root, train, download):
        calls.append((root, train, download, socket.getdefaulttimeout()))
        raise urllib.error.URLError("[Errno -3] Temporary failure\nin name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    before = socket.getdefaulttimeout()
    with pytest.raises(DataNotFoundError) as info:
        load_source("cifar100", SourceOptions(tmp_path / "new", download=True))
    message = str(info.value)
    assert "\n" not in message and "Temporary failure in name resolution" in message
    assert str(tmp_path / "new") in message and "cifar-100-python.tar.gz" in message
    assert calls == [(str(tmp_path / "new"), True, True, DOWNLOAD_SOCKET_TIMEOUT_S)]
    assert socket.getdefaulttimeout() == before  # restored


def test_download_uses_torchvision_arrays(tmp_path, monkeypatch):
    """torchvision's CIFAR100 holds HWC arrays and label lists; we want CHW tensors."""
    rng = np.random.default_rng(0)

    class FakeCIFAR100:
        def __init__(self, root, train, download):
            n = 6 if train else 4
            self.data = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            self.targets = list(range(n))

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", FakeCIFAR100)
    train, test = load_source("cifar100", SourceOptions(tmp_path, download=True))
    assert train.images.shape == (6, 3, 32, 32) and len(test) == 4
    assert train.images.is_contiguous() and train.labels.dtype == torch.int64


def test_local_copy_wins_over_download(tmp_path, monkeypatch):
    _write_fake_cifar(tmp_path / "cifar-100-python")

    def no_network(*args, **kwargs):
        raise AssertionError("must not download when the files are there")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", no_network)
    train, _ = load_source("cifar100", SourceOptions(tmp_path, download=True))
    assert len(train) == 20


# ---- CIFAR-10 ----------------------------------------------------------------------------------
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def _write_fake_cifar10(folder: Path, per_batch: int = 4) -> dict:
    """The official python layout: five training batches and a test batch, each a pickled
    dict with b"data" (N, 3072, CHW), b"labels", b"filenames", b"batch_label"; batches.meta."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(10)
    entries = {}
    for name in CIFAR10_BATCHES:
        entries[name] = {
            b"batch_label": name.encode(),
            b"labels": [int(x) for x in rng.integers(0, 10, per_batch)],
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entries[name], f)
    meta = {b"label_names": [b"airplane"] * 10, b"num_cases_per_batch": per_batch}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f)
    return entries


def test_cifar10_batches_are_read_in_order_as_chw(tmp_path):
    raw = _write_fake_cifar10(tmp_path / "cifar-10-batches-py")
    train, test = load_source("cifar10", SourceOptions(tmp_path, download=False))
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert train.images.is_contiguous()
    expected = [label for name in CIFAR10_BATCHES[:5] for label in raw[name][b"labels"]]
    assert train.labels.tolist() == expected
    assert test.labels.tolist() == raw["test_batch"][b"labels"]
    # image 2 of data_batch_3 is training image 4 + 4 + 2; pixel (c, y, x) is byte c*1024+y*32+x
    data = raw["data_batch_3"][b"data"]
    assert train.images[10, 1, 7, 3] == data[2, 1024 + 7 * 32 + 3]
    splits = load_splits("cifar10", SourceOptions(tmp_path, False), 0.25, seed=0)
    assert splits.num_classes == 10 and len(splits.train) + len(splits.val) == 20


def test_cifar10_tarball_is_extracted_offline(tmp_path):
    _write_fake_cifar10(tmp_path / "src" / "cifar-10-batches-py")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with tarfile.open(data_dir / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    train, test = load_source("cifar10", SourceOptions(data_dir, download=False))
    assert (len(train), len(test)) == (20, 4)
    assert (data_dir / "cifar-10-batches-py" / "data_batch_5").is_file()


def test_missing_cifar10_batch_says_what_to_put_where(tmp_path):
    _write_fake_cifar10(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataNotFoundError) as info:
        load_source("cifar10", SourceOptions(tmp_path, download=False))
    message = str(info.value)
    assert message.startswith(f"CIFAR-10 not found in {tmp_path}: put the folder ")
    assert f"{tmp_path}/cifar-10-batches-py (with the files data_batch_1 to " in message
    assert f"{tmp_path}/cifar-10-python.tar.gz (from {CIFAR10_URL})" in message
    assert "download=true" in message and "\n" not in message


def test_cifar10_offline_checks_name_data_dir_and_the_files(tmp_path):
    config = quick_run_config(dataset="cifar10", data_dir=str(tmp_path), download=False)
    with pytest.raises(ConfigError) as info:
        RunConfig.from_run_config(config)
    assert str(info.value) == (
        f"run-config key 'data-dir' = '{tmp_path}' is not allowed: no CIFAR-10 at {tmp_path}: "
        f"put the folder cifar-10-batches-py/ or cifar-10-python.tar.gz ({CIFAR10_URL}) there, "
        "or set download=true"
    )
    cfg = RunConfig.from_run_config(config | {"download": True})
    assert data_problem(cfg, online=lambda url: url == CIFAR10_URL) == ""
    assert data_problem(cfg, online=lambda url: False) == (
        f"no CIFAR-10 in {tmp_path} and www.cs.toronto.edu is unreachable: put "
        f"cifar-10-batches-py/ or cifar-10-python.tar.gz ({CIFAR10_URL}) there"
    )
    _write_fake_cifar10(tmp_path / "cifar-10-batches-py")
    assert data_problem(cfg, online=lambda url: False) == ""
    assert RunConfig.from_run_config(config).class_counts == (5000,) * 10


def test_cifar10_downloads_through_torchvision(tmp_path, monkeypatch):
    calls = []

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            calls.append((root, train, download, socket.getdefaulttimeout()))
            n = 6 if train else 4
            self.data = np.full((n, 32, 32, 3), 7, dtype=np.uint8)
            self.data[:, 0, 0, 2] = 9  # HWC pixel (0, 0) of channel 2
            self.targets = [i % 10 for i in range(n)]

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    train, test = load_source("cifar10", SourceOptions(tmp_path / "new", download=True))
    assert train.images.shape == (6, 3, 32, 32) and len(test) == 4
    assert int(train.images[0, 2, 0, 0]) == 9 and int(train.images[0, 1, 0, 0]) == 7
    root = str(tmp_path / "new")
    timeout = DOWNLOAD_SOCKET_TIMEOUT_S
    assert calls == [(root, True, True, timeout), (root, False, False, timeout)]

    def offline(root, train, download):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataNotFoundError, match=r"CIFAR-10 not found .*download=true failed"):
        load_source("cifar10", SourceOptions(tmp_path / "other", download=True))
