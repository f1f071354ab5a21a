"""Untrusted replies: a malformed train or Fisher reply is a failed client, never aggregated.

Each federation runs in process with one reply tampered with before the server sees it;
the round goes on with the well-formed replies, whose example-weighted mean (computed here
by hand) becomes the global model, and the reason lands in metrics.csv / calibration.csv.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable

import pandas as pd
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from safetensors.torch import load_file

from flower_app import client_app, server_app
from flower_app.data.sources import DatasetSplits, ImageSplit
from strategies import protocol
from strategies.masks import density_schedule, scores_for, select_mask
from strategies.plan import TRAIN, Phase, RoundClock
from strategies.record import FAILURE_REASONS, RoundRecord
from strategies.reply_checks import (
    TensorSpec,
    checked_tensors,
    dense_layout,
    fisher_metrics_problem,
    head_layout,
    masked_layout,
    names_problem,
    non_finite,
    state_problem,
    tensor_problem,
    train_metrics_problem,
)
from strategies.rounds import CheckedReply, RetryPolicy, send_with_retries
from tests.conftest import InProcessGrid, PushPull, quick_run_config, server_context

Tamper = Callable[[Message, Message], Message]  # (message sent, honest reply) -> reply seen
Tensors = dict[str, torch.Tensor]

SMALL = {  # 7 IID shards of 257 or 258 examples: the example weights differ
    "synthetic_train_per_class": 20,
    "num_clients": 7,
    "synthetic_test_per_class": 10,
    "fraction_train": 0.43,  # 3 clients a round
    "num_server_rounds": 2,
    "eval_every": 2,
    "local_steps": 1,
    "max_round_retries": 0,
}
SPARSE = {
    "strategy": "sparse-fedavg",
    "mask_strategy": "lowest_magnitude",
    "head_warmup_rounds": 1,
    "head": "train",
}
FISHER = {
    "strategy": "sparse-fedavg",
    "head_warmup_rounds": 0,
    "head": "train",
    "calibration_rounds": 1,
    "num_server_rounds": 1,
    "fisher_samples": 1000,  # more than a shard: num-examples is the shard size
    "fisher_labels": "empirical",
}


@pytest.fixture(autouse=True)
def small_test_split(monkeypatch) -> None:
    """The final test evaluation is not under test here: 1 in 20 test images keeps runs quick."""
    full = server_app.run_splits

    def smaller(cfg) -> DatasetSplits:
        splits = full(cfg)
        test = ImageSplit(splits.test.images[::20], splits.test.labels[::20])
        return dataclasses.replace(splits, test=test)

    monkeypatch.setattr(server_app, "run_splits", smaller)


class TamperingGrid(InProcessGrid):
    """Runs the real ClientApp; the first reply of ``target`` round (attempt 0) is tampered."""

    def __init__(self, config: dict, tamper: Tamper, target: int) -> None:
        super().__init__(client_app.app, config, num_nodes=int(config["num-clients"]))
        self.tamper, self.target = tamper, target
        self.tampered: Message | None = None
        self.seen: dict[tuple[int, int], list[Message]] = {}  # (round, attempt) -> replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout=None) -> list[Message]:
        messages = list(messages)
        replies = list(super().send_and_receive(messages, timeout=timeout))
        for i, (message, reply) in enumerate(zip(messages, replies, strict=True)):
            config = message.content.get(protocol.CONFIG)
            if config is None:
                continue  # the partition query
            key = (int(config[protocol.SERVER_ROUND]), int(config[protocol.ATTEMPT]))
            if key == (self.target, 0) and self.tampered is None:
                replies[i] = self.tampered = self.tamper(message, reply)
            self.seen.setdefault(key, []).append(replies[i])
        return replies

    def sent_in(self, server_round: int) -> Tensors:
        """The global weights sent in ``server_round`` (what the round before produced)."""
        for m in self.sent:
            config = m.content.get(protocol.CONFIG)
            if config is not None and int(config[protocol.SERVER_ROUND]) == server_round:
                return m.content[protocol.ARRAYS].to_torch_state_dict()
        raise AssertionError(f"nothing sent in round {server_round}")

    def good(self, server_round: int, attempt: int = 0) -> list[Message]:
        """The well-formed replies of a round's attempt, in partition order."""
        replies = [r for r in self.seen[(server_round, attempt)] if r is not self.tampered]
        return sorted(replies, key=_pid)


def _pid(reply: Message) -> int:
    return int(reply.content[protocol.METRICS][protocol.PARTITION_ID])


def _examples(reply: Message) -> float:
    return float(reply.content[protocol.METRICS][protocol.NUM_EXAMPLES])


def _run(tmp_path, name: str, tamper: Tamper, target: int, **overrides) -> TamperingGrid:
    """A run whose replies carry their tensors in the message (the tampering edits them)."""
    overrides = {"weights_transport": "message"} | overrides
    config = quick_run_config(**(SMALL | overrides), output_dir=str(tmp_path), run_name=name)
    grid = TamperingGrid(config, tamper, target)
    context = server_context(config)
    server_app.main(grid, context)
    assert json.loads((tmp_path / name / "summary.json").read_text())["status"] == "completed"
    assert grid.tampered is not None
    return grid


def _replaced(message: Message, reply: Message, key: str, record) -> Message:
    content = RecordDict({k: v for k, v in reply.content.items() if k != key})
    content[key] = record
    return Message(content, reply_to=message)


def arrays_changed(change: Callable[[Tensors], Tensors], key: str = protocol.ARRAYS) -> Tamper:
    """A tamper that rewrites the reply's tensors (a copy of them)."""

    def tamper(message: Message, reply: Message) -> Message:
        state = {k: v.clone() for k, v in reply.content[key].to_torch_state_dict().items()}
        return _replaced(message, reply, key, ArrayRecord(change(state)))

    return tamper


def metrics_changed(changes: Callable[[MetricRecord], dict]) -> Tamper:
    """A tamper that overrides some of the reply's metrics."""

    def tamper(message: Message, reply: Message) -> Message:
        metrics = reply.content[protocol.METRICS]
        return _replaced(
            message, reply, protocol.METRICS, MetricRecord(dict(metrics) | changes(metrics))
        )

    return tamper


def _set(name: str, value: float) -> Callable[[Tensors], Tensors]:
    def change(state: Tensors) -> Tensors:
        state[name].view(-1)[0] = value
        return state

    return change


def _without(name: str) -> Callable[[Tensors], Tensors]:
    return lambda state: {k: v for k, v in state.items() if k != name}


def _shorter(name: str) -> Callable[[Tensors], Tensors]:
    return lambda state: state | {name: state[name][:-1]}


def expected_global(base: Tensors, replies: list[Message], mask: dict | None) -> Tensors:
    """By hand: sum_k n_k / N * values_k in float64, written into the sent weights."""
    total = sum(_examples(r) for r in replies)
    states = [r.content[protocol.ARRAYS].to_torch_state_dict() for r in replies]
    out = dict(base)
    for name in states[0]:
        acc = torch.zeros(states[0][name].shape, dtype=torch.float64)
        for reply, state in zip(replies, states, strict=True):
            acc += state[name].double() * (_examples(reply) / total)
        if mask is not None and name in mask:
            out[name] = base[name].clone()
            out[name][mask[name]] = acc.float()
        else:
            out[name] = acc.float().reshape(base[name].shape)
    return out


def _assert_weights(got: Tensors, want: Tensors) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)


def _failed_row(path, server_round: int, reason: str) -> pd.Series:
    table = pd.read_csv(path)
    row = table[table["round"] == server_round].iloc[0]
    assert row["failures"] == 1
    assert reason in row[FAILURE_REASONS] and "\n" not in row[FAILURE_REASONS]
    assert "rejected" in row[FAILURE_REASONS]
    assert table.drop(index=row.name)[FAILURE_REASONS].isna().all()  # the other rounds
    return row


DENSE_CASES = {
    "missing-key": (arrays_changed(_without("cls_token")), "missing: 'cls_token'"),
    "extra-key": (arrays_changed(lambda s: s | {"bogus": torch.zeros(3)}), "unexpected"),
    "wrong-shape": (
        arrays_changed(lambda s: s | {"cls_token": s["cls_token"].flatten()}),
        "'cls_token' has shape (64,), expected (1, 1, 64)",
    ),
    "wrong-dtype": (
        arrays_changed(lambda s: s | {"head.bias": s["head.bias"].double()}),
        "'head.bias' has dtype float64, expected float32",
    ),
    "nan": (arrays_changed(_set("head.weight", math.nan)), "'head.weight' holds 1 non-finite"),
    "inf": (arrays_changed(_set("pos_embed", math.inf)), "'pos_embed' holds 1 non-finite"),
    "num-examples": (
        metrics_changed(lambda m: {protocol.NUM_EXAMPLES: 1_000_000}),
        "num-examples 1e+06, but partition",
    ),
    "partition-id": (
        metrics_changed(lambda m: {protocol.PARTITION_ID: (_mpid(m) + 1) % 7}),
        "but the message was sent to partition",
    ),
}


def _mpid(metrics: MetricRecord) -> int:
    return int(metrics[protocol.PARTITION_ID])


@pytest.mark.parametrize("case", list(DENSE_CASES))
def test_malformed_dense_reply_is_a_failure_and_the_rest_is_averaged(tmp_path, capsys, case):
    tamper, reason = DENSE_CASES[case]
    grid = _run(tmp_path, case, tamper, target=1)
    good = grid.good(1)
    assert len(good) == 2
    row = _failed_row(tmp_path / case / "metrics.csv", 1, reason)
    assert row["clients"] == 2 and row["num-examples"] == sum(_examples(r) for r in good)
    _assert_weights(grid.sent_in(2), expected_global(grid.sent_in(1), good, None))
    node = grid.tampered.metadata.src_node_id  # InProcessGrid: node 1000 + partition
    line = f"round 1: client failed: reply of partition {node - 1000} (node {node}) rejected: "
    assert any(x.startswith(line) and reason in x for x in capsys.readouterr().out.splitlines())


def test_too_few_wellformed_replies_resample_the_round(tmp_path):
    grid = _run(
        tmp_path,
        "retry",
        arrays_changed(_set("head.weight", math.nan)),
        target=1,
        min_train_clients=3,
        max_round_retries=2,
    )
    assert len(grid.good(1, 0)) == 2  # too few: a new sample is asked
    good = grid.good(1, 1)
    row = _failed_row(tmp_path / "retry" / "metrics.csv", 1, "non-finite")
    assert row["clients"] == 3 and row["failures"] == 1
    _assert_weights(grid.sent_in(2), expected_global(grid.sent_in(1), good, None))


def _head_only_mask(base: Tensors, reply: Message) -> dict[str, torch.Tensor]:
    names = reply.content[protocol.ARRAYS].keys()
    return {
        n: torch.zeros_like(base[n], dtype=torch.bool) for n in names if not n.startswith("head.")
    }


def test_sparse_reply_not_fitting_the_mask_is_a_failure(tmp_path):
    # rounds: 1 head warm-up, 2-3 training on the magnitude mask
    name = "blocks.0.attn.qkv.weight"
    grid = _run(tmp_path, "sparse", arrays_changed(_shorter(name)), target=2, **SPARSE)
    mask = {k: v.bool() for k, v in load_file(tmp_path / "sparse" / "mask.safetensors").items()}
    count = int(mask[name].sum())
    reason = f"'{name}' has shape ({count - 1},), expected ({count},)"
    _failed_row(tmp_path / "sparse" / "metrics.csv", 2, reason)
    good = grid.good(2)
    _assert_weights(grid.sent_in(3), expected_global(grid.sent_in(2), good, mask))


def test_warmup_reply_with_backbone_values_is_a_failure(tmp_path):
    name = "blocks.0.attn.qkv.weight"
    extra = arrays_changed(lambda s: s | {name: torch.ones(1)})  # warm-up: only the head trains
    grid = _run(tmp_path, "warmup", extra, target=1, **SPARSE)
    _failed_row(tmp_path / "warmup" / "metrics.csv", 1, f"'{name}' has shape (1,), expected (0,)")
    good, base = grid.good(1), grid.sent_in(1)
    after = grid.sent_in(2)
    _assert_weights(after, expected_global(base, good, _head_only_mask(base, good[0])))
    assert torch.equal(after[name], base[name]) and not torch.equal(
        after["head.bias"], base["head.bias"]
    )


def _negative(state: Tensors) -> Tensors:
    name = next(n for n, v in state.items() if v.numel())
    state[name].view(-1)[0] = -1.0
    return state


FISHER_CASES = {
    "not-fitting": (
        arrays_changed(_shorter("blocks.0.attn.qkv.weight"), protocol.FISHER),
        "has shape (12287,)",
    ),
    "negative": (arrays_changed(_negative, protocol.FISHER), "holds 1 negative value"),
    "nan": (arrays_changed(_set("pos_embed", math.nan), protocol.FISHER), "non-finite"),
    "num-examples": (
        metrics_changed(lambda m: {protocol.NUM_EXAMPLES: 100_000}),
        "num-examples 100000 exceeds",
    ),
}


def hand_mask(fisher_replies: list[Message], base: Tensors, sparsity: float) -> dict:
    """The mask the server must select from the example-weighted mean Fisher of ``replies``."""
    total = sum(_examples(r) for r in fisher_replies)
    vectors = [r.content[protocol.FISHER].to_torch_state_dict() for r in fisher_replies]
    fisher = {}
    for name in vectors[0]:
        acc = torch.zeros(vectors[0][name].shape, dtype=torch.float64)
        for reply, vector in zip(fisher_replies, vectors, strict=True):
            acc += vector[name].double() * (_examples(reply) / total)
        fisher[name] = acc.float().reshape(base[name].shape)  # round 1: every entry trainable
    params = {n: base[n] for n in fisher}
    scores = scores_for("least_sensitive", params, fisher, 0)
    every = {n: torch.ones_like(v, dtype=torch.bool) for n, v in params.items()}
    return select_mask(scores, density_schedule(sparsity, 1, "exponential")[0], current=every)


@pytest.mark.parametrize("case", list(FISHER_CASES))
def test_malformed_fisher_reply_is_a_failure_and_the_rest_is_averaged(tmp_path, case):
    tamper, reason = FISHER_CASES[case]
    grid = _run(tmp_path, case, tamper, target=1, **FISHER)
    good = grid.good(1)
    assert len(good) == 6  # calibration asks every client
    row = _failed_row(tmp_path / case / "calibration.csv", 1, reason)
    assert row["clients"] == 6 and row["num-examples"] == sum(_examples(r) for r in good)
    mask = {k: v.bool() for k, v in load_file(tmp_path / case / "mask.safetensors").items()}
    want = hand_mask(good, grid.sent_in(1), 0.9)
    assert mask.keys() == want.keys() and all(torch.equal(mask[n], want[n]) for n in want)


# ---- the pure checks -----------------------------------------------------------------------
LAYOUT = {
    "w": TensorSpec((2, 3), torch.float32),
    "n": TensorSpec((1,), torch.int64),
    "head.weight": TensorSpec((4,), torch.float32),
}


def _state() -> Tensors:
    return {"w": torch.ones(2, 3), "n": torch.tensor([3]), "head.weight": torch.zeros(4)}


def test_layouts_from_metadata_the_mask_and_the_head():
    arrays = ArrayRecord(_state())
    assert dense_layout(arrays) == LAYOUT
    mask = {"w": torch.tensor([[True, False, True], [False, False, False]])}
    assert masked_layout(mask, {"w": torch.float32}) == {"w": TensorSpec((2,), torch.float32)}
    assert masked_layout({"w": torch.zeros(2, 3, dtype=torch.bool)}, {"w": torch.float16}) == {
        "w": TensorSpec((0,), torch.float16)
    }
    assert head_layout(LAYOUT) == {"head.weight": LAYOUT["head.weight"]}


def test_names_problem_reports_missing_before_extra_and_names_a_few():
    assert names_problem(["w", "n", "head.weight"], LAYOUT) == ""
    assert names_problem(["n", "head.weight"], LAYOUT) == "1 tensor(s) missing: 'w'"
    assert names_problem([*LAYOUT, "x"], LAYOUT) == "1 unexpected tensor(s): 'x'"
    many = names_problem([*LAYOUT, "a", "b", "c", "d", "e"], LAYOUT)
    assert many == "5 unexpected tensor(s): 'a', 'b', 'c' and 2 more"


@pytest.mark.parametrize(
    ("tensor", "nonnegative", "reason"),
    [
        (torch.ones(2, 3), False, ""),
        (torch.ones(3, 2), False, "tensor 'w' has shape (3, 2), expected (2, 3)"),
        (torch.ones(2, 3, dtype=torch.float64), False, "has dtype float64, expected float32"),
        (torch.tensor([[1.0, math.nan, 1.0], [1, 1, 1]]), False, "holds 1 non-finite value"),
        (torch.tensor([[1.0, math.inf, -math.inf], [1, 1, 1]]), False, "holds 2 non-finite"),
        (torch.tensor([[1.0, -1.0, 0.0], [1, 1, 1]]), False, ""),
        (torch.tensor([[1.0, -1.0, 0.0], [1, 1, 1]]), True, "holds 1 negative value(s)"),
        (torch.tensor([[1.0, -0.0, 0.0], [1, 1, 1]]), True, ""),
    ],
)
def test_tensor_problem(tensor, nonnegative, reason):
    got = tensor_problem("w", tensor, LAYOUT["w"], nonnegative)
    assert (reason in got and got != "") if reason else got == ""


def test_non_finite_counts_exactly_even_when_the_sum_overflows():
    assert non_finite(torch.tensor([3e38, 3e38])) == 0  # the sum is inf, the entries are not
    assert non_finite(torch.tensor([60000.0, 60000.0], dtype=torch.float16)) == 0
    assert non_finite(torch.tensor([math.inf, -math.inf, math.nan, 1.0])) == 3
    assert non_finite(torch.tensor([1, 2])) == 0 and non_finite(torch.zeros(0)) == 0


def test_state_problem_and_checked_state_agree():
    state = _state()
    assert state_problem(state, LAYOUT) == ""
    decoded, problem = checked_tensors(ArrayRecord(state), LAYOUT)
    assert problem == "" and list(decoded) == list(LAYOUT)
    assert all(torch.equal(decoded[k], state[k]) for k in state)
    bad = state | {"w": torch.full((2, 3), math.nan)}
    assert "non-finite" in state_problem(bad, LAYOUT)
    assert checked_tensors(ArrayRecord(bad), LAYOUT)[0] == {}
    reordered = ArrayRecord({k: state[k] for k in reversed(list(state))})
    assert list(checked_tensors(reordered, LAYOUT)[0]) == list(LAYOUT)  # the layout's order


def test_checked_state_rejects_bytes_that_do_not_decode():
    record = ArrayRecord(_state())
    record["w"] = Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=b"garbage")
    state, problem = checked_tensors(record, LAYOUT)
    assert state == {} and problem.startswith("tensor 'w' cannot be decoded (")
    lying = ArrayRecord(_state() | {"w": torch.ones(6)})
    lying["w"].shape = (2, 3)  # metadata that lies about the data: the data decides
    assert "has shape (6,), expected (2, 3)" in checked_tensors(lying, LAYOUT)[1]


def _metrics(**values) -> MetricRecord:
    base = {protocol.PARTITION_ID: 2, protocol.NUM_EXAMPLES: 450, protocol.TRAIN_LOSS: 1.5}
    return MetricRecord(base | {k.replace("_", "-"): v for k, v in values.items()})


@pytest.mark.parametrize(
    ("metrics", "reason"),
    [
        (_metrics(), ""),
        (_metrics(num_examples=450.0), ""),
        (None, "no 'metrics' record"),
        (_metrics(partition_id=3), "partition-id 3, but the message was sent to partition 2"),
        (_metrics(partition_id=[2]), "partition-id [2]"),
        (_metrics(num_examples=451), "num-examples 451, but partition 2 holds 450"),
        (_metrics(num_examples=-450), "num-examples -450 is not a count > 0"),
        (_metrics(num_examples=math.nan), "is not a count > 0"),
        (_metrics(train_loss=math.inf), "train-loss inf is not a finite number"),
        (_metrics(client_seconds=[1.0]), "client-seconds [1.0] is not a number"),
        (_metrics(worker_pid=4242, ray_gpu_ids=[0], cuda_visible_devices=[0, -1]), ""),
        (_metrics(ray_gpu_ids=[], cuda_device_count=0), ""),  # a worker given no GPU
        (_metrics(ray_gpu_ids=[0.5]), "ray-gpu-ids [0.5] is not a list of integers"),
        (_metrics(cuda_visible_devices=1), "cuda-visible-devices 1 is not a list of integers"),
        (_metrics(worker_pid=[1]), "worker-pid [1] is not an integer"),
        (_metrics(cuda_device_count=1.0), "cuda-device-count 1.0 is not an integer"),
    ],
)
def test_train_metrics_problem(metrics, reason):
    got = train_metrics_problem(metrics, 2, 450)
    assert (reason in got and got != "") if reason else got == ""


def test_train_metrics_without_a_known_node_or_shard():
    assert "no known partition" in train_metrics_problem(_metrics(), None, None)
    assert train_metrics_problem(_metrics(num_examples=10**6), 2, None) == ""  # shard unknown
    metrics = MetricRecord({protocol.PARTITION_ID: 2, protocol.NUM_EXAMPLES: 450})
    assert "train-loss None" in train_metrics_problem(metrics, 2, 450)


@pytest.mark.parametrize(
    ("examples", "limit", "reason"),
    [
        (16, 16, ""),
        (3, 16, ""),
        (17, 16, "num-examples 17 exceeds 16"),
        (0, 16, "is not a count > 0"),
        (10**6, None, ""),
    ],
)
def test_fisher_metrics_problem(examples, limit, reason):
    metrics = MetricRecord({protocol.PARTITION_ID: 2, protocol.NUM_EXAMPLES: examples})
    got = fisher_metrics_problem(metrics, 2, limit)
    assert (reason in got and got != "") if reason else got == ""


# ---- the round driver ----------------------------------------------------------------------
class ReplyingGrid(PushPull):
    """Partition 2 fails with a Flower error; the others answer."""

    def send_and_receive(self, messages: list[Message], timeout=None) -> list[Message]:
        out = []
        for m in messages:
            pid = int(m.content["config"]["pid"])
            if pid == 2:
                out.append(Message(Error(code=0, reason="boom\non two lines"), reply_to=m))
                continue
            metrics = MetricRecord({protocol.PARTITION_ID: pid, protocol.NUM_EXAMPLES: 1})
            out.append(Message(RecordDict({protocol.METRICS: metrics}), reply_to=m))
        return out


def test_send_with_retries_counts_rejected_replies_as_failures(identity):
    record, failed = RoundRecord(RoundClock([Phase(TRAIN, 1)]).position(1)), []
    messages = [
        Message(
            RecordDict({"config": ConfigRecord({"pid": p})}),
            dst_node_id=10 + p,
            message_type=protocol.TRAIN,
        )
        for p in (0, 1, 2, 3)
    ]

    def check(reply: Message) -> CheckedReply | str:
        return "odd partition" if _pid(reply) % 2 else CheckedReply(reply, {})

    grid, policy = ReplyingGrid(), RetryPolicy(1)
    replies = send_with_retries(grid, lambda a: messages, policy, record, failed.append, check)
    assert [r.partition for r in replies] == [0] and failed == [11, 12, 13]
    assert record.failure_reasons == ["odd partition", "boom on two lines", "odd partition"]
    assert record.get("clients") == 1 and record.get("failures") == 3
    row = record.row()
    assert row[FAILURE_REASONS] == "odd partition; boom on two lines; odd partition"
    assert FAILURE_REASONS not in RoundRecord(record.position).row()  # no failure, no column
