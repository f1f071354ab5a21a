"""Task-arithmetic interference in whole quick runs (in process), dense and sparse.

The runs are the golden runs' (``test_golden_runs.py``) with ``task-metrics-examples``
on: the task columns appear in the measured rounds only, with values in range, and every
other column is the stored golden one (measuring changes no weight, sample or metric).
"""

from __future__ import annotations

import math

import pandas as pd
import pytest

from flower_app import client_app, server_app
from flower_app.config import RunConfig
from flower_app.data.node_data import write_node_data
from flower_app.runs.task_metrics import COLUMNS
from strategies import protocol
from tests.conftest import InProcessGrid, quick_run_config, server_context
from tests.integration.test_golden_runs import GOLDEN, SMALL, SPARSE
from tests.run_in_process import run

# 2 a class: all of val (SMALL, the golden runs' config, tests on 10 images a class already)
BUDGET = {"task_metrics_examples": 200, "task_metrics_every": 2}
CASES = {  # run -> (extra run-config, rounds measured)
    "dense": ({}, [2, 3]),  # training rounds 1..3: every 2nd and the last
    # warm-up 1-2 (its 2nd is also its last), calibration 3-4 (never), training 5-7
    "sparse": (SPARSE, [2, 6, 7]),
}


def _in_range(row: pd.Series, clients: int) -> None:
    for column in ("task-accuracy-base", "task-accuracy-own", "task-accuracy-merged"):
        assert 0.0 <= row[column] <= 1.0, column
    assert 0.0 <= row["task-disagreement"] <= 1.0
    assert row["task-normalized-accuracy"] >= 0.0 and math.isfinite(row["task-normalized-accuracy"])
    nonpositive = row["task-nonpositive-gain-clients"]
    assert nonpositive in range(clients + 1)
    # the retained gain is a mean over the clients with a positive own gain: NaN without one
    assert math.isnan(row["task-retained-gain"]) == (nonpositive == clients)
    assert row["seconds-task-metrics"] > 0.0


@pytest.mark.parametrize("name", list(CASES))
def test_a_quick_run_writes_the_task_columns_in_the_measured_rounds_only(tmp_path, name):
    extra, measured = CASES[name]
    run(quick_run_config(**SMALL, **extra, **BUDGET, output_dir=str(tmp_path), run_name=name))
    metrics = pd.read_csv(tmp_path / name / "metrics.csv").set_index("round")
    assert set(COLUMNS) <= set(metrics.columns)
    has = metrics["task-disagreement"].notna()
    assert has[has].index.tolist() == measured
    assert metrics.loc[~has, list(COLUMNS)].isna().all().all()
    for round_ in measured:
        _in_range(metrics.loc[round_], clients=int(metrics.loc[round_, "clients"]))
    # measuring changed nothing else: the golden run's own numbers, column for column
    golden = pd.read_csv(GOLDEN / f"{name}-metrics.csv")
    got = metrics.reset_index().drop(columns=[c for c in COLUMNS if c in metrics])
    got = got.drop(columns=[c for c in got.columns if c.startswith("seconds")])
    pd.testing.assert_frame_equal(got, golden, check_exact=False, rtol=1e-5, atol=2e-6)


def test_nodes_with_their_own_data_never_load_the_servers_splits(tmp_path, monkeypatch):
    """Each node trains on its own shard file (as in a deployment, where
    ``tests/e2e/test_deployment.py`` runs the same with SuperNodes); with task metrics on,
    no node ever loads the run's splits (the validation split among them), and the nodes
    get no message but the partition query and training."""
    config = quick_run_config(**SMALL, **BUDGET, output_dir=str(tmp_path), run_name="own")
    nodes = tmp_path / "nodes"
    write_node_data(RunConfig.from_run_config(config), nodes)
    grid = InProcessGrid(client_app.app, config, num_nodes=4)
    for context in grid.contexts.values():
        pid = context.node_config["partition-id"]
        context.node_config["data-dir"] = str(nodes / f"partition-{pid}")

    def no_splits_on_a_node(*args, **kwargs):
        raise AssertionError("a node loaded the run's splits (the validation split among them)")

    monkeypatch.setattr(client_app, "run_splits", no_splits_on_a_node)
    server_app.main(grid, server_context(config))
    metrics = pd.read_csv(tmp_path / "own" / "metrics.csv").set_index("round")
    assert metrics["task-disagreement"].notna().tolist() == [False, False, True, True]
    assert {m.metadata.message_type for m in grid.sent} == {
        protocol.QUERY_PARTITION,
        protocol.TRAIN,
    }
