"""Deployment Engine on loopback: one SuperLink, three SuperNodes with their own data.

Each SuperNode is a separate process with a node-local ``data-dir`` (its private
shard, written by ``python -m flower_app.node_data``), like separate machines. One
SuperNode is killed after the first round; the run must go on with the other two,
record the failures and finish.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pandas as pd
import pytest

from flower_app.local_superlink import LocalSuperLink, free_port, pids_with_env
from tests.conftest import ROOT

RECIPE = ROOT / "scripts" / "deployment_loopback.sh"

pytestmark = pytest.mark.e2e


@pytest.fixture
def deployment(tmp_path):
    link = LocalSuperLink.start(tmp_path / "flwr-home", simulation=False)
    try:
        yield link
    finally:
        link.stop()


def test_three_supernodes_with_private_data_survive_a_killed_node(deployment, tmp_path):
    nodes = tmp_path / "node-data"
    quick = str(ROOT / "configs" / "quick.toml")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "flower_app.node_data",
            "--out",
            str(nodes),
            "--run-config",
            quick,
            "num-clients=3",
        ],
        check=True,
        cwd=ROOT,
        env=deployment.env,
        timeout=300,
    )
    for i in range(3):
        deployment.start_supernode(
            f'partition-id={i} num-partitions=3 data-dir="{nodes / f"partition-{i}"}"'
        )
    deployment.add_connection("loopback")
    results = tmp_path / "results"
    with open(ROOT / "configs" / "quick.toml", "rb") as f:
        config = tomllib.load(f) | {
            "num-clients": 3,
            "fraction-train": 1.0,
            "num-server-rounds": 2,
            "eval-every": 1,
            "round-timeout": 180.0,
            "output-dir": str(results),
            "run-name": "deployed",
        }
    run_config = tmp_path / "run-config.toml"
    run_config.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in config.items()))
    metrics_csv = results / "deployed" / "metrics.csv"

    def kill_node_2_after_round_1(run_id: int) -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # kill node 2 once round 1 is aggregated
            if metrics_csv.exists() and (pd.read_csv(metrics_csv)["round"] >= 1).any():
                break
            time.sleep(1)
        else:
            pytest.fail(f"round 1 of run {run_id} did not finish: {deployment.log()[-3000:]}")
        os.killpg(deployment.supernodes[2].pid, signal.SIGKILL)

    run = deployment.run_to_end(
        ROOT,
        run_config,
        connection="loopback",
        timeout=600,
        on_submitted=kill_node_2_after_round_1,
    )
    assert run.completed, (run.run_id, run.status, run.log[-3000:])
    partitions = pd.read_csv(results / "deployed" / "partitions.csv")
    assert list(partitions["partition-id"]) == [0, 1, 2]
    assert partitions["num-examples"].tolist() == [3000, 3000, 3000]  # each node's own data
    metrics = pd.read_csv(metrics_csv).set_index("round")
    assert metrics.loc[1, "failures"] == 0 and metrics.loc[1, "num-examples"] == 9000
    assert metrics.loc[2, "failures"] == 1 and metrics.loc[2, "num-examples"] == 6000
    summary = json.loads((results / "deployed" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 2


def _readme_block_after(marker: str) -> str:
    """The fenced code block that follows ``marker`` in the README."""
    text = (ROOT / "README.md").read_text()
    after = text[text.index(marker) :]
    start = after.index("```bash\n") + len("```bash\n")
    return after[start : after.index("```", start)]


def test_readme_shows_the_recipe_that_the_test_runs():
    assert _readme_block_after("<!-- deployment recipe -->") == RECIPE.read_text()


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


def test_the_readme_deployment_recipe_runs(recipe_home, tmp_path):
    env = os.environ | {"PORT": str(free_port()), "BIN": str(Path(sys.executable).parent)}
    done = subprocess.run(
        ["bash", str(RECIPE), str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    summary = json.loads((tmp_path / "results" / "deployed" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 2
    partitions = pd.read_csv(tmp_path / "results" / "deployed" / "partitions.csv")
    assert partitions["num-examples"].tolist() == [3000, 3000, 3000]  # each node's own data
