"""Client partitions: IID, class-window non-IID and Dirichlet shards, and the feasibility check."""

from __future__ import annotations

import datasets
import numpy as np
import pytest

from flower_app.data.partitioners import ClassWindowPartitioner, partition_indices
from flower_app.data.partitioning import partition_feasibility_error

# CIFAR-100's training split after a 10% stratified validation split: 450 per class, in a
# shuffled order like the real file (so indices and labels are not the same thing)
LABELS = np.random.default_rng(7).permutation(np.repeat(np.arange(100), 450))
GRID = [(k, nc) for k in (10, 100, 1000) for nc in (1, 5, 10, 50)]
# 10 x 1 and 10 x 5 cannot cover 100 classes; 1000 x 50 puts 500 clients on a class of 450
INFEASIBLE = {(10, 1), (10, 5), (1000, 50)}


def _check_shards(parts: list[np.ndarray], labels: np.ndarray) -> np.ndarray:
    """Sorted int64 shards, no index in two shards, together every index; returns sizes."""
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)
    everything = np.concatenate(parts)
    assert len(everything) == len(np.unique(everything)) == len(labels)
    assert everything.min() == 0 and everything.max() == len(labels) - 1
    return np.array([len(p) for p in parts])


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(("k", "nc"), GRID)
def test_non_iid_partition_properties(k, nc):
    reason = partition_feasibility_error(450, 100, k, "non-iid", nc)
    if (k, nc) in INFEASIBLE:
        assert reason is not None and f"num-clients={k}" in reason and "\n" not in reason
        with pytest.raises(ValueError, match=f"num-clients={k}"):
            partition_indices(LABELS, k, "non-iid", nc, seed=0)
        return
    assert reason is None
    parts = partition_indices(LABELS, k, "non-iid", nc, seed=0)
    assert len(parts) == k
    sizes = _check_shards(parts, LABELS)
    assert all(len(np.unique(LABELS[p])) == nc for p in parts)  # exactly Nc classes each
    # In this grid C=100 divides K*Nc, so every class is split equally among the same
    # number of clients and each shard's real-valued share is exactly 45000/K; rounding
    # with the error carried per client keeps sizes within 1 (the partitioner's claim).
    assert sizes.max() - sizes.min() <= 1
    assert _same(parts, partition_indices(LABELS, k, "non-iid", nc, seed=0))
    other = partition_indices(LABELS, k, "non-iid", nc, seed=1)
    assert not _same(parts, other)
    # the seed changes which classes a client holds, not only the order inside a shard
    classes = [frozenset(LABELS[p]) for p in parts]
    assert classes != [frozenset(LABELS[p]) for p in other]
    if nc > 1:  # ... and which classes are held together
        assert set(classes) != {frozenset(LABELS[p]) for p in other}


def test_non_iid_balances_when_classes_have_unequal_holders():
    # 33 x 5 = 165 class slots on 100 classes: 65 classes have 2 holders, 35 have 1.
    # Equal splits would give shards of 5 x 450 next to 5 x 225; the fitted split gives
    # each client N/K in reals, and rounding moves each of its Nc shares by < 1 image.
    parts = partition_indices(LABELS, 33, "non-iid", 5, seed=3)
    sizes = _check_shards(parts, LABELS)
    assert all(len(np.unique(LABELS[p])) == 5 for p in parts)
    assert np.abs(sizes - len(LABELS) / 33).max() < 5


def test_non_iid_with_unequal_class_sizes():
    labels = np.random.default_rng(0).integers(0, 100, 20_000)  # 150 to 250 per class
    parts = partition_indices(labels, 100, "non-iid", 10, seed=0)
    sizes = _check_shards(parts, labels)
    assert all(len(np.unique(labels[p])) == 10 for p in parts)
    assert sizes.max() - sizes.min() <= 2 * 10  # real shares equal; < 1 per class rounding


@pytest.mark.parametrize("k", [10, 100, 1000])
def test_iid_partition_properties(k):
    assert partition_feasibility_error(450, 100, k, "iid", 1) is None
    parts = partition_indices(LABELS, k, "iid", 1, seed=0)
    assert len(parts) == k
    sizes = _check_shards(parts, LABELS)
    assert sizes.max() - sizes.min() <= 1
    classes = len(np.unique(LABELS[parts[0]]))
    assert classes > min(50, sizes[0] // 2)  # a shuffle, not contiguous runs of a class
    assert _same(parts, partition_indices(LABELS, k, "iid", 1, seed=0))
    assert not _same(parts, partition_indices(LABELS, k, "iid", 1, seed=1))


def test_class_window_partitioner_serves_flwr_datasets_partitions():
    labels = LABELS[:4500]
    partitioner = ClassWindowPartitioner(20, "label", 10, seed=0)
    partitioner.dataset = datasets.Dataset.from_dict({"label": labels, "idx": np.arange(4500)})
    assert partitioner.num_partitions == 20
    expected = partition_indices(labels, 20, "non-iid", 10, seed=0)
    for i in (0, 7, 19):
        served = partitioner.load_partition(i)
        assert np.array_equal(np.asarray(served["idx"]), expected[i])
        assert len(set(served["label"])) == 10


def test_feasibility_messages_name_the_values_and_the_limit():
    cover = partition_feasibility_error(450, 100, 10, "non-iid", 5)
    assert "num-clients=10 x classes-per-client=5" in cover and ">= 100" in cover
    crowded = partition_feasibility_error(450, 100, 1000, "non-iid", 50)
    assert "500 clients" in crowded and "450 training images" in crowded
    assert "<= 45000" in crowded
    too_many = partition_feasibility_error(450, 100, 10, "non-iid", 101)
    assert "classes-per-client=101" in too_many
    assert "num-clients=2000" in partition_feasibility_error(1, 100, 2000, "iid", 1)
    assert partition_feasibility_error(1, 100, 100, "iid", 1) is None
    assert partition_feasibility_error(450, 100, 1000, "non-iid", 10) is None


def test_unknown_sharding_is_refused():
    with pytest.raises(ValueError, match="'iid', 'non-iid' or 'dirichlet'"):
        partition_indices(LABELS, 10, "pathological", 1, seed=0)


def _dirichlet(alpha: float, seed: int = 0, k: int = 100, min_size: int = 10) -> list[np.ndarray]:
    return partition_indices(
        LABELS, k, "dirichlet", 1, seed, dirichlet_alpha=alpha, dirichlet_min_size=min_size
    )


def _label_skew(parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between a client's label shares and the global ones
    (0: every client holds the global mix; 1: disjoint supports)."""
    overall = np.bincount(LABELS, minlength=100) / len(LABELS)
    shares = [np.bincount(LABELS[p], minlength=100) / len(p) for p in parts]
    return float(np.mean([0.5 * np.abs(s - overall).sum() for s in shares]))


def test_dirichlet_shards_are_seeded_and_hold_the_minimum():
    parts = _dirichlet(0.5)
    sizes = _check_shards(parts, LABELS)
    assert len(parts) == 100 and sizes.min() >= 10
    assert _same(parts, _dirichlet(0.5))
    assert not _same(parts, _dirichlet(0.5, seed=1))
    # a high minimum is still met (Flower Datasets redraws until it is)
    assert _check_shards(_dirichlet(0.5, min_size=200), LABELS).min() >= 200


def test_smaller_dirichlet_alpha_gives_more_label_skew():
    skew = {alpha: _label_skew(_dirichlet(alpha)) for alpha in (0.05, 0.5, 100.0)}
    # seen at seed 0: 0.05 -> 0.83, 0.5 -> 0.47, 100 -> 0.06 (the noise of ~450 images)
    assert skew[0.05] > skew[0.5] + 0.15 > skew[100.0] + 0.3, skew
    classes = [len(np.unique(LABELS[p])) for p in _dirichlet(0.05)]
    assert np.mean(classes) < 50  # few classes each, where alpha=100 gives nearly all 100
    assert np.mean([len(np.unique(LABELS[p])) for p in _dirichlet(100.0)]) > 95


def test_dirichlet_draws_that_miss_the_minimum_are_one_line_errors():
    with pytest.raises(ValueError, match="dirichlet-min-size=440") as failed:
        _dirichlet(0.01, min_size=440)
    message = str(failed.value)
    assert "dirichlet-alpha=0.01" in message and "\n" not in message
    assert "raise dirichlet-alpha" in message
    sure = partition_feasibility_error(450, 100, 100, "dirichlet", 1, min_size=451)
    assert "num-clients=100 x dirichlet-min-size=451 = 45100 exceeds the 45000" in sure
    assert partition_feasibility_error(450, 100, 100, "dirichlet", 1, min_size=450) is None
