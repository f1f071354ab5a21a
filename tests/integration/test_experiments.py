"""Sweep runner, studies, tables and plots: rules on made-up data, then a real quick sweep."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest
import torch

from flower_app.config import ConfigError, RunConfig, app_defaults
from flower_app.models import factory
from flower_app.runs import prerequisites
from flower_app.runs.checkpoint import CHECKPOINT_NAME
from flower_app.studies import experiments
from flower_app.studies.catalog import (
    FEDPROX_MU,
    LOCAL_STEPS,
    base_config,
    scaled_rounds,
    study_settings,
)
from flower_app.studies.reports import (
    load_runs,
    markdown_table,
    resolve_launch_path,
    studies_with_results,
    summary_table,
    write_report,
)
from tests.conftest import ROOT
from tests.invalid_configs import INVALID
from tests.notebook_runs import execute_notebook, notebook_texts

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---- studies ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("quick", "base_rounds"), [(False, 500), (True, 32)])
def test_local_steps_study_keeps_steps_times_rounds_constant(quick, base_rounds):
    base = base_config(ROOT, quick, centralized=False)
    settings = study_settings("local-steps", base)
    assert [s.overrides["local-steps"] for s in settings] == list(LOCAL_STEPS)
    products = {s.overrides["local-steps"] * s.overrides["num-server-rounds"] for s in settings}
    assert products == {4 * base_rounds}


def test_scaled_rounds_refuses_what_does_not_divide():
    assert scaled_rounds(500, 16) == 125 and scaled_rounds(30, 8) == 15
    with pytest.raises(ConfigError, match="not divisible by local-steps 16"):
        scaled_rounds(10, 16)


BASE = {"num-server-rounds": 32, "local-steps": 4, "lr": 0.05}


def test_studies_cover_the_questions():
    names = {study: [s.name for s in study_settings(study, BASE)] for study in experiments.STUDIES}
    assert names["heterogeneity"] == ["nc1", "nc5", "nc10", "nc50", "iid"]
    masks = ["least_sensitive", "most_sensitive", "lowest_magnitude", "highest_magnitude"]
    arm = ["dense", *masks, "random"]
    assert names["mask-strategies"] == [
        *(f"nc5-sgdm-{m}" for m in arm),
        *(f"nc5-adamw-{m}" for m in arm),
    ]
    assert names["fedavg"] == ["iid", "iid-random-init"]
    assert names["label-skew"] == ["dir0.05", "dir0.1", "dir0.5", "dir1", "dir100"]
    # label-skew is this project's extension; task arithmetic is the study's own question
    assert experiments.expand("all") == [s for s in experiments.STUDIES if s != "label-skew"]
    assert study_settings("centralized", BASE)[0].centralized
    scratch = study_settings("fedavg", BASE)[1].overrides
    assert scratch["weights"] == "random" and scratch["pretrained-path"] == ""


def test_the_mask_study_arms_differ_in_shards_and_optimizer_only():
    settings = {s.name: s.overrides for s in study_settings("mask-strategies", BASE)}
    for name, overrides in settings.items():
        shards, optimizer, mask = name.split("-", 2)
        assert overrides["strategy"] == "sparse-fedavg"  # the same warm-up, a frozen head
        if mask == "dense":
            assert overrides["sparsity"] == 0.0 and overrides["mask-strategy"] == "random"
        else:
            assert overrides["mask-strategy"] == mask and "sparsity" not in overrides
        assert overrides["sharding"] == ("iid" if shards == "iid" else "non-iid")
        assert overrides["task-metrics-examples"] > 0  # every run measures interference
        assert overrides.get("optimizer", "sgdm") == optimizer
    # TaLoS's lr x steps (1e-5 x 2,000) over the miniature's 32 x 4 steps; SGDM's warm-up lr
    adamw = settings["nc5-adamw-least_sensitive"]
    assert adamw["lr"] == pytest.approx(1e-5 * 2000 / 128) and adamw["head-warmup-lr"] == 0.05
    paper = study_settings("mask-strategies", BASE | {"num-server-rounds": 500, "lr": 0.01})
    assert len(paper) == 12
    assert [s.overrides["lr"] for s in paper if "adamw" in s.name] == [pytest.approx(1e-5)] * 6
    sgdm = settings["nc5-sgdm-least_sensitive"]
    assert {k: v for k, v in sgdm.items() if k != "optimizer"} == {
        k: v for k, v in adamw.items() if k not in ("optimizer", "lr", "head-warmup-lr")
    }


@pytest.mark.parametrize("case", INVALID, ids=str)
def test_every_invalid_run_config_value_stops_the_sweep_before_work(tmp_path, capsys, case):
    argv = ["fedavg", "--quick", *case.as_cli(), "--output-dir", str(tmp_path / "out")]
    code = experiments.main([*argv, "--app", str(ROOT)])
    err = capsys.readouterr().err
    owned = [k for k in case.overrides() if k in ("seed", "resume", "run-name")]
    expected = f"override '{owned[0]}' is not allowed" if owned else case.allowed  # runner's
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# ---- planning: every bad input stops before any run -----------------------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["fedavg", "lr=abc"], "run-config key 'lr' = 'abc' is not allowed: must be a number"),
        (["fedavg", "seed=3"], "override 'seed' is not allowed"),
        (["fedavg", "--seeds", "0"], "--seeds 0 is not allowed"),
        (["heterogeneity", "--settings", "nc3"], "--settings nc3 is not allowed"),
        (["fedavg", "--app", "/"], "--app '/' is not allowed"),
        (["fedavg", "lr"], "override 'lr' is not allowed: write key=value"),
        (["fedavg", "--strategies", "fedavg,fedsgd"], "--strategies fedsgd is not allowed"),
        (["fedavg", "--strategies", "krum", "num-clients=4"], "'krum-malicious' = 0"),
    ],
)
def test_bad_sweep_inputs_fail_with_one_line_before_work(tmp_path, capsys, argv, message):
    app = [] if "--app" in argv else ["--app", str(ROOT)]
    code = experiments.main([*argv, "--output-dir", str(tmp_path / "out"), *app])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def _plan(tmp_path, *argv: str) -> list[experiments.PlannedRun]:
    args = experiments.parse_args([*argv, "--output-dir", str(tmp_path), "--app", str(ROOT)])
    return experiments.plan(args)


def test_plan_is_settings_times_seeds_with_named_run_dirs(tmp_path):
    runs = _plan(tmp_path, "heterogeneity", "--quick", "--seeds", "3", "batch-size=8")
    assert len(runs) == 5 * 3
    assert runs[0].run_dir == tmp_path.resolve() / "heterogeneity" / "nc1-seed0"
    assert {r.config["seed"] for r in runs} == {0, 1, 2}
    assert all(r.config["batch-size"] == "8" and r.num_clients == 100 for r in runs)


def test_strategies_cross_every_federated_setting_and_leave_centralized_alone(tmp_path):
    """--strategies: each setting once per server strategy, side by side in one study."""
    argv = ("--quick", "--strategies", "fedavg,fedprox,fedadam", "--settings", "iid,nc1")
    runs = _plan(tmp_path, "heterogeneity", *argv)
    assert [r.setting.name for r in runs] == [
        f"{s}-{x}" for s in ("nc1", "iid") for x in ("fedavg", "fedprox", "fedadam")
    ]
    by_name = {r.setting.name: r.config for r in runs}
    assert by_name["iid-fedavg"]["server-rule"] == "mean"
    assert by_name["iid-fedavg"]["proximal-mu"] == 0.0
    assert by_name["iid-fedprox"]["proximal-mu"] == FEDPROX_MU
    assert by_name["nc1-fedadam"]["server-rule"] == "fedadam"
    assert by_name["nc1-fedadam"]["classes-per-client"] == 1
    # a key=value override wins over the strategy's value
    runs = _plan(
        tmp_path, "fedavg", "--strategies", "fedprox", "--settings", "iid", "proximal-mu=0.1"
    )
    assert runs[0].config["proximal-mu"] == "0.1"
    centralized = _plan(tmp_path, "centralized", "--quick", "--strategies", "fedadam")
    assert [r.setting.name for r in centralized] == ["centralized"]


def test_prepare_skips_finished_resumes_checkpointed_and_clears_leftovers(tmp_path):
    done, resumable, leftover, new = _plan(tmp_path, "fedavg", "--settings", "iid", "--seeds", "4")
    done.run_dir.mkdir(parents=True)
    (done.run_dir / "summary.json").write_text(json.dumps({"status": "completed"}))
    resumable.run_dir.mkdir()
    (resumable.run_dir / CHECKPOINT_NAME).write_bytes(b"x")
    leftover.run_dir.mkdir()
    (leftover.run_dir / "metrics.csv").write_text("round\n0\n")
    assert [experiments.prepare(r) for r in (done, resumable, leftover, new)] == [
        "done",
        "resume",
        "fresh",
        "fresh",
    ]
    assert not leftover.run_dir.exists()


def test_failed_runs_are_reported_and_kept_out_of_the_table(tmp_path, monkeypatch, capsys):
    """A run Flower reports as failed is listed as failed; only completed runs are results."""

    def fake_run(self, run, resume):
        if run.seed == 1:
            return False, "flwr run 7 finished:failed; log: x.log; last line: boom"
        _write_run(run.run_dir, run.seed, 0.5 + run.seed)
        return True, "flwr run 6"

    monkeypatch.setattr(experiments.SweepRunner, "run", fake_run)
    monkeypatch.setattr(experiments, "check_outside", lambda runs: None)  # no CIFAR-100 here
    code = experiments.main(
        [
            "fedavg",
            "--settings",
            "iid",
            "--seeds",
            "3",
            "--output-dir",
            str(tmp_path),
            "--app",
            str(ROOT),
        ]
    )
    out = capsys.readouterr().out
    assert code == 1
    assert "[2/3] fedavg/iid-seed1: FAILED" in out and "last line: boom" in out
    table = pd.read_csv(tmp_path / "fedavg" / "table.csv")
    assert table.loc[0, "runs"] == 2 and table.loc[0, "failed"] == 1
    assert table.loc[0, "test-accuracy-mean"] == pytest.approx((0.5 + 2.5) / 2)
    manifest = pd.read_csv(tmp_path / "fedavg" / "sweep.csv")
    assert list(manifest["status"]) == ["completed", "failed", "completed"]


@pytest.mark.parametrize(
    ("argv", "engine"),
    [(["--quick"], "in-process"), ([], "flwr"), (["--quick", "--engine", "flwr"], "flwr")],
)
def test_the_miniature_runs_in_process_unless_told_otherwise(tmp_path, capsys, argv, engine):
    backbone = tmp_path / "vit_tiny_test-synthetic-pretrain-seed0.safetensors"
    where = ["--output-dir", str(tmp_path / "out"), "--app", str(ROOT)]
    code = experiments.main(["fedavg", *argv, "--dry-run", f"pretrained-path={backbone}", *where])
    out = capsys.readouterr().out
    assert code == 0 and f"engine: {engine})" in out.splitlines()[0]
    if argv:  # the miniature names the backbone, which is missing: the runner would make it
        assert f"first: fl-pretrain --output {backbone} (the pretrained backbone" in out
    assert not backbone.exists() and not (tmp_path / "out").exists()


def test_the_label_skew_study_plans_every_alpha_at_both_scales(tmp_path, capsys):
    backbone = tmp_path / "vit_tiny_test-synthetic-pretrain-seed0.safetensors"
    where = ["--output-dir", str(tmp_path / "out"), "--app", str(ROOT)]
    for scale in (["--quick"], []):
        argv = ["label-skew", *scale, "--dry-run", f"pretrained-path={backbone}", *where]
        assert experiments.main(argv) == 0
        out = capsys.readouterr().out
        for alpha in ("0.05", "0.1", "0.5", "1", "100"):
            assert f"label-skew/dir{alpha}-seed0" in out
    assert not (tmp_path / "out").exists()


def test_bad_files_stop_the_sweep_before_the_backbone_is_made(tmp_path, capsys, monkeypatch):
    def no_pretraining(*args, **kwargs):
        raise AssertionError("pretrained before every input was checked")

    monkeypatch.setattr(experiments, "ensure_backbone", no_pretraining)
    backbone = tmp_path / "vit_tiny_test-synthetic-pretrain-seed0.safetensors"
    argv = ["fedavg", "--quick", f"pretrained-path={backbone}", "dataset=cifar100"]
    argv += ["download=false", f"data-dir={tmp_path / 'nothing'}"]
    code = experiments.main([*argv, "--output-dir", str(tmp_path / "out"), "--app", str(ROOT)])
    err = capsys.readouterr().err
    assert code == 2 and "run-config key 'data-dir'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_an_in_process_run_that_raises_is_a_failed_run_and_the_sweep_goes_on(
    tmp_path, capsys, monkeypatch
):
    def fake_run(config):
        if config["seed"] == 0:
            print("round 1/2 (train) | the log keeps what the run printed")
            raise RuntimeError("boom\nsecond line")
        _write_run(Path(config["output-dir"]) / config["run-name"], 1, 0.5)

    monkeypatch.setattr(experiments, "run_in_process", fake_run)
    monkeypatch.setattr(experiments, "check_outside", lambda runs: None)  # no CIFAR-100 here
    sweep = ["fedavg", "--settings", "iid", "--seeds", "2", "--engine", "in-process"]
    code = experiments.main([*sweep, "--output-dir", str(tmp_path), "--app", str(ROOT)])
    out = capsys.readouterr().out
    assert code == 1
    log = tmp_path / "fedavg" / "logs" / "iid-seed0.log"
    assert "[1/2] fedavg/iid-seed0: FAILED in" in out
    assert f"| RuntimeError: boom second line; log: {log}; last line: " in out
    assert "[2/2] fedavg/iid-seed1: run, completed" in out
    text = log.read_text()
    assert "the log keeps what the run printed" in text and "Traceback" in text
    manifest = pd.read_csv(tmp_path / "fedavg" / "sweep.csv")
    assert list(manifest["status"]) == ["failed", "completed"]
    assert "  iid  0.5000 (1 failed)" in out.splitlines()


# ---- tables and plots from made-up runs -----------------------------------------------------
def _write_run(run_dir: Path, seed: int, accuracy: float, strategy: str = "fedavg") -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps({"strategy": strategy, "local-steps": 4}))
    rows = [
        {"round": r, "val-accuracy": accuracy * r / 2, "bytes-down": 10.0 * r, "bytes-up": 5.0}
        | ({"update-cosine": 0.1 * seed, "update-norm-ratio": 0.5, "update-norm": 2.0} if r else {})
        for r in range(3)
    ]
    pd.DataFrame(rows).to_csv(run_dir / "metrics.csv", index=False)
    summary = {
        "status": "completed",
        "final-test-accuracy": accuracy,
        "best-val-accuracy": accuracy + 0.01,
        "rounds": 2,
        "wall-time-s": 10.0 * (seed + 1),
        "bytes-down": 3e6,
        "bytes-up": 1e6,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))


def _write_study(study: Path, accuracies: dict[str, list[float]], strategy: str) -> None:
    """Made-up runs (one per setting and seed) and the runner's manifest of them."""
    manifest = []
    for setting, accs in accuracies.items():
        for seed, acc in enumerate(accs):
            _write_run(study / f"{setting}-seed{seed}", seed, acc, strategy)
            manifest.append([setting, seed, f"{setting}-seed{seed}"])
    frame = pd.DataFrame(manifest, columns=["setting", "seed", "run-name"])
    frame.assign(study=study.name, status="completed", seconds=1.0, detail="").to_csv(
        study / "sweep.csv", index=False
    )


def test_table_is_mean_and_sample_std_over_seeds(tmp_path):
    study = tmp_path / "s"
    _write_study(study, {"a": [0.2, 0.4, 0.6], "b": [0.3]}, "sparse-fedavg")
    pd.DataFrame({"round": [1, 2], "bytes-down": [1e6, 1e6], "bytes-up": [5e5, 5e5]}).to_csv(
        study / "b-seed0" / "calibration.csv", index=False
    )
    table = summary_table(load_runs(study))
    a, b = table.iloc[0], table.iloc[1]
    # the summary already counts calibration traffic: calibration.csv is not added again
    assert b["bytes-mean"] == pytest.approx(4e6)
    assert a["test-accuracy-mean"] == pytest.approx(0.4)
    assert a["test-accuracy-std"] == pytest.approx(0.2)  # sample std of 0.2, 0.4, 0.6
    assert a["wall-time-s-mean"] == pytest.approx(20.0) and a["bytes-mean"] == 4e6
    assert b["runs"] == 1 and math.isnan(b["test-accuracy-std"])
    text = markdown_table(table)
    assert "| a | 3 | 0 | 0.4000 ± 0.2000 | 0.4100 ± 0.2000 | 2 ± 0 | 20.0 ± 10.0 |" in text
    assert "| b | 1 | 0 | 0.3000 | 0.3100 |" in text
    outputs = write_report(study, "s")
    assert set(outputs) == {
        "table.csv",
        "table.md",
        "accuracy.png",
        "final_accuracy.png",
        "accuracy_vs_bytes.png",
        "interference.png",
    }
    for name, path in outputs.items():
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == PNG_MAGIC
            assert matplotlib.image.imread(path).shape[2] in (3, 4)


def _add_task_metrics(run_dir: Path, normalized: float) -> None:
    """Task columns in a made-up run: a head warm-up row (not in the table's mean) and two
    measured training rounds of a three-round run."""
    metrics = pd.read_csv(run_dir / "metrics.csv")
    metrics["phase"] = ["initial", "head-warmup", "train"]
    train = pd.DataFrame({"round": [3], "phase": ["train"]})
    metrics = pd.concat([metrics, train], ignore_index=True)
    values = {  # per round: normalized accuracy, retained gain, disagreement
        1: (0.1, -1.0, 0.9),  # warm-up: left out
        2: (normalized, 0.5, 0.2),
        3: (normalized + 0.1, 0.7, 0.4),
    }
    for round_, (norm, gain, disagree) in values.items():
        metrics.loc[metrics["round"] == round_, "task-normalized-accuracy"] = norm
        metrics.loc[metrics["round"] == round_, "task-retained-gain"] = gain
        metrics.loc[metrics["round"] == round_, "task-disagreement"] = disagree
    metrics.to_csv(run_dir / "metrics.csv", index=False)


def test_task_columns_reach_the_table_and_the_figure_where_runs_have_them(tmp_path):
    study = tmp_path / "s"
    _write_study(study, {"a": [0.2, 0.4], "b": [0.3]}, "fedavg")
    plain = summary_table(load_runs(study))
    assert not any(c.startswith("task-") for c in plain.columns)  # no run measured them
    assert "normalized acc." not in markdown_table(plain)
    geometric = write_report(study, "s", tmp_path / "plain")["interference.png"]
    _add_task_metrics(study / "a-seed0", 0.8)
    _add_task_metrics(study / "a-seed1", 0.6)
    table = summary_table(load_runs(study)).set_index("setting")
    # per run the mean over its measured training rounds: 0.85 and 0.65
    assert table.loc["a", "task-normalized-accuracy-mean"] == pytest.approx(0.75)
    assert table.loc["a", "task-normalized-accuracy-std"] == pytest.approx(math.sqrt(0.02))
    assert table.loc["a", "task-retained-gain-mean"] == pytest.approx(0.6)
    assert table.loc["a", "task-disagreement-mean"] == pytest.approx(0.3)
    assert math.isnan(table.loc["b", "task-normalized-accuracy-mean"])  # b measured none
    text = markdown_table(table.reset_index())
    assert text.splitlines()[0].endswith("| normalized acc. | retained gain | disagreement |")
    assert "| 0.750 ± 0.141 | 0.600 ± 0.000 | 0.300 ± 0.000 |" in text
    assert text.splitlines()[3].endswith("| - | - | - |")  # b
    both = write_report(study, "s", tmp_path / "task")["interference.png"]
    # a second row of panels: the task-arithmetic metrics under the geometric ones
    height = matplotlib.image.imread(both).shape[0]
    assert height == pytest.approx(2 * matplotlib.image.imread(geometric).shape[0], rel=0.02)


def test_report_goes_to_another_folder_and_leaves_the_study_as_it_was(tmp_path):
    study = tmp_path / "fedavg"
    _write_study(study, {"iid": [0.2, 0.4]}, "fedavg")
    before = _snapshot(study)
    outputs = write_report(study, "fedavg", tmp_path / "report")
    assert _snapshot(study) == before
    assert {p.parent for p in outputs.values()} == {tmp_path / "report"}
    table = pd.read_csv(outputs["table.csv"])
    assert table.loc[0, "runs"] == 2 and table.loc[0, "test-accuracy-mean"] == pytest.approx(0.3)


def test_results_dir_is_read_as_typed_in_the_shell(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_launch_path("/abs/x", "/elsewhere") == Path("/abs/x")
    assert resolve_launch_path("res/studies", str(ROOT)) == ROOT / "res" / "studies"
    assert resolve_launch_path("res", None) == tmp_path.resolve() / "res"


def test_a_folder_without_results_is_an_error_that_says_so(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"no results in {tmp_path / 'x'}: the folder")
    ):
        studies_with_results(tmp_path / "x")
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"no results in {tmp_path}: no study folder")
    ):
        studies_with_results(tmp_path)
    _write_study(tmp_path / "fedavg", {"iid": [0.2]}, "fedavg")
    (tmp_path / "fedavg" / "iid-seed0" / "summary.json").unlink()  # the run did not finish
    with pytest.raises(FileNotFoundError, match=r"no study folder .* with a completed run"):
        studies_with_results(tmp_path)
    _write_study(tmp_path / "centralized", {"centralized": [0.5]}, "fedavg")
    assert studies_with_results(tmp_path) == ["fedavg", "centralized"]  # study order


# ---- the notebook, executed as `jupyter nbconvert --execute` would, from the project root ----
def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder``: its bytes and modification time."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_notebook_reads_relative_results_dir_and_changes_no_file(tmp_path, monkeypatch):
    results = tmp_path / "studies"
    _write_study(results / "fedavg", {"iid": [0.2, 0.4]}, "fedavg")
    _write_study(results / "centralized", {"centralized": [0.5]}, "fedavg")
    before = _snapshot(results)
    notebook = execute_notebook(monkeypatch, results, tmp_path / "report")
    assert _snapshot(results) == before  # same files, bytes and mtimes: nothing written
    texts = notebook_texts(notebook)
    assert any(f"results in {results.resolve()}: fedavg, centralized" in t for t in texts)
    assert any("| iid | 2 | 0 | 0.3000 ± 0.1414 |" in t for t in texts)
    assert any("gap-to-centralized" in t for t in texts)
    assert (tmp_path / "report" / "fedavg" / "table.csv").is_file()
    assert (tmp_path / "report" / "fedavg" / "interference.png").read_bytes()[:8] == PNG_MAGIC


def test_notebook_on_an_empty_folder_fails_saying_so(tmp_path, monkeypatch):
    from nbclient.exceptions import CellExecutionError

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CellExecutionError) as failure:
        execute_notebook(monkeypatch, empty, tmp_path / "report")
    assert "FileNotFoundError" in str(failure.value)
    assert f"no results in {empty.resolve()}: no study folder" in str(failure.value)
    assert list(empty.iterdir()) == [] and not (tmp_path / "report").exists()


@pytest.mark.parametrize("cuda", [False, True])
def test_the_sweeps_federation_takes_fl_runs_gpu_resources_and_keeps_flowers_cpu_default(
    monkeypatch, cuda
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    chosen = experiments.run_federation("", 100)
    if cuda:
        assert chosen == (
            "num-supernodes=100 client-resources-num-cpus=1 client-resources-num-gpus=0.5"
        )
    else:
        assert chosen == "num-supernodes=100"
    given = "client-resources-num-cpus=2"
    assert "client-resources-num-cpus=2" in experiments.run_federation(given, 10).split()
    with pytest.raises(ConfigError, match="num-supernodes=7 is not allowed"):
        experiments.run_federation("num-supernodes=7", 10)


# ---- a study reuses only what its run-config would make --------------------------------------
def _no_work(monkeypatch) -> None:
    """Fail the test if the sweep runs or pretrains anything."""

    def refuse(*args, **kwargs):
        raise AssertionError("work started before every folder was checked")

    monkeypatch.setattr(experiments.SweepRunner, "run", refuse)
    monkeypatch.setattr(experiments, "ensure_backbone", refuse)


def _made_run(run: experiments.PlannedRun, **changed) -> None:
    """A finished run folder as the ServerApp writes it, made with ``changed`` keys."""
    config = RunConfig.from_run_config(app_defaults(ROOT) | run.config, check_files=False)
    made = config.to_dict() | {"run-name": run.name} | changed
    _write_run(run.run_dir, run.seed, 0.5)
    (run.run_dir / "config.json").write_text(json.dumps(made))


def _mini(tmp_path, *argv: str) -> list[str]:
    backbone = tmp_path / "backbone.safetensors"
    backbone.write_bytes(b"")  # never read: nothing runs
    where = ["--output-dir", str(tmp_path / "out"), "--app", str(ROOT)]
    return ["heterogeneity", "--quick", *argv, f"pretrained-path={backbone}", *where]


def test_a_finished_run_of_another_run_config_is_refused_naming_the_keys(
    tmp_path, capsys, monkeypatch
):
    argv = _mini(tmp_path, "--settings", "iid,nc1")
    nc1, iid = experiments.plan(experiments.parse_args(argv))
    _made_run(iid, lr=0.5, **{"image-size": 64})
    _made_run(nc1, lr=0.5)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    _no_work(monkeypatch)
    assert experiments.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {nc1.run_dir} was made with another")
    assert "(lr=0.5 there, 0.05 planned) (1 more folders differ too)" in err
    assert "--move-aside to move such folders into moved-aside/" in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # untouched


def test_a_finished_run_of_the_same_run_config_is_skipped(tmp_path, capsys, monkeypatch):
    argv = _mini(tmp_path, "--settings", "iid")
    (iid,) = experiments.plan(experiments.parse_args(argv))
    _made_run(iid, **{"round-timeout": 5.0, "device": "cpu"})  # operational keys may differ
    _no_work(monkeypatch)
    assert experiments.main(argv) == 0
    out = capsys.readouterr().out
    assert "[1/1] heterogeneity/iid-seed0: skipped (finished earlier)" in out
    table = (tmp_path / "out" / "heterogeneity" / "table.md").read_text().splitlines()
    assert table[0].startswith("heterogeneity: miniature scale, engine unknown, 1 seed (0);")


def test_move_aside_keeps_the_other_run_and_runs_the_planned_one(tmp_path, capsys, monkeypatch):
    argv = _mini(tmp_path, "--settings", "iid", "--move-aside")
    (iid,) = experiments.plan(experiments.parse_args(argv))
    _made_run(iid, lr=0.5)

    def fake_run(self, run, resume):
        _made_run(run)
        return True, "in-process"

    monkeypatch.setattr(experiments.SweepRunner, "run", fake_run)
    assert experiments.main(argv) == 0
    out = capsys.readouterr().out
    moved = list((iid.study_dir / "moved-aside").iterdir())
    assert len(moved) == 1 and moved[0].name.startswith("iid-seed0-")
    assert json.loads((moved[0] / "config.json").read_text())["lr"] == 0.5
    assert f"moved {iid.run_dir} to {moved[0]} (made with another run-config)" in out
    assert json.loads((iid.run_dir / "config.json").read_text())["lr"] == 0.05


def test_a_study_folder_of_another_base_is_refused_for_any_setting(tmp_path, capsys, monkeypatch):
    """Runs of other settings share the study's table: their base must be this sweep's."""

    def fake_run(self, run, resume):
        _made_run(run)
        return True, "in-process"

    monkeypatch.setattr(experiments.SweepRunner, "run", fake_run)
    assert experiments.main(_mini(tmp_path, "--settings", "nc1", "lr=0.5")) == 0
    study = json.loads((tmp_path / "out" / "heterogeneity" / "study.json").read_text())
    assert study["scale"] == "miniature" and study["base"]["lr"] == 0.5
    capsys.readouterr()
    assert experiments.main(_mini(tmp_path, "--settings", "iid")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'out' / 'heterogeneity'} was made with another")
    assert "(lr=0.5 there, 0.05 planned)" in err


def test_a_paper_scale_study_without_its_data_stops_in_one_line_writing_nothing(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(prerequisites, "reachable", lambda url, timeout=3.0: False)
    monkeypatch.setattr(factory, "reachable", lambda url, timeout=3.0: False)
    monkeypatch.setattr(factory, "hub_weights_cached", lambda name: False)
    _no_work(monkeypatch)
    out = tmp_path / "out"
    argv = ["heterogeneity", f"data-dir={tmp_path / 'data'}", "--output-dir", str(out)]
    assert experiments.main([*argv, "--app", str(ROOT)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no CIFAR-100 in {tmp_path / 'data'}" in err
    assert "vit_small_patch16_224.dino weights are not in the Hugging Face cache" in err
    assert not out.exists() and not (tmp_path / "data").exists()


def test_the_scales_write_to_their_own_default_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for quick, folder in ((True, "miniature"), (False, "paper")):
        args = experiments.parse_args(["fedavg", "--app", str(ROOT), *(["--quick"] * quick)])
        assert experiments.output_dir_of(args) == tmp_path / "results" / folder


def test_a_run_that_two_studies_plan_alike_is_computed_once(tmp_path, capsys, monkeypatch):
    """fedavg's iid is heterogeneity's iid: the second study copies it (hard links) and
    names where it came from; a setting that measures more (task metrics) runs itself."""
    made: list[str] = []

    def fake_run(self, run, resume):
        made.append(f"{run.study}/{run.name}")
        _made_run(run)
        return True, "in-process"

    monkeypatch.setattr(experiments.SweepRunner, "run", fake_run)
    het = _mini(tmp_path, "--settings", "iid")
    assert experiments.main(het) == 0
    fedavg = ["fedavg", *het[1:]]
    assert experiments.main(fedavg) == 0
    out = capsys.readouterr().out
    assert made == ["heterogeneity/iid-seed0"]
    assert "fedavg/iid-seed0: the same run as heterogeneity/iid-seed0, copied" in out
    source, copy = (tmp_path / "out" / s / "iid-seed0" for s in ("heterogeneity", "fedavg"))
    assert (copy / "summary.json").stat().st_ino == (source / "summary.json").stat().st_ino
    manifest = pd.read_csv(copy.parent / "sweep.csv", keep_default_na=False)
    assert manifest["detail"].tolist() == ["same run as heterogeneity/iid-seed0"]
    assert manifest["status"].tolist() == ["completed"]
    # the same run-config measuring more (task metrics) is another run: it runs itself
    steps = ["local-steps", "--quick", "--settings", "J4", het[4], "task-metrics-examples=100"]
    assert experiments.main([*steps, *het[-4:]]) == 0
    assert made == ["heterogeneity/iid-seed0", "local-steps/J4-seed0"]
