"""Task addition and negation on constructed task vectors, and task-classes restriction."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flower_app.config import ConfigError, RunConfig
from flower_app.data.sources import DatasetSplits, ImageSplit
from flower_app.data.tasks import parse_task_classes, restrict_splits
from flower_app.runs.task_arithmetic import (
    ALPHA_GRID,
    Task,
    add_tasks,
    backbone_sum,
    edited,
    negate_task,
    pick_addition_alpha,
    pick_negation_alpha,
)
from flower_app.runs.task_runs import TaskRun, TaskVectorMismatch, _pretrained_key, check_compatible
from flower_app.studies.catalog import ARITHMETIC_ARMS, arm_and_task, study_settings


# ---- a linear model: features = body @ x, logits = head @ features -----------------------
def _accuracy(state, x: torch.Tensor, y: torch.Tensor) -> float:
    logits = x @ state["body.weight"].T @ state["head.weight"].T
    return float((logits.argmax(1) == y).float().mean())


def _linear_task(name: str, axis: int, head: torch.Tensor) -> Task:
    """Class 0 for x[axis] < 0, the head's last class above; scored on its own examples."""
    g = torch.Generator().manual_seed(axis)
    x = torch.randn(400, 2, generator=g)
    y = (x[:, axis] > 0).long() * (len(head) - 1)
    initial = {"body.weight": torch.zeros(2, 2), "head.weight": torch.zeros_like(head)}
    vector = {"body.weight": torch.zeros(2, 2), "head.weight": head}
    vector["body.weight"][axis, axis] = 1.0

    def score(state, split: str) -> float:
        return _accuracy(state, x, y)

    return Task(name, initial, vector, score)


def test_addition_sums_backbones_only_and_keeps_each_tasks_own_head():
    # heads of different shapes (2 and 3 classes): a sum over heads would fail, and each
    # task must be scored with its own head on its own classes
    a = _linear_task("a", 0, torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
    b = _linear_task("b", 1, torch.tensor([[0.0, -1.0], [0.0, 0.0], [0.0, 1.0]]))
    assert backbone_sum([a.vector, b.vector])["body.weight"].equal(torch.eye(2))
    result = add_tasks([a, b])
    # alpha 0 is the zero backbone (every logit 0: class 0); every alpha > 0 gives the same
    # argmax, so all tie and the smallest wins
    assert result.val_curve[0.0] < result.val_curve[0.05] == max(result.val_curve.values())
    assert result.alpha == 0.05
    for name in ("a", "b"):
        scores = result.tasks[name]
        assert scores.fine_tuned == scores.edited == 1.0 and scores.normalized == 1.0
        assert scores.pretrained < 0.6


def _scalar_task(name: str, score) -> Task:
    """A backbone of one number v (w0: v = 0, tau: v = 1) and a one-entry head."""
    initial = {"body.weight": torch.zeros(1), "head.weight": torch.zeros(1)}
    vector = {"body.weight": torch.ones(1), "head.weight": torch.ones(1)}
    return Task(name, initial, vector, lambda s, split: score(float(s["body.weight"]), split))


def test_addition_alpha_maximises_mean_normalized_validation_accuracy():
    # merged v = alpha * 2 (both vectors add 1); task a peaks at v = 0.9, b at v = 1.1,
    # so the mean normalized accuracy peaks at v = 1.0, alpha = 0.5; test = val - 0.1
    def peak(at: float):
        return lambda v, split: 1.0 - (v - at) ** 2 - (0.1 if split == "test" else 0.0)

    a, b = _scalar_task("a", peak(0.9)), _scalar_task("b", peak(1.1))
    result = add_tasks([a, b])
    assert result.alpha == 0.5
    assert result.tasks["a"].edited == pytest.approx(1.0 - 0.01 - 0.1)
    assert result.tasks["a"].fine_tuned == pytest.approx(1.0 - 0.01 - 0.1)  # own model: v = 1
    assert result.absolute == pytest.approx(0.89)
    given = add_tasks([a, b], alpha=0.25)
    assert given.alpha == 0.25 and given.val_curve == {}
    assert given.tasks["b"].edited == pytest.approx(1.0 - 0.36 - 0.1)


def test_negation_alpha_is_the_largest_that_keeps_95_percent_of_control():
    # negated v = -alpha; target accuracy 0.5 + 0.5 v falls with alpha; control
    # 0.8 - 0.2 v^2 keeps >= 0.95 x 0.8 = 0.76 while alpha^2 <= 0.2: alpha 0.4 (0.45 fails)
    target = _scalar_task("target", lambda v, split: 0.5 + 0.5 * max(-1.0, min(1.0, v)))
    control = _scalar_task("control", lambda v, split: 0.8 - 0.2 * v * v)
    result = negate_task(target, control)
    assert result.alpha == 0.4
    assert result.target.edited == pytest.approx(0.3) and result.target.pretrained == 0.5
    assert result.control.edited == pytest.approx(0.8 - 0.2 * 0.16)
    assert result.control.edited >= 0.95 * result.control.pretrained
    assert set(result.val_curve) == set(ALPHA_GRID)


def test_the_pretrained_and_fine_tuned_models_are_scored_once_per_task_and_split():
    """Addition and negation both report them on the test split; scoring a model is a pass
    over that split, so each is scored once (the edited models at every alpha, of course,
    each time)."""
    calls: list[tuple[str, float, str]] = []

    def counted(name: str):
        def score(v: float, split: str) -> float:
            calls.append((name, v, split))
            return 0.5 + 0.1 * v

        return score

    a, b = _scalar_task("a", counted("a")), _scalar_task("b", counted("b"))
    added, negated = add_tasks([a, b], alpha=0.25), negate_task(a, b, alpha=0.5)
    assert added.tasks["a"].pretrained == negated.target.pretrained == 0.5
    assert added.tasks["b"].fine_tuned == negated.control.fine_tuned == pytest.approx(0.6)
    for name in ("a", "b"):  # v = 0: pretrained, v = 1: fine-tuned (0.5 and -0.5: edited)
        assert sorted(v for n, v, split in calls if n == name and split == "test") == [
            -0.5,
            0.0,
            0.5,
            1.0,
        ]


def test_pick_rules_on_given_curves():
    assert pick_addition_alpha({0.0: 0.5, 0.3: 0.9, 0.6: 0.9, 0.9: float("nan")}) == 0.3
    control = {0.0: 0.8, 0.5: 0.77, 0.7: 0.75, 1.0: 0.79}  # not monotone: the largest that keeps
    assert pick_negation_alpha(control, 0.8) == 1.0
    assert pick_negation_alpha({0.0: 0.8, 0.05: 0.1}, 0.8) == 0.0  # alpha 0 always qualifies


def test_edited_keeps_integer_buffers_and_dtypes():
    initial = {"body.weight": torch.ones(2, dtype=torch.float64), "steps": torch.tensor([3])}
    out = edited(initial, {"body.weight": torch.ones(2)}, -0.5)
    assert out["body.weight"].dtype == torch.float64 and out["body.weight"].tolist() == [0.5, 0.5]
    assert out["steps"].tolist() == [3]


# ---- task-classes ----------------------------------------------------------------------
def test_parse_task_classes():
    assert parse_task_classes("", 4) == (0, 1, 2, 3)
    assert parse_task_classes("5-7, 1", 10) == (5, 6, 7, 1)
    for bad, reason in (("0-10", "below"), ("3-1", "backwards"), ("1,1", "twice"), ("x", "nei")):
        with pytest.raises(ValueError, match=reason):
            parse_task_classes(bad, 10)


def test_restrict_splits_keeps_own_classes_relabelled_in_order():
    labels = torch.tensor([0, 1, 2, 3, 2, 1], dtype=torch.int64)
    images = torch.arange(6, dtype=torch.uint8).view(6, 1, 1, 1).expand(6, 3, 2, 2).contiguous()
    split = ImageSplit(images, labels)
    task = restrict_splits(DatasetSplits(split, split, split, 4), (3, 1))
    assert task.num_classes == 2
    assert task.test.labels.tolist() == [1, 0, 1]  # classes 1, 3, 1 -> positions 1, 0, 1
    assert task.test.images[:, 0, 0, 0].tolist() == [1, 3, 5]


# ---- mismatched task vectors ------------------------------------------------------------
def _run(name: str, vector: dict, initial: dict | None = None, **keys) -> TaskRun:
    config = RunConfig.from_run_config(keys, check_files=False)
    initial = initial or {n: torch.zeros_like(v) for n, v in vector.items()}
    return TaskRun(Path(name), config, Task(name, initial, vector, lambda s, split: 0.0))


VECTOR = {"body.weight": torch.ones(2, 2), "head.weight": torch.ones(3, 2)}
MISMATCHES = [
    ({}, {}, {"model": "vit_tiny_test", "weights": "random"}, "different models", "model="),
    ({}, {}, {"weights": "random"}, "different base weights", "weights="),
    ({}, {}, {"strategy": "sparse-fedavg"}, "different masks", "'strategy': 'fedavg'"),
    (
        {"strategy": "sparse-fedavg"},
        {},
        {"strategy": "sparse-fedavg", "mask-strategy": "random"},
        "different masks",
        "least_sensitive",
    ),
    ({}, {"body.weight": torch.ones(2, 3)}, {}, "different shapes", "(2, 2) against (2, 3)"),
    ({}, {"extra.weight": torch.ones(1)}, {}, "different shapes", "'extra.weight'"),
]


@pytest.mark.parametrize(("keys_a", "vector_b", "keys_b", "what", "detail"), MISMATCHES)
def test_mismatched_vectors_are_refused_in_one_line(keys_a, vector_b, keys_b, what, detail):
    a = _run("run-a", VECTOR, **keys_a)
    b = _run("run-b", VECTOR | vector_b, **(keys_b or keys_a))  # {}: as run-a
    with pytest.raises(TaskVectorMismatch, match=f"task vectors of {what}") as caught:
        check_compatible([a, b])
    assert detail in str(caught.value) and "\n" not in str(caught.value)
    assert "run-a and run-b" in str(caught.value)


def test_different_initial_backbones_are_refused_and_heads_may_differ():
    a = _run("run-a", VECTOR)
    head = {"body.weight": torch.ones(2, 2), "head.weight": torch.ones(5, 2)}  # 5 classes
    check_compatible([a, _run("run-b", head)])  # heads are per task: no error
    other_w0 = {"body.weight": torch.eye(2), "head.weight": torch.zeros(3, 2)}
    with pytest.raises(TaskVectorMismatch, match=r"different base weights.*'body\.weight'"):
        check_compatible([a, _run("run-b", VECTOR, other_w0)])


# ---- the study's settings ------------------------------------------------------------------
def test_study_settings_are_arm_by_task_with_rounds_by_the_passes_rule():
    base = {"dataset": "synthetic", "num-server-rounds": 32, "head-warmup-rounds": 8}
    settings = study_settings("task-arithmetic", base)
    assert [s.name for s in settings[:3]] == ["dense-task0", "dense-task1", "least_sensitive-task0"]
    assert len(settings) == 2 * len(ARITHMETIC_ARMS) == 12
    assert {s.overrides["task-classes"] for s in settings} == {"0-49", "50-99"}
    assert {s.overrides["num-server-rounds"] for s in settings} == {16}  # 32 / 2 tasks
    assert {s.overrides["head-warmup-rounds"] for s in settings} == {4}
    # every arm: sparse FedAvg with the head frozen after the same warm-up; dense = full mask
    assert all(s.overrides["strategy"] == "sparse-fedavg" for s in settings)
    assert all(s.overrides["head"] == "frozen" for s in settings)
    assert settings[0].overrides["sparsity"] == 0.0
    three = study_settings("task-arithmetic", base, tasks=3)
    assert [s.overrides["task-classes"] for s in three[:3]] == ["0-32", "33-65", "66-99"]
    assert three[0].overrides["num-server-rounds"] == 11  # ceil(32 / 3)
    assert arm_and_task("least_sensitive-task1") == ("least_sensitive", 1)
    with pytest.raises(ConfigError, match=r"--tasks 1 is not allowed: must be in 2\.\.50"):
        study_settings("task-arithmetic", base, tasks=1)


def test_a_client_process_trains_each_run_on_its_own_task():
    # the in-process engine runs a study's tasks one after another in one process: the
    # client's data cache must not hand task 0 the images of task 1
    from flower_app import client_app
    from flower_app.runs.runtime import run_splits

    keys = {"dataset": "synthetic", "synthetic-train-per-class": 10, "num-clients": 5}
    keys |= {"model": "vit_tiny_test", "weights": "random", "image-size": 32, "device": "cpu"}
    for classes in ("50-99", "0-49"):
        cfg = RunConfig.from_run_config(keys | {"task-classes": classes}, check_files=False)
        runtime = client_app.get_runtime(cfg, 0)
        expected = run_splits(cfg).train
        assert torch.equal(runtime.train.images.cpu(), expected.images)
        assert runtime.train.labels.max() == 49 and runtime.model.head.out_features == 50


@pytest.mark.parametrize(
    ("change", "same"),
    [
        ({"synthetic-test-per-class": 10}, False),  # another test split: another accuracy
        ({"synthetic-train-per-class": 20}, False),
        ({"task-classes": "0-49"}, False),
        ({"seed": 1}, False),
        ({"lr": 0.01}, True),  # training settings do not change w0 with a given head
        ({"download": True}, True),
    ],
)
def test_the_pretrained_accuracy_is_shared_only_between_runs_of_the_same_data(change, same):
    """Arms of one seed and task warm up the same head, so their pretrained accuracy is
    computed once; a run whose split or task differs must not reuse it."""
    a, b = _run("run-a", VECTOR), _run("run-b", VECTOR, **change)
    assert (_pretrained_key(a.config, a.task) == _pretrained_key(b.config, b.task)) is same
    head = {"body.weight": torch.ones(2, 2), "head.weight": 2 * torch.ones(3, 2)}
    c = _run("run-c", head, **change)  # the same data, another head
    assert _pretrained_key(b.config, b.task) != _pretrained_key(c.config, c.task)
