"""The mask study's verdicts: each hypothesis stated with its numbers, whichever way it goes."""

from __future__ import annotations

import math

import pandas as pd

from flower_app.studies.mask_report import hypotheses, split_setting
from flower_app.studies.reports import probe_accuracy, read_metrics

MASKS = ("least_sensitive", "most_sensitive", "random")


def _table(arm: str, normalized: dict[str, tuple[float, float]], disagreement: float = 0.1):
    rows = []
    for mask, (mean, std) in normalized.items():
        rows.append(
            {
                "setting": f"{arm}-{mask}",
                "task-normalized-accuracy-mean": mean,
                "task-normalized-accuracy-std": std,
                "task-disagreement-mean": disagreement + (0.05 if mask == "dense" else 0.0),
                "task-disagreement-std": math.nan,
            }
        )
    return pd.DataFrame(rows)


def test_a_setting_splits_into_arm_and_mask():
    assert split_setting("nc5-adamw-least_sensitive") == ("nc5-adamw", "least_sensitive")
    assert split_setting("iid-sgdm-dense") == ("iid-sgdm", "dense")


def test_both_hypotheses_hold_when_least_sensitive_leads_and_every_mask_beats_dense():
    table = _table(
        "nc5-sgdm",
        {"dense": (0.80, 0.01), "least_sensitive": (0.95, 0.01), "most_sensitive": (0.90, 0.01)},
    )
    lines = hypotheses(table)
    assert "least_sensitive 0.950 > most_sensitive 0.900; dense 0.800" in lines[1]
    assert lines[2].endswith("least_sensitive interferes least: holds")
    assert "sparse merges better than dense: holds (2 of 2 masks above dense)" in lines[3]
    assert lines[3].endswith("lowest disagreement: least_sensitive 0.100")


def test_a_lead_within_one_std_is_not_shown_and_a_wider_one_refutes():
    close = {"dense": (0.905, 0.0), "least_sensitive": (0.90, 0.03), "random": (0.91, 0.01)}
    lines = hypotheses(_table("iid-sgdm", close))
    assert "not shown (random higher by less than one std, 0.030)" in lines[2]
    assert "partly (1 of 2 masks above dense)" in lines[3]
    far = {"dense": (0.99, 0.0), "least_sensitive": (0.80, 0.01), "random": (0.90, 0.01)}
    lines = hypotheses(_table("iid-sgdm", far))
    assert "does not hold (random 0.900 against 0.800)" in lines[2]
    assert "sparse merges better than dense: does not hold (0 of 2" in lines[3]


def test_the_probe_is_the_last_evaluated_warm_up_round(tmp_path):
    frame = pd.DataFrame(
        {
            "round": [0, 4, 8, 13, 16],
            "phase": ["initial", "head-warmup", "head-warmup", "train", "train"],
            "val-accuracy": [0.1, 0.5, 0.6, 0.7, 0.8],
        }
    )
    frame.to_csv(tmp_path / "metrics.csv", index=False)
    assert probe_accuracy(read_metrics(tmp_path)) == 0.6
    frame[frame["phase"] != "head-warmup"].to_csv(tmp_path / "metrics.csv", index=False)
    assert math.isnan(probe_accuracy(read_metrics(tmp_path)))  # a dense run: no warm-up


def test_an_arm_without_dense_or_least_sensitive_says_what_is_missing():
    lines = hypotheses(_table("nc5-sgdm", {"least_sensitive": (0.9, math.nan)}))
    assert lines[3].startswith("    sparse merges better than dense: no dense run to compare;")
    assert "nan" not in lines[3]
    lines = hypotheses(_table("nc5-sgdm", {"dense": (0.9, 0.0), "random": (0.8, 0.0)}))
    assert lines[1:] == ["  nc5-sgdm: no least_sensitive run with normalized accuracy"]
