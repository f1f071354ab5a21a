"""Which partition a node is: the one reading of a SuperNode's ``partition-id`` (its
handlers and the failure mod ask it), each misfit with the run as one line."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class NodeConfigError(ValueError):
    """A SuperNode's node-config does not fit the run; the message is one line."""


NODE_CONFIG_HELP = (
    'every SuperNode needs --node-config "partition-id=<i>" (i in 0..K-1, its identity in '
    "the run) and, to train on its own data, data-dir=<folder with node-data.npz>"
)


def node_partition_id(node_config: Mapping[str, Any], num_clients: int) -> int:
    """The node's partition id (simulation numbers nodes 0..num-supernodes-1).

    One rule for every node: ``partition-id`` is required; with ``data-dir`` the node
    trains on that private data, without it on shard ``partition-id`` of the run-config's
    data set. ``num-partitions``, when given, must equal ``num-clients``.
    """
    raw = node_config.get("partition-id")
    if raw is None:
        raise NodeConfigError(f"node-config has no partition-id: {NODE_CONFIG_HELP}")
    try:
        pid = int(raw)
    except (TypeError, ValueError):
        raise NodeConfigError(f"node-config partition-id={raw!r} is not an integer") from None
    if not 0 <= pid < num_clients:
        raise NodeConfigError(
            f"node-config partition-id={pid} is outside 0..{num_clients - 1} "
            f"(run-config num-clients={num_clients})"
        )
    parts = node_config.get("num-partitions")
    if parts is not None and int(parts) != num_clients:
        raise NodeConfigError(
            f"node-config num-partitions={parts} differs from run-config "
            f"num-clients={num_clients}: start the SuperNode with num-partitions={num_clients}"
        )
    return pid
