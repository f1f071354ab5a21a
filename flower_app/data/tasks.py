"""A task as a subset of the data set's classes: the run-config key ``task-classes``.

Task arithmetic (Ilharco et al., ICLR 2023) fine-tunes one model per task and adds or
negates their task vectors; each task keeps its own classification head. Here a task is a
block of classes of the same data set: ``task-classes = "0-49"`` restricts a run's train,
validation and test splits to classes 0..49, relabels them 0..n-1 in the listed order, and
the model's head gets n outputs. Sharding (IID, Nc, Dirichlet) then works within the task.
"""

from __future__ import annotations

import re

import torch

from flower_app.data.sources import DatasetSplits, ImageSplit

ALLOWED = (
    '"" (all classes), or class ids and ranges separated by commas, such as "0-49" or '
    '"0,2,5-9", each id once'
)
_PART = re.compile(r"^(\d+)(?:-(\d+))?$")


def parse_task_classes(spec: str, num_classes: int) -> tuple[int, ...]:
    """The task's classes in order (all ``num_classes`` for ""); ``ValueError`` with the
    reason on one line when ``spec`` is not a list of distinct ids below ``num_classes``."""
    if not spec.strip():
        return tuple(range(num_classes))
    classes: list[int] = []
    for part in spec.replace(" ", "").split(","):
        match = _PART.match(part)
        if not match:
            raise ValueError(f"{part!r} is neither a class id nor a range a-b; allowed: {ALLOWED}")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if high < low:
            raise ValueError(f"range {part!r} runs backwards; allowed: {ALLOWED}")
        if high >= num_classes:
            raise ValueError(f"class {high} is not below the data set's {num_classes} classes")
        classes.extend(range(low, high + 1))
    repeated = sorted({c for c in classes if classes.count(c) > 1})
    if repeated:
        raise ValueError(f"class {repeated[0]} is listed twice; allowed: {ALLOWED}")
    return tuple(classes)


def restrict_split(split: ImageSplit, classes: tuple[int, ...], num_classes: int) -> ImageSplit:
    """The examples of ``classes`` only, labels remapped to their position in ``classes``."""
    relabel = torch.full((num_classes,), -1, dtype=torch.int64)
    relabel[list(classes)] = torch.arange(len(classes))
    new_labels = relabel[split.labels]
    keep = new_labels >= 0
    return ImageSplit(split.images[keep].contiguous(), new_labels[keep].contiguous())


def restrict_splits(splits: DatasetSplits, classes: tuple[int, ...]) -> DatasetSplits:
    """Every split restricted to the task (a no-op for all classes in their own order)."""
    if classes == tuple(range(splits.num_classes)):
        return splits
    n = splits.num_classes
    return DatasetSplits(
        restrict_split(splits.train, classes, n),
        restrict_split(splits.val, classes, n),
        restrict_split(splits.test, classes, n),
        len(classes),
    )
