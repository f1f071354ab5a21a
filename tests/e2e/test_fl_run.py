"""``fl-run`` through a real ``flwr run`` on a SuperLink of the test's own."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time

import pytest

from flower_app.cli.local_superlink import LocalSuperLink, flower_executable, run_process_pids
from flower_app.config import load_preset, write_run_config
from flower_app.runs.checkpoint import CHECKPOINT_NAME
from flower_app.runs.run_lock import is_locked
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def superlink(tmp_path_factory):
    """A SuperLink of this module's own (FLWR_HOME, port); stop() ends every process with
    its FLWR_HOME by PID (the SuperLink, the ServerApp, Ray, fl-run and flwr too)."""
    link = LocalSuperLink.start(tmp_path_factory.mktemp("flwr") / "flwr-home")
    try:
        yield link
    finally:
        link.stop()


def test_fl_run_runs_the_quick_preset_through_flwr_run(superlink, tmp_path):
    results = tmp_path / "results"
    command = [
        flower_executable("fl-run"),
        "configs/quick.toml",
        "num-server-rounds=1",
        "local-steps=2",
        "synthetic-test-per-class=10",
        f"output-dir={results}",
        "run-name=front-door",
    ]
    proc = subprocess.run(
        command, cwd=ROOT, env=superlink.env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert "Successfully started run" in proc.stdout and "round 1/1" in proc.stdout
    summary = json.loads((results / "front-door" / "summary.json").read_text())
    last = proc.stdout.strip().splitlines()[-1]  # the result where the user looks
    assert re.fullmatch(r"run \d+ completed: final test accuracy \d\.\d{4} .*", last)
    assert f"final test accuracy {summary['final-test-accuracy']:.4f}" in last
    assert last.endswith(f"; results in {results / 'front-door'}")


# a run that outlives the test but costs little while it waits: one client a round, one step
# on a small shard, no evaluation (the quick preset's rounds kept both cores busy throughout)
LIGHT_LONG_RUN = {
    "num-server-rounds": 100_000,
    "checkpoint-every": 5,
    "fraction-train": 0.1,
    "local-steps": 1,
    "synthetic-train-per-class": 10,
    "eval-every": 100_000,
}


def test_one_writer_per_run_folder_and_ctrl_c_stops_the_run(superlink, tmp_path):
    """While fl-run runs ``long``: fl-run refuses to resume it in one line, a ServerApp
    submitted with plain ``flwr run`` refuses the folder; SIGINT then stops the run
    through Flower and leaves no process of it."""
    results = tmp_path / "results"
    config = ["configs/quick.toml", *(f"{k}={v}" for k, v in LIGHT_LONG_RUN.items())]
    config += [f"output-dir={results}", "run-name=long"]
    log = open(tmp_path / "fl-run.out", "w")  # noqa: SIM115 - closed after the process
    err = tmp_path / "fl-run.err"
    first = subprocess.Popen(
        [flower_executable("fl-run"), *config],
        cwd=ROOT,
        env=superlink.env,
        stdout=log,
        stderr=open(err, "w"),  # noqa: SIM115
    )
    try:
        folder = results / "long"
        _wait_for(lambda: (folder / CHECKPOINT_NAME).is_file() and is_locked(folder), 240)
        run_id = is_locked(folder)["flower-run-id"]
        # a second ServerApp through plain flwr run refuses the folder too; submitted first,
        # so its simulation starts while fl-run is checked
        toml = write_run_config(
            tmp_path / "resume.toml",
            load_preset(ROOT / "configs" / "quick.toml")
            | LIGHT_LONG_RUN
            | {"output-dir": str(results), "run-name": "long", "resume": True},
        )
        second = superlink.submit(ROOT, toml, "num-supernodes=10")
        # fl-run checks the folder itself: one line, exit 2, nothing started
        again = subprocess.run(
            [flower_executable("fl-run"), *config, "resume=true"],
            cwd=ROOT,
            env=superlink.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr
        assert f"run folder {folder} is in use by Flower run {run_id} (pid " in again.stderr
        assert again.stderr.strip().endswith(
            f"stop it with: {flower_executable('flwr')} stop {run_id}"
        )
        assert superlink.wait_for_run(second, ROOT, timeout=240)["status"] == "finished:failed"
        second_log = superlink.run_log(second, ROOT)
        assert f"run folder {folder} is in use by Flower run {run_id}" in second_log
        assert is_locked(folder)["flower-run-id"] == run_id  # the first run still holds it
    finally:
        first.send_signal(signal.SIGINT)
        first.wait(timeout=300)
        log.close()
    stderr = err.read_text()
    assert first.returncode == 130, stderr
    assert stderr.splitlines()[-1] == f"fl-run: stopped run {run_id}; its ServerApp has ended"
    status = {int(r["run-id"]): r["status"] for r in superlink.runs(ROOT)}
    assert status[run_id] == "finished:stopped"
    assert not run_process_pids(superlink.marker) and is_locked(folder) is None


def _wait_for(condition, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)
