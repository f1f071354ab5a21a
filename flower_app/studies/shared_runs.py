"""Runs that several studies plan identically are computed once.

The reference federated run (IID, J=4) is a setting of ``fedavg``, ``heterogeneity`` and
``local-steps`` alike; ``all`` plans it three times per seed. A planned run whose full
run-config (every key that changes results, and every key that says what the run
measures) equals that of a finished run under the same output folder is a copy of that
run: its folder is made by hard links (no second copy of the bytes), and the sweep's
manifest names the run it came from. A run-config that differs in any such key is run.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flower_app.config import RunConfig
from flower_app.runs.run_lock import LOCK_NAME
from flower_app.runs.task_vectors import NOT_RUN_CONFIG

# keys outside the result identity that decide what a run's files hold
MEASURED = ("update-metrics", "task-metrics-examples", "task-metrics-every")


def run_key(config: Mapping[str, Any]) -> str:
    """What a federated run computes and measures, as one comparable string."""
    given = {k: v for k, v in config.items() if k not in NOT_RUN_CONFIG}
    cfg = RunConfig.from_run_config(given, check_files=False)
    values = cfg.to_dict()
    identity = cfg.experiment_identity() | {key: values[key] for key in MEASURED}
    return json.dumps(identity, sort_keys=True, default=str)


class FinishedRuns:
    """The finished federated runs under an output folder, by what they computed."""

    def __init__(self) -> None:
        self.by_key: dict[str, Path] = {}

    @classmethod
    def scan(cls, root: Path) -> FinishedRuns:
        """Every finished run of every study folder under ``root``."""
        runs = cls()
        for summary in sorted(root.glob("*/*/summary.json")):
            run_dir = summary.parent
            try:
                config = json.loads((run_dir / "config.json").read_text())
                done = json.loads(summary.read_text()).get("status") == "completed"
            except (OSError, ValueError):
                continue
            if done and config.get("mode", "federated") == "federated":
                runs.add(run_dir, config)
        return runs

    def add(self, run_dir: Path, config: Mapping[str, Any]) -> None:
        try:
            self.add_key(run_key(config), run_dir)
        except ValueError:  # a config.json of another version: never a match
            return

    def add_key(self, key: str, run_dir: Path) -> None:
        """``run_dir`` computed ``key`` (``run_key``); the first one named stays the source."""
        self.by_key.setdefault(key, run_dir)

    def find_key(self, key: str) -> Path | None:
        return self.by_key.get(key)


def copy_run(source: Path, target: Path) -> None:
    """``target`` as a copy of the finished run ``source`` (hard links where the file
    system allows, plain copies elsewhere), without its lock file; the copy is written
    beside ``target`` and renamed, so a half-copied folder never looks finished."""
    partial = target.with_name(target.name + ".copying")
    if partial.exists():
        shutil.rmtree(partial)

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, partial, copy_function=link, ignore=shutil.ignore_patterns(LOCK_NAME))
    partial.rename(target)
