"""Deployment Engine on loopback: one SuperLink, two SuperNodes with their own data.

Each SuperNode is a separate process with a node-local ``data-dir`` (its private
shard, written by ``python -m flower_app.data.node_data``), like separate machines. One
run meets what a deployment meets: a SuperNode killed after the first round (the run goes
on with the other and records the failure), the same node back on a new node id, and
the ServerApp stopped and resumed from its checkpoint while the SuperNodes keep running; it
finishes, and measures task-arithmetic interference on the server's validation split,
which no node holds or is sent. The SuperNodes declare a 10 s heartbeat
(``quick_heartbeat_supernode.py``), so a killed one is given up after 20 s instead of a
minute. The documented recipe (``scripts/deployment_loopback.sh``) runs on its own."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from flower_app.cli.local_superlink import LocalSuperLink, free_port, pids_with_env
from flower_app.config import RunConfig, load_preset, write_run_config
from flower_app.data.sources import load_node_data
from flower_app.models.factory import build_model
from flower_app.runs.checkpoint import CHECKPOINT_NAME, load_checkpoint
from flower_app.runs.runtime import run_splits
from flower_app.runs.task_metrics import COLUMNS
from tests.conftest import ROOT
from tests.e2e.quick_heartbeat_supernode import COMMAND as QUICK_HEARTBEAT_SUPERNODE

RECIPE = ROOT / "scripts" / "deployment_loopback.sh"
PARTITIONS = 2  # the fewest that leave a node training while one is killed
KILLED = PARTITIONS - 1  # the partition whose node is killed and restarted
IMAGES = 9000  # the quick preset's training split, shared out to the nodes
SHARD = IMAGES // PARTITIONS  # each node's training images


@dataclass
class Nodes:
    """A SuperLink and one SuperNode per partition, each with its private shard in
    ``data``, started in ``machine`` (a working directory apart from the SuperLink's)."""

    link: LocalSuperLink
    data: Path
    machine: Path
    by_partition: dict[int, subprocess.Popen] = field(default_factory=dict)

    def start(self, partition: int) -> None:
        """(Re)start the SuperNode of ``partition``: a new node id, the same shard."""
        shard = self.data / f"partition-{partition}"
        config = f'partition-id={partition} num-partitions={PARTITIONS} data-dir="{shard}"'
        self.by_partition[partition] = self.link.start_supernode(
            config, cwd=self.machine, command=QUICK_HEARTBEAT_SUPERNODE
        )


@pytest.fixture(scope="module")
def nodes(tmp_path_factory) -> Iterator[Nodes]:
    root = tmp_path_factory.mktemp("deployment")
    link = LocalSuperLink.start(root / "flwr-home", simulation=False)
    try:
        nodes = Nodes(link, root / "node-data", root / "node-machine")
        nodes.machine.mkdir()
        _write_node_data(link, nodes.data)
        for partition in range(PARTITIONS):
            nodes.start(partition)
        link.add_connection("loopback")
        yield nodes
    finally:
        link.stop()


def _write_node_data(deployment: LocalSuperLink, nodes: Path) -> None:
    quick = str(ROOT / "configs" / "quick.toml")
    command = [sys.executable, "-m", "flower_app.data.node_data", "--out", str(nodes)]
    command += ["--run-config", quick, f"num-clients={PARTITIONS}"]
    subprocess.run(command, check=True, cwd=ROOT, env=deployment.env, timeout=300)


def _coordinator_only_weights(deployment: LocalSuperLink) -> str:
    """Initial weights in the SuperLink's working directory, named by a relative path: the
    ServerApp (started from there) finds them, the SuperNodes (started elsewhere) cannot."""
    torch.manual_seed(11)
    weights = build_model("vit_tiny_test", num_classes=100, image_size=32).state_dict()
    save_file({k: v.contiguous() for k, v in weights.items()}, deployment.home / "init.safetensors")
    return "init.safetensors"


def _write_run_config(tmp_path: Path, weights: str, results: Path) -> Path:
    """The quick preset (2 local steps) for the SuperNodes, ``ROUNDS`` rounds from
    ``weights``, a checkpoint every round (the ServerApp is stopped and resumed)."""
    config = load_preset(ROOT / "configs" / "quick.toml") | {
        "weights": "pretrained",
        "pretrained-path": weights,
        "num-clients": PARTITIONS,
        "fraction-train": 1.0,
        "num-server-rounds": ROUNDS,
        "local-steps": 2,  # what is tested is who trains, not how much
        "eval-every": 1,
        "checkpoint-every": 1,
        "task-metrics-examples": 100,  # one validation example a class, every round
        "synthetic-test-per-class": 10,  # the final test on 1,000 images
        "round-timeout": 180.0,
        "output-dir": str(results),
        "run-name": "deployed",
    }
    return write_run_config(tmp_path / "run-config.toml", config)


def _metrics_until(metrics_csv: Path, done, deployment: LocalSuperLink) -> pd.DataFrame:
    """metrics.csv (indexed by round) once ``done(metrics)`` holds; fails after 300 s."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if metrics_csv.exists():
            metrics = pd.read_csv(metrics_csv).set_index("round")
            if done(metrics):
                return metrics
        time.sleep(0.25)
    pytest.fail(f"{metrics_csv} never showed what was awaited: {deployment.log()[-3000:]}")


def _wait_for_round(metrics_csv: Path, round_: int, deployment: LocalSuperLink) -> None:
    _metrics_until(metrics_csv, lambda m: (m.index >= round_).any(), deployment)


# rounds 1 (all nodes), 2 (node 1 killed), then node 1 back on a new node id, adopted in round
# 3 or 4 (the test of 4 rounds before always saw it by round 4); the ServerApp is stopped
# after the first round node 1 trained in again, which leaves the resumed ServerApp two
# rounds or more: one would race the stop (``flwr stop`` takes a second or two)
ROUNDS = 6


def test_supernodes_with_private_data_survive_a_killed_node_and_a_restarted_serverapp(
    nodes, tmp_path
):
    """One run through what a deployment meets: the node of partition ``KILLED`` is killed
    after round 1 (round 2 goes on with the other and records the failure) and restarted
    after round 2 on a new node id (the ServerApp gives it its partition back); once it
    trained again, the ServerApp is stopped (``flwr stop``) while the SuperNodes keep
    running, and a second ServerApp resumes the run from its checkpoint against them."""
    deployment = nodes.link
    results = tmp_path / "results"
    run_config = _write_run_config(tmp_path, _coordinator_only_weights(deployment), results)
    run_dir = results / "deployed"
    metrics_csv = run_dir / "metrics.csv"

    def kill_restart_then_stop(run_id: int) -> None:
        _wait_for_round(metrics_csv, 1, deployment)
        os.killpg(nodes.by_partition[KILLED].pid, signal.SIGKILL)
        _wait_for_round(metrics_csv, 2, deployment)
        nodes.start(KILLED)  # same partition, new id
        back = _metrics_until(
            metrics_csv, lambda m: ((m.index > 2) & (m["num-examples"] == IMAGES)).any(), deployment
        )
        assert back.index.max() < ROUNDS, "the run ended before its ServerApp could be stopped"
        checkpoint = run_dir / CHECKPOINT_NAME  # written atomically
        while load_checkpoint(checkpoint).completed_rounds < back.index.max():
            time.sleep(0.25)
        deployment.stop_run(run_id, ROOT, "loopback")  # the ServerApp ends; nodes keep running

    first = deployment.run_to_end(
        ROOT, run_config, connection="loopback", timeout=900, on_submitted=kill_restart_then_stop
    )
    assert not first.completed and not (run_dir / "summary.json").exists(), first.status
    assert f"partition {KILLED} is now on node" in first.log
    resumed = write_run_config(tmp_path / "resume.toml", load_preset(run_config) | {"resume": True})
    run = deployment.run_to_end(ROOT, resumed, connection="loopback", timeout=600)
    assert run.completed, (run.run_id, run.status, run.log[-3000:])
    assert "resuming after round" in run.log
    partitions = pd.read_csv(run_dir / "partitions.csv")
    assert list(partitions["partition-id"]) == list(range(PARTITIONS))
    assert partitions["num-examples"].tolist() == [SHARD] * PARTITIONS  # each node's own data
    metrics = pd.read_csv(metrics_csv).set_index("round")
    assert metrics.index.tolist() == list(range(ROUNDS + 1))  # no round twice, none lost
    assert metrics.loc[1, "failures"] == 0 and metrics.loc[1, "num-examples"] == IMAGES
    assert metrics.loc[2, "failures"] == 1 and metrics.loc[2, "num-examples"] == IMAGES - SHARD
    last = metrics.loc[ROUNDS]
    assert last["failures"] == 0 and last["num-examples"] == IMAGES  # back, after the resume too
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == ROUNDS
    assert summary["segments"] == 2
    assert_task_metrics_from_server_data_only(deployment, metrics, nodes.data, run_config)


def assert_task_metrics_from_server_data_only(
    deployment: LocalSuperLink, metrics: pd.DataFrame, nodes: Path, run_config: Path
) -> None:
    """The ServerApp measured every round on its validation split; the nodes hold none of
    those images (their folders: their own shard only) and were sent nothing but the
    partition query and training (the SuperNodes' logs of every message they received)."""
    measured = metrics.loc[list(range(1, ROUNDS + 1))]
    always = [c for c in COLUMNS if c != "task-retained-gain"]  # NaN: no client gained
    assert measured[always].notna().all().all()
    no_gain = measured["task-nonpositive-gain-clients"] == measured["clients"]
    assert (measured["task-retained-gain"].isna() == no_gain).all()
    assert measured["task-disagreement"].between(0, 1).all()
    received = set()
    for index in range(len(deployment.supernodes)):
        received |= set(re.findall(r"Receiving: (\S+) message", deployment.supernode_log(index)))
    assert received == {"query.partition", "train"}, received
    cfg = RunConfig.from_run_config(load_preset(run_config), check_files=False)
    val = {image.numpy().tobytes() for image in run_splits(cfg).val.images}
    assert len(val) == 1000  # 10 a class
    for pid in range(PARTITIONS):
        folder = nodes / f"partition-{pid}"
        assert [p.name for p in folder.iterdir()] == ["node-data.npz"]
        own = {image.numpy().tobytes() for image in load_node_data(folder).images}
        assert len(own) == SHARD and not own & val


@pytest.fixture
def recipe_home(tmp_path):
    """The recipe's FLWR_HOME; whatever still carries it at the end is killed by PID."""
    home = tmp_path / "flwr-home"
    try:
        yield home
    finally:
        for pid in pids_with_env(f"FLWR_HOME={home}".encode()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# what the recipe's run is changed by here: one round, 2 local steps, the final test on 1,000
# images (what is tested is that the recipe runs, and that its key=value pairs reach fl-run)
RECIPE_PAIRS = ["num-server-rounds=1", "local-steps=2", "synthetic-test-per-class=10"]


def test_the_deployment_recipe_runs(recipe_home, tmp_path):
    env = os.environ | {"PORT": str(free_port()), "BIN": str(Path(sys.executable).parent)}
    done = subprocess.run(
        ["bash", str(RECIPE), str(tmp_path), *RECIPE_PAIRS],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    summary = json.loads((tmp_path / "results" / "deployed" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 1
    config = json.loads((tmp_path / "results" / "deployed" / "config.json").read_text())
    assert (config["local-steps"], config["synthetic-test-per-class"]) == (2, 10)
    assert config["num-clients"] == 3  # the recipe's own pairs kept
    partitions = pd.read_csv(tmp_path / "results" / "deployed" / "partitions.csv")
    assert partitions["num-examples"].tolist() == [3000, 3000, 3000]  # each node's own data
