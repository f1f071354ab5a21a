"""The run directory's writing: atomic files, and the one ending of every run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from flower_app import results
from flower_app.results import (
    RunDirectory,
    atomic_path,
    atomic_write_bytes,
    finish_run,
    save_figure,
    write_summary,
)

matplotlib.use("Agg")

SUMMARY_KEYS = {  # what write_summary writes for every run (federated runs add more)
    "run-name",
    "status",
    "rounds",
    "final-val-accuracy",
    "best-val-accuracy",
    "best-val-round",
    "final-test-accuracy",
    "final-test-loss",
    "best-model-test-accuracy",
    "best-model-test-loss",
    "bytes-down",
    "bytes-up",
    "wall-time-s",
}


# ---- atomic writes -------------------------------------------------------------------------
def test_atomic_path_replaces_on_success_and_keeps_the_old_file_on_error(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.exists() and not target.exists()
        tmp.write_text("new")
    assert target.read_text() == "new"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash while writing")
    assert target.read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["file.txt"]  # no temporary left


def test_atomic_write_bytes_and_weights_leave_only_the_file(tmp_path, monkeypatch):
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    run_dir = RunDirectory(tmp_path)
    x = torch.arange(6.0).view(2, 3).t()  # not contiguous: saved as a contiguous copy
    run_dir.save_weights("w.safetensors", {"x": x})
    assert torch.equal(load_file(str(tmp_path / "w.safetensors"))["x"], x)

    def half_written(tensors, filename):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(results, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        run_dir.save_weights("w.safetensors", {"x": x})
    assert torch.equal(load_file(str(tmp_path / "w.safetensors"))["x"], x)  # old file kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "w.safetensors"]


def test_save_figure_closes_the_figure_and_cleans_up_on_error(tmp_path):
    import matplotlib.pyplot as plt

    fig = plt.figure()
    save_figure(fig, tmp_path / "ok.png")
    assert (tmp_path / "ok.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number)

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    fig = plt.figure()
    fig.savefig = disk_full  # type: ignore[method-assign]
    with pytest.raises(OSError, match="disk full"):
        save_figure(fig, tmp_path / "broken.png")
    assert not plt.fignum_exists(fig.number)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.png"]


# ---- the end of a run ----------------------------------------------------------------------
def _metrics(val_accuracies: list[float]) -> pd.DataFrame:
    n = len(val_accuracies)
    return pd.DataFrame(
        {
            "round": range(1, n + 1),
            "train-loss": [1.0] * n,
            "val-loss": [1.0] * n,
            "val-accuracy": val_accuracies,
            "bytes-down": [10.0] * n,
            "bytes-up": [5.0] * n,
        }
    )


def _states() -> tuple[dict, dict, dict]:
    initial = {"w": torch.zeros(3), "steps": torch.tensor(0)}
    final = {"w": torch.tensor([1.0, 2.0, 3.0]), "steps": torch.tensor(7)}
    best = {"w": torch.tensor([0.5, 0.5, 0.5]), "steps": torch.tensor(4)}
    return initial, final, best


class _Tester:
    """A ``test`` callable that scores a state by its first weight and counts its calls."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, state) -> tuple[float, float]:
        self.calls.append(float(state["w"][0]))
        return 2.0 - float(state["w"][0]), float(state["w"][0]) / 10


def test_finish_run_tests_both_models_and_writes_every_file(tmp_path):
    initial, final, best = _states()
    run_dir, tester = RunDirectory(tmp_path), _Tester()
    mask = {"w": torch.tensor([1, 0, 1], dtype=torch.uint8)}
    summary = finish_run(
        run_dir,
        "run",
        metrics=_metrics([0.2, 0.6, 0.4]),
        rounds=3,
        final_state=final,
        initial_state=initial,
        best_state=best,
        best_accuracy=0.6,
        best_round=2,
        test=tester,
        wall_time_s=12.5,
        extra_summary={"mode": "x"},
        extra_weights={"mask.safetensors": mask},
    )
    assert tester.calls == [1.0, 0.5]  # final, then best
    assert set(summary) == SUMMARY_KEYS | {"mode"}
    assert summary == json.loads((tmp_path / "summary.json").read_text())
    assert (summary["final-test-loss"], summary["final-test-accuracy"]) == (1.0, 0.1)
    assert (summary["best-model-test-loss"], summary["best-model-test-accuracy"]) == (1.5, 0.05)
    assert (summary["best-val-accuracy"], summary["best-val-round"]) == (0.6, 2)
    assert summary["final-val-accuracy"] == 0.4 and summary["rounds"] == 3
    assert (summary["bytes-down"], summary["bytes-up"]) == (30.0, 15.0)
    assert summary["wall-time-s"] >= 12.5 and summary["mode"] == "x"
    assert torch.equal(load_file(str(tmp_path / "final_model.safetensors"))["w"], final["w"])
    assert torch.equal(load_file(str(tmp_path / "best_model.safetensors"))["w"], best["w"])
    vector = load_file(str(tmp_path / "task_vector.safetensors"))
    assert set(vector) == {"w"} and torch.equal(vector["w"], final["w"])  # ints are no task
    assert torch.equal(load_file(str(tmp_path / "mask.safetensors"))["w"], mask["w"])
    assert (tmp_path / "metrics.png").is_file()


@pytest.mark.parametrize("best_is_final", ["last-round", "none"])
def test_finish_run_tests_the_final_model_once_when_it_is_the_best(tmp_path, best_is_final):
    initial, final, _ = _states()
    tester = _Tester()
    found = best_is_final == "last-round"
    summary = finish_run(
        RunDirectory(tmp_path),
        "run",
        metrics=_metrics([0.2, 0.6] if found else [math.nan, math.nan]),
        rounds=2,
        final_state=final,
        initial_state=initial,
        best_state=final if found else None,
        best_accuracy=0.6 if found else None,
        best_round=2 if found else None,
        test=tester,
        wall_time_s=0.0,
    )
    assert tester.calls == [1.0]
    assert summary["best-model-test-accuracy"] == summary["final-test-accuracy"] == 0.1
    assert summary["best-val-round"] == (2 if found else None)
    assert summary["final-val-accuracy"] == (0.6 if found else None)
    best_file = load_file(str(tmp_path / "best_model.safetensors"))
    assert torch.equal(best_file["w"], final["w"])


def test_write_summary_takes_plain_best_values(tmp_path):
    summary = write_summary(
        RunDirectory(tmp_path),
        "run",
        _metrics([0.3]),
        rounds=1,
        best_accuracy=None,
        best_round=None,
        test=(1.0, 0.3),
        best_test=(1.0, 0.3),
        wall_time_s=1.0,
    )
    assert set(summary) == SUMMARY_KEYS
    assert summary["best-val-accuracy"] is None and summary["best-val-round"] is None
