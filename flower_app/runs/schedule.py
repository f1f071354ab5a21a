"""The learning-rate schedule, one formula for rounds (federated) and steps (centralized).

The server decides a round's learning rate and sends it to the clients; the centralized
baseline sets it per optimizer step. Both are linear warm-up then cosine (or constant),
so a federated round r is step r - 1 of ``num-server-rounds`` steps.
"""

from __future__ import annotations

import math

from flower_app.config import RunConfig


def lr_at_step(
    step: int,
    total_steps: int,
    warmup_steps: int,
    lr: float,
    min_lr: float,
    schedule: str = "cosine",
) -> float:
    """Learning rate of step ``step`` (0-based) out of ``total_steps``.

    Linear warm-up: step s < ``warmup_steps`` trains at ``lr * (s + 1) / warmup_steps``
    (the last warm-up step at ``lr``). Then cosine from ``lr`` at step ``warmup_steps``
    to ``min_lr`` at step ``total_steps`` (one past the last step, which trains just
    above ``min_lr``); or ``lr`` throughout with ``schedule = "constant"``.
    """
    if not 0 <= step <= total_steps or not 0 <= warmup_steps < max(total_steps, 1):
        raise ValueError(
            f"step={step}, total_steps={total_steps}, warmup_steps={warmup_steps}: need "
            "0 <= step <= total_steps and 0 <= warmup_steps < total_steps"
        )
    return _warmup_cosine(step, total_steps, warmup_steps, lr, min_lr, schedule)


def lr_at_round(server_round: int, cfg: RunConfig) -> float:
    """``lr_at_step(server_round - 1)`` over ``num-server-rounds`` with ``warmup-rounds``.

    Round 1 trains at the full ``lr`` when there is no warm-up; the last round is the
    only one that trains close to ``min-lr``. ``server_round`` is the round within the
    training phase (1..num-server-rounds); the head warm-up trains at a constant ``lr``.
    """
    return lr_at_step(
        server_round - 1,
        cfg.num_server_rounds,
        cfg.warmup_rounds,
        cfg.lr,
        cfg.min_lr,
        cfg.lr_schedule,
    )


def _warmup_cosine(
    step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float, schedule: str
) -> float:
    """The formula itself, shared by both entry points so they cannot drift apart."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
