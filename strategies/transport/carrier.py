"""How weights travel between the server and each node: by reference or in the message.

The server's side of ``strategies/transport/shared_weights.py``. At the start (and when a node
joins mid-run) every node is probed: it reads a small file of the run folder and writes
one back. Nodes that pass get the global weights as a reference to one file per round;
the others, and every node with ``weights-transport = "message"``, get them in the
message. Replies come the way the request went; either way they are decoded and checked
against the same layout.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from flwr.app import ArrayRecord, Message, RecordDict

from strategies import protocol
from strategies.reply_checks import Layout, checked_tensors, names_problem, tensor_problem
from strategies.transport.shared_weights import (
    RunFolder,
    SharedWeightsError,
    WeightRef,
    read_shared,
    ref_file,
    ref_folder,
    write_shared,
)
from strategies.transport.tensor_file import Inspect

PROBE_TENSOR = "probe"


class WeightCarrier:
    """One per run. Without a folder (``weights-transport = "message"``), every message
    carries its tensors and nothing is written."""

    def __init__(self, folder: RunFolder | None = None) -> None:
        self.folder = folder
        self.by_reference: set[int] = set()
        self._global: tuple[ArrayRecord, WeightRef] | None = None  # this round's written weights
        self._probe: WeightRef | None = None
        self._replies: set[str] = set()  # file names of this round's replies read here
        self._kept: dict[str, tuple[ArrayRecord, WeightRef]] = {}  # key -> files kept over rounds

    # ---- which nodes read the folder ------------------------------------------------------
    def probe_content(self) -> RecordDict:
        """The content of a partition query: with a folder, the reference of a probe file."""
        if self.folder is None:
            return RecordDict()
        if self._probe is None:
            probe = {PROBE_TENSOR: torch.arange(64, dtype=torch.int64)}
            try:
                self._probe = write_shared(self.folder.root, self.folder.name, probe)
            except SharedWeightsError as exc:  # no probe: every node answers "no probe"
                print(f"weights travel in the messages: {exc}", flush=True)
                return RecordDict()
        return RecordDict({protocol.SHARED_PROBE: self._probe.record()})

    def accept_probe(self, node_id: int, reply: Message) -> str:
        """Mark the node as reading by reference if its reply proves both directions work;
        returns why not ("" when it does)."""
        if self.folder is None:
            return "weights-transport is message"
        answer = reply.content.config_records.get(protocol.SHARED_PROBE)
        if answer is None:
            return "the node did not answer the shared-folder probe"
        if "problem" in answer:
            return str(answer["problem"])
        try:
            self._read(WeightRef.from_record(answer))
        except SharedWeightsError as exc:
            return f"its probe file cannot be read here: {exc}"
        self.by_reference.add(node_id)
        return ""

    # ---- sending ----------------------------------------------------------------------------
    def weights_for(
        self, node_id: int, arrays: ArrayRecord, tensors: Callable[[], Mapping[str, torch.Tensor]]
    ) -> RecordDict:
        """The weights record of a message to ``node_id``: the reference of ``arrays``'
        file (written once per global model, from ``tensors()``) or ``arrays`` itself."""
        if self.folder is None or node_id not in self.by_reference:
            return RecordDict({protocol.ARRAYS: arrays})
        if self._global is None or self._global[0] is not arrays:
            try:
                self._global = (
                    arrays,
                    write_shared(self.folder.root, self.folder.name, tensors()),
                )
            except SharedWeightsError as exc:  # e.g. a full tmpfs: messages from now on
                print(f"weights travel in the messages from now on: {exc}", flush=True)
                self.by_reference.clear()
                return RecordDict({protocol.ARRAYS: arrays})
        return RecordDict({protocol.ref_key(protocol.ARRAYS): self._global[1].record()})

    def kept_for(self, node_id: int, key: str, arrays: ArrayRecord) -> RecordDict:
        """Record ``key`` of a message to ``node_id`` for something that stays valid over
        rounds (the sparse mask of one version): the reference of one file, written once
        per ArrayRecord and kept until another one replaces it, or ``arrays`` itself."""
        if self.folder is None or node_id not in self.by_reference:
            return RecordDict({key: arrays})
        kept = self._kept.get(key)
        if kept is None or kept[0] is not arrays:
            try:
                ref = write_shared(self.folder.root, self.folder.name, arrays.to_torch_state_dict())
            except SharedWeightsError as exc:  # e.g. a full tmpfs: this one in the message
                print(f"{key} travels in the message: {exc}", flush=True)
                return RecordDict({key: arrays})
            if kept is not None and kept[1].name != ref.name:
                (self.folder.root / kept[1].name).unlink(missing_ok=True)
            self._kept[key] = kept = (arrays, ref)
        return RecordDict({protocol.ref_key(key): kept[1].record()})

    # ---- receiving --------------------------------------------------------------------------
    def reply_tensors(
        self, reply: Message, key: str, layout: Layout, nonnegative: bool = False
    ) -> tuple[dict[str, torch.Tensor], str]:
        """The tensors of record ``key`` of a reply, checked against ``layout``:
        ``(tensors, "")``, or ``({}, reason)`` when they must not be aggregated."""
        ref_record = reply.content.config_records.get(protocol.ref_key(key))
        if ref_record is None:
            arrays = reply.content.array_records.get(key)
            if arrays is None:
                return {}, f"no {key!r} record"
            return checked_tensors(arrays, layout, nonnegative)
        if reply.metadata.src_node_id not in self.by_reference:
            return {}, "a weight reference from a node that was not sent one"

        def inspect(name: str, tensor: torch.Tensor) -> str:
            spec = layout.get(name)  # an extra tensor is named by names_problem below
            return tensor_problem(name, tensor, spec, nonnegative) if spec else ""

        try:
            ref = WeightRef.from_record(ref_record)
            state = self._read(ref, inspect)
        except SharedWeightsError as exc:
            return {}, str(exc)
        self._replies.add(ref_file(ref))
        problem = names_problem(state, layout)
        if problem:
            return {}, problem
        return {name: state[name] for name in layout}, ""  # the file's order differs

    def _read(self, ref: WeightRef, inspect: Inspect | None = None) -> dict[str, torch.Tensor]:
        """A file of this run's folder only: a reply cannot point at another run's files."""
        assert self.folder is not None
        if ref_folder(ref) != self.folder.name:
            raise SharedWeightsError(f"{ref.name} is not in this run's folder {self.folder.name}")
        return read_shared(self.folder.root, ref, inspect)

    # ---- cleaning up ------------------------------------------------------------------------
    def end_round(self) -> None:
        """Remove the round's files (weights, replies) but the probe (a node that joins
        later is probed with it); the replies read here become spares that the next
        round's writes reuse. Call it once the round's decoded replies are dropped."""
        if self.folder is None:
            return
        self._global = None  # the round's weights need not outlive it in this process
        kept = [ref for _, ref in self._kept.values()] + ([self._probe] if self._probe else [])
        keep = {ref_file(ref) for ref in kept}
        self.folder.clear(keep, recycle=self._replies)
        self._replies = set()

    def close(self) -> None:
        """Remove the run folder (the end of the run, or its failure)."""
        if self.folder is not None:
            self.folder.remove()
            self._global = None
