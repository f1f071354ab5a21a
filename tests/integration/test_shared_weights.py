"""Weights by reference: the same tensors and byte counts as the message path, digests that
catch a changed file, a per-node fallback to the message, and no run folder left behind.

Every test points ``FL_SHARED_WEIGHTS_ROOT`` at its own ``tmp_path``, so the real
``/dev/shm`` folder of other runs is never touched. A node "on another host" is a node
whose root differs from the ServerApp's when it answers the probe.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from safetensors.torch import load_file

from flower_app import client_app, server_app
from flower_app.config import ConfigError
from strategies import protocol
from strategies.reply_checks import dense_layout, reply_tensors
from strategies.sparse_codec import decode_mask, encode_mask, gather_masked
from strategies.tensor_record import TensorRecord, record_tensors
from strategies.transport import node
from strategies.transport.carrier import WeightCarrier
from strategies.transport.grid import CarryingGrid
from strategies.transport.node import MappedArrays
from strategies.transport.shared_weights import (
    ROOT_ENV,
    SPARE_SUFFIX,
    SUFFIX,
    RunFolder,
    SharedWeightsError,
    WeightRef,
    _host,
    _start_ticks,
    answer_probe,
    message_bytes,
    read_shared,
    remove_stale,
    reply_records,
    resolve,
    write_shared,
)
from strategies.transport.tensor_file import write_tensors
from tests.conftest import ROOT, InProcessGrid, quick_run_config, server_context
from tests.run_in_process import run

Tensors = dict[str, torch.Tensor]
SMALL = {
    "synthetic_train_per_class": 20,
    "synthetic_test_per_class": 10,
    "num_clients": 4,
    "fraction_train": 1.0,  # every node trains: both transports are used in every round
    "num_server_rounds": 2,
    "eval_every": 2,
    "local_steps": 2,
}


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's shared root, for the ServerApp and every node (unless a test says not)."""
    path = tmp_path / "shm"
    monkeypatch.setenv(ROOT_ENV, str(path))
    return path


# ---- states -----------------------------------------------------------------------------------
def dense_state(seed: int) -> Tensors:
    """Float weights with NaN, inf and -0.0 (bit-exactness, not just equality) and the integer
    buffers a model holds, in a non-sorted order."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(7, 5, generator=gen)
    weight[0, :3] = torch.tensor([float("nan"), float("-inf"), -0.0])
    return {
        "z.weight": weight,
        "a.bias": torch.randn(5, generator=gen),
        "blocks.0.steps": torch.randint(-(2**40), 2**40, (3,), generator=gen),
        "blocks.0.flags": torch.rand(4, 2, generator=gen) > 0.5,
        "blocks.0.bytes": torch.randint(0, 256, (6,), generator=gen, dtype=torch.uint8),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
    }


def finite_state(seed: int) -> Tensors:
    """``dense_state`` without NaN/inf: a reply the checks accept."""
    return {
        n: torch.nan_to_num(t) if t.is_floating_point() else t for n, t in dense_state(seed).items()
    }


def sparse_state(seed: int) -> Tensors:
    """What a sparse reply carries: 1-D masked vectors (one of them empty) and a dense head."""
    gen = torch.Generator().manual_seed(seed)
    full = {
        "blocks.0.attn.qkv.weight": torch.randn(12, 4, generator=gen),
        "blocks.0.mlp.fc1.weight": torch.randn(8, 4, generator=gen),
        "blocks.1.norm.weight": torch.randn(4, generator=gen),
    }
    mask = {name: torch.rand(t.shape, generator=gen) < 0.3 for name, t in full.items()}
    mask["blocks.1.norm.weight"][:] = False
    head = {"head.weight": torch.randn(3, 4, generator=gen), "head.bias": torch.zeros(3)}
    return gather_masked(full, mask) | head


def assert_bitwise_equal(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        assert got[name].numpy().tobytes() == tensor.numpy().tobytes(), name


def file_names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# ---- the file format -------------------------------------------------------------------------
@pytest.mark.parametrize("make", [dense_state, sparse_state], ids=["dense", "sparse"])
def test_round_trip_equals_the_message_path_bit_for_bit(
    tmp_path: Path, make: Callable[[int], Tensors]
) -> None:
    """A node must load exactly what an ArrayRecord would have given it, and the bytes
    reported for the round must not depend on how the weights travelled."""
    (tmp_path / "run").mkdir()
    state = make(0)
    ref = write_shared(tmp_path, "run", state)
    via_message = ArrayRecord(state)
    assert_bitwise_equal(read_shared(tmp_path, ref), via_message.to_torch_state_dict())
    assert ref.nbytes == message_bytes(state) == via_message.count_bytes()
    assert ref.name == f"run/{ref.digest}{SUFFIX}" and len(ref.digest) == 32
    assert write_shared(tmp_path, "run", make(0)) == ref  # same content, same file
    other = write_shared(tmp_path, "run", make(1))
    assert other.digest != ref.digest
    # atomic writes leave no temp file; equal content was written once
    assert file_names(tmp_path / "run") == {f"{ref.digest}{SUFFIX}", f"{other.digest}{SUFFIX}"}


def test_message_bytes_counts_what_an_array_record_counts_for_each_dtype() -> None:
    """``bytes-down``/``bytes-up`` must equal the message path's figures for any tensor."""
    for name, tensor in (dense_state(2) | sparse_state(2)).items():
        assert message_bytes({name: tensor}) == ArrayRecord({name: tensor}).count_bytes(), name


def test_record_tensors_read_an_array_records_bytes_as_they_are() -> None:
    """The tensors the Grid writes into a file are the ArrayRecord's own bytes (no decoded
    copy), equal to Flower's decoding for every dtype and shape, scalars included."""
    state = dense_state(0) | sparse_state(0)
    arrays = ArrayRecord(state)
    views = record_tensors(arrays)
    assert_bitwise_equal(views, arrays.to_torch_state_dict())
    for name, view in views.items():
        data = arrays[name].data
        if view.numel():  # the view's memory lies inside the Array's bytes
            offset = view.numpy().__array_interface__["data"][0] - memoryview_address(data)
            assert 0 < offset < len(data), name


def memoryview_address(data: bytes) -> int:
    return np.frombuffer(data, np.uint8).__array_interface__["data"][0]


def test_a_reply_carried_by_reference_is_never_serialized(root: Path) -> None:
    """The node's mod writes a TensorRecord's tensors straight into the run folder (its
    Arrays are never built); in a message it becomes a plain ArrayRecord, the same bytes
    and object id as one built from the tensors."""
    folder = RunFolder.create(root, 7)
    sent = write_shared(root, folder.name, dense_state(0)).record()
    trained = TensorRecord(finite_state(1))
    out = node.outgoing(sent, protocol.ARRAYS, trained)
    assert set(out) == {protocol.ref_key(protocol.ARRAYS)} and not trained.__dict__["_filled"]
    written = WeightRef.from_record(out[protocol.ref_key(protocol.ARRAYS)])
    assert_bitwise_equal(read_shared(root, written), finite_state(1))
    plain = node.outgoing(None, protocol.ARRAYS, TensorRecord(finite_state(1)))[protocol.ARRAYS]
    assert type(plain) is ArrayRecord
    assert plain.object_id == ArrayRecord(finite_state(1)).object_id
    folder.remove()


def test_a_changed_byte_or_a_missing_file_is_refused(tmp_path: Path) -> None:
    """A file changed or truncated after it was referenced must never be loaded."""
    (tmp_path / "run").mkdir()
    ref = write_shared(tmp_path, "run", dense_state(0))
    path = tmp_path / ref.name
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor's data; the header still parses
    path.write_bytes(bytes(data))
    with pytest.raises(SharedWeightsError, match=f"not {ref.digest}"):
        read_shared(tmp_path, ref)
    path.unlink()
    with pytest.raises(SharedWeightsError, match="cannot read run/"):
        read_shared(tmp_path, ref)
    with pytest.raises(SharedWeightsError, match="malformed weight reference"):
        WeightRef.from_record(ConfigRecord({"name": ref.name, "digest": ref.digest}))


def test_a_node_maps_its_global_file_once_and_again_when_it_changes(tmp_path: Path) -> None:
    """A worker's clients of one round share one mapping of the global file (no new page
    faults, no second hash); a file replaced under the same name is read and hashed anew,
    so a tampered one is still refused."""
    (tmp_path / "run").mkdir()
    ref = write_shared(tmp_path, "run", finite_state(0))
    first = read_shared(tmp_path, ref, remember=True)
    again = read_shared(tmp_path, ref, remember=True)
    assert all(again[n].data_ptr() == first[n].data_ptr() for n in first if first[n].numel())
    assert read_shared(tmp_path, ref)["z.weight"].data_ptr() != first["z.weight"].data_ptr()

    path = tmp_path / ref.name
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.unlink()  # a new file under the same name: another inode
    path.write_bytes(bytes(data))
    with pytest.raises(SharedWeightsError, match=f"not {ref.digest}"):
        read_shared(tmp_path, ref, remember=True)
    assert_bitwise_equal(first, finite_state(0))  # the old mapping is unchanged


@pytest.mark.parametrize(
    "name",
    [
        "../x.safetensors",
        "/abs/x.safetensors",
        "a/b/c.safetensors",
        "a/x.bin",
        "x.safetensors",
        "a/..",
        "/x.safetensors",
    ],
)
def test_resolve_refuses_names_outside_one_run_folder(tmp_path: Path, name: str) -> None:
    """A reference names a file of a run folder under the reader's root, nothing else."""
    with pytest.raises(SharedWeightsError, match=r"is not '<folder>/<file>\.safetensors'"):
        resolve(tmp_path, name)


def test_resolve_keeps_a_good_name_under_the_root(tmp_path: Path) -> None:
    assert resolve(tmp_path, "run-a/d.safetensors") == tmp_path / "run-a" / "d.safetensors"


# ---- the carrier (the ServerApp's side) ---------------------------------------------------------
def request(content: RecordDict, node: int, kind: str = protocol.TRAIN) -> Message:
    return Message(content, dst_node_id=node, message_type=kind)


def reply(to: Message, records: Mapping[str, ArrayRecord | ConfigRecord]) -> Message:
    """A node's reply: its ``src_node_id`` is the request's destination."""
    return Message(RecordDict(dict(records)), reply_to=to)


def probed(carrier: WeightCarrier, node: int) -> str:
    """Probe ``node`` with the node-side code under the current root; the carrier's verdict."""
    query = request(carrier.probe_content(), node, protocol.QUERY_PARTITION)
    answer = answer_probe(query.content)
    assert answer is not None
    return carrier.accept_probe(node, reply(query, {protocol.SHARED_PROBE: answer}))


def read_back(
    carrier: WeightCarrier, message: Message, key: str, layout: dict
) -> tuple[Tensors, str]:
    """A reply as the server's Grid hands it over (``incoming``), read by the reply check."""
    return reply_tensors(carrier.incoming(message), key, layout)


def test_carrier_accepts_only_good_replies_from_its_own_folder(root: Path, identity: None) -> None:
    """A reference in a reply is untrusted: it must come from a node that was sent one, point
    into this run's folder, hash to its digest and fit the layout."""
    carrier = WeightCarrier(RunFolder.create(root, 7))
    assert probed(carrier, 5) == "" and carrier.by_reference == {5}
    sent = finite_state(0)
    arrays = ArrayRecord(sent)
    layout = dense_layout(arrays)  # insertion order, not the file's sorted order
    train = request(carrier.weights_for(5, arrays, lambda: sent), 5)
    trained = {name: t + 1 if t.is_floating_point() else t for name, t in sent.items()}

    records = reply_records(train.content, protocol.ARRAYS, trained)
    assert set(records) == {protocol.ref_key(protocol.ARRAYS)}
    state, reason = read_back(carrier, reply(train, records), protocol.ARRAYS, layout)
    assert reason == "" and list(state) == list(layout)
    assert_bitwise_equal(state, trained)

    other_run = RunFolder.create(root, 8)  # a live run's folder under the same root
    elsewhere = write_shared(root, other_run.name, trained).record()
    state, reason = read_back(
        carrier,
        reply(train, {protocol.ref_key(protocol.ARRAYS): elsewhere}),
        protocol.ARRAYS,
        layout,
    )
    assert state == {} and f"is not in this run's folder {carrier.folder.name}" in reason

    unprobed = request(RecordDict({protocol.ARRAYS: arrays}), 6)
    state, reason = read_back(carrier, reply(unprobed, records), protocol.ARRAYS, layout)
    assert state == {} and reason == "a weight reference from a node that was not sent one"

    ref = WeightRef.from_record(records[protocol.ref_key(protocol.ARRAYS)])
    data = bytearray((root / ref.name).read_bytes())
    data[-1] ^= 0x80
    (root / ref.name).write_bytes(bytes(data))
    state, reason = read_back(carrier, reply(train, records), protocol.ARRAYS, layout)
    assert state == {} and f"not {ref.digest}" in reason

    shorter = reply_records(train.content, protocol.ARRAYS, trained | {"a.bias": torch.zeros(4)})
    state, reason = read_back(carrier, reply(train, shorter), protocol.ARRAYS, layout)
    assert state == {} and reason == "tensor 'a.bias' has shape (4,), expected (5,)"
    other_run.remove()


def test_weights_are_written_once_per_global_model_and_cleaned_up(
    root: Path, identity: None
) -> None:
    """One file per global ArrayRecord whatever the number of nodes; a round's end keeps
    only the probe (the next round writes its weights again); ``close`` removes the folder."""
    folder = RunFolder.create(root, 7)
    carrier = WeightCarrier(folder)
    assert probed(carrier, 1) == "" and probed(carrier, 2) == ""
    calls: list[int] = []

    def tensors_of(state: Tensors) -> Callable[[], Tensors]:
        return lambda: calls.append(1) or state

    first, second = ArrayRecord(dense_state(0)), ArrayRecord(dense_state(1))
    to_one = carrier.weights_for(1, first, tensors_of(dense_state(0)))
    to_two = carrier.weights_for(2, first, tensors_of(dense_state(0)))
    key = protocol.ref_key(protocol.ARRAYS)
    assert len(calls) == 1 and dict(to_one[key]) == dict(to_two[key])
    assert protocol.ARRAYS not in to_one
    first_file = WeightRef.from_record(to_one[key]).name.rsplit("/", 1)[1]
    new = carrier.weights_for(1, second, tensors_of(dense_state(1)))
    second_file = WeightRef.from_record(new[key]).name.rsplit("/", 1)[1]
    assert len(calls) == 2 and second_file != first_file
    write_shared(root, folder.name, sparse_state(0))  # a reply
    # the probe, one answer (both nodes wrote the same one), two global models, a reply
    assert len(file_names(folder.path)) == 5
    carrier.end_round()
    probe = carrier.probe_content()[protocol.SHARED_PROBE]
    probe_file = WeightRef.from_record(probe).name.rsplit("/", 1)[1]
    assert file_names(folder.path) == {probe_file}
    again = carrier.weights_for(1, second, tensors_of(dense_state(1)))
    assert len(calls) == 3 and dict(again[key]) == dict(new[key])  # written again, same file
    carrier.close()
    assert not folder.path.exists() and list(root.iterdir()) == []


def test_replies_read_by_the_server_become_spares_that_later_writes_reuse(
    root: Path, identity: None
) -> None:
    """A round's end turns the replies it read (and no longer maps) into spares; the next
    write in the folder takes one over: same inode, cut to its new length, digest right.
    A reply still mapped (its tensors alive) is removed instead: nobody writes over it."""
    folder = RunFolder.create(root, 7)
    carrier = WeightCarrier(folder)
    assert probed(carrier, 1) == ""
    sent = finite_state(0)
    arrays = ArrayRecord(sent)
    layout = dense_layout(arrays)
    train = request(carrier.weights_for(1, arrays, lambda: sent), 1)
    trained = {name: t + 1 if t.is_floating_point() else t for name, t in sent.items()}

    def answered() -> tuple[Tensors, Path]:
        records = reply_records(train.content, protocol.ARRAYS, trained)
        state, reason = read_back(carrier, reply(train, records), protocol.ARRAYS, layout)
        assert reason == ""
        return state, root / WeightRef.from_record(records[protocol.ref_key(protocol.ARRAYS)]).name

    def spares() -> list[Path]:
        return sorted(folder.path.glob(f"*{SPARE_SUFFIX}"))

    held, path = answered()
    carrier.end_round()  # ``held`` still maps the reply: removed, not recycled
    assert spares() == [] and not path.exists()
    assert_bitwise_equal(held, trained)

    del held
    path = answered()[1]  # its tensors are dropped at once
    inode = path.stat().st_ino
    carrier.end_round()
    assert [p.stat().st_ino for p in spares()] == [inode] and not path.exists()

    smaller = {"a.bias": torch.arange(5, dtype=torch.float32)}
    ref = write_shared(root, folder.name, smaller)
    written = root / ref.name
    assert spares() == [] and written.stat().st_ino == inode
    fresh = root / "fresh.safetensors"
    assert write_tensors(fresh, smaller) == ref.digest
    assert written.read_bytes() == fresh.read_bytes()  # nothing of the old reply is left
    assert_bitwise_equal(read_shared(root, ref), smaller)  # the digest is checked on read

    for _ in range(3):  # spares left from an earlier, larger round
        (folder.path / f"{os.urandom(4).hex()}{SPARE_SUFFIX}").write_bytes(b"x")
    path = answered()[1]
    carrier.end_round()  # no more spares than the round's replies
    assert len(spares()) == 1 and spares()[0].stat().st_size > 1
    carrier.close()


class EchoGrid:
    """A Grid whose nodes answer every pushed message with ``answer(message)``; keeps what
    it was handed."""

    def __init__(self, answer: Callable[[Message], Message]) -> None:
        self.answer, self.pushed, self.waiting = answer, [], {}

    def get_node_ids(self) -> list[int]:
        return [1, 2]

    def push_messages(self, messages):
        self.pushed.extend(messages)
        for i, message in enumerate(messages):
            self.waiting[f"m{len(self.pushed)}-{i}"] = message
        return list(self.waiting)

    def pull_messages(self, ids):
        return [self.answer(self.waiting.pop(i)) for i in list(ids) if i in self.waiting]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(list(messages)))


def test_the_grid_carries_weights_out_of_the_strategys_sight(root: Path, identity: None) -> None:
    """Through ``CarryingGrid`` a strategy's plain messages reach a node that reads the folder
    as references (weights and mask, each written once) and everyone else unchanged; a
    referenced reply arrives as a record that counts its bytes and is read by the reply check;
    the next server round removes the last round's weights file."""
    carrier = WeightCarrier(RunFolder.create(root, 7))
    sent = finite_state(0)
    trained = {n: t + 1 if t.is_floating_point() else t for n, t in sent.items()}

    def answer(message: Message) -> Message:
        if message.metadata.message_type == protocol.QUERY_PARTITION:
            probe = answer_probe(message.content) if message.metadata.dst_node_id == 1 else None
            return reply(message, {protocol.SHARED_PROBE: probe} if probe else {})
        return reply(message, reply_records(message.content, protocol.ARRAYS, trained))

    inner = EchoGrid(answer)
    grid = CarryingGrid(inner, carrier)
    queries = [request(RecordDict(), n, protocol.QUERY_PARTITION) for n in (1, 2)]
    grid.send_and_receive(queries)
    assert carrier.by_reference == {1} and carrier.verdicts[2] != ""

    arrays, mask = ArrayRecord(sent), encode_mask({"a.weight": torch.ones(5, 4, dtype=torch.bool)})

    def round_messages(server_round: int, arrays: ArrayRecord = arrays) -> list[Message]:
        config = ConfigRecord({protocol.SERVER_ROUND: server_round})
        contents = [
            RecordDict({protocol.ARRAYS: arrays, protocol.MASK: mask, protocol.CONFIG: config})
            for _ in (1, 2)
        ]
        return [request(c, n) for c, n in zip(contents, (1, 2), strict=True)]

    replies = list(grid.pull_messages(grid.push_messages(round_messages(1))))
    by_reference, in_message = inner.pushed[-2:]
    assert set(by_reference.content.config_records) >= {
        protocol.ref_key(protocol.ARRAYS),
        protocol.ref_key(protocol.MASK),
    }
    assert not by_reference.content.array_records
    assert set(in_message.content.array_records) == {protocol.ARRAYS, protocol.MASK}
    layout = dense_layout(arrays)
    for message in replies:
        record = message.content.array_records[protocol.ARRAYS]
        assert record.count_bytes() == arrays.count_bytes()  # either way, the same bytes
        tensors, reason = reply_tensors(message, protocol.ARRAYS, layout)
        assert reason == "" and list(tensors) == list(layout)
        assert_bitwise_equal(tensors, trained)
    weights_file = WeightRef.from_record(by_reference.content[protocol.ref_key(protocol.ARRAYS)])
    assert (root / weights_file.name).is_file()
    del replies, tensors, message, record
    grid.push_messages(round_messages(2, ArrayRecord(trained)))  # round 1's weights file goes
    assert not (root / weights_file.name).exists()
    carrier.close()


def test_a_kept_record_is_written_once_and_lives_until_replaced(root: Path, identity: None) -> None:
    """The sparse mask of one version: one file whatever the nodes and rounds, kept by a
    round's end, removed when the next version replaces it; a node not reading by
    reference gets the record itself. Its bytes count as the record's."""
    folder = RunFolder.create(root, 7)
    carrier = WeightCarrier(folder)
    assert probed(carrier, 1) == "" and probed(carrier, 2) == ""
    first, second = encode_mask({"w": torch.rand(9, 7) < 0.5}), encode_mask({"w": torch.ones(3)})
    key = protocol.ref_key(protocol.MASK)
    to_one, to_two = (
        carrier.kept_for(1, protocol.MASK, first),
        carrier.kept_for(2, protocol.MASK, first),
    )
    assert dict(to_one[key]) == dict(to_two[key]) and protocol.MASK not in to_one
    ref = WeightRef.from_record(to_one[key])
    assert ref.nbytes == first.count_bytes()
    assert_bitwise_equal(decode_mask(read_shared(root, ref)), decode_mask(first))
    carrier.end_round()
    assert (root / ref.name).exists()
    assert carrier.kept_for(3, protocol.MASK, first)[protocol.MASK] is first  # not probed
    newer = WeightRef.from_record(carrier.kept_for(1, protocol.MASK, second)[key])
    assert not (root / ref.name).exists() and (root / newer.name).exists()
    carrier.close()


# ---- the fallback to the message ----------------------------------------------------------------
def test_a_node_on_another_host_gets_the_weights_in_the_message(
    tmp_path: Path, root: Path, monkeypatch: pytest.MonkeyPatch, identity: None
) -> None:
    """Another root when the probe arrives = another host: the node says why it cannot read
    the folder, and from then on gets (and sends) tensors in the message."""
    carrier = WeightCarrier(RunFolder.create(root, 3))
    content = carrier.probe_content()
    query = request(content, 11, protocol.QUERY_PARTITION)
    monkeypatch.setenv(ROOT_ENV, str(tmp_path / "another-host"))
    answer = answer_probe(content)
    assert answer is not None and "cannot read" in str(answer["problem"])
    reason = carrier.accept_probe(11, reply(query, {protocol.SHARED_PROBE: answer}))
    assert reason == str(answer["problem"]) and "\n" not in reason
    monkeypatch.setenv(ROOT_ENV, str(root))
    assert probed(carrier, 12) == "" and carrier.by_reference == {12}

    silent = carrier.accept_probe(13, reply(query, {}))
    assert silent == "the node did not answer the shared-folder probe"
    forged = WeightRef(f"{carrier.folder.name}/{'0' * 32}{SUFFIX}", "0" * 32, 1).record()
    reason = carrier.accept_probe(14, reply(query, {protocol.SHARED_PROBE: forged}))
    assert reason.startswith("its probe file cannot be read here")
    assert carrier.by_reference == {12}

    state = dense_state(0)
    arrays = ArrayRecord(state)

    def never() -> Tensors:
        raise AssertionError("no file is written for a node that gets the message")

    to_other_host = carrier.weights_for(11, arrays, never)
    assert (
        list(to_other_host.keys()) == [protocol.ARRAYS] and to_other_host[protocol.ARRAYS] is arrays
    )
    to_local = carrier.weights_for(12, arrays, lambda: state)
    assert list(to_local.keys()) == [protocol.ref_key(protocol.ARRAYS)]
    ref = WeightRef.from_record(to_local[protocol.ref_key(protocol.ARRAYS)])
    assert_bitwise_equal(MappedArrays(ref).to_torch_state_dict(), state)
    assert_bitwise_equal(to_other_host[protocol.ARRAYS].to_torch_state_dict(), state)
    carrier.close()


def test_without_a_folder_every_node_gets_the_message(identity: None) -> None:
    """``weights-transport = "message"``: no probe, no file."""
    carrier = WeightCarrier()
    assert len(carrier.probe_content()) == 0
    query = request(RecordDict(), 1, protocol.QUERY_PARTITION)
    assert carrier.accept_probe(1, reply(query, {})) == "weights-transport is message"
    arrays = ArrayRecord(dense_state(0))
    assert carrier.weights_for(1, arrays, dict)[protocol.ARRAYS] is arrays


def probes_from_another_host(
    monkeypatch: pytest.MonkeyPatch, other: Path, fails: Callable[[int], bool]
) -> None:
    """Nodes answer the probe in query order (1000, 1001, ...); the ``fails(i)``-th answer
    is given under ``other`` as its root, as a node on another host would."""
    real = node.answer_probe
    count = [0]

    def answer(content: RecordDict) -> ConfigRecord | None:
        index, count[0] = count[0], count[0] + 1
        if not fails(index):
            return real(content)
        server_root = os.environ[ROOT_ENV]
        os.environ[ROOT_ENV] = str(other)
        try:
            return real(content)
        finally:
            os.environ[ROOT_ENV] = server_root

    monkeypatch.setattr(node, "answer_probe", answer)


def run_on(config: dict) -> InProcessGrid:
    """``tests.run_in_process.run``, keeping the grid to look at what was sent."""
    grid = InProcessGrid(client_app.app, config, num_nodes=int(config["num-clients"]))
    server_app.main(grid, server_context(config))
    return grid


def untimed_metrics(run_dir: Path) -> pd.DataFrame:
    frame = pd.read_csv(run_dir / "metrics.csv")
    return frame.drop(columns=[c for c in frame.columns if c.startswith("seconds")])


def assert_same_results(a: Path, b: Path) -> None:
    pd.testing.assert_frame_equal(untimed_metrics(a), untimed_metrics(b), check_exact=True)
    final_a = load_file(a / "final_model.safetensors")
    assert_bitwise_equal(load_file(b / "final_model.safetensors"), final_a)


def test_mixed_transports_give_the_same_run_as_messages_only(
    tmp_path: Path, root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """How the weights travel must change no number of a run: half of the nodes on
    "another host", all in messages, all by reference give the same weights and metrics."""
    run(
        quick_run_config(
            **SMALL, weights_transport="message", output_dir=str(tmp_path), run_name="message"
        )
    )
    assert not root.exists()  # "message" writes nothing
    run(quick_run_config(**SMALL, output_dir=str(tmp_path), run_name="auto"))
    assert "to 4 of 4 nodes\n" in capsys.readouterr().out
    assert list(root.iterdir()) == []  # the run removed its folder

    probes_from_another_host(monkeypatch, tmp_path / "another-host", lambda i: i % 2 == 0)
    grid = run_on(quick_run_config(**SMALL, output_dir=str(tmp_path), run_name="mixed"))
    out = capsys.readouterr().out
    assert "to 2 of 4 nodes, in the messages to the others (node 1000: cannot read" in out
    assert list(root.iterdir()) == []
    trains = [m for m in grid.sent if m.metadata.message_type == protocol.TRAIN]
    assert len(trains) == 2 * 4
    for message in trains:
        in_message = message.metadata.dst_node_id in (1000, 1002)
        assert (protocol.ARRAYS in message.content) is in_message
        assert (protocol.ref_key(protocol.ARRAYS) in message.content) is not in_message

    assert_same_results(tmp_path / "message", tmp_path / "mixed")
    assert_same_results(tmp_path / "message", tmp_path / "auto")


def test_a_sparse_mask_goes_by_reference_and_the_run_is_the_same(
    tmp_path: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node reading by reference gets each mask version as a reference to one file
    (kept over rounds) and keeps only that in its context; the others get the packed mask.
    Warm-up, calibration and training masks (three versions) give the same run as
    messages only."""
    sparse = SMALL | {
        "strategy": "sparse-fedavg",
        "head_warmup_rounds": 1,
        "calibration_rounds": 1,
        "fisher_samples": 8,
        "num_server_rounds": 2,
    }
    run(
        quick_run_config(
            **sparse, weights_transport="message", output_dir=str(tmp_path), run_name="message"
        )
    )
    probes_from_another_host(monkeypatch, tmp_path / "another-host", lambda i: i % 2 == 0)
    grid = run_on(quick_run_config(**sparse, output_dir=str(tmp_path), run_name="mixed"))
    with_mask = [
        m for m in grid.sent if protocol.MASK_VERSION in m.content.get(protocol.CONFIG, {})
    ]
    versions = {int(m.content[protocol.CONFIG][protocol.MASK_VERSION]) for m in with_mask}
    assert len(versions) == 3
    for message in with_mask:
        in_message = message.metadata.dst_node_id in (1000, 1002)
        assert protocol.ref_key(protocol.MASK) not in message.content or not in_message
        assert protocol.MASK not in message.content or in_message
    refs = {
        dict(m.content[protocol.ref_key(protocol.MASK)])["name"]
        for m in with_mask
        if protocol.ref_key(protocol.MASK) in m.content
    }
    assert len(refs) == 3  # one file per version, not per node or round
    for node_id, context in grid.contexts.items():
        by_reference = node_id in (1001, 1003)
        assert (protocol.ref_key(protocol.MASK) in context.state) is by_reference
        assert (protocol.MASK in context.state) is not by_reference
    assert list(root.iterdir()) == []
    assert_same_results(tmp_path / "message", tmp_path / "mixed")


def test_shared_memory_with_a_node_that_cannot_read_fails_at_the_start(
    tmp_path: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``shared-memory`` promises every node reads the folder: one that cannot stops the run
    before round 1, with one line naming the key, and no file is left."""
    probes_from_another_host(monkeypatch, tmp_path / "another-host", lambda i: i == 1)
    config = quick_run_config(
        **SMALL, weights_transport="shared-memory", output_dir=str(tmp_path), run_name="strict"
    )
    with pytest.raises(ConfigError) as info:
        run(config)
    message = str(info.value)
    assert message.startswith("weights-transport='shared-memory' but 1 node(s) cannot use")
    assert "(node 1001: cannot read" in message and "\n" not in message
    assert not (tmp_path / "strict").exists()
    assert list(root.iterdir()) == []


# ---- the node's side ------------------------------------------------------------------------
def test_a_reply_goes_the_way_the_request_came(root: Path) -> None:
    """By reference into the request's folder, or (request in the message) an ArrayRecord."""
    folder = RunFolder.create(root, 4)
    sent = write_shared(root, folder.name, dense_state(0))
    by_ref = RecordDict({protocol.ref_key(protocol.ARRAYS): sent.record()})
    answer = sparse_state(0)
    records = reply_records(by_ref, protocol.FISHER, answer)
    assert list(records) == [protocol.ref_key(protocol.FISHER)]
    ref = WeightRef.from_record(records[protocol.ref_key(protocol.FISHER)])
    assert ref.name.startswith(f"{folder.name}/")
    assert_bitwise_equal(read_shared(root, ref), answer)
    in_message = reply_records(
        RecordDict({protocol.ARRAYS: ArrayRecord(dense_state(0))}), "x", answer
    )
    assert list(in_message) == ["x"]
    assert_bitwise_equal(in_message["x"].to_torch_state_dict(), answer)
    folder.remove()


def test_a_reply_that_cannot_be_written_goes_in_the_message(root: Path) -> None:
    """A vanished or full tmpfs must not lose the reply: it travels as an ArrayRecord."""
    gone = WeightRef(f"run-gone-1-1-1/{'0' * 32}{SUFFIX}", "0" * 32, 1)
    request_content = RecordDict({protocol.ref_key(protocol.ARRAYS): gone.record()})
    answer = sparse_state(0)
    records = reply_records(request_content, protocol.FISHER, answer)
    assert list(records) == [protocol.FISHER]
    assert_bitwise_equal(records[protocol.FISHER].to_torch_state_dict(), answer)


def test_a_node_joining_after_a_round_can_pass_the_probe(root: Path, identity: None) -> None:
    """The carrier probes nodes that join mid-run; they must be able to pass."""
    carrier = WeightCarrier(RunFolder.create(root, 5))
    assert probed(carrier, 1) == ""
    state = dense_state(0)
    carrier.weights_for(1, ArrayRecord(state), lambda: state)
    carrier.end_round()
    assert probed(carrier, 2) == ""


# ---- run folders --------------------------------------------------------------------------------
def dead_pid() -> int:
    pid = 999_999
    while Path(f"/proc/{pid}").exists():
        pid += 1
    return pid


def test_run_folders_of_dead_processes_of_this_host_are_removed(root: Path) -> None:
    """A killed run's folder (its process gone, or the pid reused by another process) is
    removed at the next start; live runs and other hosts' folders are not touched."""
    me, ticks = os.getpid(), _start_ticks(os.getpid())
    assert ticks is not None and _host() != "elsewhere"
    live = f"run-{_host()}-3-{me}-{ticks}"
    reused_pid = f"run-{_host()}-4-{me}-{int(ticks) + 1}"
    dead = f"run-{_host()}-5-{dead_pid()}-123"
    other_host = f"run-elsewhere-6-{dead_pid()}-123"
    not_a_run = f"run-{_host()}-notes"
    for name in (live, reused_pid, dead, other_host, not_a_run):
        (root / name).mkdir(parents=True)
        (root / name / f"{'0' * 32}{SUFFIX}").write_bytes(b"weights")
    folder = RunFolder.create(root, 9)
    assert folder.name == f"run-{_host()}-9-{me}-{ticks}"
    assert folder.path.stat().st_mode & 0o777 == 0o700
    assert file_names(root) == {live, other_host, not_a_run, folder.name}
    (root / dead).mkdir()
    assert remove_stale(root) == [dead]
    assert remove_stale(root / "missing") == []


def test_a_killed_run_leaves_its_folder_until_the_next_start(
    tmp_path: Path, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGKILL runs no ``finally``: the folder stays, and the next run on this host removes it."""
    config = quick_run_config(
        **(SMALL | {"num_server_rounds": 50}), output_dir=str(tmp_path), run_name="killed"
    )
    path = tmp_path / "killed.json"
    path.write_text(json.dumps(config))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.run_in_process", str(path)],
        cwd=ROOT,
        env=os.environ | {ROOT_ENV: str(root)},
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline, files = time.monotonic() + 120, []
        while time.monotonic() < deadline and proc.poll() is None and not files:
            files = list(root.glob(f"run-{_host()}-*/*{SUFFIX}"))
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        assert files, "no weights file appeared in the run folder"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    stale = files[0].parent
    assert stale.name.split("-")[-2] == str(proc.pid)
    assert stale.is_dir() and any(stale.iterdir())
    run(
        quick_run_config(
            **(SMALL | {"num_server_rounds": 1}), output_dir=str(tmp_path), run_name="next"
        )
    )
    assert "to 4 of 4 nodes" in capsys.readouterr().out
    assert not stale.exists() and list(root.iterdir()) == []


def test_auto_carries_in_messages_when_the_simulation_joins_a_ray_cluster(
    root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With RAY_ADDRESS a node's messages may run on any machine of the cluster: no folder."""
    from strategies.transport.selection import open_carrier

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    auto = open_carrier("auto", run_id=3)
    assert auto.folder is None and not root.exists()
    assert "RAY_ADDRESS is set" in capsys.readouterr().out
    carrier = open_carrier("shared-memory", run_id=3)
    assert carrier.folder is not None and carrier.folder.path.is_dir()
    carrier.close()


def test_files_are_ordinary_safetensors_files_both_ways(tmp_path: Path) -> None:
    """The one-pass writer and the mapped reader speak the safetensors format: the library
    reads what ``write_tensors`` wrote, and ``tensors_in`` reads what the library wrote."""
    from safetensors.torch import save_file

    from strategies.transport.tensor_file import map_file, tensors_in, write_tensors

    state = sparse_state(1) | dense_state(2)
    ours = tmp_path / "ours.safetensors"
    digest = write_tensors(ours, state)
    assert_bitwise_equal(load_file(ours), state)
    theirs = tmp_path / "theirs.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(theirs))
    tensors, their_digest, problem = tensors_in(map_file(theirs))
    assert problem == "" and their_digest != "" and digest != ""
    assert_bitwise_equal(tensors, state)
