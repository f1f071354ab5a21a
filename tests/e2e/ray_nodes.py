"""Ray nodes on this machine for end-to-end tests, and a simulation SuperLink joined to them.

``ray start`` with its own temp dir and ports per node, the resources a test declares (Ray
only counts GPUs: a node may declare GPUs the machine lacks), and a SuperLink started with
``RAY_ADDRESS``, so its simulations use that cluster instead of starting their own Ray.

``ray stop`` would end every Ray on the machine (other tests' too), so the cluster's Ray
processes carry an environment entry (which every process Ray starts inherits) and are ended,
with all their children, by PID, also when the test fails. Each node has its own
``--temp-dir``: Ray then writes the cluster's address there, not into ``/tmp/ray``, where any
other ``ray.init()`` on the machine would find it and join this cluster.
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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from flower_app.cli.local_superlink import LocalSuperLink, RunOutcome, free_port
from flower_app.config import load_preset, write_run_config
from tests.conftest import ROOT

RAY = Path(sys.executable).parent / "ray"
MARKER_KEY = "FL_TEST_RAY_CLUSTER"  # in the environment of every process of the cluster

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
class NodeResources:
    """What a node declares to Ray (``--num-cpus``, ``--num-gpus``), whatever it has."""

    cpus: int
    gpus: int = 0


@dataclass(frozen=True)
class RayCluster:
    """Ray nodes on this machine, the first the head; ``nodes`` maps name to ``--temp-dir``."""

    address: str
    nodes: dict[str, Path]
    resources: dict[str, NodeResources]
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
        every node is alive in the GCS with the CPUs and GPUs it declared."""
        deadline = time.monotonic() + timeout
        while True:
            nodes = self.query()["nodes"]
            ids = {
                name: node["id"]
                for node in nodes
                for name, temp_dir in self.nodes.items()
                if node["alive"]
                and (node["cpus"], node["gpus"])
                == (self.resources[name].cpus, self.resources[name].gpus)
                and node["raylet"].startswith(f"{temp_dir}/")
            }
            if len(ids) == len(self.nodes):
                return ids
            assert time.monotonic() < deadline, f"nodes not all up: {nodes}"
            time.sleep(1)


def _ray_start(env: dict[str, str], resources: NodeResources, *args: str) -> None:
    """``ray start ...`` declaring ``resources``, with a small object store and free ports."""
    out = subprocess.run(
        [
            str(RAY),
            "start",
            *args,
            f"--num-cpus={resources.cpus}",
            f"--num-gpus={resources.gpus}",
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
    """SIGKILL the cluster's processes (all found before any ends: an ended parent's
    children lose it). Not SIGTERM first: Ray's agents ignore it, so a grace period only
    waited for them (5 s a cluster), and the cluster's files go with its temp dir anyway
    (its object store left nothing in /dev/shm either way)."""
    procs = _cluster_processes(root)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    _, alive = psutil.wait_procs(procs, timeout=5)
    for proc in alive + _cluster_processes(root):
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)


@contextlib.contextmanager
def ray_cluster(nodes: Mapping[str, NodeResources]) -> Iterator[RayCluster]:
    """``ray start --head`` for the first node, ``ray start --address`` for the others, each
    with its own temp dir and ports; every process of the cluster ends with the block.

    The temp dirs are short (``/tmp/rayXXXX``): Ray's socket paths live under them and a
    Unix socket path has at most 107 bytes.
    """
    root = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {MARKER_KEY: str(root), "RAY_USAGE_STATS_ENABLED": "0"}
    port = free_port()
    cluster = RayCluster(
        f"127.0.0.1:{port}", {name: root / name for name in nodes}, dict(nodes), env
    )
    head, *others = nodes
    try:
        _ray_start(
            env,
            nodes[head],
            "--head",
            f"--port={port}",
            f"--temp-dir={cluster.nodes[head]}",
            "--include-dashboard=false",
            f"--dashboard-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
        )
        for name in others:
            _ray_start(
                env,
                nodes[name],
                f"--address={cluster.address}",
                f"--temp-dir={cluster.nodes[name]}",
            )
        yield cluster
    finally:
        _end_processes(root)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def joined_superlink(
    cluster: RayCluster, home: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[LocalSuperLink]:
    """A simulation SuperLink whose environment (copied from ours) has RAY_ADDRESS."""
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    link = LocalSuperLink.start(home)
    try:
        yield link
    finally:
        link.stop()


def run_quick(
    link: LocalSuperLink,
    tmp_path: Path,
    overrides: Mapping[str, object],
    federation: str,
    on_poll: Callable[[], None] | None = None,
) -> RunOutcome:
    """configs/quick.toml with ``overrides`` through ``flwr run`` on ``link``, to its end."""
    config = load_preset(ROOT / "configs" / "quick.toml") | dict(overrides)
    path = write_run_config(tmp_path / "run-config.toml", config)
    return link.run_to_end(ROOT, path, federation, timeout=300, on_poll=on_poll)
