"""How weights travel between the server and each node: by reference or in the message.

The server's side of ``strategies/transport/shared_weights.py``, used by ``CarryingGrid``
(``strategies/transport/grid.py``) on every message it pushes and every reply it pulls. At
the start (and when a node joins mid-run) every node is probed: a partition query carries a
small file of the run folder, the node reads it and writes one back. Nodes that pass get
the global weights (and a sparse mask) as a reference to one file; the others, and every
node with ``weights-transport = "message"``, get them in the message. Replies come the way
the request went; a referenced reply becomes a ``ReferencedArrays`` record, read and
checked against the same layout as a reply in the message when its check asks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from strategies import protocol
from strategies.reply_checks import Layout, names_problem, tensor_problem
from strategies.tensor_record import record_tensors
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


class ReferencedArrays(ArrayRecord):
    """A reply's tensors in a file of the run folder: read, hashed and checked against a
    layout only when a reply check asks (``read_checked``); a reference that may not be
    read holds the reason instead."""

    def __init__(self, carrier: WeightCarrier, ref: WeightRef | None, problem: str = "") -> None:
        super().__init__()
        self.carrier, self.ref, self.problem = carrier, ref, problem

    def count_bytes(self) -> int:
        """What the tensors would count in the message (the reference states it)."""
        return self.ref.nbytes if self.ref is not None else 0

    def read_checked(
        self, layout: Layout, nonnegative: bool = False
    ) -> tuple[dict[str, torch.Tensor], str]:
        """``(tensors, "")`` in ``layout``'s order, or ``({}, reason)``."""
        if self.ref is None:
            return {}, self.problem
        return self.carrier.read_reply(self.ref, layout, nonnegative)


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
        self._round: int | None = None  # the server round of the last messages carried
        self.verdicts: dict[int, str] = {}  # node -> "" (by reference) or why not, per probe

    # ---- what CarryingGrid calls -------------------------------------------------------------
    def outgoing(self, messages: list[Message]) -> list[Message]:
        """``messages`` as they travel: a new server round ends the last one; a partition
        query gets the probe; weights and masks to a node that reads the folder become
        references (each ArrayRecord written once)."""
        rounds = [
            int(m.content[protocol.CONFIG][protocol.SERVER_ROUND])
            for m in messages
            if protocol.CONFIG in m.content.config_records
        ]
        if rounds and max(rounds) != self._round:
            if self._round is not None:
                self.end_round()
            self._round = max(rounds)
        for message in messages:
            node, content = message.metadata.dst_node_id, message.content
            if message.metadata.message_type == protocol.QUERY_PARTITION:
                content.update(self.probe_content())
                continue
            if self.folder is None or node not in self.by_reference:
                continue
            if protocol.ARRAYS in content.array_records:
                arrays = content.array_records[protocol.ARRAYS]
                del content[protocol.ARRAYS]
                content.update(self.weights_for(node, arrays, lambda a=arrays: record_tensors(a)))
            if protocol.MASK in content.array_records:
                mask = content.array_records[protocol.MASK]
                del content[protocol.MASK]
                content.update(self.kept_for(node, protocol.MASK, mask))
        return messages

    def incoming(self, reply: Message) -> Message:
        """A reply as the server reads it: a probe answer judged (``verdicts``); a record by
        reference turned into ``ReferencedArrays``, read when its check asks."""
        if reply.has_error():
            return reply
        node, content = reply.metadata.src_node_id, reply.content
        if reply.metadata.message_type == protocol.QUERY_PARTITION:
            self.verdicts[node] = self.accept_probe(node, reply)
            return reply
        for key in protocol.REPLY_TENSORS:
            ref_record = content.config_records.get(protocol.ref_key(key))
            if ref_record is not None:
                del content[protocol.ref_key(key)]
                content[key] = self.referenced(node, ref_record)
        return reply

    def referenced(self, node_id: int, ref_record: ConfigRecord) -> ReferencedArrays:
        """The record of a reply's reference, or the reason it may not be read."""
        if self.folder is None or node_id not in self.by_reference:
            return ReferencedArrays(
                self, None, "a weight reference from a node that was not sent one"
            )
        try:
            return ReferencedArrays(self, WeightRef.from_record(ref_record))
        except SharedWeightsError as exc:
            return ReferencedArrays(self, None, str(exc))

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
                ref = write_shared(self.folder.root, self.folder.name, record_tensors(arrays))
            except SharedWeightsError as exc:  # e.g. a full tmpfs: this one in the message
                print(f"{key} travels in the message: {exc}", flush=True)
                return RecordDict({key: arrays})
            if kept is not None and kept[1].name != ref.name:
                (self.folder.root / kept[1].name).unlink(missing_ok=True)
            self._kept[key] = kept = (arrays, ref)
        return RecordDict({protocol.ref_key(key): kept[1].record()})

    # ---- receiving --------------------------------------------------------------------------
    def read_reply(
        self, ref: WeightRef, layout: Layout, nonnegative: bool = False
    ) -> tuple[dict[str, torch.Tensor], str]:
        """The tensors of a referenced reply file, each checked against ``layout`` as it is
        read: ``(tensors, "")``, or ``({}, reason)`` when they must not be aggregated."""

        def inspect(name: str, tensor: torch.Tensor) -> str:
            spec = layout.get(name)  # an extra tensor is named by names_problem below
            return tensor_problem(name, tensor, spec, nonnegative) if spec else ""

        try:
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
