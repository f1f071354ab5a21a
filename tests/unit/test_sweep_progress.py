"""The sweep runner shows a running run's latest round, read from its metrics.csv."""

from __future__ import annotations

import pandas as pd

from flower_app.studies.catalog import Setting
from flower_app.studies.experiments import PlannedRun, RunProgress
from tests.conftest import quick_run_config


def test_progress_prints_each_new_round_once(tmp_path):
    config = quick_run_config(strategy="sparse-fedavg", head_warmup_rounds=2)
    run = PlannedRun("mask-strategies", Setting("least_sensitive"), 0, config, tmp_path)
    lines: list[str] = []
    progress = RunProgress(run, lines.append)
    progress()  # nothing written yet: nothing shown, no error
    run.run_dir.mkdir()
    rows = [
        {"round": 0, "phase": "initial", "val-accuracy": 0.01},
        {"round": 1, "phase": "head-warmup", "val-accuracy": None},
    ]
    pd.DataFrame(rows[:1]).to_csv(run.run_dir / "metrics.csv", index=False)
    progress()
    progress()  # same round again: not repeated
    pd.DataFrame(rows).to_csv(run.run_dir / "metrics.csv", index=False)
    progress()
    total = 2 + 4 + 8  # warm-up, calibration (pyproject default), quick training rounds
    assert lines == [
        f"    least_sensitive-seed0: round 0/{total} (initial) | val-accuracy 0.0100",
        f"    least_sensitive-seed0: round 1/{total} (head-warmup)",
    ]
