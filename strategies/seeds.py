"""One way to derive every random seed of a run from its ``seed``.

numpy's ``SeedSequence`` mixes the run's seed with a spawn key: the purpose first, then
the numbers that make a draw unique (global round, attempt, partition). Draws for
different purposes or rounds are independent, and none depends on an earlier draw, so a
resumed run draws exactly what an uninterrupted one drew and no generator state is
saved. Both sides use it: the server for sampling and random masks, the ClientApp for
batches, augmentation, Fisher examples and injected failures.
"""

from __future__ import annotations

import random

import numpy as np

PURPOSES = (
    "sample",  # which partitions a round asks
    "batches",  # a client's mini-batch order
    "augment",  # a client's random crops and flips
    "fisher-examples",  # which examples a client scores
    "fisher-labels",  # labels drawn from the model for the Fisher
    "failure",  # injected client failures (client-failure-rate)
    "random-mask",  # scores of the random mask strategy
    "centralized-batches",
    "centralized-augment",
    "task-metrics-subset",  # the server's validation examples that task metrics score
)


def derive_seed(seed: int, purpose: str, *keys: int) -> int:
    """A 63-bit seed for ``purpose`` at ``keys`` (e.g. round, attempt, partition)."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown seed purpose {purpose!r}; known: {', '.join(PURPOSES)}")
    if seed < 0 or any(k < 0 for k in keys):
        raise ValueError(f"seed and keys must be >= 0, got seed={seed}, keys={keys}")
    sequence = np.random.SeedSequence(seed, spawn_key=(PURPOSES.index(purpose), *keys))
    return int(sequence.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def sample_partitions(
    num_partitions: int, per_round: int, seed: int, server_round: int, attempt: int = 0
) -> list[int]:
    """The partitions asked in a round (attempt k > 0: the k-th retry), sorted."""
    rng = random.Random(derive_seed(seed, "sample", server_round, attempt))
    return sorted(rng.sample(range(num_partitions), per_round))
