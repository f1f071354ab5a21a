"""The run directory's writing: atomic files, and the one ending of every run."""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import matplotlib
import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from flower_app.runs import results
from flower_app.runs.results import (
    RunDirectory,
    atomic_path,
    atomic_write_bytes,
    finish_run,
    metrics_figure,
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


# ---- helpers shared with the quick-run tests -------------------------------------------------
@contextmanager
def umask(mask: int) -> Iterator[int]:
    """Run with ``mask`` as the process umask; yields the mode a new ordinary file gets."""
    old = os.umask(mask)
    try:
        yield 0o666 & ~mask
    finally:
        os.umask(old)


def file_modes(folder: Path) -> dict[str, int]:
    """Permission bits of every file under ``folder``, by relative path."""
    return {
        str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode)
        for p in folder.rglob("*")
        if p.is_file()
    }


def weights_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


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

    def disk_full(fd: int) -> None:  # the weights are half written when fsync fails
        raise OSError("disk full")

    monkeypatch.setattr(results.os, "fsync", disk_full)
    with pytest.raises(OSError, match="disk full"):
        run_dir.save_weights("w.safetensors", {"x": x})
    assert torch.equal(load_file(str(tmp_path / "w.safetensors"))["x"], x)  # old file kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "w.safetensors"]


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_every_writer_gives_the_mode_of_an_ordinary_file(tmp_path, mask):
    import matplotlib.pyplot as plt

    run_dir = RunDirectory(tmp_path)
    with umask(mask) as expected:
        (tmp_path / "ordinary.txt").write_text("made by open()")
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        run_dir.write_json("s.json", {"a": 1})
        run_dir.write_csv("m.csv", pd.DataFrame({"a": [1]}))
        run_dir.save_weights("w.safetensors", {"x": torch.ones(2)})
        save_figure(plt.figure(), tmp_path / "f.png")
        with atomic_path(tmp_path / "sub" / "p.txt") as tmp:
            tmp.write_text("y")
    modes = file_modes(tmp_path)
    assert len(modes) == 7 and expected == modes["ordinary.txt"]
    assert modes == dict.fromkeys(modes, expected), oct(expected)


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


MASK = {"w": torch.tensor([1, 0, 1], dtype=torch.uint8)}


def _finish_with_best_at_round_2(run_dir: RunDirectory, tester: _Tester) -> dict:
    """Three training rounds after two warm-up rounds (final round 5); best at round 2."""
    initial, final, best = _states()
    return finish_run(
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
        model="vit_x",
        num_classes=100,
        extra_summary={"mode": "x"},
        extra_weights={"mask.safetensors": MASK},
        final_round=5,
    )


def test_finish_run_tests_both_models_and_writes_every_file(tmp_path, monkeypatch):
    _, final, best = _states()
    tester, plotted, figure = _Tester(), [], results.metrics_figure
    monkeypatch.setattr(
        results, "metrics_figure", lambda *args: plotted.append(args[2:]) or figure(*args)
    )
    summary = _finish_with_best_at_round_2(RunDirectory(tmp_path), tester)
    assert plotted == [(0.1, 100)]  # the final model's test accuracy, chance 1/100
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
    assert torch.equal(load_file(str(tmp_path / "mask.safetensors"))["w"], MASK["w"])
    assert (tmp_path / "metrics.png").is_file()


def test_finish_run_weights_say_what_they_hold_and_of_which_round(tmp_path):
    _finish_with_best_at_round_2(RunDirectory(tmp_path), _Tester())
    rounds = {"final_model": "5", "best_model": "2", "task_vector": "5", "mask": "5"}
    for name, round_ in rounds.items():
        assert weights_metadata(tmp_path / f"{name}.safetensors") == {
            "format": "fl-task-arithmetic/1",
            "run-name": "run",
            "round": round_,
            "content": results.WEIGHTS_CONTENT[f"{name}.safetensors"],
            "model": "vit_x",
        }, name
    contents = {weights_metadata(p)["content"] for p in tmp_path.glob("*.safetensors")}
    assert len(contents) == 4  # each file says something different


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
        model="vit_x",
        num_classes=10,
    )
    assert tester.calls == [1.0]
    assert summary["best-model-test-accuracy"] == summary["final-test-accuracy"] == 0.1
    assert summary["best-val-round"] == (2 if found else None)
    assert summary["final-val-accuracy"] == (0.6 if found else None)
    best_file = load_file(str(tmp_path / "best_model.safetensors"))
    assert torch.equal(best_file["w"], final["w"])
    assert weights_metadata(tmp_path / "best_model.safetensors")["round"] == "2"


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


def _accuracy_lines(fig) -> dict[str, matplotlib.lines.Line2D]:
    return {line.get_label(): line for line in fig.axes[0].get_lines()}


def test_metrics_plot_marks_the_test_accuracy_and_chance():
    import matplotlib.pyplot as plt

    frame = _metrics([0.2, 0.6, 0.4]).assign(round=[0, 4, 8])
    fig = metrics_figure(frame, "run", 0.35, 100)
    lines = _accuracy_lines(fig)
    test = lines["test, final model (0.3500)"]
    assert (list(test.get_xdata()), list(test.get_ydata())) == ([8], [0.35])  # at the last round
    chance = lines["chance (1/100)"]
    assert chance.get_linestyle() == "--" and set(chance.get_ydata()) == {0.01}
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["validation", "test, final model (0.3500)", "chance (1/100)"]
    plt.close(fig)
    bare = metrics_figure(frame, "run", None, None)
    assert list(_accuracy_lines(bare)) == ["validation"]
    plt.close(bare)


def test_label_counts_read_the_partitions_table_back():
    from flower_app.runs.results import label_counts, partitions_frame

    replies = [
        {"partition-id": 1, "num-examples": 5, "classes": [0, 2], "class-counts": [4, 1]},
        {"partition-id": 0, "num-examples": 3, "classes": [1], "class-counts": [3]},
    ]
    counts = label_counts(partitions_frame(replies), 3)
    assert counts.tolist() == [[0, 3, 0], [4, 0, 1]]  # rows by partition id


def test_the_partitions_figure_ticks_whole_classes_and_clients():
    """With a few classes (an image folder of 3) no tick falls between two classes."""
    import matplotlib.pyplot as plt

    from flower_app.runs.results import partitions_figure, partitions_frame

    replies = [
        {"partition-id": p, "num-examples": 6, "classes": [0, 1, 2], "class-counts": [1, 2, 3]}
        for p in range(4)
    ]
    fig = partitions_figure(partitions_frame(replies), 3, "three classes")
    fig.canvas.draw()
    ax_map, ax_size = fig.axes[:2]
    for ticks in (ax_map.get_yticks(), ax_size.get_xticks()):
        shown = [t for t in ticks if -0.5 <= t <= 3.5]
        assert shown and all(float(t).is_integer() for t in shown)
    plt.close(fig)
