"""``fl-experiments --jobs``: runs side by side, reported in plan order, a run identical to
one under way copied once that one ends, and worker processes that compute what the
sweep's own process computes."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import pytest

from flower_app.config import ConfigError, app_defaults
from flower_app.studies import experiments, run_pool
from flower_app.studies.shared_runs import FinishedRuns
from tests.conftest import ROOT
from tests.integration.test_experiments import _made_run, _mini


def test_jobs_values_and_their_one_line_errors(monkeypatch):
    monkeypatch.setattr(run_pool, "usable_cores", lambda: 6)
    assert run_pool.parse_jobs("auto", "in-process") == 6
    assert run_pool.parse_jobs("auto", "flwr") == 1
    assert run_pool.parse_jobs("3", "in-process") == 3 and run_pool.parse_jobs("1", "flwr") == 1
    assert [run_pool.threads_per_job(j) for j in (1, 2, 4, 6, 12)] == [6, 3, 1, 1, 1]
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(ConfigError) as err:
            run_pool.parse_jobs(bad, "in-process")
        assert str(err.value) == f"--jobs {bad} is not allowed: a whole number >= 1, or auto"
    with pytest.raises(ConfigError, match=r"^--jobs 2 is not allowed with --engine flwr: "):
        run_pool.parse_jobs("2", "flwr")


def test_a_bad_jobs_value_stops_the_sweep_before_any_run(tmp_path, capsys):
    argv = [*_mini(tmp_path, "--settings", "iid"), "--jobs", "0"]
    assert experiments.main(argv) == 2
    assert capsys.readouterr().err == (
        "error: --jobs 0 is not allowed: a whole number >= 1, or auto\n"
    )
    assert not (tmp_path / "out").exists()


class ThreadPool:
    """The pool's interface over threads, so a test's stand-in for a run is seen by it."""

    jobs = 2

    def __init__(self) -> None:
        self.executor = ThreadPoolExecutor(self.jobs)

    def submit(self, work, *args):
        return self.executor.submit(run_pool.timed, work, *args)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True)


def test_runs_side_by_side_report_in_plan_order_and_a_twin_waits_to_be_copied(
    tmp_path, capsys, monkeypatch
):
    """heterogeneity's nc1 and iid run together; iid (slow) ends after nc1 but comes first
    in the lines and the manifest, as planned; fedavg's iid is the same run: it does not
    start beside it, and is copied when it ends."""
    het = experiments.plan(experiments.parse_args(_mini(tmp_path, "--settings", "nc1,iid")))
    fedavg = experiments.plan(experiments.parse_args(["fedavg", *_mini(tmp_path)[1:]]))
    runs = [het[1], het[0], *[r for r in fedavg if r.setting.name == "iid"]]
    assert [f"{r.study}/{r.name}" for r in runs] == [
        "heterogeneity/iid-seed0",
        "heterogeneity/nc1-seed0",
        "fedavg/iid-seed0",
    ]
    ended, under_way, most = [], set(), []
    lock = threading.Lock()

    def fake_run(self, run, resume):
        with lock:
            under_way.add(run.name)
            most.append(len(under_way))
        time.sleep(0.6 if run.setting.name == "iid" else 0.1)
        _made_run(run)
        with lock:
            under_way.discard(run.name)
            ended.append(f"{run.study}/{run.name}")
        return True, "in-process"

    monkeypatch.setattr(experiments.SweepRunner, "run", fake_run)
    runner = experiments.SweepRunner(ROOT, tmp_path / "out", "", 60.0, "in-process")
    defaults = app_defaults(ROOT)
    failed = experiments.run_all(
        runs, runner, time.perf_counter(), FinishedRuns(), defaults, ThreadPool()
    )
    assert failed == 0 and max(most) == 2
    assert ended == ["heterogeneity/nc1-seed0", "heterogeneity/iid-seed0"]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert [line.split(":")[0] for line in lines] == [
        "[1/3] heterogeneity/iid-seed0",
        "[2/3] heterogeneity/nc1-seed0",
        "[3/3] fedavg/iid-seed0",
    ]
    assert "the same run as heterogeneity/iid-seed0, copied" in lines[2]
    manifest = pd.read_csv(runs[0].study_dir / "sweep.csv", keep_default_na=False)
    assert manifest["run-name"].tolist() == ["iid-seed0", "nc1-seed0"]
    assert pd.read_csv(runs[2].study_dir / "sweep.csv")["detail"].tolist() == [
        "same run as heterogeneity/iid-seed0"
    ]


TINY = [
    "heterogeneity",
    "--quick",
    "--settings",
    "iid",
    "--seeds",
    "2",
    "num-server-rounds=2",
    "eval-every=1",
    "num-clients=10",
    "synthetic-train-per-class=20",
    "synthetic-test-per-class=10",
    "fraction-train=0.3",
]


def test_worker_processes_compute_what_the_sweep_process_computes(
    tmp_path, pretrained_backbone, capsys
):
    """Two real runs in two spawned workers (one torch thread each) against the same runs
    one after another here: the same accuracies, losses equal to float rounding (the
    thread count may differ: docs/studies.md)."""
    summaries = {}
    for jobs in ("2", "1"):
        out = tmp_path / f"jobs{jobs}"
        argv = [*TINY, f"pretrained-path={pretrained_backbone}", "--output-dir", str(out)]
        assert experiments.main([*argv, "--app", str(ROOT), "--jobs", jobs]) == 0
        first = capsys.readouterr().out.splitlines()[0]
        assert first.endswith(", 2 at a time)") == (jobs == "2"), first
        summaries[jobs] = [
            json.loads((out / "heterogeneity" / f"iid-seed{k}" / "summary.json").read_text())
            for k in (0, 1)
        ]
    for parallel, serial in zip(summaries["2"], summaries["1"], strict=True):
        assert parallel["status"] == serial["status"] == "completed"
        assert parallel["final-test-accuracy"] == serial["final-test-accuracy"]
        assert parallel["final-test-loss"] == pytest.approx(serial["final-test-loss"], rel=1e-5)
