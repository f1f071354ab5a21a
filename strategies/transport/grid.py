"""The run's Grid with the weight transport inside it: Flower's own place to intercept
messages, so strategies, the round loop and the reply checks see ``ArrayRecord``s only.

``CarryingGrid`` wraps the Grid Flower hands the ServerApp. On the way out it turns a
message's weights (and a sparse mask) into a reference to one file of the run folder for
every node that reads that folder (``WeightCarrier.outgoing``), and adds the folder's probe
to partition queries; on the way in it judges probe answers and turns a reply's reference
into a ``ReferencedArrays`` record that is read, hashed and checked only when a reply check
asks for its tensors (``WeightCarrier.incoming``). A new server round in the messages ends
the previous one: its global weights file goes and the replies read here become spares.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from strategies.transport.carrier import WeightCarrier


class CarryingGrid(Grid):
    """A Grid (push, pull, send-and-receive, node ids) that carries weights by reference."""

    def __init__(self, grid: Grid, carrier: WeightCarrier) -> None:
        self.grid = grid
        self.carrier = carrier

    def __getattr__(self, name: str) -> Any:
        """Everything else (``run``, ``pull_interval``, ...) is the wrapped Grid's."""
        return getattr(self.grid, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("grid", "carrier"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.grid, name, value)

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(self.carrier.outgoing(list(messages)))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.carrier.incoming(reply) for reply in self.grid.pull_messages(message_ids)]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = self.grid.send_and_receive(self.carrier.outgoing(list(messages)), timeout=timeout)
        return [self.carrier.incoming(reply) for reply in replies]
