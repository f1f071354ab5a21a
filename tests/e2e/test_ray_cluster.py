"""End to end: a simulation joined to a two-node Ray cluster through ``RAY_ADDRESS``.

A Ray head and a second Ray node run on this machine (``ray start --head`` and ``ray start
--address``), one CPU each, so each node hosts one ClientApp worker at a time; a simulation
SuperLink started with ``RAY_ADDRESS`` set runs the quick preset on that cluster with the
weights in the messages. The cluster's own table of actors (read from its GCS) then shows
ClientApp workers on both nodes. docs/deployment.md ("Simulation on a Ray cluster") gives
this recipe and the one for several GPU machines.

``ray stop`` would end every Ray on the machine (other tests' too), so the fixture tags its
Ray processes with an environment entry (which every process Ray starts inherits) and ends
them, and all their children, by PID. Each node has its own ``--temp-dir``: Ray then
writes the cluster's address there, not into ``/tmp/ray``, where any other ``ray.init()``
on the machine would find it and join this cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import psutil
import pytest

from flower_app.cli.local_superlink import LocalSuperLink, RunOutcome, free_port
from tests.conftest import ROOT

RAY = Path(sys.executable).parent / "ray"
MARKER_KEY = "FL_TEST_RAY_CLUSTER"  # in the environment of every process of the cluster
ROUNDS = 2
CLIENTS = 4  # = num-supernodes; 4 messages per round for 2 workers

# What the cluster's GCS knows, printed as JSON by a short driver of its own. The state API
# (ray.util.state, `ray list actors`) needs the dashboard of ray[default], which
# flwr[simulation] does not install, so this reads the GCS tables that it reads.
QUERY = """
import json, sys
import ray
from ray._private import state

ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
nodes = [
    {"id": n["NodeID"], "alive": n["Alive"], "cpus": n["Resources"].get("CPU", 0),
     "gpus": n["Resources"].get("GPU", 0), "raylet": n["RayletSocketName"]}
    for n in ray.nodes()
]
actors = [
    {"class": a["ActorClassName"], "node": a["Address"]["NodeID"], "state": a["State"],
     "pid": a["Pid"]}
    for a in state.actors().values()
]
ray.shutdown()
print(json.dumps({"nodes": nodes, "actors": actors}))
"""


@dataclass(frozen=True)
class RayCluster:
    """A head and a second node on this machine; ``nodes`` maps name to ``--temp-dir``."""

    address: str
    nodes: dict[str, Path]
    env: dict[str, str]

    def query(self) -> dict:
        """``{"nodes": [...], "actors": [...]}`` from the cluster's GCS (dead actors too)."""
        out = subprocess.run(
            [sys.executable, "-c", QUERY, self.address],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    def node_ids(self, timeout: float = 60.0) -> dict[str, str]:
        """Ray's node id of each node name (by its raylet's socket, under its temp dir), once
        every node is alive in the GCS with one CPU."""
        deadline = time.monotonic() + timeout
        while True:
            nodes = self.query()["nodes"]
            ids = {
                name: node["id"]
                for node in nodes
                for name, temp_dir in self.nodes.items()
                if node["alive"] and node["cpus"] == 1 and node["raylet"].startswith(f"{temp_dir}/")
            }
            if len(ids) == len(self.nodes):
                return ids
            assert time.monotonic() < deadline, f"nodes not all up: {nodes}"
            time.sleep(1)


def _ray_start(env: dict[str, str], *args: str) -> None:
    """``ray start ...`` with one CPU, no GPU, a small object store and free ports."""
    out = subprocess.run(
        [
            str(RAY),
            "start",
            *args,
            "--num-cpus=1",
            "--num-gpus=0",
            "--object-store-memory=200000000",
            f"--dashboard-agent-listen-port={free_port()}",
            "--disable-usage-stats",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])


def _cluster_processes(root: Path) -> list[psutil.Process]:
    """The processes of the cluster under ``root``: those with its marker in their
    environment, its path in their command line or a file open under it (its logs), and
    all their descendants. Ray's workers and agents set their process title (``ray::IDLE``,
    ``ray::DashboardAgent``), which blanks what /proc shows of their environment; they are
    found as children, or by their logs once their raylet is gone."""
    marker = str(root)
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.pid == os.getpid():
                continue
            if (
                proc.environ().get(MARKER_KEY) == marker
                or marker in " ".join(proc.cmdline())
                or any(f.path.startswith(f"{marker}/") for f in proc.open_files())
            ):
                found[proc.pid] = proc
                found |= {child.pid: child for child in proc.children(recursive=True)}
    return list(found.values())


def _end_processes(root: Path) -> None:
    """SIGTERM the cluster's processes (all found before any ends: an ended parent's
    children lose it), SIGKILL those left after a grace period (Ray's agents ignore
    SIGTERM, its GCS takes seconds)."""
    procs = _cluster_processes(root)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=5)
    for proc in alive + _cluster_processes(root):
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)


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
                    title = child.cmdline()[0]
                    maps = Path(f"/proc/{child.pid}/maps").read_text()
                    if title.startswith("ray::ClientAppActor") and "libtorch" in maps:
                        names.add(name)
    return names


@pytest.fixture
def ray_cluster() -> Iterator[RayCluster]:
    """``ray start --head`` and ``ray start --address`` with their own temp dirs and ports.

    The temp dirs are short (``/tmp/rayXXXX``): Ray's socket paths live under them and a
    Unix socket path has at most 107 bytes.
    """
    root = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {MARKER_KEY: str(root), "RAY_USAGE_STATS_ENABLED": "0"}
    port = free_port()
    cluster = RayCluster(f"127.0.0.1:{port}", {"head": root / "head", "node2": root / "node2"}, env)
    try:
        _ray_start(
            env,
            "--head",
            f"--port={port}",
            f"--temp-dir={cluster.nodes['head']}",
            "--include-dashboard=false",
            f"--dashboard-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
        )
        _ray_start(env, f"--address={cluster.address}", f"--temp-dir={cluster.nodes['node2']}")
        yield cluster
    finally:
        _end_processes(root)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def superlink(ray_cluster, tmp_path, monkeypatch) -> Iterator[LocalSuperLink]:
    """A simulation SuperLink whose environment (copied from ours) has RAY_ADDRESS."""
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster.address)
    link = LocalSuperLink.start(tmp_path / "flwr-home")
    try:
        yield link
    finally:
        link.stop()


def _run(
    link: LocalSuperLink, tmp_path: Path, results: Path, on_poll: Callable[[], None]
) -> RunOutcome:
    with open(ROOT / "configs" / "quick.toml", "rb") as f:
        config = tomllib.load(f) | {
            "num-clients": CLIENTS,
            "fraction-train": 1.0,
            "num-server-rounds": ROUNDS,
            "local-steps": 2,  # what is tested is where clients run, not how much they train
            "eval-every": 1,
            "weights-transport": "message",
            "output-dir": str(results),
            "run-name": "ray-cluster",
        }
    path = tmp_path / "run-config.toml"
    path.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in config.items()) + "\n")
    federation = f"num-supernodes={CLIENTS} client-resources-num-cpus=1 client-resources-num-gpus=0"
    return link.run_to_end(ROOT, path, federation, timeout=300, on_poll=on_poll)


def test_a_simulation_on_a_two_node_ray_cluster_runs_clients_on_both_nodes(
    ray_cluster, superlink, tmp_path
):
    node_ids = ray_cluster.node_ids()  # both nodes are in the cluster before the run

    results = tmp_path / "results"
    ran: set[str] = set()
    run = _run(
        superlink, tmp_path, results, lambda: ran.update(_nodes_that_ran_the_clientapp(ray_cluster))
    )

    assert run.status == "finished:completed", (run.run_id, run.status, run.log[-3000:])
    metrics = pd.read_csv(results / "ray-cluster" / "metrics.csv")
    assert metrics["round"].tolist() == list(range(ROUNDS + 1))
    assert "weights travel by reference" not in run.log  # "message": no shared-memory file
    workers = [a for a in ray_cluster.query()["actors"] if a["class"] == "ClientAppActor"]
    on = {name for name, node in node_ids.items() if node in {a["node"] for a in workers}}
    assert on == {"head", "node2"}, workers  # placed on both nodes ...
    assert ran == {"head", "node2"}  # ... and both ran the ClientApp
