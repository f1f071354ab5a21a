"""The in-process engine: the ServerApp's ``main`` with a Grid whose nodes are ClientApp
calls in the same process.

Flower 1.42 simulates on Ray only, and a ``flwr run`` pays its start-up (SuperLink, Ray,
the ServerApp process, workers loading data) on every run, which on a small machine is
more than a miniature run's whole work (docs/performance.md). The study runner (``--engine
in-process``) and the tests drive the very same ``server_app.main`` and ClientApp with
Flower ``Message`` objects, node contexts (``partition-id``, ``num-partitions``) and
run-config; what this leaves out is Flower's transport (SuperLink, Ray workers, message
serialisation), so it exercises none of it. Nodes answer one after another.

Creating a ``Message`` outside a Flower process needs ``TaskIdentity`` set (an internal
Flower API); it is set here and nowhere else.
"""

from __future__ import annotations

import copy as copy_module
import itertools
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

FIRST_NODE_ID = 1000
_RUN_IDS = itertools.count(1)  # a new run id per run of this process, as a SuperLink gives


def set_task_identity(run_id: int = 1) -> None:
    """What Flower's ServerApp process sets before the first ``Message`` is created."""
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = 0
    TaskIdentity.task_id = 1


class PushPull:
    """``push_messages`` / ``pull_messages`` over a grid's ``send_and_receive``: a push gives
    each message an id (as a SuperLink does) and has them all answered at once; a pull hands
    out the replies to the ids asked for, in the order they were answered."""

    unpulled: list[Message]

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        messages = list(messages)
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        answered = list(self.send_and_receive(messages))  # type: ignore[attr-defined]
        self.unpulled = getattr(self, "unpulled", []) + answered
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        wanted = set(message_ids)
        out = [r for r in self.unpulled if r.metadata.reply_to_message_id in wanted]
        self.unpulled = [r for r in self.unpulled if r.metadata.reply_to_message_id not in wanted]
        return out


class InProcessGrid(PushPull, Grid):
    """A Grid whose nodes are calls of ``client_app`` in this process (no Ray, no SuperLink).

    A ClientApp that raises answers with an error reply, as Flower's engine does, so the
    ServerApp sees a failed client, not a crash.
    """

    def __init__(
        self, client_app: ClientApp, run_config: Mapping[str, Any], num_nodes: int, run_id: int = 1
    ) -> None:
        set_task_identity(run_id)
        self.client_app = client_app
        self.node_ids = [FIRST_NODE_ID + i for i in range(num_nodes)]
        self.contexts = {
            nid: Context(
                run_id=run_id,
                node_id=nid,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for i, nid in enumerate(self.node_ids)
        }
        self.unpulled: list[Message] = []

    def set_run(self, run_id: int) -> None:
        raise NotImplementedError("an InProcessGrid serves the one run it was made for")

    @property
    def run(self):
        raise NotImplementedError("an InProcessGrid has no Flower Run object")

    def create_message(self, *args, **kwargs):
        raise NotImplementedError("create a Message directly")

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def answer(self, message: Message) -> Message:
        """The addressed node's reply, or an error reply if its ClientApp raised."""
        try:
            return self.client_app(delivered(message), self.contexts[message.metadata.dst_node_id])
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            return Message(Error(code=code, reason=reason), reply_to=message)

    def send_and_receive(self, messages: Iterable[Message], *, timeout=None) -> Iterable[Message]:
        return [self.answer(message) for message in messages]


def delivered(message: Message) -> Message:
    """The message as its node receives it: a Message and RecordDict of its own (a real
    transport delivers a copy; the node's transport mod replaces records in what it got),
    the records themselves shared, since nothing writes into them."""
    copy = copy_module.copy(message)
    copy.__dict__["_content"] = RecordDict(dict(message.content.items()))
    return copy


def server_context(run_config: Mapping[str, Any], run_id: int = 1) -> Context:
    """The ServerApp's Context for an in-process run of ``run_config``."""
    return Context(
        run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config)
    )


def run_in_process(run_config: Mapping[str, Any]) -> None:
    """One whole run (``run_config`` complete, as Flower merges it) in this process.

    As in ``flwr run``, the federation has ``num-clients`` nodes; the ServerApp prints to
    this process's stdout and raises what it raises in a simulation.
    """
    from flower_app import client_app, server_app  # the apps: imported when a run starts

    run_id = next(_RUN_IDS)
    num_nodes = int(float(run_config["num-clients"]))
    grid = InProcessGrid(client_app.app, run_config, num_nodes, run_id)
    server_app.main(grid, server_context(run_config, run_id))
