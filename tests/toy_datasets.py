"""Data sets made inside the tests: a toy registry entry (registered through the registry
alone) and, for the built-in entries, files in their real formats."""

from __future__ import annotations

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
