"""End to end: a simulation joined to a two-node Ray cluster through ``RAY_ADDRESS``.

A Ray head and a second Ray node run on this machine (``ray start --head`` and ``ray start
--address``), one CPU each, so each node hosts one ClientApp worker at a time; a simulation
SuperLink started with ``RAY_ADDRESS`` set runs the quick preset on that cluster with the
weights in the messages. The cluster's own table of actors (read from its GCS) then shows
ClientApp workers on both nodes. docs/deployment.md ("Simulation on a Ray cluster") gives
this recipe and the one for several GPU machines. The nodes, their processes (ended by PID)
and the joined SuperLink are ``tests/e2e/ray_nodes.py``'s.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import psutil
import pytest

from flower_app.cli.local_superlink import LocalSuperLink
from tests.e2e.ray_nodes import NodeResources, RayCluster, joined_superlink, ray_cluster, run_quick

ROUNDS = 2
CLIENTS = 4  # = num-supernodes; 4 messages per round for 2 workers


def _nodes_that_ran_the_clientapp(cluster: RayCluster) -> set[str]:
    """Names of the nodes whose raylet has a ClientAppActor child with torch loaded now.

    The actor loads the ClientApp (and so torch) with its first message, so such a worker
    has run one; called while the run goes on (the actors end with the run).
    """
    names = set()
    for proc in psutil.process_iter(["cmdline"]):
        argv = proc.info["cmdline"] or []
        if not argv or Path(argv[0]).name != "raylet":
            continue
        for name, temp_dir in cluster.nodes.items():
            if not any(arg.startswith(f"--raylet_socket_name={temp_dir}/") for arg in argv):
                continue
            for child in proc.children():
                with contextlib.suppress(psutil.Error, OSError):
                    title = " ".join(child.cmdline())  # empty for a worker that is exiting
                    maps = Path(f"/proc/{child.pid}/maps").read_text()
                    if title.startswith("ray::ClientAppActor") and "libtorch" in maps:
                        names.add(name)
    return names


@pytest.fixture
def cluster() -> Iterator[RayCluster]:
    """A head and a second node, one CPU and no GPU each."""
    with ray_cluster({"head": NodeResources(1), "node2": NodeResources(1)}) as nodes:
        yield nodes


@pytest.fixture
def superlink(cluster, tmp_path, monkeypatch) -> Iterator[LocalSuperLink]:
    with joined_superlink(cluster, tmp_path / "flwr-home", monkeypatch) as link:
        yield link


def test_a_simulation_on_a_two_node_ray_cluster_runs_clients_on_both_nodes(
    cluster, superlink, tmp_path
):
    node_ids = cluster.node_ids()  # both nodes are in the cluster before the run

    results = tmp_path / "results"
    ran: set[str] = set()
    overrides = {
        "num-clients": CLIENTS,
        "fraction-train": 1.0,
        "num-server-rounds": ROUNDS,
        "local-steps": 2,  # what is tested is where clients run, not how much they train
        "eval-every": 1,
        "weights-transport": "message",
        "synthetic-test-per-class": 10,
        "output-dir": str(results),
        "run-name": "ray-cluster",
    }
    federation = f"num-supernodes={CLIENTS} client-resources-num-cpus=1 client-resources-num-gpus=0"
    run = run_quick(
        superlink,
        tmp_path,
        overrides,
        federation,
        lambda: ran.update(_nodes_that_ran_the_clientapp(cluster)),
    )

    assert run.status == "finished:completed", (run.run_id, run.status, run.log[-3000:])
    metrics = pd.read_csv(results / "ray-cluster" / "metrics.csv")
    assert metrics["round"].tolist() == list(range(ROUNDS + 1))
    assert "weights travel by reference" not in run.log  # "message": no shared-memory file
    workers = [a for a in cluster.query()["actors"] if a["class"] == "ClientAppActor"]
    on = {name for name, node in node_ids.items() if node in {a["node"] for a in workers}}
    assert on == {"head", "node2"}, workers  # placed on both nodes ...
    assert ran == {"head", "node2"}  # ... and both ran the ClientApp
