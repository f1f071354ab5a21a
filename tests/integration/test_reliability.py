"""Reliability: kill and resume, atomic checkpoints, refused checkpoints, client failures,
bad input before any work, determinism."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from flower_app import client_app
from flower_app.config import ConfigError
from flower_app.runs import run_lock
from flower_app.runs.checkpoint import (
    CHECKPOINT_NAME,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from strategies.rounds import InsufficientRepliesError
from tests.conftest import ROOT, quick_run_config
from tests.invalid_configs import INVALID
from tests.run_in_process import run

BASE = {
    "synthetic_train_per_class": 20,
    "synthetic_test_per_class": 10,
    "num_clients": 4,
    "fraction_train": 0.5,
    "num_server_rounds": 6,
    "eval_every": 2,
    "local_steps": 2,
    "checkpoint_every": 2,
}


def _config(tmp_path, name: str, **overrides) -> dict:
    return quick_run_config(**(BASE | overrides), output_dir=str(tmp_path), run_name=name)


def _metrics(run_dir) -> pd.DataFrame:
    frame = pd.read_csv(run_dir / "metrics.csv")
    return frame.drop(columns=[c for c in frame.columns if c.startswith("seconds")])


def _assert_same_run(a, b, mask_resent: bool = False) -> None:
    ma, mb = _metrics(a), _metrics(b)
    if mask_resent:  # a resumed sparse run sends each node its mask once more, nothing else
        extra = (mb.pop("bytes-down") - ma.pop("bytes-down")).fillna(0)
        mask_bytes = ma["bytes-up"].max()  # upper bound: a mask is 1 bit per entry
        assert (extra >= 0).all() and extra.sum() <= 4 * mask_bytes
    pd.testing.assert_frame_equal(ma, mb)
    fa, fb = load_file(a / "final_model.safetensors"), load_file(b / "final_model.safetensors")
    assert all(torch.equal(fa[k], fb[k]) for k in fa)


FEDADAM_SPARSE = {"server_rule": "fedadam", "head_warmup_rounds": 1}
# TaLoS's optimizer on the clients: its moments live in one message, so a resume needs
# nothing more than the global weights; killed inside the training phase as FedAdam
ADAMW = {"optimizer": "adamw", "lr": 1e-3, "adamw_weight_decay": 0.1}


@pytest.mark.parametrize(
    ("strategy", "rule", "kill_after"),
    [
        ("fedavg", {}, 2),
        ("sparse-fedavg", {}, 2),
        # FedAdam's moments are part of the checkpoint: killed inside the training phase,
        # after its first rounds (sparse: warm-up 1 and calibration 2 rounds come first)
        ("fedavg", {"server_rule": "fedadam"}, 2),
        ("sparse-fedavg", FEDADAM_SPARSE, 5),
        ("fedavg", ADAMW, 2),
        ("sparse-fedavg", ADAMW | {"head_warmup_rounds": 1}, 5),
    ],
    ids=[
        "fedavg",
        "sparse-fedavg",
        "fedavg-fedadam",
        "sparse-fedavg-fedadam",
        "fedavg-adamw",
        "sparse-fedavg-adamw",
    ],
)
def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path, strategy, rule, kill_after):
    extra = {"strategy": strategy, "calibration_rounds": 2, "fisher_samples": 16, **rule}
    run(_config(tmp_path, "straight", **extra))
    killed = _config(tmp_path, "killed", **extra)
    path = tmp_path / "killed.json"
    path.write_text(json.dumps(killed))
    proc = subprocess.Popen([sys.executable, "-m", "tests.run_in_process", str(path)], cwd=ROOT)
    checkpoint = tmp_path / "killed" / CHECKPOINT_NAME
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if checkpoint.exists() and load_checkpoint(checkpoint).completed_rounds >= kill_after:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)  # a crash at an arbitrary point after round 2
    finally:
        proc.kill()
        proc.wait()
    assert not (tmp_path / "killed" / "summary.json").exists()
    run(killed | {"resume": True})
    _assert_same_run(tmp_path / "straight", tmp_path / "killed", strategy == "sparse-fedavg")


def test_resuming_a_finished_run_changes_no_file(tmp_path, capsys):
    config = _config(tmp_path, "done", num_server_rounds=2)
    run(config)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "done").iterdir()}
    capsys.readouterr()
    run(config | {"resume": True})
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "done").iterdir()}
    assert after == before
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [
        f"run done finished already (2 rounds, results in {tmp_path / 'done'}); nothing to do"
    ]


def test_a_second_server_app_on_a_held_run_folder_refuses_naming_the_holder(tmp_path):
    """In process as through flwr run (tests/e2e/test_fl_run.py): the folder's holder is
    named with its stop command, and the second ServerApp writes nothing."""
    config = _config(tmp_path, "held", num_server_rounds=2)
    run(config)
    folder = tmp_path / "held"
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    lock = run_lock.acquire(folder, run_lock.holder_record(7, "/v/bin/flwr stop 7"))
    try:
        with pytest.raises(ConfigError) as refused:
            run(config | {"resume": True})
    finally:
        lock.release()
    message = str(refused.value)
    assert message.startswith(f"run folder {folder} is in use by Flower run 7 (pid {os.getpid()}")
    assert message.endswith("stop it with: /v/bin/flwr stop 7") and "\n" not in message
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_wall_time_sums_the_segments_of_a_resumed_run(tmp_path):
    config = _config(tmp_path, "segments", num_server_rounds=4)
    run(config)
    path = tmp_path / "segments" / CHECKPOINT_NAME
    checkpoint = load_checkpoint(path)
    # pretend the run was cut after round 2 of a first segment that took 1000 s
    checkpoint.components["clock"]["completed"] = 2
    checkpoint.components["stopwatch"] = {"elapsed": 1000.0, "segments": 1}
    checkpoint.components["metrics"]["rows"] = checkpoint.components["metrics"]["rows"][:3]
    save_checkpoint(path, checkpoint)
    (tmp_path / "segments" / "summary.json").unlink()
    run(config | {"resume": True})
    summary = json.loads((tmp_path / "segments" / "summary.json").read_text())
    assert summary["segments"] == 2 and 1000.0 < summary["wall-time-s"] < 1300.0
    assert pd.read_csv(tmp_path / "segments" / "metrics.csv")["round"].tolist() == [0, 1, 2, 3, 4]


def _checkpoint(completed: int) -> Checkpoint:
    state = {"w": torch.full((3,), float(completed))}
    return Checkpoint({"seed": 0}, state, state, {"clock": {"completed": completed}})


def test_crash_between_write_and_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(path, _checkpoint(2))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed between write and rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, _checkpoint(4))
    monkeypatch.undo()
    assert load_checkpoint(path).completed_rounds == 2
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]  # no temporary left


def test_corrupt_checkpoint_is_reported_never_loaded(tmp_path):
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(path, _checkpoint(2))
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(CheckpointError, match="is corrupt"):
        load_checkpoint(path)


def test_checkpoint_from_another_config_is_refused(tmp_path):
    run(_config(tmp_path, "first", num_server_rounds=2))
    changed = _config(tmp_path, "first", num_server_rounds=2, sharding="non-iid")
    with pytest.raises(CheckpointError) as info:
        run(changed | {"resume": True, "classes-per-client": 50})
    message = str(info.value)
    assert "sharding='iid' in the checkpoint, 'non-iid' now" in message
    assert "classes-per-client=10 in the checkpoint, 50 now" in message


def test_failures_below_the_minimum_are_recorded(tmp_path):
    config = _config(
        tmp_path,
        "flaky",
        num_clients=10,
        num_server_rounds=4,
        client_failure_rate=0.3,
        min_train_clients=1,
    )
    run(config)
    metrics = pd.read_csv(tmp_path / "flaky" / "metrics.csv").dropna(subset=["failures"])
    assert metrics["failures"].sum() > 0  # some sampled clients failed...
    assert (metrics["num-examples"] == (5 - metrics["failures"]) * 180).all()  # ...the rest count
    assert json.loads((tmp_path / "flaky" / "summary.json").read_text())["status"] == "completed"


def test_too_few_replies_retry_then_fail_clearly(tmp_path):
    config = _config(
        tmp_path, "broken", client_failure_rate=0.95, min_train_clients=2, max_round_retries=2
    )
    with pytest.raises(InsufficientRepliesError) as info:
        run(config)
    message = str(info.value)
    assert "fewer than the 2 required, after 3 attempts" in message and "\n" not in message
    assert "min-train-clients=2 / raise max-round-retries=2" in message
    assert not (tmp_path / "broken" / "summary.json").exists()


def test_retry_with_a_new_sample_rescues_a_round(tmp_path):
    config = _config(tmp_path, "rescued", client_failure_rate=0.5, min_train_clients=2)
    config["max-round-retries"] = 10
    run(config)
    metrics = pd.read_csv(tmp_path / "rescued" / "metrics.csv").dropna(subset=["failures"])
    assert (metrics["num-examples"] >= 2 * 450).all()
    assert metrics["failures"].max() >= 1


def test_same_seed_same_metrics_other_seed_other_metrics(tmp_path):
    run(_config(tmp_path, "a", num_server_rounds=3))
    run(_config(tmp_path, "b", num_server_rounds=3))
    run(_config(tmp_path, "c", num_server_rounds=3, seed=1))
    _assert_same_run(tmp_path / "a", tmp_path / "b")
    assert not _metrics(tmp_path / "a").equals(_metrics(tmp_path / "c"))


SERVER_ONLY = [  # what only the ServerApp can know: its checkpoint and its output folder
    ({"resume": True, "run_name": "never-ran"}, "no checkpoint at"),
    ({"output_dir": "/proc/forbidden"}, "'output-dir' = '/proc/forbidden'"),
]


@pytest.mark.parametrize(
    ("overrides", "text"),
    [(c.overrides(), c.allowed) for c in INVALID] + SERVER_ONLY,
    ids=[str(c) for c in INVALID] + ["resume-without-checkpoint", "output-dir"],
)
def test_bad_input_fails_before_any_work_with_one_line(tmp_path, overrides, text):
    config = quick_run_config(output_dir=str(tmp_path), run_name="bad") | {
        k.replace("_", "-"): v for k, v in overrides.items()
    }
    with pytest.raises(ConfigError) as info:
        run(config)
    assert text in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "bad").exists()  # no results directory claiming anything


def test_a_dirichlet_draw_that_misses_the_minimum_stops_the_run_before_the_nodes_load(
    tmp_path, monkeypatch
):
    """10 clients x 800 of 9,000 images fits, but Dir(0.01) shards are nowhere near equal."""

    def no_node_work(*args, **kwargs):
        raise AssertionError("a node loaded its data for a run the server refuses")

    monkeypatch.setattr(client_app, "get_runtime", no_node_work)
    skewed = {"sharding": "dirichlet", "dirichlet-alpha": 0.01, "dirichlet-min-size": 800}
    with pytest.raises(ConfigError) as info:
        run(quick_run_config(output_dir=str(tmp_path), run_name="skewed") | skewed)
    message = str(info.value)
    assert "dirichlet-min-size=800" in message and "in all 11 draws" in message
    assert "\n" not in message and not (tmp_path / "skewed").exists()


def test_calibration_rounds_tolerate_failures(tmp_path):
    config = _config(
        tmp_path,
        "sparse-flaky",
        num_server_rounds=2,
        strategy="sparse-fedavg",
        calibration_rounds=2,
        fisher_samples=16,
        client_failure_rate=0.3,
    )
    run(config)
    calibration = pd.read_csv(tmp_path / "sparse-flaky" / "calibration.csv")
    assert calibration["failures"].sum() > 0
    assert (calibration["clients"] + calibration["failures"] >= 4).all()
    assert calibration["density"].iloc[-1] == pytest.approx(0.1, abs=1e-4)
