"""Shared test helpers: the quick preset as a dict, and a Grid that runs the ClientApp in process.

Creating a ``Message`` outside a Flower process needs ``TaskIdentity`` set (an internal
Flower API); it is set here and nowhere else.
"""

from __future__ import annotations

import tomllib
import uuid
from collections.abc import Iterable
from pathlib import Path

import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

ROOT = Path(__file__).resolve().parents[1]


def quick_run_config(**overrides) -> dict:
    """pyproject defaults + configs/quick.toml + overrides, as Flower would merge them."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        config = dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])
    with open(ROOT / "configs" / "quick.toml", "rb") as f:
        config.update(tomllib.load(f))
    config.update({k.replace("_", "-"): v for k, v in overrides.items()})
    return config


def server_context(config: dict) -> Context:
    """The ServerApp's Context for an in-process run of ``config``."""
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config)


def set_task_identity() -> None:
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0
    TaskIdentity.task_id = 1


class PushPull:
    """``push_messages`` / ``pull_messages`` over a test grid's ``send_and_receive``: push
    gives each message an id (as Flower's grids do) and answers them all at once; pull
    hands out the replies to the ids asked for, in the order they were answered."""

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        messages = list(messages)
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        answered = list(self.send_and_receive(messages))
        self.unpulled = getattr(self, "unpulled", []) + answered
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        wanted = set(message_ids)
        out = [r for r in self.unpulled if r.metadata.reply_to_message_id in wanted]
        self.unpulled = [r for r in self.unpulled if r.metadata.reply_to_message_id not in wanted]
        return out


class InProcessGrid(PushPull, Grid):
    """A Grid whose nodes are ClientApp calls in this process (no Ray, no SuperLink)."""

    def __init__(self, client_app: ClientApp, run_config: dict, num_nodes: int) -> None:
        set_task_identity()
        self.client_app = client_app
        self.node_ids = [1000 + i for i in range(num_nodes)]
        self.contexts = {
            nid: Context(
                run_id=1,
                node_id=nid,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=run_config,
            )
            for i, nid in enumerate(self.node_ids)
        }
        self.sent: list[Message] = []
        self.reverse_replies = False

    def set_run(self, run) -> None:
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout=None) -> Iterable[Message]:
        messages = list(messages)
        self.sent.extend(messages)
        replies = []
        for message in messages:
            nid = message.metadata.dst_node_id
            try:
                reply = self.client_app(message, self.contexts[nid])
            except Exception as exc:
                reply = Message(
                    Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=message
                )
            replies.append(reply)
        return list(reversed(replies)) if self.reverse_replies else replies


@pytest.fixture
def identity() -> None:
    set_task_identity()
