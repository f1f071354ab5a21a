"""End to end: GPU-allocated ClientApp workers, placed by a Ray node that declares GPUs the
machine does not have (``ray start --head --num-gpus=2 --num-cpus=4``).

A simulation SuperLink joined to that node (``RAY_ADDRESS``) runs the quick preset scaled
down to 4 clients and one round with docs/gpu.md's client resources (half a GPU per
worker, here with one CPU each: 4 workers fit the node). Ray only counts GPUs, so it gives
every worker a GPU id and sets CUDA_VISIBLE_DEVICES to it though no GPU exists; what is
checked comes from the workers themselves (their train replies' placement metrics, which
the ServerApp writes to ``placement.csv``):

- ``device=auto`` (one worker, given all 4 CPUs and half a GPU: the refusal needs no
  more, and each worker costs seconds of imports): a worker given a GPU id that CUDA does
  not show stops the run in its first message (the partition query) with one line naming
  the mismatch, instead of training on the CPU in silence: the run is
  ``finished:failed`` and made no run folder;
- ``device=cpu``: the run completes, every worker reports exactly one of the two declared
  GPU ids, at most two workers share one, and each worker's CUDA_VISIBLE_DEVICES is the id
  Ray gave it.

Ray's processes are ended by PID, also on failure (``tests/e2e/ray_nodes.py``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pandas as pd
import pytest
import torch

from flower_app.cli.local_superlink import LocalSuperLink
from flower_app.cli.run import last_error_line
from tests.e2e.ray_nodes import NodeResources, RayCluster, joined_superlink, ray_cluster, run_quick

CLIENTS = 4
GPUS = 2  # declared to Ray, not present
FEDERATION = f"num-supernodes={CLIENTS} client-resources-num-cpus=1 client-resources-num-gpus=0.5"
# the refusal needs one worker given a GPU id: all 4 CPUs to it, so Ray starts only one
ONE_WORKER = (
    f"num-supernodes={CLIENTS} client-resources-num-cpus={CLIENTS} client-resources-num-gpus=0.5"
)

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="the Ray node must declare GPUs this machine lacks"
)


@pytest.fixture
def cluster() -> Iterator[RayCluster]:
    with ray_cluster({"head": NodeResources(cpus=CLIENTS, gpus=GPUS)}) as nodes:
        yield nodes


@pytest.fixture
def superlink(cluster, tmp_path, monkeypatch) -> Iterator[LocalSuperLink]:
    with joined_superlink(cluster, tmp_path / "flwr-home", monkeypatch) as link:
        yield link


def _overrides(results, device: str) -> dict:
    return {
        "num-clients": CLIENTS,
        "fraction-train": 1.0,
        "num-server-rounds": 1,
        "local-steps": 1,  # what is tested is where clients run, not how much they train
        "synthetic-train-per-class": 20,
        "synthetic-test-per-class": 10,
        "eval-every": 1,
        "device": device,
        "output-dir": str(results),
        "run-name": device,
    }


def test_workers_given_declared_gpus_report_them_and_auto_refuses_a_gpu_cuda_lacks(
    cluster, superlink, tmp_path
):
    cluster.node_ids()  # the head is up with the CPUs and GPUs it declared
    results = tmp_path / "results"

    auto = run_quick(superlink, tmp_path, _overrides(results, "auto"), ONE_WORKER)
    assert auto.status == "finished:failed", (auto.run_id, auto.status, auto.log[-3000:])
    line = last_error_line(auto.log.splitlines())  # what fl-run shows of a failed run
    assert re.fullmatch(
        r"RuntimeError: partition query: 4 of 4 nodes did not answer; first error: "
        r"GpuMismatchError: run-config key 'device' = 'auto' but Ray gave this ClientApp "
        r"worker GPU ids \['([01])'\] \(CUDA_VISIBLE_DEVICES='\1'\) and torch sees 0 CUDA "
        r"devices \(torch [^)]*\): declare to Ray only GPUs the machine has \(ray start "
        r"--num-gpus\), install a CUDA build of torch, or train on the CPU with "
        r"client-resources-num-gpus=0 or device=cpu",
        line,
    ), line
    assert not (results / "auto").exists()  # stopped before any training

    cpu = run_quick(superlink, tmp_path, _overrides(results, "cpu"), FEDERATION)
    assert cpu.completed, (cpu.run_id, cpu.status, cpu.log[-3000:])
    placement = pd.read_csv(results / "cpu" / "placement.csv", dtype=str, keep_default_na=False)
    assert sorted(placement["partition-id"]) == [str(p) for p in range(CLIENTS)]
    assert (placement["cuda-device-count"] == "0").all()
    ids = placement.groupby("worker-pid")["ray-gpu-ids"].unique()
    shown = {pid: list(got) for pid, got in ids.items()}
    print(f"runs: auto {auto.seconds:.0f} s, cpu {cpu.seconds:.0f} s; GPU ids by worker: {shown}")
    # every worker was given one GPU id, one of those declared, in every round it trained
    assert all(len(got) == 1 and got[0] in {str(g) for g in range(GPUS)} for got in ids), ids
    sharing = placement.drop_duplicates("worker-pid").groupby("ray-gpu-ids").size()
    assert (sharing <= 2).all(), sharing  # half a GPU each: at most two workers per GPU
    assert (placement["cuda-visible-devices"] == placement["ray-gpu-ids"]).all(), placement
