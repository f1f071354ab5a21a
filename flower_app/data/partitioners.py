"""Flower Datasets partitioner classes of this project (imported only when partitioning).

Kept out of ``flower_app.data.partitioning`` because subclassing ``Partitioner`` needs
``flwr_datasets`` and Hugging Face ``datasets`` at import time (slow imports), and that
module is imported by every ClientApp process through the run-config schema; the shard
arithmetic itself lives there and works on label arrays only.
"""

from __future__ import annotations

import warnings

import datasets
import numpy as np
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner

from flower_app.data.partitioning import class_window_partition


class ClassWindowPartitioner(Partitioner):
    """Non-IID shards: exactly ``num_classes_per_partition`` classes each, all classes used.

    Why not flwr-datasets' PathologicalPartitioner (0.6.1): its "deterministic" mode gives
    partition i the classes i, i+1, ..., i+Nc-1 (mod C), so with K < C partitions it uses
    only K+Nc-1 classes (K=10, Nc=10 covers 19 of 100); "random" and "first-deterministic"
    drop the classes nobody drew; a class is cut into equal parts, so shards are unequal
    whenever classes have unequal numbers of holders; and with "deterministic" the seed
    only reorders samples inside a shard, never changing which samples a shard holds.

    Here the classes sit on a circle in a seeded order, and partition i holds the Nc
    consecutive classes starting at floor(i * C / K): the starts are spread evenly, so
    every class is used when K * Nc >= C and each class has floor or ceil of K * Nc / C
    holders (for K = C this is the "deterministic" assignment, up to the seeded order).
    Each holder first gets one image of the class (so it really has its Nc classes);
    the rest of every class is divided by iterative proportional fitting of the
    partition x class table to equal shard sizes N / K and the exact class counts, then
    rounded class by class along the circle, the rounding error carried per partition.
    When C divides K * Nc every class is split equally and shard sizes differ by at most
    1 (so in all 792 such cases with K <= 1000 on 100 classes x 450 images we measured).
    Otherwise the fitting balances shards as far as the holder structure allows (K=33,
    Nc=5: 1362 to 1365 images), except that with Nc = 1 a shard is a share of a single
    class, so classes with fewer holders give bigger shards (K=150: 225 or 450).
    Each class's images are shuffled with the seed before they are dealt out.
    """

    def __init__(
        self, num_partitions: int, partition_by: str, num_classes_per_partition: int, seed: int
    ) -> None:
        super().__init__()
        self._num_partitions = num_partitions
        self._partition_by = partition_by
        self._nc = num_classes_per_partition
        self._seed = seed
        self._indices: list[np.ndarray] | None = None

    @property
    def num_partitions(self) -> int:
        return self._num_partitions

    def partition_rows(self) -> list[np.ndarray]:
        """Sorted row indices of every partition (computed once per dataset)."""
        if self._indices is None:
            # via Arrow: a plain column read iterates Python rows
            labels = self.dataset.with_format("arrow")[self._partition_by].to_numpy()
            self._indices = class_window_partition(
                labels, self._num_partitions, self._nc, self._seed
            )
        return self._indices

    def load_partition(self, partition_id: int) -> datasets.Dataset:
        return self.dataset.select(self.partition_rows()[partition_id])


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    sharding: str,
    classes_per_client: int,
    seed: int,
    *,
    dirichlet_alpha: float = 0.5,
    dirichlet_min_size: int = 10,
) -> list[np.ndarray]:
    """Sorted int64 indices into ``labels`` for each of the K client shards.

    "iid": a seeded shuffle cut by flwr-datasets' IidPartitioner into contiguous shards
    (sizes differ by at most 1). "non-iid": ``ClassWindowPartitioner``. "dirichlet":
    flwr-datasets' DirichletPartitioner (label shares per class ~ Dir(alpha), redrawn
    until every shard holds ``dirichlet_min_size``), seeded with ``seed``.
    """
    labels = np.asarray(labels)
    if num_partitions < 1:
        raise ValueError(f"num_partitions={num_partitions}: must be >= 1")
    if sharding == "iid":
        if num_partitions > len(labels):
            raise ValueError(f"{num_partitions} partitions but only {len(labels)} samples")
        order = np.random.default_rng(seed).permutation(len(labels))
        iid = IidPartitioner(num_partitions=num_partitions)
        table = {"label": labels[order], "idx": order}
        iid.dataset = datasets.Dataset.from_dict(table).with_format("arrow")  # fastest read
        return [
            np.sort(iid.load_partition(i)["idx"].to_numpy().astype(np.int64))
            for i in range(num_partitions)
        ]
    if sharding == "non-iid":
        # the partitioner's own row lists: load_partition would select the same rows with
        # datasets' overhead per partition (K of them) for nothing
        windows = ClassWindowPartitioner(num_partitions, "label", classes_per_client, seed)
        windows.dataset = datasets.Dataset.from_dict({"label": labels})
        return windows.partition_rows()
    if sharding == "dirichlet":
        return dirichlet_partition(
            labels, num_partitions, dirichlet_alpha, dirichlet_min_size, seed
        )
    raise ValueError(f"sharding={sharding!r}: must be 'iid', 'non-iid' or 'dirichlet'")


def dirichlet_partition(
    labels: np.ndarray, num_partitions: int, alpha: float, min_size: int, seed: int
) -> list[np.ndarray]:
    """Flower Datasets' ``DirichletPartitioner`` on a label array, as sorted row indices.

    It redraws up to 10 times when a shard is under ``min_size`` and warns each time;
    the warnings are kept back and its final failure becomes one line naming the keys.
    """
    dirichlet = DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        alpha=alpha,
        min_partition_size=min_size,
        self_balancing=False,  # Flower Datasets' default
        seed=seed,
    )
    table = {"label": labels, "idx": np.arange(len(labels))}
    dirichlet.dataset = datasets.Dataset.from_dict(table).with_format("arrow")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The specified min_partition_size")
            return [
                np.sort(dirichlet.load_partition(i)["idx"].to_numpy().astype(np.int64))
                for i in range(num_partitions)
            ]
    except ValueError as exc:
        if "max number of attempts" not in str(exc):
            raise
        raise ValueError(
            f"sharding='dirichlet' with dirichlet-alpha={alpha:g} left a client under "
            f"dirichlet-min-size={min_size} images in all 11 draws of Flower Datasets' "
            f"DirichletPartitioner ({num_partitions} clients, {len(labels)} images): raise "
            "dirichlet-alpha, or lower dirichlet-min-size or num-clients"
        ) from None
