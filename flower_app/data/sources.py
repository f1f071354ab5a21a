"""Where the images come from: CIFAR-100 and CIFAR-10, the synthetic set, a node's own
file, the split.

Kept apart from partitioning and preprocessing so that loading (files, download, the
fixed synthetic set, the stratified train/validation split) has one home; which data set a
run-config names, and what the rest of the code knows of it, is the registry's
(``flower_app.data.registry``). Images stay
uint8 tensors (N, 3, 32, 32) until a batch is drawn, so a whole split can sit on the GPU
(150 MB for CIFAR-100) and resizing/augmentation run there (``flower_app.data.preprocessing``).
Nothing is cached here; the ClientApp and ServerApp cache what they load.
"""

from __future__ import annotations

import pickle
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from torchvision.datasets import CIFAR100

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_FOLDER = "cifar-100-python"
CIFAR100_TARBALL = "cifar-100-python.tar.gz"
DOWNLOAD_SOCKET_TIMEOUT_S = 60.0  # a silently dropped connection fails instead of hanging
SYNTHETIC_CLASSES = 100  # CIFAR-100-shaped
SYNTHETIC_SEED = 20_240_101  # the synthetic set is a fixed data set, not a run's random draw
# the pretraining set of ``fl-pretrain``: the same generator with other class prototypes, so
# the tiny ViT learns features on a task disjoint from the fine-tuning task (as DINO did on
# ImageNet before CIFAR-100)
SYNTHETIC_PRETRAIN_SEED = 20_231_231
SYNTHETIC_SEEDS = {"synthetic": SYNTHETIC_SEED, "synthetic-pretrain": SYNTHETIC_PRETRAIN_SEED}
SYNTHETIC_TEST_PER_CLASS = 100
SYNTHETIC_MAX_SHIFT = 2  # px of random translation each way
SYNTHETIC_NOISE_BITS = 7  # pixel noise uniform in [0, 127] (std 37) added to the prototype
NODE_DATA_FILE = "node-data.npz"


class DataNotFoundError(FileNotFoundError):
    """The data set is not where the run-config says; the message says where to put it."""


@dataclass(frozen=True)
class ImageSplit:
    """uint8 images (N, 3, 32, 32), CHW so they move to a GPU as they are; int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        # metadata checks only: a wrong dtype here would surface far away, in a training step
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ValueError(
                f"ImageSplit images must be uint8 (N, 3, H, W), got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"ImageSplit labels must be int64 ({len(self.images)},), got "
                f"{self.labels.dtype} {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class DatasetSplits:
    """Training split (after the validation split is carved out), validation, official test."""

    train: ImageSplit
    val: ImageSplit
    test: ImageSplit
    num_classes: int


# ---- CIFAR-100 and CIFAR-10 --------------------------------------------------------------
@dataclass(frozen=True)
class CifarFormat:
    """One of the official CIFAR "python version" archives: where its files are, what they
    are called, which key holds the labels and which torchvision class downloads it."""

    title: str
    url: str
    folder: str
    tarball: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    torchvision_class: str
    files_text: str  # the folder's files, in words: "train and test"

    def files_present(self, data_dir: Path) -> bool:
        """The official folder (train + test) or its tarball is in ``data_dir`` (no reading)."""
        return self.folder_complete(data_dir) or (data_dir / self.tarball).is_file()

    def folder_complete(self, data_dir: Path) -> bool:
        folder = data_dir / self.folder
        return all((folder / name).is_file() for name in self.train_files + self.test_files)


CIFAR100 = CifarFormat(
    title="CIFAR-100",
    url=CIFAR100_URL,
    folder=CIFAR100_FOLDER,
    tarball=CIFAR100_TARBALL,
    train_files=("train",),
    test_files=("test",),
    label_key=b"fine_labels",
    torchvision_class="CIFAR100",
    files_text="train and test",
)
CIFAR10 = CifarFormat(
    title="CIFAR-10",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    folder="cifar-10-batches-py",
    tarball="cifar-10-python.tar.gz",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    label_key=b"labels",
    torchvision_class="CIFAR10",
    files_text="data_batch_1 to data_batch_5 and test_batch",
)


def _not_found(
    fmt: CifarFormat, data_dir: Path, detail: str = "", downloading: bool = False
) -> DataNotFoundError:
    """One line that names the absolute folder, both accepted layouts and the remedies that
    apply (after a failed download, download=true is already set)."""
    where = data_dir.expanduser().absolute()
    extra = f" ({' '.join(detail.split())})" if detail else ""
    other = (
        "or run where that URL is reachable"
        if downloading
        else "or set download=true on a machine with network"
    )
    return DataNotFoundError(
        f"{fmt.title} not found in {where}{extra}: put the folder {where / fmt.folder} "
        f"(with the files {fmt.files_text}) or the tarball {where / fmt.tarball} "
        f"(from {fmt.url}) there, {other}"
    )


def _read_cifar_pickles(fmt: CifarFormat, names: tuple[str, ...], data_dir: Path) -> ImageSplit:
    """Files of the official python version, concatenated: b"data" (N, 3072) in CHW order
    and the labels under ``fmt.label_key``."""
    images, labels = [], []
    for name in names:
        path = data_dir / fmt.folder / name
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="bytes")
            images.append(np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(entry[fmt.label_key], dtype=np.int64))
        except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as exc:
            detail = f"{path} is not a {fmt.title} python file: {exc!r}"
            raise _not_found(fmt, data_dir, detail) from exc
    # one file (CIFAR-100) is used as read: no second copy of 150 MB
    data = images[0] if len(images) == 1 else np.concatenate(images)
    targets = labels[0] if len(labels) == 1 else np.concatenate(labels)
    return ImageSplit(torch.from_numpy(np.ascontiguousarray(data)), torch.from_numpy(targets))


def _from_torchvision(dataset: CIFAR100) -> ImageSplit:
    """torchvision keeps HWC arrays and a label list; ImageSplit wants CHW tensors."""
    data = np.asarray(dataset.data, dtype=np.uint8)
    labels = np.asarray(dataset.targets, dtype=np.int64)
    images = np.ascontiguousarray(data.transpose(0, 3, 1, 2))
    return ImageSplit(torch.from_numpy(images), torch.from_numpy(labels))


def load_cifar(fmt: CifarFormat, data_dir: Path, download: bool) -> tuple[ImageSplit, ImageSplit]:
    """(train, test) from ``data_dir``: the folder, else the tarball, else a download.

    A local copy always wins, so a machine without network never tries to reach one.
    """
    data_dir = data_dir.expanduser()
    if not fmt.folder_complete(data_dir):
        tarball = data_dir / fmt.tarball
        if tarball.is_file():
            from torchvision.datasets.utils import extract_archive

            try:
                extract_archive(tarball, data_dir)
            except Exception as exc:
                raise _not_found(fmt, data_dir, f"cannot extract {tarball}: {exc!r}") from exc
        elif download:
            return _download_cifar(fmt, data_dir)
        else:
            raise _not_found(fmt, data_dir)
        if not fmt.folder_complete(data_dir):
            detail = f"{tarball} holds no {fmt.folder}/{fmt.files_text}"
            raise _not_found(fmt, data_dir, detail)
    return (
        _read_cifar_pickles(fmt, fmt.train_files, data_dir),
        _read_cifar_pickles(fmt, fmt.test_files, data_dir),
    )


def load_cifar100(data_dir: Path, download: bool) -> tuple[ImageSplit, ImageSplit]:
    """CIFAR-100's (train, test), as ``load_cifar`` finds or fetches them."""
    return load_cifar(CIFAR100, data_dir, download)


def _download_cifar(fmt: CifarFormat, data_dir: Path) -> tuple[ImageSplit, ImageSplit]:
    """torchvision fetches and checks the tarball (md5) and extracts it into ``data_dir``.

    torchvision opens its URL without a timeout, so the process-wide socket default is
    set for the duration of the download (and restored): without network this fails
    within a minute instead of waiting on a connection that never answers.
    """
    import torchvision.datasets

    dataset_class = getattr(torchvision.datasets, fmt.torchvision_class)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_SOCKET_TIMEOUT_S)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        train = dataset_class(root=str(data_dir), train=True, download=True)
        test = dataset_class(root=str(data_dir), train=False, download=False)
    except Exception as exc:
        reason = str(exc) or type(exc).__name__
        detail = f"download=true failed: {reason}"
        raise _not_found(fmt, data_dir, detail, downloading=True) from exc
    finally:
        socket.setdefaulttimeout(previous)
    return _from_torchvision(train), _from_torchvision(test)


# ---- synthetic source --------------------------------------------------------------------
def synthetic_cifar100(
    train_per_class: int,
    test_per_class: int = SYNTHETIC_TEST_PER_CLASS,
    generator_seed: int = SYNTHETIC_SEED,
) -> tuple[ImageSplit, ImageSplit]:
    """A fixed, learnable, CIFAR-100-shaped data set: class prototypes, shifted, plus noise.

    Each class has a random 4x4 colour pattern upsampled (bilinear) to a smooth 36x36
    image; a sample is a random 32x32 window of it (a translation of up to 2 px each way)
    plus uniform pixel noise. The seed is fixed, like a real data set's content, and the
    test set does not depend on ``train_per_class``. Samples are ordered by class.
    ``generator_seed`` names the data set (``SYNTHETIC_SEEDS``): another seed draws other
    class prototypes, a disjoint task of the same kind.
    Speed: all 25 windows of every class are built once;
    a sample is then one row copy plus one uint8 add of random bytes shifted right (the
    prototypes stay <= 255 - max noise, so nothing overflows, and full-range bytes are
    several times faster to draw than a bounded range).
    """
    if train_per_class < 1 or test_per_class < 1:
        raise ValueError(
            f"synthetic images per class must be >= 1, got train={train_per_class}, "
            f"test={test_per_class}"
        )
    proto_seed, train_seed, test_seed = np.random.SeedSequence(generator_seed).spawn(3)
    windows = _class_windows(proto_seed)
    return (
        _noisy_samples(windows, train_per_class, train_seed),
        _noisy_samples(windows, test_per_class, test_seed),
    )


_SPAN = 2 * SYNTHETIC_MAX_SHIFT + 1  # window positions along each axis
_NOISE_SHIFT = 8 - SYNTHETIC_NOISE_BITS


def _class_windows(seed: np.random.SeedSequence) -> np.ndarray:
    """Every 32x32 window of every class prototype: (classes, span * span, 3, 32, 32) uint8."""
    classes = SYNTHETIC_CLASSES
    top = 255 - (255 >> _NOISE_SHIFT)
    coarse = np.random.default_rng(seed).uniform(0, top, (classes, 3, 4, 4))
    big = F.interpolate(
        torch.from_numpy(coarse).float(), size=32 + _SPAN - 1, mode="bilinear", align_corners=False
    )
    big_u8 = big.round().clamp(0, top).to(torch.uint8).numpy()
    return np.stack(
        [big_u8[:, :, dy : dy + 32, dx : dx + 32] for dy in range(_SPAN) for dx in range(_SPAN)],
        axis=1,
    )


def _noisy_samples(windows: np.ndarray, per_class: int, seed: np.random.SeedSequence) -> ImageSplit:
    """``per_class`` samples of each class, ordered by class: a random window plus noise."""
    classes, positions = windows.shape[:2]
    flat = windows.reshape(classes * positions, 3, 32, 32)
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes, dtype=np.int64), per_class)
    which = labels * positions + rng.integers(0, positions, len(labels))
    images = np.take(flat, which, axis=0)
    for start in range(0, len(images), 8192):  # bounded memory for the noise
        chunk = images[start : start + 8192]
        noise = rng.integers(0, 256, chunk.shape, dtype=np.uint8)
        noise >>= _NOISE_SHIFT
        chunk += noise
    return ImageSplit(torch.from_numpy(images), torch.from_numpy(labels))


# ---- node-local data (deployment) ----------------------------------------------------------
def save_node_data(folder: Path, split: ImageSplit) -> Path:
    """Write one node's own training data: ``images`` uint8 (N,3,32,32), ``labels`` int64."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / NODE_DATA_FILE
    np.savez(path, images=split.images.cpu().numpy(), labels=split.labels.cpu().numpy())
    return path


def load_node_data(folder: Path) -> ImageSplit:
    """A SuperNode's private training data, from its node-config ``data-dir``."""
    path = folder / NODE_DATA_FILE
    if not path.is_file():
        raise DataNotFoundError(
            f"node-config data-dir={folder}: no {NODE_DATA_FILE} there; write it with "
            "python -m flower_app.data.node_data (arrays images uint8 (N,3,32,32), labels int64)"
        )
    with np.load(path) as data:
        images, labels = data["images"], data["labels"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (3, 32, 32):
        raise DataNotFoundError(
            f"{path}: images must be uint8 of shape (N, 3, 32, 32), got {images.dtype} "
            f"{images.shape}"
        )
    if labels.shape != (len(images),):
        raise DataNotFoundError(f"{path}: labels must have shape ({len(images)},)")
    return ImageSplit(
        torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64))
    )


# ---- train / validation split --------------------------------------------------------------
def split_train_val(
    labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified: a seeded choice of round(val_fraction * n_c) images of each class c.

    Returns sorted int64 (train, val) indices into ``labels``; disjoint, together all.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction}: must be in [0, 1)")
    order = np.random.default_rng(seed).permutation(len(labels))
    order = order[np.argsort(labels[order], kind="stable")]  # grouped by class, shuffled within
    _, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    take = np.array([round(val_fraction * int(n)) for n in counts], dtype=np.int64)
    rank = np.arange(len(order)) - np.repeat(starts, counts)
    in_val = rank < np.repeat(take, counts)
    train = np.sort(order[~in_val]).astype(np.int64)
    val = np.sort(order[in_val]).astype(np.int64)
    return train, val
