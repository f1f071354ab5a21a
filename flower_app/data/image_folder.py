"""The user's own images: ``train/<class>/<image>`` and ``test/<class>/<image>`` under a root.

The layout of torchvision's ``ImageFolder``, twice: one folder per class in ``train/`` and
the same class folders in ``test/``; classes are the sorted folder names (label i is the
i-th), so a class's label does not depend on the order a file system lists them. Listing
is kept apart from decoding: the class count and the images per class come from file
names alone, so the run-config checks (classes, shards) run in milliseconds before any
image is opened, and every layout problem is one line naming the folder.

Images are decoded with PIL through torchvision, converted to RGB, their shorter side
resized to the stored size and centre-cropped to a square (no distortion of the aspect
ratio), and kept as uint8 like every other source.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from flower_app.data.sources import DataNotFoundError, ImageSplit

SPLITS = ("train", "test")
LAYOUT = (
    "put the images in train/<class>/ and test/<class>/ under it, one folder per class, "
    "the same class folders in both"
)

# split -> class name -> its image files, classes and files sorted
Listing = dict[str, dict[str, tuple[str, ...]]]


def image_extensions() -> tuple[str, ...]:
    """The file endings torchvision's ``ImageFolder`` reads (``.jpg``, ``.png``, ...)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return IMG_EXTENSIONS


def _class_folders(split_dir: Path) -> list[str]:
    """Sorted names of the class folders (hidden ones, such as ``.ipynb_checkpoints``, are
    no class)."""
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and e.name[0] != ".")


def _image_files(class_dir: Path, extensions: tuple[str, ...]) -> tuple[str, ...]:
    """Every image file below ``class_dir`` (sub-folders and linked folders included, as
    ``ImageFolder`` does; hidden names skipped), in sorted order folder by folder. Plain
    strings: 60,000 files are listed in about 0.1 s."""
    found: list[str] = []
    for folder, folders, names in os.walk(class_dir, followlinks=True):
        folders[:] = sorted(name for name in folders if name[0] != ".")  # walked in order
        wanted = (n for n in sorted(names) if n.lower().endswith(extensions) and n[0] != ".")
        found.extend(os.path.join(folder, name) for name in wanted)
    return tuple(found)


# this process's last listing: (root, stamp) -> listing. A ClientApp builds and checks its
# run-config for every message, and the checks count the classes' images: listing 60,000
# files again each time cost about 0.1 s a message
_LISTED: dict[tuple[Path, tuple], Listing] = {}


def list_image_folder(root: Path) -> Listing:
    """The class folders and image files of both splits, or one ``DataNotFoundError`` line
    naming what is missing or does not match. Listed again only when a split folder or a
    class folder changed (its modification time: images added to or removed from a class
    folder, classes added or removed); a change only inside a class folder's sub-folders is
    seen by the next process, as for the data the ClientApp keeps."""
    stamp = _stamp(root)
    if stamp is not None and (root, stamp) in _LISTED:
        return _LISTED[root, stamp]
    listing = _list(root)
    if stamp is not None:
        _LISTED.clear()
        _LISTED[root, stamp] = listing
    return listing


def _stamp(root: Path) -> tuple | None:
    """The modification times of both split folders and their class folders (a few
    hundred ``stat`` calls, not a walk), or None when one cannot be read."""
    try:
        found = []
        for split in SPLITS:
            folder = root / split
            found.append((split, "", folder.stat().st_mtime_ns))
            found.extend((split, e.name, e.stat().st_mtime_ns) for e in os.scandir(folder))
    except OSError:
        return None
    return tuple(sorted(found))


def _list(root: Path) -> Listing:
    """The class folders and image files of both splits, or one ``DataNotFoundError`` line
    naming what is missing or does not match."""
    for split in SPLITS:
        if not (root / split).is_dir():
            what = "does not exist" if not root.exists() else f"has no {split}/ folder"
            raise DataNotFoundError(f"image folder {root} {what}: {LAYOUT}")
    classes = {split: _class_folders(root / split) for split in SPLITS}
    _check_classes(root, classes["train"], classes["test"])
    extensions = image_extensions()
    listing = {
        split: {name: _image_files(root / split / name, extensions) for name in classes[split]}
        for split in SPLITS
    }
    empty = [f"{s}/{name}" for s in SPLITS for name, files in listing[s].items() if not files]
    if empty:
        raise DataNotFoundError(
            f"image folder {root}: class folders with no image file "
            f"({' '.join(extensions)}): {', '.join(empty)}"
        )
    return listing


def _check_classes(root: Path, train: list[str], test: list[str]) -> None:
    """Both splits hold the same class folders, at least two of them."""
    if train != test:
        only_train = sorted(set(train) - set(test)) or ["none"]
        only_test = sorted(set(test) - set(train)) or ["none"]
        raise DataNotFoundError(
            f"image folder {root}: train/ and test/ must hold the same class folders; only in "
            f"train/: {', '.join(only_train)}; only in test/: {', '.join(only_test)}"
        )
    if len(train) < 2:
        raise DataNotFoundError(
            f"image folder {root}: {len(train)} class folder(s) in train/, a classifier "
            f"needs at least 2: {LAYOUT}"
        )


def train_counts(root: Path) -> tuple[int, ...]:
    """Training images per class, in label order, from the file names alone."""
    return tuple(len(files) for files in list_image_folder(root)["train"].values())


def load_image_folder(root: Path, size: int) -> tuple[ImageSplit, ImageSplit]:
    """(train, test) decoded at ``size`` x ``size``; label i is the i-th sorted class."""
    listing = list_image_folder(root)
    return _decode(listing["train"], size), _decode(listing["test"], size)


def _decode(files_by_class: dict[str, tuple[str, ...]], size: int) -> ImageSplit:
    """Every file as RGB uint8 (3, size, size): shorter side to ``size``, centre crop."""
    from torchvision import transforms
    from torchvision.datasets.folder import pil_loader

    to_tensor = transforms.Compose(
        [transforms.Resize(size), transforms.CenterCrop(size), transforms.PILToTensor()]
    )
    files = [path for paths in files_by_class.values() for path in paths]
    counts = [len(paths) for paths in files_by_class.values()]
    images = torch.empty((len(files), 3, size, size), dtype=torch.uint8)
    for i, path in enumerate(files):
        try:
            images[i] = to_tensor(pil_loader(path))
        except (OSError, ValueError, SyntaxError) as exc:  # PIL's errors for a broken file
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise DataNotFoundError(f"{path} is not a readable image: {reason}") from exc
    labels = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    return ImageSplit(images, torch.from_numpy(labels))
