"""Task addition and negation of task vectors (Ilharco et al., ICLR 2023; TaLoS, ICLR 2025).

Pure functions over state dicts and accuracy callables, so that they can be tested on a
linear model; loading runs is ``flower_app.runs.task_runs``. Choices and their sources:

- Only the backbone is edited: w0 + alpha * sum_t tau_t over the entries outside the head
  (``head.``). Each task keeps its own head, the one its own run ended with, and is tested
  on its own classes only, as Ilharco et al. evaluate each task with its own classification
  head (TaLoS does the same).
- alpha of an addition comes from the grid 0.0, 0.05, ..., 1.0 (the grid of Ilharco et al.'s
  held-out search, which TaLoS reuses): the one with the best mean normalized accuracy on
  the validation splits; ties go to the smallest alpha.
- Normalized accuracy of a task = acc(merged) / acc(the task's own fine-tuned model), both
  on the same split (Ilharco et al.; TaLoS Tab. 1 reports it).
- Negation: w0 - alpha * tau_target; alpha is the largest on the grid whose control-task
  accuracy stays >= 0.95 x the pretrained model's control accuracy on the validation split
  (Ilharco et al.'s rule of keeping 95% of the pretrained control accuracy; the code of
  Ortiz-Jimenez et al. instead takes the alpha of the lowest target accuracy under the
  same constraint, the same alpha whenever target accuracy falls with alpha). The
  pretrained model of a task is w0 with that task's own head.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from strategies.protocol import HEAD_PREFIX

ALPHA_GRID = tuple(round(i * 0.05, 2) for i in range(21))
CONTROL_KEEP = 0.95  # Ilharco et al. 2023, Sec. 3
SPLITS = ("val", "test")

State = Mapping[str, torch.Tensor]
# a task's accuracy of a full state dict (backbone + its own head) on "val" or "test"
Scorer = Callable[[State, str], float]


@dataclass(frozen=True)
class Task:
    """One task: its run's initial weights (w0 with that run's initial head), its task
    vector (final - initial, head included) and how to score a model on its classes."""

    name: str
    initial: State
    vector: State
    score: Scorer
    # accuracies of the pretrained and the fine-tuned model per split, computed once
    _references: dict[tuple[str, str], float] = field(
        default_factory=dict, compare=False, repr=False
    )

    def own_head(self) -> dict[str, torch.Tensor]:
        """The head the task's run ended with: initial head + the vector's head part."""
        return {
            n: self.initial[n].float() + self.vector[n].float()
            for n in self.initial
            if is_head(n) and n in self.vector
        } | {n: w for n, w in self.initial.items() if is_head(n) and n not in self.vector}

    def fine_tuned(self) -> dict[str, torch.Tensor]:
        """w0 + tau: the task's own fine-tuned model."""
        return edited(self.initial, self.vector, 1.0, self.own_head())

    def pretrained(self) -> dict[str, torch.Tensor]:
        """w0 with the task's own head: the model before its backbone was fine-tuned."""
        return edited(self.initial, {}, 0.0, self.own_head())

    def remember(self, which: str, split: str, accuracy: float) -> None:
        """An accuracy of the pretrained or fine-tuned model known without scoring it."""
        self._references[(which, split)] = accuracy

    def known(self, which: str, split: str) -> float | None:
        return self._references.get((which, split))

    def reference(self, which: str, split: str) -> float:
        """Accuracy of the ``pretrained`` or ``fine_tuned`` model on ``split``, once."""
        key = (which, split)
        if key not in self._references:
            self._references[key] = self.score(getattr(self, which)(), split)
        return self._references[key]


@dataclass(frozen=True)
class TaskScores:
    """A task's accuracies on one split: pretrained (w0 + own head), its own fine-tuned
    model, and the edited model."""

    pretrained: float
    fine_tuned: float
    edited: float

    @property
    def normalized(self) -> float:
        """acc(edited) / acc(own fine-tuned model); NaN when the latter is 0."""
        return _ratio(self.edited, self.fine_tuned)


@dataclass(frozen=True)
class Addition:
    alpha: float
    tasks: dict[str, TaskScores]  # test split
    val_curve: dict[float, float]  # alpha -> mean normalized validation accuracy

    @property
    def absolute(self) -> float:
        return sum(s.edited for s in self.tasks.values()) / len(self.tasks)

    @property
    def normalized(self) -> float:
        return sum(s.normalized for s in self.tasks.values()) / len(self.tasks)


@dataclass(frozen=True)
class Negation:
    alpha: float
    target: TaskScores  # test split
    control: TaskScores  # test split
    val_curve: dict[float, float]  # alpha -> control validation accuracy


def is_head(name: str) -> bool:
    return name.startswith(HEAD_PREFIX)


def backbone_sum(vectors: Sequence[State]) -> dict[str, torch.Tensor]:
    """Sum of the vectors' backbone entries (float32); the heads are left out."""
    total: dict[str, torch.Tensor] = {}
    for vector in vectors:
        for name, delta in vector.items():
            if not is_head(name):
                total[name] = total.get(name, 0.0) + delta.float()
    return total


def edited(
    initial: State, delta: State, alpha: float, head: State | None = None
) -> dict[str, torch.Tensor]:
    """``initial + alpha * delta`` on the backbone, ``head`` (else the initial head) on top.

    Entries ``delta`` lacks (integer buffers) stay as they are; dtypes are ``initial``'s.
    """
    out = {}
    for name, weight in initial.items():
        if is_head(name):
            source = head[name] if head is not None and name in head else weight
            out[name] = source.to(weight.dtype).clone()
        elif name in delta:
            out[name] = (weight.float() + alpha * delta[name].float()).to(weight.dtype)
        else:
            out[name] = weight.clone()
    return out


def pick_addition_alpha(curve: Mapping[float, float]) -> float:
    """The alpha of the best mean normalized validation accuracy; ties: the smallest."""
    best = max(v for v in curve.values() if v == v)  # NaN never wins
    return min(a for a, v in curve.items() if v == best)


def pick_negation_alpha(
    control: Mapping[float, float], pretrained_control: float, keep: float = CONTROL_KEEP
) -> float:
    """The largest alpha whose control accuracy is >= ``keep`` x the pretrained model's.

    alpha = 0 is the pretrained model itself and always qualifies.
    """
    allowed = [a for a, acc in control.items() if a == 0.0 or acc >= keep * pretrained_control]
    return max(allowed)


def _ratio(accuracy: float, own: float) -> float:
    return accuracy / own if own > 0 else float("nan")


def _scores(task: Task, state: State, split: str) -> TaskScores:
    """The edited model scored; the pretrained and fine-tuned ones once per task and split
    (addition and negation both report them, on the same test split)."""
    return TaskScores(
        task.reference("pretrained", split),
        task.reference("fine_tuned", split),
        task.score(state, split),
    )


def add_tasks(
    tasks: Sequence[Task], alpha: float | None = None, grid: Sequence[float] = ALPHA_GRID
) -> Addition:
    """Task addition: w0 + alpha * sum of the backbone vectors, each task with its own head.

    ``alpha=None`` searches ``grid`` on the validation splits; the result is on the test
    splits. The backbone of w0 is the first task's (``task_runs`` checks they are equal).
    """
    total = backbone_sum([t.vector for t in tasks])
    heads = {t.name: t.own_head() for t in tasks}

    def merged(task: Task, a: float) -> dict[str, torch.Tensor]:
        return edited(task.initial, total, a, heads[task.name])

    curve: dict[float, float] = {}
    if alpha is None:
        own = {t.name: t.reference("fine_tuned", "val") for t in tasks}
        for a in grid:
            ratios = [_ratio(t.score(merged(t, a), "val"), own[t.name]) for t in tasks]
            curve[a] = sum(ratios) / len(ratios)
        alpha = pick_addition_alpha(curve)
    test = {t.name: _scores(t, merged(t, alpha), "test") for t in tasks}
    return Addition(alpha, test, curve)


def negate_task(
    target: Task,
    control: Task,
    alpha: float | None = None,
    grid: Sequence[float] = ALPHA_GRID,
    keep: float = CONTROL_KEEP,
) -> Negation:
    """Task negation: w0 - alpha * tau_target on the backbone; target and control each
    with its own head. ``alpha=None``: the control rule on the validation splits."""
    delta = backbone_sum([target.vector])
    target_head, control_head = target.own_head(), control.own_head()

    def control_accuracy(a: float) -> float:
        return control.score(edited(control.initial, delta, -a, control_head), "val")

    curve: dict[float, float] = {}
    if alpha is None:  # the rule needs the control curve only
        curve = {a: control_accuracy(a) for a in grid}
        pretrained_control = control.reference("pretrained", "val")
        alpha = pick_negation_alpha(curve, pretrained_control, keep)
    return Negation(
        alpha,
        _scores(target, edited(target.initial, delta, -alpha, target_head), "test"),
        _scores(control, edited(control.initial, delta, -alpha, control_head), "test"),
        curve,
    )
