"""Task-arithmetic interference of a round, measured in function space on the server.

Each aggregated client k is a task with its own label distribution p_k; its update t_k
is a task vector, and the round's applied update t (after the server rule) is their
merge. After the round the server scores, on its own validation split reweighted to
p_k, the global weights before the round (w), the client's own model (w + t_k) and the
merged model (w + t), and reports per round the mean over clients of

- normalized accuracy acc(w + t) / acc(w + t_k) (Ilharco et al., ICLR 2023);
- retained gain (acc(w + t) - acc(w)) / (acc(w + t_k) - acc(w)), over the clients whose
  own gain is positive; the others are counted apart;
- disagreement: the p_k-weighted share of examples on which w + t_k and w + t predict
  different classes (weight disentanglement error, Ortiz-Jimenez et al., NeurIPS 2023).

Every model is run once over a fixed, seeded, class-stratified subset of the validation
split (``stratified_subset``); a client's reweighted accuracy is sum_c p_k(c) acc_c
from per-class accuracies on that subset, so one forward pass per model serves every
client: at most (clients + 2) passes per measured round. The strategy puts the models on the
round's record (``strategies.record.TaskModels``); ``TaskInterference`` reads and drops
them, so no client's weights outlive the round.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord

from flower_app.data.sources import ImageSplit
from strategies import protocol
from strategies.plan import HEAD_WARMUP, TRAIN, RoundPosition
from strategies.record import RoundRecord, State

# the phases whose rounds change the weights with client updates (calibration sends none)
MEASURED_PHASES = frozenset({HEAD_WARMUP, TRAIN})
# a client's own gain counts as positive above this: float sums of equal accuracies can
# differ in their last bits, while one example more is worth p_k(c) / (examples of c), which
# is orders of magnitude larger for any label share and subset this app can produce
GAIN_TOLERANCE = 1e-9
COLUMNS = (
    "task-normalized-accuracy",
    "task-retained-gain",
    "task-nonpositive-gain-clients",
    "task-disagreement",
    "task-accuracy-base",
    "task-accuracy-own",
    "task-accuracy-merged",
    "seconds-task-metrics",
)


@dataclass(frozen=True)
class TaskRounds:
    """The rounds measured: every ``every``-th round of the head warm-up and the training
    phase, and the last round of each (as the central evaluation's cadence)."""

    every: int

    def __call__(self, position: RoundPosition) -> bool:
        if position.phase not in MEASURED_PHASES:
            return False
        return position.phase_round % self.every == 0 or position.last_of_phase


def stratified_subset(
    labels: torch.Tensor, budget: int, num_classes: int, seed: int
) -> torch.Tensor:
    """Sorted indices of at most ``budget`` examples: budget // num_classes of each class
    (all of a class that has fewer), drawn with ``seed``. Equal counts per class give every
    class's accuracy the same precision, whichever classes a client holds."""
    per_class = budget // num_classes
    generator = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    chosen = []
    for label in range(num_classes):
        members = (labels == label).nonzero().flatten()
        order = torch.randperm(len(members), generator=generator)
        chosen.append(members[order[:per_class]])
    return torch.cat(chosen).sort().values


def label_shares(
    partitions: Iterable[Mapping[str, Any]], num_classes: int
) -> dict[int, torch.Tensor]:
    """p_k(c) per partition id, from the partition query's classes and class counts (what
    ``partitions.csv`` holds: IID, Nc and Dirichlet shards alike)."""
    shares = {}
    for partition in partitions:
        counts = torch.zeros(num_classes, dtype=torch.float64)
        classes = torch.tensor([int(c) for c in partition[protocol.CLASSES]], dtype=torch.int64)
        held = [float(c) for c in partition[protocol.CLASS_COUNTS]]
        counts[classes] = torch.tensor(held, dtype=torch.float64)
        shares[int(partition[protocol.PARTITION_ID])] = counts / counts.sum()
    return shares


@dataclass(frozen=True)
class ClientScores:
    """One client's reweighted accuracies of w, w + t_k and w + t, and the disagreement
    of w + t_k with w + t."""

    base: float
    own: float
    merged: float
    disagreement: float


class SubsetScores:
    """Per-class shares on the scored subset, and their p_k-weighted sums."""

    def __init__(self, labels: torch.Tensor, num_classes: int) -> None:
        self.labels = labels.cpu()
        self.num_classes = num_classes
        self.counts = torch.bincount(self.labels, minlength=num_classes).to(torch.float64)

    def per_class(self, hits: torch.Tensor) -> torch.Tensor:
        """The share of each class's examples where ``hits`` is True (0 where none)."""
        sums = torch.bincount(self.labels, weights=hits.cpu().double(), minlength=self.num_classes)
        return sums / self.counts.clamp(min=1.0)

    def weighted(self, share: torch.Tensor, per_class: torch.Tensor) -> float:
        """sum_c p_k(c) x per_class(c), over the classes the subset holds (p_k renormalized
        there; NaN for a client none of whose classes the subset holds)."""
        weights = share * (self.counts > 0)
        total = float(weights.sum())
        return float((weights * per_class).sum()) / total if total > 0 else math.nan

    def client(
        self,
        share: torch.Tensor,
        base: torch.Tensor,
        own: torch.Tensor,
        merged: torch.Tensor,
    ) -> ClientScores:
        """A client's scores from the three models' predicted classes."""
        return ClientScores(
            base=self.weighted(share, self.per_class(base == self.labels)),
            own=self.weighted(share, self.per_class(own == self.labels)),
            merged=self.weighted(share, self.per_class(merged == self.labels)),
            disagreement=self.weighted(share, self.per_class(own != merged)),
        )


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def round_metrics(scores: Sequence[ClientScores]) -> dict[str, float]:
    """The round's columns: means over clients (normalized accuracy over those whose own
    model scores above 0; retained gain over those whose own gain is positive, the others
    counted in ``task-nonpositive-gain-clients``)."""
    gains = [s.own - s.base for s in scores]
    retained = [
        (s.merged - s.base) / gain
        for s, gain in zip(scores, gains, strict=True)
        if gain > GAIN_TOLERANCE
    ]
    return {
        "task-normalized-accuracy": _mean([s.merged / s.own for s in scores if s.own > 0]),
        "task-retained-gain": _mean(retained),
        "task-nonpositive-gain-clients": float(sum(g <= GAIN_TOLERANCE for g in gains)),
        "task-disagreement": _mean([s.disagreement for s in scores]),
        "task-accuracy-base": _mean([s.base for s in scores]),
        "task-accuracy-own": _mean([s.own for s in scores]),
        "task-accuracy-merged": _mean([s.merged for s in scores]),
    }


class TaskInterference:
    """A round hook: the task-arithmetic columns of a round whose record carries the
    strategy's ``task_models`` (the rounds ``TaskRounds`` names), and their seconds.

    ``predict(state, split)`` is the class that weights ``state`` predict for each example
    of ``split``; ``subset`` the scored validation examples; ``shares`` p_k by partition id.
    A client's own model is run only on the examples of the classes it holds (the others
    weigh 0 in each of its scores), so a client with 5 of 100 classes costs a twentieth of
    a pass. With ``reuse_base`` (every round measured) the previous round's merged
    predictions serve as this round's w when this round started from those very weights.
    """

    def __init__(
        self,
        predict: Callable[[State, ImageSplit], torch.Tensor],
        subset: ImageSplit,
        shares: Mapping[int, torch.Tensor],
        num_classes: int,
        reuse_base: bool = False,
    ) -> None:
        self.predict = predict
        self.subset = subset
        self.scores = SubsetScores(subset.labels, num_classes)
        self.shares = dict(shares)
        self.rows = {pid: self.rows_of(share) for pid, share in self.shares.items()}
        self.reuse_base = reuse_base
        self.last: tuple[State, torch.Tensor] | None = None  # (merged weights, predictions)

    def rows_of(self, share: torch.Tensor) -> torch.Tensor | None:
        """The subset's examples of the classes in ``share`` (None: all of them)."""
        held = (share > 0)[self.scores.labels]
        return None if bool(held.all()) else held.nonzero().flatten()

    def own_predictions(self, pid: int, state: State) -> torch.Tensor:
        """w + t_k's predictions on the client's rows; -1 (no class) elsewhere."""
        rows = self.rows[pid]
        if rows is None:
            return self.predict(state, self.subset)
        images = self.subset.images[rows.to(self.subset.images.device)]
        out = torch.full_like(self.scores.labels, -1)
        out[rows] = self.predict(state, ImageSplit(images, self.scores.labels[rows]))
        return out

    def base_predictions(self, base: State) -> torch.Tensor:
        if self.last is not None and self.last[0] is base:
            return self.last[1]
        return self.predict(base, self.subset)

    def __call__(self, record: RoundRecord, arrays: ArrayRecord) -> None:
        models = record.task_models
        if models is None:
            return
        record.task_models = None  # the clients' weights live no longer than this call
        t0 = time.perf_counter()
        base = self.base_predictions(models.base)
        merged = self.predict(models.merged, self.subset)
        self.last = (models.merged, merged) if self.reuse_base else None
        scores = []
        for client in models.clients:
            own = self.own_predictions(client.partition_id, client.state())
            share = self.shares[client.partition_id]
            scores.append(self.scores.client(share, base, own, merged))
        record.add(round_metrics(scores) | {"seconds-task-metrics": time.perf_counter() - t0})
