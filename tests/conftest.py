"""Shared test helpers: the tier markers by folder, the quick preset as a dict, and the
in-process engine's Grid keeping what it sent (``flower_app.studies.in_process`` runs the
ClientApp in process)."""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from pathlib import Path

import pytest
from flwr.app import Message
from flwr.clientapp import ClientApp

from flower_app.studies.in_process import InProcessGrid as EngineGrid
from flower_app.studies.in_process import PushPull, server_context, set_task_identity

ROOT = Path(__file__).resolve().parents[1]
TIERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Each test carries its folder's tier as a marker; ``perf`` tests are skipped unless the
    ``-m`` expression names ``perf`` (so ``-m "not e2e"`` skips them too)."""
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
    a temporary folder: tests never write into the user's cache."""
    from flower_app.centralized.pretrain import ensure_backbone
    from flower_app.models.backbone_cache import default_backbone_path

    path = tmp_path_factory.mktemp("backbone") / default_backbone_path(0).name
    return ensure_backbone(path, 0, log=lambda line: None)


__all__ = [
    "ROOT",
    "InProcessGrid",
    "PushPull",
    "quick_run_config",
    "server_context",
    "set_task_identity",
]
