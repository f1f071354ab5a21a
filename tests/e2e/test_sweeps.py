"""A real quick sweep through ``flwr run`` (a local SuperLink, Ray workers): its tables and
plots, skipping finished runs, the in-process engine's equality with it (and the tables over
seeds, from the in-process engine's two seeds), masks kept in Ray's workers, and the analysis
notebook on its results."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from flower_app.config import RunConfig
from flower_app.runs.runtime import initial_model
from flower_app.studies import experiments
from tests.conftest import ROOT
from tests.notebook_runs import execute_notebook, notebook_texts

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---- a real quick sweep through flwr run, then the notebook on its results ------------------
# dense (sparsity 0) and sparse after the same warm-up; the magnitude mask needs no Fisher
DENSE, SPARSE = "nc5-sgdm-dense", "nc5-sgdm-lowest_magnitude"
SETTINGS = (DENSE, SPARSE)
SWEEP = [
    "mask-strategies",
    "--quick",
    "--settings",
    ",".join(SETTINGS),
    "num-server-rounds=2",
    "synthetic-train-per-class=20",
    "synthetic-test-per-class=10",
    "eval-every=1",
    "num-clients=4",  # fewer nodes to start and query than the quick study's 100
    "sharding=iid",  # 4 clients x 5 classes cannot cover 100 classes; the sweep is the point
    "fraction-train=0.5",  # 2 clients a round: the fewest that have an update cosine
    "head-warmup-rounds=1",  # sparse: one warm-up round, so its bytes stay below dense
]


def _sweep(out: Path, backbone: Path, engine: str, seeds: int) -> tuple[int, str]:
    argv = [*SWEEP, f"pretrained-path={backbone}", "--engine", engine, "--seeds", str(seeds)]
    argv += ["--output-dir", str(out)]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = experiments.main([*argv, "--app", str(ROOT)])
    return code, buffer.getvalue()


@pytest.fixture(scope="module")
def quick_sweep(tmp_path_factory, pretrained_backbone) -> tuple[Path, str]:
    """The sweep through flwr run (a local SuperLink, Ray workers), one seed: each
    ``flwr run`` costs about 30 CPU-seconds, and the tables over seeds are the same code
    whichever engine made the runs (the in-process test below runs two seeds)."""
    out = tmp_path_factory.mktemp("sweep")
    code, log = _sweep(out, pretrained_backbone, "flwr", seeds=1)
    assert code == 0, log
    return out, log


def test_quick_sweep_writes_tables_and_plots_and_skips_finished_runs(quick_sweep, capsys):
    out, log = quick_sweep
    study = out / "mask-strategies"
    assert f"[2/2] mask-strategies/{SPARSE}-seed0: run, completed" in log
    table = pd.read_csv(study / "table.csv").set_index("setting")
    for setting in SETTINGS:
        summary = json.loads((study / f"{setting}-seed0" / "summary.json").read_text())
        assert table.loc[setting, "test-accuracy-mean"] == summary["final-test-accuracy"]
        assert table.loc[setting, "runs"] == 1 and pd.isna(table.loc[setting, "test-accuracy-std"])
    assert table.loc[SPARSE, "bytes-mean"] < table.loc[DENSE, "bytes-mean"]
    for name in ("accuracy.png", "final_accuracy.png", "accuracy_vs_bytes.png", "interference.png"):
        assert (study / name).read_bytes()[:8] == PNG_MAGIC
    for setting in SETTINGS:
        metrics = pd.read_csv(study / f"{setting}-seed0" / "metrics.csv")
        cosine = metrics["update-cosine"].dropna()
        assert len(cosine) == 2 and cosine.between(-1, 1).all()
        assert metrics["update-norm-ratio"].dropna().between(0, 1 + 1e-9).all()

    stamps = {p: p.stat().st_mtime_ns for p in study.glob("*/summary.json")}
    config = json.loads((study / f"{DENSE}-seed0" / "config.json").read_text())
    code, again = _sweep(out, Path(config["pretrained-path"]), "flwr", seeds=1)
    assert code == 0 and again.count("skipped (finished earlier)") == 2
    assert {p: p.stat().st_mtime_ns for p in study.glob("*/summary.json")} == stamps


def _untimed_metrics(run_dir: Path) -> pd.DataFrame:
    frame = pd.read_csv(run_dir / "metrics.csv")
    return frame.drop(columns=[c for c in frame.columns if c.startswith("seconds")])


def test_the_in_process_engine_computes_what_flwr_run_computes(
    quick_sweep, pretrained_backbone, tmp_path
):
    """Same run-configs through both engines: the same metrics (timings aside) and the same
    final weights, bit for bit, dense and sparse; over two seeds, the table's mean and
    sample std of each setting."""
    code, log = _sweep(tmp_path, pretrained_backbone, "in-process", seeds=2)
    assert code == 0, log
    study = tmp_path / "mask-strategies"
    flwr_runs = sorted((quick_sweep[0] / "mask-strategies").glob("*-seed*/summary.json"))
    assert [run.parent.name for run in flwr_runs] == [f"{s}-seed0" for s in sorted(SETTINGS)]
    for run in flwr_runs:
        here = study / run.parent.name
        pd.testing.assert_frame_equal(_untimed_metrics(here), _untimed_metrics(run.parent))
        a, b = (load_file(str(d / "final_model.safetensors")) for d in (here, run.parent))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), run.parent.name
    table = pd.read_csv(study / "table.csv").set_index("setting")
    for setting in SETTINGS:
        summaries = [
            json.loads((study / f"{setting}-seed{k}" / "summary.json").read_text()) for k in (0, 1)
        ]
        accs = pd.Series([summary["final-test-accuracy"] for summary in summaries])
        assert table.loc[setting, "test-accuracy-mean"] == pytest.approx(accs.mean())
        assert table.loc[setting, "test-accuracy-std"] == pytest.approx(accs.std(ddof=1))
        assert table.loc[setting, "runs"] == 2
    assert "± " in (study / "table.md").read_text()


def test_sparse_runs_through_ray_keep_masked_entries(quick_sweep):
    """The mask reaches Ray's worker processes once and lives in each node's context.state."""
    run = quick_sweep[0] / "mask-strategies" / f"{SPARSE}-seed0"
    mask = {k: v.bool() for k, v in load_file(run / "mask.safetensors").items()}
    final = load_file(run / "final_model.safetensors")
    config = json.loads((run / "config.json").read_text())
    config.pop("run-name")
    initial = initial_model(RunConfig.from_run_config(config)).state_dict()
    for name, m in mask.items():
        assert torch.equal(final[name][~m], initial[name][~m]), name
    assert any(not torch.equal(final[n][m], initial[n][m]) for n, m in mask.items())


def test_analysis_notebook_runs_on_quick_results(quick_sweep, monkeypatch, tmp_path):
    out, _ = quick_sweep
    notebook = execute_notebook(monkeypatch, out, tmp_path)
    texts = notebook_texts(notebook)
    assert any("results in" in t and "mask-strategies" in t for t in texts)
    assert any("update-cosine" in t for t in texts)
    outputs = [o for c in notebook.cells for o in c.get("outputs", [])]
    assert not any(o.get("output_type") == "error" for o in outputs)
