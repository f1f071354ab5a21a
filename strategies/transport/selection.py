"""The run's weight transport: make the shared folder, probe the nodes, say what was chosen.

``weights-transport = "auto"`` (default) carries weights through a shared-memory file to
every node that proves, at the start, that it reads the ServerApp's folder and writes
into it (all nodes of a simulation; SuperNodes on the ServerApp's host), and in the
message to the others. ``"message"`` never writes a file; ``"shared-memory"`` stops the
run at the start when a node cannot use the folder. A simulation that joins an existing
Ray cluster (``RAY_ADDRESS`` set) may run a node's messages on any of its machines, so
``auto`` carries weights in the messages there.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from strategies.transport.carrier import WeightCarrier
from strategies.transport.shared_weights import ROOT_ENV, RunFolder, shared_root


class TransportUnavailable(RuntimeError):
    """``shared-memory`` was asked for and cannot be kept (the app names the key's value)."""


def open_carrier(mode: str, run_id: int) -> WeightCarrier:
    """The run's carrier for ``mode`` (``auto``, ``message``, ``shared-memory``); with a
    shared folder unless ``message`` or it cannot be made."""
    if mode == "message":
        return WeightCarrier()
    if mode == "auto" and os.environ.get("RAY_ADDRESS"):
        # a simulation that joins a Ray cluster may run any node's message on any machine,
        # so a node's probe says nothing about where its next message runs
        print(
            "weights travel in the messages: RAY_ADDRESS is set, so client workers may run "
            "on other machines (weights-transport='shared-memory' overrides)",
            flush=True,
        )
        return WeightCarrier()
    root = shared_root()
    try:
        return WeightCarrier(RunFolder.create(root, run_id))
    except OSError as exc:
        problem = f"cannot create a run folder under {root} ({exc}); set {ROOT_ENV} to a tmpfs"
        if mode == "shared-memory":
            raise TransportUnavailable(f"weights-transport='shared-memory': {problem}") from exc
        print(f"weights travel in the messages: {problem}", flush=True)
        return WeightCarrier()


def report_probes(carrier: WeightCarrier, node_ids: Iterable[int], mode: str) -> None:
    """One line on how weights reach the nodes, from the carrier's verdicts on their
    probe answers; with ``shared-memory``, a node that cannot read the folder stops the run."""
    if carrier.folder is None:
        return
    nodes = list(node_ids)
    failed = {n: carrier.verdicts.get(n, "no probe answer") for n in nodes}
    failed = {n: reason for n, reason in failed.items() if reason}
    line = (
        f"weights travel by reference ({carrier.folder.path}) to "
        f"{len(nodes) - len(failed)} of {len(nodes)} nodes"
    )
    if failed:
        node, reason = next(iter(failed.items()))
        line += f", in the messages to the others (node {node}: {reason})"
        if mode == "shared-memory":
            raise TransportUnavailable(
                f"weights-transport='shared-memory' but {len(failed)} node(s) cannot use "
                f"{carrier.folder.root} (node {node}: {reason}); use 'auto' or 'message'"
            )
    print(line, flush=True)
