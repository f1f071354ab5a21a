"""Experiment tracking: the run's metrics, run-config and summary in TensorBoard or W&B.

Off by default (run-config ``tracking = "none"``); the backends are optional extras
(``pip install 'fl-task-arithmetic[tensorboard]'``, ``[wandb]`` or ``[tracking]``), and
``make_tracker`` turns a missing one into a one-line run-config error before any work.

A tracker is a round hook (``hook(record, arrays)``, placed after the tables): every
numeric value of the round's row of ``metrics.csv`` (tag ``metrics/<column>``) or of
``calibration.csv`` (``calibration/<column>``) is logged with the global round as the
step; empty values (NaN, a round without evaluation) are skipped. ``start(config)`` opens
the tracker run with the resolved run-config, ``finish(summary)`` logs what
``summary.json`` holds and closes it, ``close()`` ends it after an error.

A tracker saves itself like every stateful component: its state (backend, run id, last
logged round) is part of the checkpoint, so a resumed run continues the same tracker run.
TensorBoard: the event files of one run live in ``<run folder>/tensorboard/`` and carry
the run id in their names; a resumed run writes there with ``purge_step`` at the first
round it logs, so rounds that were logged after the checkpoint and are run again appear
once. W&B: ``wandb.init(id=<saved id>, resume="allow")`` in ``<run folder>/wandb/``.
"""

from __future__ import annotations

import importlib
import json
import math
import numbers
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord

from flower_app.config import ConfigError, RunConfig
from flower_app.runs.hooks import TRAINING_PHASES
from strategies.plan import CALIBRATION
from strategies.record import RoundRecord

TENSORBOARD_DIR = "tensorboard"  # the event files, under the run folder
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # backend -> package (and extra)
NOT_LOGGED = frozenset({"round", "phase"})  # the step itself, and a label


def table_of(phase: str) -> str | None:
    """The CSV a round's row goes to: ``metrics`` (round 0, warm-up, training) or
    ``calibration`` (``hooks.MetricsTable`` and ``hooks.calibration_table``)."""
    if phase in TRAINING_PHASES:
        return "metrics"
    return "calibration" if phase == CALIBRATION else None


def loggable(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of ``values`` as floats, keys prefixed; text and NaN left out."""
    out = {}
    for key, value in values.items():
        if key in NOT_LOGGED or isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        if math.isfinite(value):
            out[f"{prefix}{key}"] = float(value)
    return out


class Tracker:
    """``tracking = "none"``: logs nothing; the interface and the state every backend shares."""

    backend = "none"

    def __init__(self, run_path: Path) -> None:
        self.run_path = run_path
        self.run_id: str | None = None  # the tracker's run, kept across resumed segments
        self.step = -1  # the last global round seen (-1: none yet)

    def start(self, config: Mapping[str, Any]) -> None:
        """Open the tracker run (a new one, or the saved ``run_id`` again) with ``config``."""

    def log(self, values: dict[str, float], step: int) -> None:
        """Log ``values`` (tag -> number) at ``step``."""

    def finish(self, summary: Mapping[str, Any]) -> None:
        """Log the run's summary and close the tracker run."""
        self.close()

    def close(self) -> None:
        """End the tracker run if it is open (idempotent; after an error too)."""

    def __call__(self, record: RoundRecord, arrays: ArrayRecord) -> None:
        table = table_of(record.phase)
        values = loggable(record.row(), f"{table}/") if table else {}
        if values:
            self.log(values, record.round)
        self.step = record.round

    def state_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "run-id": self.run_id, "step": self.step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the saved tracker run; one of another backend (``tracking`` is
        operational, so it may change on resume) is not continued: a new run starts."""
        self.step = int(state.get("step", -1))
        if state.get("backend") == self.backend:
            self.run_id = state.get("run-id")


def _markdown_json(obj: Mapping[str, Any]) -> str:
    """JSON as a Markdown code block (TensorBoard's text plugin renders Markdown)."""
    text = json.dumps(dict(obj), indent=2, sort_keys=True, default=str)
    return "\n".join("    " + line for line in text.splitlines())


class TensorBoardTracker(Tracker):
    """Event files in ``<run folder>/tensorboard/``, named with the tracker's run id."""

    backend = "tensorboard"

    def __init__(self, run_path: Path) -> None:
        super().__init__(run_path)
        self.writer = None

    @property
    def log_dir(self) -> Path:
        return self.run_path / TENSORBOARD_DIR

    def start(self, config: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.run_id = self.run_id or secrets.token_hex(4)
        first = self.step + 1  # the first round this segment logs (0: a fresh run)
        self.writer = SummaryWriter(
            str(self.log_dir),
            purge_step=first or None,  # rounds logged after the checkpoint are dropped
            filename_suffix=f".{self.run_id}",
        )
        self.writer.add_text("run-config", _markdown_json(config), first)
        self.writer.flush()

    def log(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # a killed run keeps every round up to its checkpoint

    def finish(self, summary: Mapping[str, Any]) -> None:
        if self.writer is not None:
            for tag, value in loggable(summary, "summary/").items():
                self.writer.add_scalar(tag, value, max(self.step, 0))
            self.writer.add_text("summary", _markdown_json(summary), max(self.step, 0))
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# the app's choices where the run-config has no key; a user's WANDB_<NAME> replaces each
WANDB_DEFAULTS = {
    "console": "off",  # the ServerApp's output stays the ServerApp's
    "x_disable_stats": True,  # no system-metrics sampling next to the run
}


def _in_env(setting: str) -> bool:
    """Whether the user set W&B's ``setting`` through its ``WANDB_<SETTING>`` variable."""
    return f"WANDB_{setting.upper()}" in os.environ


class WandbTracker(Tracker):
    """A W&B run in ``<run folder>/wandb/`` (offline: ``offline-run-*``, for ``wandb sync``)."""

    backend = "wandb"

    def __init__(self, run_path: Path, project: str, mode: str) -> None:
        super().__init__(run_path)
        self.project = project
        self.mode = mode
        self.run = None

    def start(self, config: Mapping[str, Any]) -> None:
        import wandb

        settings = {k: v for k, v in WANDB_DEFAULTS.items() if not _in_env(k)}
        name = {} if _in_env("name") else {"name": self.run_path.name}  # the run folder's
        self.run = wandb.init(
            project=self.project,
            mode=self.mode,
            dir=str(self.run_path),
            id=self.run_id,
            resume="allow",
            config=dict(config),
            allow_val_change=True,  # a resumed segment may change operational keys
            settings=wandb.Settings(**settings),
            **name,
        )
        self.run_id = self.run.id

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def finish(self, summary: Mapping[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(dict(summary))
        self.close(exit_code=0)

    def close(self, exit_code: int = 1) -> None:
        """Finish the W&B run (``exit_code`` 1: the run failed) and, when no other W&B run
        of this process is open, stop W&B's service so nothing outlives the run."""
        if self.run is None:
            return
        import wandb

        run, self.run = self.run, None
        run.finish(exit_code=exit_code)
        if wandb.run is None:
            wandb.teardown()


def missing_extra(backend: str) -> str:
    """The one-line error of a tracker whose package is not installed."""
    package = PACKAGES[backend]
    return (
        f"run-config key 'tracking' = {backend!r} needs the {package} package: "
        f"pip install 'fl-task-arithmetic[{package}]'"
    )


def make_tracker(cfg: RunConfig, run_path: Path) -> Tracker:
    """The tracker ``tracking`` names, for the run folder ``run_path`` (opened by ``start``);
    a backend whose package is missing is a ``ConfigError`` naming the install command."""
    if cfg.tracking == "none":
        return Tracker(run_path)
    try:
        importlib.import_module(PACKAGES[cfg.tracking])
    except ImportError as exc:
        raise ConfigError(missing_extra(cfg.tracking)) from exc
    if cfg.tracking == "tensorboard":
        return TensorBoardTracker(run_path)
    return WandbTracker(run_path, cfg.wandb_project, cfg.wandb_mode)
