"""The round benchmark leaves its metrics behind, not its runs' model files."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from benchmarks.round import cli, runs
from benchmarks.round.figures import round_figures
from benchmarks.round.floors import Floor
from benchmarks.round.forms import TINY_FORM

KEPT = ("metrics.csv", "summary.json", "config.json", "partitions.csv")
MODELS = {
    "checkpoint.pt": 300,
    "best_model.safetensors": 200,
    "final_model.safetensors": 200,
    "task_vector.safetensors": 100,
}


def _fake_run(run_dir: Path, models: dict[str, int] = MODELS) -> None:
    run_dir.mkdir(parents=True)
    for name in KEPT:
        (run_dir / name).write_text("x\n")
    for name, size in models.items():
        (run_dir / name).write_bytes(b"\0" * size)


def test_prune_deletes_model_files_of_the_named_runs_only(tmp_path):
    _fake_run(tmp_path / "dense")
    _fake_run(tmp_path / "sparse", MODELS | {"mask.safetensors": 50})
    _fake_run(tmp_path / "someone-elses")

    freed = runs.prune_model_files(tmp_path, ["dense", "sparse", "never-ran"])

    assert freed == 2 * sum(MODELS.values()) + 50
    for name in ("dense", "sparse"):
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == sorted(KEPT)
    assert len(list((tmp_path / "someone-elses").iterdir())) == len(KEPT) + len(MODELS)


def _failing_run_all(specs, out, timeout):
    for spec in specs:
        _fake_run(out / spec.name)
    raise KeyboardInterrupt  # as if the user stopped the benchmark during the runs


@pytest.mark.parametrize("keep", [False, True])
def test_main_prunes_even_when_interrupted_unless_kept(tmp_path, monkeypatch, capsys, keep):
    monkeypatch.setattr(cli, "run_all", _failing_run_all)
    argv = ["--tiny", "--device", "cpu", "--skip-k1000", "--output-dir", str(tmp_path)]
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv + (["--keep-models"] if keep else []))

    left = sorted(p.name for p in (tmp_path / "dense").iterdir())
    assert left == sorted(KEPT + tuple(MODELS) if keep else KEPT)
    out = capsys.readouterr().out
    if keep:
        assert "deleted the runs' model files" not in out
    else:
        freed_mb = 2 * sum(MODELS.values()) / 2**20
        assert f"deleted the runs' model files ({freed_mb:.0f} MB; --keep-models keeps them)" in out


def test_task_metrics_flag_turns_the_measurement_on_in_both_runs(tmp_path, monkeypatch):
    seen = []

    def record_specs(specs, out, timeout):
        seen.extend(specs)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_all", record_specs)
    argv = ["--tiny", "--device", "cpu", "--skip-k1000", "--output-dir", str(tmp_path)]
    with pytest.raises(KeyboardInterrupt):
        cli.main([*argv, "--task-metrics", "1000"])
    assert [s.name for s in seen] == ["dense", "sparse"]
    for spec in seen:
        assert spec.config["task-metrics-examples"] == 1000
        assert spec.config["task-metrics-every"] == 1


def test_the_measurements_share_is_the_median_of_each_rounds_own_ratio():
    """Shares of the same round's time (eval left out), so a busy machine that slows both
    parts of a round does not change it much; 0.5 and 0.25 and 0.2 -> 0.25."""
    spec = runs.RunSpec("dense", TINY_FORM, "client-resources-num-cpus=1", 1, 3)
    metrics = pd.DataFrame(
        {
            "round": [0, 1, 2, 3, 4],
            "seconds": [None, 9.0, 2.0, 5.0, 4.0],
            "seconds-eval": [None, None, None, 1.0, None],
            "seconds-task-metrics": [None, 9.0, 1.0, 1.0, 0.8],  # round 1: warm-up
        }
    )
    floor = Floor({"batch 64": 100.0}, "batch 64", 100, 1, 1.0)
    figures = round_figures(spec, metrics, floor)
    assert figures.task_share == pytest.approx(0.25)
    assert figures.task_s == pytest.approx(1.0)
    off = round_figures(spec, metrics.drop(columns=["seconds-task-metrics"]), floor)
    assert off.as_dict()["task-metrics-share"] is None
