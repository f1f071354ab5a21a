"""Data sets made inside the tests: a toy registry entry (registered through the registry
alone) and, for the built-in entries, files in their real formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from flower_app.data import registry
from flower_app.data.registry import DatasetSpec, SourceOptions, register_dataset
from flower_app.data.sources import ImageSplit

TOY_CLASSES, TOY_TRAIN, TOY_TEST = 4, 24, 6
TOY_COLOURS = ((200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30))


def toy_split(per_class: int, seed: int) -> ImageSplit:
    """Each class a flat colour plus noise, ordered by class: learnable in a round or two."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(TOY_CLASSES).repeat_interleave(per_class)
    noise = torch.randint(0, 40, (len(labels), 3, 32, 32), generator=generator)
    images = (torch.tensor(TOY_COLOURS)[labels][:, :, None, None] + noise).to(torch.uint8)
    return ImageSplit(images, labels)


def load_toy(options: SourceOptions) -> tuple[ImageSplit, ImageSplit]:
    return toy_split(TOY_TRAIN, 0), toy_split(TOY_TEST, 1)


def toy_counts(options: SourceOptions) -> tuple[int, ...]:
    return (TOY_TRAIN,) * TOY_CLASSES


@pytest.fixture
def fresh_registry(monkeypatch) -> None:
    """The built-in entries in a registry of the test's own: what it registers goes after."""
    monkeypatch.setattr(registry, "DATASETS", dict(registry.DATASETS))


@pytest.fixture
def toy(fresh_registry) -> DatasetSpec:
    """``dataset = "toy"``: 4 classes of 24 training and 6 test images, 32 px."""
    return register_dataset(DatasetSpec(name="toy", class_counts=toy_counts, load=load_toy))


# ---- an image folder of tiny PNG files ---------------------------------------------------------
# "yak" is written greyscale, the others alternately RGB and RGBA
FOLDER_COLOURS = {
    "cat": (220, 40, 40),
    "dog": (40, 220, 40),
    "owl": (40, 40, 220),
    "yak": (120, 120, 120),
}


def write_image_folder(
    root: Path, train: int = 6, test: int = 2, classes: dict | None = None
) -> Path:
    """``root/train/<class>/<i>.png`` and ``root/test/<class>/<i>.png``: 12 x 8 px images of
    each class's colour plus a little noise, in RGB, RGBA or greyscale (the loader makes
    every one RGB); ``classes`` maps a class to its colour (``FOLDER_COLOURS``)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("test", test)):
        for name, colour in (classes or FOLDER_COLOURS).items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                noise = rng.integers(0, 8, (8, 12, 1))  # the same in every channel
                pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
                mode = "L" if name == "yak" else ("RGB", "RGBA")[i % 2]
                Image.fromarray(pixels, "RGB").convert(mode).save(folder / f"{i}.png")
    return root
