"""Centralized baseline: the federated run's model, data and augmentation, on all the data.

``python -m flower_app.centralized [--run-config PRESET.toml] [key=value ...]`` (console
script ``fl-centralized``) trains the model of the run-config on the whole training
split for ``epochs`` epochs of ``ceil(len(train) / batch-size)`` SGD-momentum steps,
with a per-step learning rate: a linear warm-up over ``warmup-epochs``, then cosine
from ``lr`` to ``min-lr`` (or constant with ``lr-schedule = "constant"``). It evaluates
on the validation split after every epoch, keeps the best-validation weights, tests
the final and the best model, and writes the same run directory as a federated run
(``metrics.csv`` with one row per epoch in the ``round`` column; no bytes move).

The initial weights are the federated run's for the same ``seed`` (same factory, same
seeding), and the one ``seed`` drives the split, the batches and the augmentation, so
on a CPU the same seed repeats a run exactly. The federated keys (clients, rounds,
sharding, sparse fine-tuning) are accepted and ignored.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord

from clients.training import autocast_context, batch_schedule, evaluate
from flower_app.config import ConfigError, RunConfig, load_preset, parse_overrides
from flower_app.data import ImageSplit, batch_preprocessor
from flower_app.results import BestModel, MetricsTable, RunDirectory, task_vector, write_summary
from flower_app.runtime import initial_model, resolve_device, run_splits, use_bf16
from flower_app.server_app import writable_output_dir

MODE = "centralized"


def lr_at_step(
    step: int,
    total_steps: int,
    warmup_steps: int,
    lr: float,
    min_lr: float,
    schedule: str = "cosine",
) -> float:
    """Learning rate of optimizer step ``step`` (0-based) out of ``total_steps``.

    Linear warm-up: step s < ``warmup_steps`` trains at ``lr * (s + 1) / warmup_steps``
    (the last warm-up step at ``lr``). Then cosine from ``lr`` at step ``warmup_steps``
    to ``min_lr`` at step ``total_steps`` (one past the last step, which trains just
    above ``min_lr``), as the federated schedule treats rounds; or ``lr`` throughout
    with ``schedule = "constant"``.
    """
    if not 0 <= step <= total_steps or not 0 <= warmup_steps < max(total_steps, 1):
        raise ValueError(
            f"step={step}, total_steps={total_steps}, warmup_steps={warmup_steps}: need "
            "0 <= step <= total_steps and 0 <= warmup_steps < total_steps"
        )
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def default_run_name(cfg: RunConfig, timestamp: str) -> str:
    """``run-name`` or ``centralized_seed{seed}_{timestamp}``."""
    return cfg.run_name or f"{MODE}_seed{cfg.seed}_{timestamp}"


def check_centralized(cfg: RunConfig) -> None:
    """What the federated schema allows but this script cannot do."""
    if cfg.resume:
        raise ConfigError(
            "run-config key 'resume' = True is not allowed: the centralized baseline writes "
            "no checkpoint and cannot resume; set resume=false"
        )


def _to_device(split: ImageSplit, device: torch.device) -> ImageSplit:
    return ImageSplit(split.images.to(device), split.labels.to(device))


def train_centralized(
    cfg: RunConfig,
    output_dir: Path,
    run_name: str,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Load data and model, then create the run directory, train, test and write results.

    Returns the summary (also written, last, to ``summary.json``).
    """
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    bf16 = use_bf16(cfg.precision, device)
    splits = run_splits(cfg)
    model = initial_model(cfg)
    initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.to(device)
    train, val, test = (_to_device(s, device) for s in (splits.train, splits.val, splits.test))
    preprocess = batch_preprocessor(cfg.image_size)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = cfg.warmup_epochs * steps_per_epoch
    # one seeded permutation per pass over the data, continued across epochs
    batches = batch_schedule(
        len(train), total_steps, cfg.batch_size, torch.Generator().manual_seed(cfg.seed)
    ).to(device)
    augment = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    run_dir = RunDirectory.create(output_dir, run_name)
    run_dir.write_json("config.json", cfg.to_dict() | {"run-name": run_name, "mode": MODE})
    log(f"run directory: {run_dir.path}")
    log(
        f"centralized: {len(train)} training images, {steps_per_epoch} steps of batch "
        f"{cfg.batch_size} per epoch, {cfg.epochs} epochs, device {device}"
    )

    metrics, best = MetricsTable(run_dir), BestModel()
    for epoch in range(1, cfg.epochs + 1):
        t_epoch = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), device=device)
        lr = cfg.lr
        for step in range((epoch - 1) * steps_per_epoch, epoch * steps_per_epoch):
            lr = lr_at_step(step, total_steps, warmup_steps, cfg.lr, cfg.min_lr, cfg.lr_schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = batches[step]
            x = preprocess(train.images[idx], True, augment)
            with autocast_context(device, bf16):
                loss = F.cross_entropy(model(x), train.labels[idx])
            optimizer.zero_grad(set_to_none=False)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach().float()
        train_loss = float(loss_sum) / steps_per_epoch
        t_eval = time.perf_counter()
        val_loss, val_acc = evaluate(
            model, val.images, val.labels, cfg.eval_batch_size, preprocess, bf16
        )
        now = time.perf_counter()
        row = {
            "round": epoch,
            "lr": lr,  # of the epoch's last step
            "num-examples": steps_per_epoch * cfg.batch_size,
            "train-loss": train_loss,
            "val-loss": val_loss,
            "val-accuracy": val_acc,
            "bytes-down": 0,
            "bytes-up": 0,
            "seconds-eval": now - t_eval,
            "seconds": now - t_epoch,
        }
        metrics.append(row)
        if not math.isnan(val_acc) and val_acc > best.accuracy:
            best(epoch, ArrayRecord(_cpu_state(model)), row)
        log(
            f"epoch {epoch}/{cfg.epochs} | lr {lr:.5f} | train-loss {train_loss:.4f} | "
            f"val-loss {val_loss:.4f} | val-accuracy {val_acc:.4f} | seconds {now - t_epoch:.1f}"
        )

    final_state = _cpu_state(model)
    test_loss, test_acc = evaluate(
        model, test.images, test.labels, cfg.eval_batch_size, preprocess, bf16
    )
    if best.state is None or best.round == cfg.epochs:  # the best model is the final one
        best_state, best_test_loss, best_test_acc = final_state, test_loss, test_acc
    else:
        best_state = best.state
        model.load_state_dict(best_state, strict=True)
        best_test_loss, best_test_acc = evaluate(
            model, test.images, test.labels, cfg.eval_batch_size, preprocess, bf16
        )
    run_dir.save_weights("final_model.safetensors", final_state)
    run_dir.save_weights("best_model.safetensors", best_state)
    run_dir.save_weights("task_vector.safetensors", task_vector(final_state, initial_state))
    summary = write_summary(
        run_dir,
        run_name,
        metrics.frame(),
        best,
        cfg.epochs,
        (test_loss, test_acc),
        (best_test_loss, best_test_acc),
        time.perf_counter() - t_start,
        {"mode": MODE},
    )
    log(
        f"final test accuracy {test_acc:.4f} (best-validation model, epoch "
        f"{summary['best-val-round']}: {best_test_acc:.4f}); results written to {run_dir.path}"
    )
    return summary


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fl-centralized", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument(
        "--run-config", type=Path, help="a TOML preset, e.g. configs/centralized_quick.toml"
    )
    parser.add_argument("overrides", nargs="*", help="key=value run-config overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Validate everything (exit 2 with one line on stderr), then train; 0 when finished."""
    args = parse_args(argv)
    try:
        config = load_preset(args.run_config) if args.run_config else {}
        config |= parse_overrides(args.overrides)
        cfg = RunConfig.from_run_config(config)
        check_centralized(cfg)
        output_dir = writable_output_dir(cfg.output_dir)
        run_name = default_run_name(cfg, time.strftime("%Y%m%d-%H%M%S"))
        if (output_dir / run_name).exists():
            RunDirectory.create(output_dir, run_name)  # raises the one-line error
    except (ConfigError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    train_centralized(cfg, output_dir, run_name, log=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
