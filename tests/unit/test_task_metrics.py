"""Task-arithmetic interference of a round, on a case computed by hand.

A linear model with 3 classes (logits = W x + b; W is the masked "body", b the head) and
6 validation examples, 2 a class. The round sends w; client A (partition 0, classes 0,0,0,1:
p_A = (3/4, 1/4, 0), 4 examples) and client B (partition 1, classes 1,2: p_B = (0, 1/2,
1/2), 2 examples) return their models; FedAvg weights them 4:2.

    w:      W = [[1, 0], [0, 1], [0, 0]], b = (0, 0, 0.5)
    w+t_A:  W00 = 4.5, W11 = 3                      (body entries only)
    w+t_B:  W11 = 0.4, b2 = 0.8                     (a body entry and the head)
    w+t:    W00 = 20/6, W11 = 12.8/6, b2 = 3.6/6    (the example-weighted mean)

    example  x         y | w  w+t_A  w+t_B  w+t
    0        (1, 0)    0 | 0  0      0      0
    1        (0.2, 0)  0 | 2  0      2      0
    2        (0, 1)    1 | 1  1      2      1
    3        (0, 0.2)  1 | 2  1      2      2
    4        (0, 0)    2 | 2  2      2      2
    5        (0.7, 0)  2 | 0  0      2      0

Per class (c0, c1, c2), accuracy: w (1/2, 1/2, 1/2), w+t_A (1, 1, 1/2), w+t_B (1/2, 0, 1),
w+t (1, 1/2, 1/2). Under p_A: acc(w) = 1/2, acc(w+t_A) = 1, acc(w+t) = 7/8, so normalized
accuracy 7/8 and retained gain (7/8 - 1/2) / (1 - 1/2) = 3/4; A and w+t disagree on example 3
only: (0, 1/2, 0) per class, 1/8 under p_A. Under p_B: acc(w) = acc(w+t_B) = acc(w+t) = 1/2:
normalized accuracy 1, own gain 0 (not positive: counted apart); B and w+t disagree on
examples 1, 2 and 5: (1/2, 1/2, 1/2), 1/2 under p_B. The round: normalized accuracy
(7/8 + 1) / 2 = 15/16, retained gain 3/4 (A alone), one client without a positive gain,
disagreement (1/8 + 1/2) / 2 = 5/16.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from torch import nn

from clients.training import predict
from flower_app.data.sources import ImageSplit
from flower_app.runs.task_metrics import (
    ClientScores,
    TaskInterference,
    TaskRounds,
    label_shares,
    round_metrics,
    stratified_subset,
)
from strategies import protocol
from strategies.fedavg import OrderedFedAvg
from strategies.plan import CALIBRATION, HEAD_WARMUP, TRAIN, Phase, RoundClock, RoundPosition
from strategies.record import RoundRecord, TaskModels
from strategies.rounds import CheckedReply
from strategies.sparse_codec import gather_masked
from strategies.sparse_fedavg import SparseFedAvg

# x as uint8 "images" (N, 3, 1, 1): 10 x in the first two channels (ImageSplit's form)
IMAGES = torch.tensor([[10, 0], [2, 0], [0, 10], [0, 2], [0, 0], [7, 0]], dtype=torch.uint8)
IMAGES = torch.cat([IMAGES, torch.zeros(6, 1, dtype=torch.uint8)], dim=1).view(6, 3, 1, 1)
LABELS = torch.tensor([0, 0, 1, 1, 2, 2])
SUBSET = ImageSplit(IMAGES, LABELS)
PARTITIONS = [  # what the partition query reports
    {protocol.PARTITION_ID: 0, protocol.CLASSES: [0, 1], protocol.CLASS_COUNTS: [3, 1]},
    {protocol.PARTITION_ID: 1, protocol.CLASSES: [1, 2], protocol.CLASS_COUNTS: [1, 1]},
]
EXPECTED = {
    "task-normalized-accuracy": 15 / 16,
    "task-retained-gain": 3 / 4,
    "task-nonpositive-gain-clients": 1.0,
    "task-disagreement": 5 / 16,
    "task-accuracy-base": 1 / 2,
    "task-accuracy-own": 3 / 4,  # (1 + 1/2) / 2
    "task-accuracy-merged": 11 / 16,  # (7/8 + 1/2) / 2
}


class Linear(nn.Module):
    """logits = W x + b, with W as "body.weight" (maskable) and b as the head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(2, 3, bias=False)
        self.head = nn.ParameterDict({"bias": nn.Parameter(torch.zeros(3))})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.head["bias"]


def _weights(w00: float = 1.0, w11: float = 1.0, b2: float = 0.5) -> dict[str, torch.Tensor]:
    body = torch.tensor([[w00, 0.0], [0.0, w11], [0.0, 0.0]])
    return {"body.weight": body, "head.bias": torch.tensor([0.0, 0.0, b2])}


SENT = _weights()
CLIENT_A = _weights(w00=4.5, w11=3.0)
CLIENT_B = _weights(w11=0.4, b2=0.8)
MASK = {"body.weight": torch.tensor([[True, False], [False, True], [False, False]])}


def features(images: torch.Tensor, train: bool, generator: torch.Generator | None):
    """The linear model's input x from the uint8 images (the app's preprocess step)."""
    return images.flatten(1)[:, :2].float() / 10


def _predictor():
    model = Linear()

    def predictions(state, split: ImageSplit) -> torch.Tensor:
        model.load_state_dict(state, strict=True)
        return predict(model, split.images, 4, features)  # 2 batches of the 6

    return predictions


def _strategy(sparse: bool, phase: str = TRAIN) -> OrderedFedAvg:
    common = {
        "partition_to_node": {0: 100, 1: 101},
        "clients_per_round": 2,
        "seed": 0,
        "clock": RoundClock([Phase(phase, 1)]),
        "lr_at": lambda r: 0.1,
        "task_rounds": TaskRounds(1),
    }
    if not sparse:
        return OrderedFedAvg(**common)
    strategy = SparseFedAvg(
        eligible=["body.weight"],
        head_mode="train",
        sparsity=0.5,
        mask_strategy="random",
        calibration_schedule="exponential",
        calibration_clients=2,
        fisher_config={},
        warmup_lr=0.1,
        **common,
    )
    strategy.set_mask(MASK)
    return strategy


def _reply(sent: Message, pid: int, examples: int, tensors: dict) -> CheckedReply:
    metrics = {protocol.NUM_EXAMPLES: examples, protocol.PARTITION_ID: pid, protocol.TRAIN_LOSS: 1}
    content = RecordDict(
        {protocol.ARRAYS: ArrayRecord(tensors), protocol.METRICS: MetricRecord(metrics)}
    )
    return CheckedReply(Message(content, reply_to=sent), dict(tensors))


def _round(strategy: OrderedFedAvg, replies: list[dict], phase: str = TRAIN):
    """One aggregation of ``replies`` (A's and B's tensors as the wire carries them)."""
    base = ArrayRecord(SENT)
    sent = strategy.train_messages(RoundPosition(1, phase, 1, 1), base, 0)
    messages = [_reply(sent[k], k, (4, 2)[k], replies[k]) for k in (0, 1)]
    record = RoundRecord(RoundPosition(1, phase, 1, 1))
    return strategy.aggregate_round(base, messages, record), record


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_the_three_metrics_of_a_round_computed_by_hand(identity, sparse):
    """Dense replies hold every tensor; sparse ones the mask's two body entries and the
    head, which the strategy scatters into the sent weights: the same client models."""
    strategy = _strategy(sparse)
    replies = [CLIENT_A, CLIENT_B]
    if sparse:
        replies = [gather_masked(s, MASK) | {"head.bias": s["head.bias"]} for s in replies]
        values = torch.stack([r["body.weight"] for r in replies])
        assert torch.equal(values, torch.tensor([[4.5, 3.0], [1.0, 0.4]]))  # W00, W11
    merged, record = _round(strategy, replies)
    expected_merged = _weights(w00=20 / 6, w11=12.8 / 6, b2=3.6 / 6)
    for name, value in merged.to_torch_state_dict().items():
        torch.testing.assert_close(value, expected_merged[name])
    models = record.task_models
    assert [c.partition_id for c in models.clients] == [0, 1]
    for client, own in zip(models.clients, (CLIENT_A, CLIENT_B), strict=True):
        for name, value in client.state().items():
            torch.testing.assert_close(value, own[name], rtol=0, atol=0)
    hook = TaskInterference(_predictor(), SUBSET, label_shares(PARTITIONS, 3), 3)
    watched = weakref.ref(models.clients[0])
    del models
    hook(record, merged)
    assert record.task_models is None
    gc.collect()
    assert watched() is None  # no client model outlives the hook
    got = {k: v for k, v in record.values.items() if k.startswith("task-")}
    assert got == pytest.approx(EXPECTED, abs=1e-12)
    assert record.values["seconds-task-metrics"] >= 0.0


def test_a_client_runs_only_on_the_examples_of_its_classes(identity):
    """Client B holds classes 1 and 2: its model sees examples 2..5 only, A's all six (it
    holds classes 0 and 1 of 3, so 4 of 6); w and w + t see all six."""
    seen = []
    predictions = _predictor()

    def counting(state, split):
        seen.append(len(split.labels))
        return predictions(state, split)

    _, record = _round(_strategy(False), [CLIENT_A, CLIENT_B])
    hook = TaskInterference(counting, SUBSET, label_shares(PARTITIONS, 3), 3)
    hook(record, ArrayRecord(SENT))
    assert seen == [6, 6, 4, 4]  # w, w + t, then A (classes 0, 1) and B (classes 1, 2)


def test_the_previous_rounds_merged_predictions_serve_as_the_next_base(identity):
    """With every round measured, round r's w is round r-1's w + t (the same tensors): its
    predictions are reused, not recomputed; any other weights are predicted anew."""
    calls = []
    predictions = _predictor()

    def counting(state, split):
        calls.append(state)
        return predictions(state, split)

    hook = TaskInterference(counting, SUBSET, label_shares(PARTITIONS, 3), 3, reuse_base=True)
    strategy = _strategy(False)
    merged, record = _round(strategy, [CLIENT_A, CLIENT_B])
    hook(record, merged)
    first = dict(record.values)
    merged_state = strategy.tensors_of(merged)
    assert calls[1] is merged_state
    # the next round starts from exactly those weights: w is not predicted again
    record = RoundRecord(RoundPosition(2, TRAIN, 2, 2))
    record.task_models = TaskModels(merged_state, SENT, [])
    calls.clear()
    hook(record, merged)
    assert calls == [SENT]  # only w + t; w came from the last round
    assert first["task-accuracy-merged"] == pytest.approx(11 / 16)


def test_round_metrics_leave_out_what_is_undefined():
    scores = [
        ClientScores(base=0.5, own=0.0, merged=0.25, disagreement=0.5),  # no own accuracy
        ClientScores(base=0.5, own=0.5 + 1e-12, merged=0.5, disagreement=0.0),  # gain ~ 0
        ClientScores(base=0.2, own=0.6, merged=0.4, disagreement=0.25),
    ]
    got = round_metrics(scores)
    assert got["task-normalized-accuracy"] == pytest.approx((0.5 / (0.5 + 1e-12) + 0.4 / 0.6) / 2)
    assert got["task-retained-gain"] == pytest.approx(0.5)  # (0.4 - 0.2) / (0.6 - 0.2)
    assert got["task-nonpositive-gain-clients"] == 2.0  # gain -0.5 and a float's 1e-12
    assert got["task-disagreement"] == pytest.approx(0.25)
    none_gain = round_metrics([ClientScores(0.5, 0.5, 0.5, 0.0)])
    assert none_gain["task-nonpositive-gain-clients"] == 1.0
    assert none_gain["task-retained-gain"] != none_gain["task-retained-gain"]  # NaN


def test_rounds_are_measured_at_the_cadence_and_at_each_phases_end():
    due = TaskRounds(3)
    rounds = [p for p in range(1, 8) if due(RoundPosition(10 + p, TRAIN, p, 7))]
    assert rounds == [3, 6, 7]
    assert due(RoundPosition(2, HEAD_WARMUP, 2, 2))  # the warm-up's last round (head only)
    assert not due(RoundPosition(1, HEAD_WARMUP, 1, 2))
    assert not due(RoundPosition(4, CALIBRATION, 2, 2))  # calibration sends no update
    assert not due(RoundPosition(0, "initial", 0, 0))


def test_the_strategy_puts_models_on_due_rounds_only(identity):
    strategy = _strategy(False)
    strategy.task_rounds = TaskRounds(2)
    base = ArrayRecord(SENT)
    sent = strategy.train_messages(RoundPosition(1, TRAIN, 1, 3), base, 0)
    messages = [_reply(sent[k], k, (4, 2)[k], (CLIENT_A, CLIENT_B)[k]) for k in (0, 1)]
    record = RoundRecord(RoundPosition(1, TRAIN, 1, 3))
    strategy.aggregate_round(base, messages, record)
    assert record.task_models is None
    record = RoundRecord(RoundPosition(2, TRAIN, 2, 3))
    strategy.aggregate_round(base, messages, record)
    assert record.task_models is not None and len(record.task_models.clients) == 2


def test_a_head_warmup_client_model_is_the_sent_body_with_its_head(identity):
    """In warm-up the mask is all False: a reply holds no body entry, only the head."""
    strategy = _strategy(True, HEAD_WARMUP)
    strategy.set_mask({"body.weight": torch.zeros(3, 2, dtype=torch.bool)})
    replies = [
        {"body.weight": torch.zeros(0), "head.bias": s["head.bias"]} for s in (CLIENT_A, CLIENT_B)
    ]
    _, record = _round(strategy, replies, HEAD_WARMUP)
    state = record.task_models.clients[1].state()
    assert torch.equal(state["body.weight"], SENT["body.weight"])
    assert torch.equal(state["head.bias"], CLIENT_B["head.bias"])


def test_the_subset_is_stratified_seeded_and_at_most_the_budget():
    labels = torch.arange(10).repeat_interleave(torch.tensor([5, 5, 5, 5, 5, 5, 5, 5, 5, 2]))
    chosen = stratified_subset(labels, 35, 10, seed=7)
    counts = torch.bincount(labels[chosen], minlength=10).tolist()
    assert counts == [3] * 9 + [2]  # 35 // 10 = 3 a class; class 9 has only 2
    assert chosen.tolist() == sorted(set(chosen.tolist()))
    assert torch.equal(chosen, stratified_subset(labels, 35, 10, seed=7))
    assert not torch.equal(chosen, stratified_subset(labels, 35, 10, seed=8))
    assert len(stratified_subset(labels, 1000, 10, seed=7)) == len(labels)


def test_label_shares_come_from_the_partition_query():
    shares = label_shares(PARTITIONS, 3)
    assert shares[0].tolist() == [0.75, 0.25, 0.0]
    assert shares[1].tolist() == [0.0, 0.5, 0.5]
