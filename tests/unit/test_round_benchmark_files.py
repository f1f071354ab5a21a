"""The round benchmark leaves its metrics behind, not its runs' model files."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.round import cli, runs

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
