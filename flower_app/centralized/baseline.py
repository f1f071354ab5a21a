"""Centralized baseline: the federated run's model, data and augmentation, on all the data.

``python -m flower_app.centralized.baseline [--run-config PRESET.toml] [key=value ...]`` (console
script ``fl-centralized``) trains the model of the run-config on the whole training
split for ``epochs`` epochs of ``ceil(len(train) / batch-size)`` steps of the clients'
dense optimizer (``optimizer``: SGD momentum, or AdamW as TaLoS's dense fine-tuning),
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clients.optimizers import dense_optimizer
from clients.training import Preprocess, batch_schedule, sgd_step
from flower_app.config import ConfigError, RunConfig, load_preset, parse_pairs
from flower_app.data.preprocessing import batch_preprocessor
from flower_app.data.sources import ImageSplit
from flower_app.perf.allocator import keep_freed_memory
from flower_app.runs.hooks import BestModel, MetricsTable
from flower_app.runs.prerequisites import check_prerequisites
from flower_app.runs.results import RunDirectory, finish_run, result_line
from flower_app.runs.runtime import (
    ModelEvaluator,
    initial_model,
    resolve_device,
    run_splits,
    to_device,
    use_bf16,
)
from flower_app.runs.schedule import lr_at_step
from flower_app.server_app import writable_output_dir
from strategies.seeds import derive_seed

MODE = "centralized"

State = dict[str, torch.Tensor]


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


@dataclass
class _Trainer:
    """What every epoch shares: model, optimizer, the splits on the device, the step plan."""

    cfg: RunConfig
    device: torch.device
    bf16: bool
    model: nn.Module
    optimizer: torch.optim.Optimizer
    train: ImageSplit
    val: ImageSplit
    test: ImageSplit
    preprocess: Preprocess
    batches: torch.Tensor  # (epochs * steps_per_epoch, batch-size) indices into train
    augment: torch.Generator
    steps_per_epoch: int
    evaluator: ModelEvaluator

    def train_epoch(self, epoch: int) -> tuple[float, float]:
        """SGD steps of ``epoch`` (1-based); mean training loss and the last step's lr."""
        cfg, per_epoch = self.cfg, self.steps_per_epoch
        total_steps, warmup_steps = cfg.epochs * per_epoch, cfg.warmup_epochs * per_epoch
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        lr = cfg.lr
        for step in range((epoch - 1) * per_epoch, epoch * per_epoch):
            lr = lr_at_step(step, total_steps, warmup_steps, cfg.lr, cfg.min_lr, cfg.lr_schedule)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            idx = self.batches[step]
            x = self.preprocess(self.train.images[idx], True, self.augment)
            loss = sgd_step(self.model, self.optimizer, x, self.train.labels[idx], self.bf16)
            loss_sum += loss.float()
        return float(loss_sum) / per_epoch, lr

    def test_state(self, state: Mapping[str, torch.Tensor]) -> tuple[float, float]:
        """(loss, accuracy) of ``state`` on the test split; the model keeps ``state``."""
        return self.evaluator(state, self.test)


def _prepare(cfg: RunConfig) -> tuple[_Trainer, State]:
    """Data, model (and a copy of its initial weights), optimizer and seeded batch plan.

    The order (splits, then the model) is the federated run's, so the same ``seed``
    gives the same initial weights.
    """
    keep_freed_memory()  # as in the clients: freed blocks stay in the heap
    device = resolve_device(cfg.device)
    splits = run_splits(cfg)
    model = initial_model(cfg)
    initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.to(device)
    train, val, test = (to_device(s, device) for s in (splits.train, splits.val, splits.test))
    optimizer = dense_optimizer(model.parameters(), cfg.optimizer_settings())
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    # one seeded permutation per pass over the data, continued across epochs
    batches = batch_schedule(
        len(train),
        cfg.epochs * steps_per_epoch,
        cfg.batch_size,
        torch.Generator().manual_seed(derive_seed(cfg.seed, "centralized-batches")),
    ).to(device)
    trainer = _Trainer(
        cfg=cfg,
        device=device,
        bf16=use_bf16(cfg.precision, device),
        model=model,
        optimizer=optimizer,
        train=train,
        val=val,
        test=test,
        preprocess=batch_preprocessor(cfg.image_size),
        batches=batches,
        augment=torch.Generator(device=device).manual_seed(
            derive_seed(cfg.seed, "centralized-augment")
        ),
        steps_per_epoch=steps_per_epoch,
        evaluator=ModelEvaluator(model, cfg, device),
    )
    return trainer, initial_state


def _epoch_row(trainer: _Trainer, epoch: int) -> dict[str, float]:
    """Train one epoch, then validate: the epoch's row of ``metrics.csv``."""
    t_epoch = time.perf_counter()
    train_loss, lr = trainer.train_epoch(epoch)
    t_eval = time.perf_counter()
    val_loss, val_acc = trainer.evaluator.score(trainer.val)
    now = time.perf_counter()
    return {
        "round": epoch,
        "phase": "train",
        "lr": lr,  # of the epoch's last step
        "num-examples": trainer.steps_per_epoch * trainer.cfg.batch_size,
        "train-loss": train_loss,
        "val-loss": val_loss,
        "val-accuracy": val_acc,
        "bytes-down": 0,
        "bytes-up": 0,
        "seconds-eval": now - t_eval,
        "seconds": now - t_epoch,
    }


def _train_epochs(
    trainer: _Trainer, metrics: MetricsTable, log: Callable[[str], None]
) -> BestModel:
    """All epochs: one metrics row and one log line each; returns the best-validation epoch."""
    epochs, best = trainer.cfg.epochs, BestModel()
    for epoch in range(1, epochs + 1):
        row = _epoch_row(trainer, epoch)
        metrics.append(row)
        best.offer(epoch, row["val-accuracy"], lambda: _cpu_state(trainer.model))
        log(
            f"epoch {epoch}/{epochs} | lr {row['lr']:.5f} | train-loss {row['train-loss']:.4f} "
            f"| val-loss {row['val-loss']:.4f} | val-accuracy {row['val-accuracy']:.4f} | "
            f"seconds {row['seconds']:.1f}"
        )
    return best


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
    trainer, initial_state = _prepare(cfg)
    run_dir = RunDirectory.create(output_dir, run_name, resumable=False)
    run_dir.write_json("config.json", cfg.to_dict() | {"run-name": run_name, "mode": MODE})
    log(f"run directory: {run_dir.path}")
    log(
        f"centralized: {len(trainer.train)} training images, {trainer.steps_per_epoch} steps "
        f"of batch {cfg.batch_size} per epoch, {cfg.epochs} epochs, device {trainer.device}"
    )
    metrics = MetricsTable(run_dir)
    best = _train_epochs(trainer, metrics, log)
    found = best.state is not None
    summary = finish_run(
        run_dir,
        run_name,
        metrics=metrics.frame(),
        rounds=cfg.epochs,
        final_state=_cpu_state(trainer.model),
        initial_state=initial_state,
        best_state=best.state,
        best_accuracy=best.accuracy if found else None,
        best_round=best.round if found else None,
        test=trainer.test_state,
        wall_time_s=time.perf_counter() - t_start,
        model=cfg.model,
        num_classes=cfg.num_classes,
        extra_summary={"mode": MODE},
        title=cfg.title(run_name, centralized=True),
    )
    log(f"{result_line(summary, unit='epoch')}; results in {run_dir.path}")
    return summary


def _cpu_state(model: nn.Module) -> State:
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
        config |= parse_pairs(args.overrides)
        cfg = RunConfig.from_run_config(config)
        check_centralized(cfg)
        check_prerequisites(cfg, run_folder=False)  # data, weights, output folder: at once
        output_dir = writable_output_dir(cfg.output_dir)
        run_name = default_run_name(cfg, time.strftime("%Y%m%d-%H%M%S"))
        if (output_dir / run_name).exists():
            RunDirectory.create(output_dir, run_name, resumable=False)  # raises: one line
    except (ConfigError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    train_centralized(cfg, output_dir, run_name, log=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
