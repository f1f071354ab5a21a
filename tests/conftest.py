"""Shared test helpers: the tier markers by folder, the quick preset as a dict, and the
in-process engine's Grid keeping what it sent (``flower_app.studies.in_process`` runs the
ClientApp in process)."""

from __future__ import annotations

import os
import sys
import tomllib
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from flwr.app import Message
from flwr.clientapp import ClientApp

from flower_app.studies.in_process import InProcessGrid as EngineGrid
from flower_app.studies.in_process import PushPull, server_context, set_task_identity

ROOT = Path(__file__).resolve().parents[1]
TIERS = ("unit", "integration", "e2e")

# pytest-xdist runs the suite in workers side by side (pyproject's addopts): each worker and
# the processes it starts (ServerApps, Ray workers) use one torch thread, so two workers share
# the two cores instead of four thread pools contending for them
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def one_sweep_run_at_a_time() -> Iterator[None]:
    """``fl-experiments`` in a test runs one run at a time unless the test passes ``--jobs``:
    the suite's own workers already keep the cores busy, and the tests that replace
    ``SweepRunner.run`` need it to run in the test's process. Session-scoped, so that the
    module fixtures' sweeps (the miniature, the task-arithmetic short form) are covered too:
    a function-scoped patch came after them, and they ran in spawned workers that imported
    everything again and ran beside the other pytest worker. (Patched where a collected test
    module imported the runner, so a unit test alone does not pay for its imports.)"""
    with pytest.MonkeyPatch.context() as patch:
        experiments = sys.modules.get("flower_app.studies.experiments")
        if experiments is not None:
            patch.setattr(experiments, "DEFAULT_JOBS", "1")
        yield


# The files that take longest (docs/performance.md, "The slowest tests"), longest first, so
# the two workers end together instead of one finishing a long file alone (pyproject's
# --no-loadscope-reorder keeps this order; xdist would otherwise start the files with most
# tests first, which put these few-test, long files last). A worker takes the next file
# when it is almost done with its own; the backbone's first user comes first, its other users
# after two files that need none, so they rarely wait for its lock.
LONGEST_FIRST = (
    "e2e/test_sweeps.py",
    "e2e/test_deployment.py",
    "integration/test_reliability.py",
    "integration/test_task_arithmetic_study.py",
    "integration/test_miniature.py",
    "e2e/test_fl_run.py",
    "e2e/test_flwr_run.py",
    "e2e/test_ray_gpus.py",
    "e2e/test_deployment_security.py",
    "integration/test_sparse_fedavg.py",
    "e2e/test_ray_cluster.py",
    "e2e/test_compiled_round.py",
)


def _start_rank(item: pytest.Item) -> int:
    name = f"{item.path.parent.name}/{item.path.name}"
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Each test carries its folder's tier as a marker; ``perf`` tests are skipped unless the
    ``-m`` expression names ``perf`` (so ``-m "not e2e"`` skips them too). The longest files
    come first (``LONGEST_FIRST``), the rest in their usual order."""
    items.sort(key=_start_rank)  # stable: each file's tests keep their order
    run_perf = "perf" in (config.getoption("markexpr") or "")
    for item in items:
        tier = item.path.parent.name
        if tier in TIERS:
            item.add_marker(tier)
        if item.get_closest_marker("perf") and not run_perf:
            item.add_marker(pytest.mark.skip(reason="perf: a machine-state count; -m perf runs it"))


def quick_run_config(**overrides) -> dict:
    """pyproject defaults + configs/quick.toml + overrides, as Flower would merge them."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        config = dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])
    with open(ROOT / "configs" / "quick.toml", "rb") as f:
        config.update(tomllib.load(f))
    config.update({k.replace("_", "-"): v for k, v in overrides.items()})
    return config


# one round of 2 of 4 clients, 2 local steps, on 20 images a class: the least a run can be
ONE_ROUND = {
    "synthetic_train_per_class": 20,
    "synthetic_test_per_class": 10,  # the final test on 1,000 images (a run's largest cost here)
    "num_clients": 4,
    "fraction_train": 0.5,
    "num_server_rounds": 1,
    "eval_every": 1,
    "local_steps": 2,
    "device": "cpu",
}


def run_quick(tmp_path: Path, name: str, **overrides) -> InProcessGrid:
    """A quick run (the quick preset and ``overrides``) in this process, into
    ``tmp_path/name``; its Grid, which kept what it sent."""
    from flower_app import client_app, server_app  # the apps: imported when a run starts

    config = quick_run_config(**overrides, output_dir=str(tmp_path), run_name=name)
    grid = InProcessGrid(client_app.app, config, num_nodes=int(config["num-clients"]))
    server_app.main(grid, server_context(config))
    return grid


class InProcessGrid(EngineGrid):
    """The engine's Grid, keeping every message sent; ``reverse_replies`` answers a push in
    reverse order (the server must not depend on reply order)."""

    def __init__(self, client_app: ClientApp, run_config: dict, num_nodes: int) -> None:
        super().__init__(client_app, run_config, num_nodes)
        self.sent: list[Message] = []
        self.reverse_replies = False

    def send_and_receive(self, messages: Iterable[Message], *, timeout=None) -> Iterable[Message]:
        messages = list(messages)
        self.sent.extend(messages)
        replies = list(super().send_and_receive(messages, timeout=timeout))
        return list(reversed(replies)) if self.reverse_replies else replies


@pytest.fixture
def identity() -> None:
    set_task_identity()


@pytest.fixture(scope="session")
def pretrained_backbone(tmp_path_factory) -> Path:
    """The miniature's backbone (``fl-pretrain``'s recipe, seed 0), made once per session in
    a temporary folder: tests never write into the user's cache. Under pytest-xdist the
    workers share one (the folder above each worker's own; the first makes it, under a lock)."""
    from flower_app.centralized.pretrain import ensure_backbone
    from flower_app.models.backbone_cache import default_backbone_path

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    folder = root / "backbone"
    folder.mkdir(exist_ok=True)
    # made with the worker's one torch thread: two threads beside the other worker's tests
    # took 6.6 times as long (an epoch of the recipe with a busy loop on the other core:
    # 157 s on two threads, 24 s on one), since each parallel step waits for the thread
    # that lost its core
    with FileLock(folder / "make.lock"):
        return ensure_backbone(folder / default_backbone_path(0).name, 0, log=lambda _: None)


__all__ = [
    "ROOT",
    "InProcessGrid",
    "PushPull",
    "quick_run_config",
    "server_context",
    "set_task_identity",
]
