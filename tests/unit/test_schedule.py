"""The one learning-rate schedule: by step (centralized) and by round (federated)."""

from __future__ import annotations

import itertools
import math

import pytest

from flower_app.config import RunConfig
from flower_app.runs.schedule import lr_at_round, lr_at_step
from tests.conftest import quick_run_config


# ---- the formulas as they were before the two copies were merged (the reference) -----------
def _old_lr_at_round(server_round: int, cfg: RunConfig) -> float:
    if server_round <= cfg.warmup_rounds:
        return cfg.lr * server_round / cfg.warmup_rounds
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = cfg.num_server_rounds - cfg.warmup_rounds
    progress = (server_round - 1 - cfg.warmup_rounds) / span
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


GRID = [
    (total, warmup, schedule, lr, min_lr)
    for total in (1, 2, 3, 8, 10, 37, 500)
    for warmup in sorted({0, 1, 2, total // 3, total - 1})
    if 0 <= warmup < total
    for schedule in ("cosine", "constant")
    for lr, min_lr in ((0.1, 0.0), (0.05, 0.001), (0.3, 0.3))
]


@pytest.mark.parametrize(("total", "warmup", "schedule", "lr", "min_lr"), GRID)
def test_round_and_step_equal_the_old_formulas_exactly(total, warmup, schedule, lr, min_lr):
    cfg = RunConfig(
        num_server_rounds=total, warmup_rounds=warmup, lr_schedule=schedule, lr=lr, min_lr=min_lr
    )
    for r in range(1, total + 1):
        old = _old_lr_at_round(r, cfg)
        assert lr_at_round(r, cfg) == old, (r, cfg)
        assert lr_at_step(r - 1, total, warmup, lr, min_lr, schedule) == old, r
    # one past the last step: the end of the cosine (min-lr), or lr when constant
    end = lr_at_step(total, total, warmup, lr, min_lr, schedule)
    assert end == pytest.approx(lr if schedule == "constant" else min_lr, abs=1e-15)


def test_rounds_outside_the_training_phase_are_refused():
    cfg = RunConfig(num_server_rounds=4, warmup_rounds=1, lr=0.1, min_lr=0.0)
    with pytest.raises(ValueError, match="step=5"):
        lr_at_round(6, cfg)


# ---- by step --------------------------------------------------------------------------------
def test_warmup_is_linear_then_cosine_to_min_lr():
    total, warm, lr = 100, 10, 0.1
    assert lr_at_step(0, total, warm, lr, 0.0) == pytest.approx(0.01)
    assert lr_at_step(4, total, warm, lr, 0.0) == pytest.approx(0.05)
    assert lr_at_step(9, total, warm, lr, 0.0) == pytest.approx(0.1)
    assert lr_at_step(10, total, warm, lr, 0.0) == pytest.approx(0.1)  # cosine starts at lr
    assert lr_at_step(55, total, warm, lr, 0.0) == pytest.approx(0.05)  # half way: (lr+min)/2
    assert lr_at_step(100, total, warm, lr, 0.0) == pytest.approx(0.0, abs=1e-15)
    assert lr_at_step(55, total, warm, lr, 0.01) == pytest.approx(0.055)
    assert lr_at_step(100, total, warm, lr, 0.01) == pytest.approx(0.01)


def test_cosine_without_warmup_hand_computed():
    # step 25 of 100: 0.05 * (1 + cos(pi / 4))
    assert lr_at_step(0, 100, 0, 0.1, 0.0) == pytest.approx(0.1)
    assert lr_at_step(25, 100, 0, 0.1, 0.0) == pytest.approx(0.0853553390593)
    assert lr_at_step(75, 100, 0, 0.1, 0.0) == pytest.approx(0.0146446609407)
    lrs = [lr_at_step(s, 100, 0, 0.1, 0.001) for s in range(101)]
    assert all(a > b for a, b in itertools.pairwise(lrs))
    assert lrs[-1] == pytest.approx(0.001) and min(lrs[:-1]) > 0.001


def test_constant_schedule_and_bad_steps():
    assert {lr_at_step(s, 50, 5, 0.2, 0.0, "constant") for s in range(5, 51)} == {0.2}
    assert lr_at_step(1, 50, 5, 0.2, 0.0, "constant") == pytest.approx(0.08)
    with pytest.raises(ValueError):
        lr_at_step(101, 100, 0, 0.1, 0.0)
    with pytest.raises(ValueError):
        lr_at_step(-1, 100, 0, 0.1, 0.0)
    with pytest.raises(ValueError):
        lr_at_step(0, 100, 100, 0.1, 0.0)


# ---- by round -------------------------------------------------------------------------------
def test_cosine_schedule_over_rounds():
    cfg = RunConfig.from_run_config(quick_run_config(num_server_rounds=10, lr=0.1, min_lr=0.0))
    lrs = [lr_at_round(r, cfg) for r in range(1, 11)]
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[5] == pytest.approx(0.05)
    assert all(a > b for a, b in itertools.pairwise(lrs))
    warm = RunConfig.from_run_config(quick_run_config(num_server_rounds=10, warmup_rounds=2))
    assert lr_at_round(1, warm) == pytest.approx(warm.lr / 2)
    assert lr_at_round(3, warm) == pytest.approx(warm.lr)
    const = RunConfig.from_run_config(quick_run_config(lr_schedule="constant"))
    assert {lr_at_round(r, const) for r in range(1, 9)} == {const.lr}
