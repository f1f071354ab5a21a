"""The data sets a run-config may name: one entry each, holding all the rest of the code
needs to know of it.

Adding a data set is one ``register_dataset(DatasetSpec(...))`` (its loader may live in its
own module, as CIFAR's and the image folder's do): the run-config's allowed ``dataset``
values, the class count, the images per class that the shard checks use before anything is
loaded, the check of the files in ``data-dir`` and its one-line error, the download host
that the prerequisites probe, loading and the train/validation split all read the entry,
as timm's ``register_model`` is the one place of a model. Nothing else names a data set.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from flower_app.data.image_folder import list_image_folder, load_image_folder, train_counts
from flower_app.data.sources import (
    CIFAR10,
    CIFAR100,
    SYNTHETIC_CLASSES,
    SYNTHETIC_SEEDS,
    SYNTHETIC_TEST_PER_CLASS,
    CifarFormat,
    DataNotFoundError,
    DatasetSplits,
    ImageSplit,
    load_cifar,
    split_train_val,
    synthetic_cifar100,
)

STORED_SIZE = 32  # px: every built-in source stores 32 x 32 (node-data files expect it)
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")


@dataclass(frozen=True)
class SourceOptions:
    """What an entry may read of the run-config (``RunConfig.source_options``)."""

    data_dir: Path  # absolute
    download: bool = False
    synthetic_train_per_class: int = 500
    synthetic_test_per_class: int = SYNTHETIC_TEST_PER_CLASS


@dataclass(frozen=True)
class Download:
    """A published data set fetched on demand: its URL (probed before a run) and what a
    user without network puts in ``data-dir`` instead."""

    title: str
    url: str
    folder: str
    tarball: str
    present: Callable[[Path], bool]

    def offline_problem(self, data_path: Path) -> str:
        """Why a run with download=false cannot have it (``RunConfig``'s data-dir error)."""
        return (
            f"no {self.title} at {data_path}: put the folder {self.folder}/ or {self.tarball} "
            f"({self.url}) there, or set download=true"
        )

    def unreachable_problem(self, data_path: Path) -> str:
        """Why a run with download=true cannot have it: nothing local, host unreachable."""
        host = urlparse(self.url).hostname
        return (
            f"no {self.title} in {data_path} and {host} is unreachable: put {self.folder}/ "
            f"or {self.tarball} ({self.url}) there"
        )


@dataclass(frozen=True)
class DatasetSpec:
    """One data set. ``class_counts``: training images per class in label order, before the
    validation split, known without loading (the shard checks need them); ``load``: the
    official (train, test) as uint8 (N, 3, ``image_size``, ``image_size``) with labels
    0..classes-1; ``download``: how it is fetched, if it is; ``check_files``: the problem of
    the files in ``data-dir`` ("" = none) for a set that is not downloaded;
    ``data_dir_is_data``: the folder's contents are the data (not a copy of a published
    set), so ``data-dir`` is part of a run's identity."""

    name: str
    class_counts: Callable[[SourceOptions], tuple[int, ...]]
    load: Callable[[SourceOptions], tuple[ImageSplit, ImageSplit]]
    image_size: int = STORED_SIZE
    download: Download | None = None
    check_files: Callable[[SourceOptions], str] | None = None
    data_dir_is_data: bool = False

    def num_classes(self, options: SourceOptions) -> int:
        """One count per class, so the counts are the class count too (they cannot differ)."""
        return len(self.class_counts(options))

    def files_problem(self, options: SourceOptions) -> str:
        """Why the run may not start with what ``data-dir`` holds, or "" (a set that is
        downloaded on demand only needs its files when download=false)."""
        if self.check_files is not None:
            return self.check_files(options)
        if self.download is None or options.download or self.download.present(options.data_dir):
            return ""
        return self.download.offline_problem(options.data_dir)


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Add an entry; a name is lowercase letters, digits and '-', and taken once."""
    if not _NAME.match(spec.name):
        raise ValueError(f"data set name {spec.name!r}: lowercase letters, digits and '-' only")
    if spec.name in DATASETS:
        raise ValueError(f"data set {spec.name!r} is registered already")
    DATASETS[spec.name] = spec
    return spec


def dataset_names() -> tuple[str, ...]:
    """The allowed values of run-config ``dataset``, in registration order."""
    return tuple(DATASETS)


def dataset_spec(name: str) -> DatasetSpec:
    """The entry of ``name``; an unknown name is one line listing the known ones."""
    if name not in DATASETS:
        raise ValueError(f"dataset={name!r}: must be one of {', '.join(DATASETS)}")
    return DATASETS[name]


# ---- the entries ---------------------------------------------------------------------------
def _uniform(classes: int, per_class: int, options: SourceOptions) -> tuple[int, ...]:
    return (per_class,) * classes


def _load_cifar(fmt: CifarFormat, options: SourceOptions) -> tuple[ImageSplit, ImageSplit]:
    return load_cifar(fmt, options.data_dir, options.download)


def _cifar(name: str, fmt: CifarFormat, classes: int, per_class: int) -> DatasetSpec:
    """A CIFAR set: the official folder or tarball in data-dir, else torchvision's download."""
    download = Download(fmt.title, fmt.url, fmt.folder, fmt.tarball, fmt.files_present)
    return DatasetSpec(
        name=name,
        class_counts=functools.partial(_uniform, classes, per_class),
        load=functools.partial(_load_cifar, fmt),
        download=download,
    )


def _synthetic_counts(options: SourceOptions) -> tuple[int, ...]:
    return (options.synthetic_train_per_class,) * SYNTHETIC_CLASSES


def _load_synthetic(seed: int, options: SourceOptions) -> tuple[ImageSplit, ImageSplit]:
    return synthetic_cifar100(
        options.synthetic_train_per_class, options.synthetic_test_per_class, seed
    )


def _synthetic(name: str) -> DatasetSpec:
    """The fixed generated set of that name's seed: no files, nothing downloaded."""
    load = functools.partial(_load_synthetic, SYNTHETIC_SEEDS[name])
    return DatasetSpec(name=name, class_counts=_synthetic_counts, load=load)


def _folder_counts(options: SourceOptions) -> tuple[int, ...]:
    return train_counts(options.data_dir)


def _folder_problem(options: SourceOptions) -> str:
    try:
        list_image_folder(options.data_dir)
    except DataNotFoundError as exc:
        return str(exc)
    return ""


def _load_folder(options: SourceOptions) -> tuple[ImageSplit, ImageSplit]:
    return load_image_folder(options.data_dir, STORED_SIZE)


register_dataset(_cifar("cifar100", CIFAR100, classes=100, per_class=500))
register_dataset(_synthetic("synthetic"))
register_dataset(_synthetic("synthetic-pretrain"))
register_dataset(_cifar("cifar10", CIFAR10, classes=10, per_class=5000))
# the user's own images: train/<class>/ and test/<class>/ in data-dir, which is then part of
# the run's identity (flower_app/data/image_folder.py)
register_dataset(
    DatasetSpec(
        name="image-folder",
        class_counts=_folder_counts,
        load=_load_folder,
        check_files=_folder_problem,
        data_dir_is_data=True,
    )
)


# ---- loading -------------------------------------------------------------------------------
def load_source(dataset: str, options: SourceOptions) -> tuple[ImageSplit, ImageSplit]:
    """(official train, official test) of the named data set, as ``options`` (a run-config's
    ``source_options``) ask; never a fallback to another."""
    spec = dataset_spec(dataset)
    train, test = spec.load(options)
    classes = spec.num_classes(options)
    for split in (train, test):
        _check_loaded(spec, split, classes)
    return train, test


def _check_loaded(spec: DatasetSpec, split: ImageSplit, classes: int) -> None:
    """What the entry promised the rest of the code: its image size and its labels."""
    size = tuple(split.images.shape[2:])
    if size != (spec.image_size, spec.image_size):
        raise ValueError(
            f"data set {spec.name!r} loaded images of {size[0]}x{size[1]} px, its entry "
            f"says {spec.image_size}"
        )
    if len(split) and not 0 <= int(split.labels.min()) <= int(split.labels.max()) < classes:
        raise ValueError(
            f"data set {spec.name!r} loaded labels outside 0..{classes - 1} (its classes)"
        )


def load_splits(
    dataset: str, options: SourceOptions, val_fraction: float, seed: int
) -> DatasetSplits:
    """Training/validation split of the official training set, and the official test set."""
    train, test = load_source(dataset, options)
    train_idx, val_idx = split_train_val(train.labels.numpy(), val_fraction, seed)
    t, v = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
    return DatasetSplits(
        ImageSplit(train.images[t].contiguous(), train.labels[t]),
        ImageSplit(train.images[v].contiguous(), train.labels[v]),
        test,
        dataset_spec(dataset).num_classes(options),
    )
