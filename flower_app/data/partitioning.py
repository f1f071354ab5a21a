"""The arithmetic of client shards on label arrays: class windows and their feasibility.

Kept apart from the data sources because it works on label arrays only, whatever the
images are, and because config validation asks ``partition_feasibility_error`` whether a
partition can keep its promises before any data is loaded. It imports neither Hugging
Face ``datasets`` nor ``flwr_datasets``: every ClientApp process imports this module
through the run-config schema, and a deployment node with its own ``data-dir`` never
partitions. The Flower Datasets side (``ClassWindowPartitioner``, ``partition_indices``)
is ``flower_app.data.partitioners``, which imports this module and not the reverse.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def class_window_partition(
    labels: np.ndarray, num_partitions: int, nc: int, seed: int
) -> list[np.ndarray]:
    """Row indices per partition for ``ClassWindowPartitioner`` (see its docstring in
    ``flower_app.data.partitioners``)."""
    classes, class_of, counts = np.unique(labels, return_inverse=True, return_counts=True)
    k, c = num_partitions, len(classes)
    reason = partition_feasibility_error(int(counts.min()), c, k, "non-iid", nc)
    if reason:
        raise ValueError(reason)
    rng = np.random.default_rng(seed)
    circle = rng.permutation(c)  # circle position -> class
    starts = np.arange(k) * c // k
    edge_part = np.repeat(np.arange(k), nc)
    edge_class = circle[(starts[:, None] + np.arange(nc)).ravel() % c]
    amounts = _balanced_amounts(edge_part, edge_class, counts, k, circle)
    # deal each class's shuffled images to its holders, class by class
    by_class = np.lexsort((edge_part, edge_class))
    owner = np.repeat(edge_part[by_class], amounts[by_class])
    shuffled = rng.permutation(len(labels))
    rows = shuffled[np.argsort(class_of[shuffled], kind="stable")]
    part_of_row = np.empty(len(labels), dtype=np.int64)
    part_of_row[rows] = owner
    grouped = np.argsort(part_of_row, kind="stable")  # sorted rows within each partition
    sizes = np.bincount(part_of_row, minlength=k)
    return [p.astype(np.int64) for p in np.split(grouped, np.cumsum(sizes)[:-1])]


def _balanced_amounts(
    edge_part: np.ndarray, edge_class: np.ndarray, counts: np.ndarray, k: int, order: np.ndarray
) -> np.ndarray:
    """Integer images per (partition, class) edge: >= 1, class sums exact, rows ~ N / K."""
    holders = np.bincount(edge_class, minlength=len(counts))
    rest = (counts - holders).astype(np.float64)  # after the one image each holder is sure of
    target = np.full(k, rest.sum() / k)
    x = rest[edge_class] / holders[edge_class]  # equal split: exact when K * Nc % C == 0
    for _ in range(500):
        rows = np.bincount(edge_part, weights=x, minlength=k)
        if np.abs(rows - target).max() < 0.25:
            break
        x *= np.divide(target, rows, out=np.ones(k), where=rows > 0)[edge_part]
        cols = np.bincount(edge_class, weights=x, minlength=len(counts))
        x *= np.divide(rest, cols, out=np.ones(len(counts)), where=cols > 0)[edge_class]
    # round per class (sums stay exact); the remainder goes to the partitions furthest behind
    amounts = np.floor(x + 1e-9).astype(np.int64)
    behind = np.zeros(k)  # real share minus integer share so far, per partition
    for cls in order:  # along the circle, so a partition's classes are rounded in a row
        edges = np.flatnonzero(edge_class == cls)
        spare = int(rest[cls]) - int(amounts[edges].sum())
        owed = x[edges] - amounts[edges] + behind[edge_part[edges]]
        if spare > 0:
            amounts[edges[np.argsort(-owed, kind="stable")[:spare]]] += 1
        elif spare < 0:  # only if float error pushed a floor up; take from the least owed
            owed[amounts[edges] == 0] = np.inf
            amounts[edges[np.argsort(owed, kind="stable")[:-spare]]] -= 1
        behind[edge_part[edges]] += x[edges] - amounts[edges]
    return amounts + 1


def partition_feasibility_error(
    num_train_per_class: int | Sequence[int],
    num_classes: int,
    num_partitions: int,
    sharding: str,
    classes_per_client: int,
    min_size: int = 1,
) -> str | None:
    """Why the partition cannot have the promised properties (one line), or None if it can.

    ``num_train_per_class``: one count for every class, or each class's own (an image
    folder's classes differ): the total counts for IID and Dirichlet shards, the smallest
    class for Nc. ``min_size`` is the Dirichlet shards' least size (``dirichlet-min-size``);
    whether a draw meets it is random, so only the sure failure (K x min > N) is found here.
    """
    k, nc, c = num_partitions, classes_per_client, num_classes
    if k < 1:
        return f"num-clients={k}: must be >= 1"
    if isinstance(num_train_per_class, int):
        least, total = num_train_per_class, num_train_per_class * c
    else:
        least, total = min(num_train_per_class), sum(num_train_per_class)
    if sharding == "iid":
        if k > total:
            return f"num-clients={k} exceeds the {total} training images: need at most {total}"
        return None
    if sharding == "dirichlet":
        if k * min_size > total:
            return (
                f"num-clients={k} x dirichlet-min-size={min_size} = {k * min_size} exceeds "
                f"the {total} training images: lower either"
            )
        return None
    if sharding != "non-iid":
        return f"sharding={sharding!r}: must be 'iid', 'non-iid' or 'dirichlet'"
    if not 1 <= nc <= c:
        return f"classes-per-client={nc}: must be between 1 and the {c} classes"
    if k * nc < c:
        return (
            f"num-clients={k} x classes-per-client={nc} = {k * nc} cannot cover all {c} "
            f"classes: need num-clients x classes-per-client >= {c}"
        )
    holders = math.ceil(k * nc / c)  # most clients that share one class
    if holders > least:
        return (
            f"num-clients={k} x classes-per-client={nc} puts up to {holders} clients on one "
            f"class of {least} training images, so some would get none of it: "
            f"need num-clients x classes-per-client <= {least * c}"
        )
    return None
