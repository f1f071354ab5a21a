"""Interference of client updates: hand-computed values, and the strategies' rows."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from strategies import protocol
from strategies.fedavg import OrderedFedAvg
from strategies.interference import interference_metrics, split_interference, update_gram
from strategies.plan import TRAIN, Phase, RoundClock
from strategies.record import RoundRecord
from strategies.rounds import CheckedReply
from strategies.sparse_codec import gather_masked
from strategies.sparse_fedavg import SparseFedAvg


def _u(x: float, y: float) -> dict[str, torch.Tensor]:
    """A 2-D update split over two tensors, plus an integer buffer that must be ignored."""
    return {"a": torch.tensor([float(x)]), "b": torch.tensor([[float(y)]]), "n": torch.tensor([7])}


def test_three_updates_against_hand_computed_values():
    updates = [_u(3, 4), _u(4, 3), _u(0, -2)]
    out = interference_metrics(updates, [1, 1, 2])
    # cosines: (3,4).(4,3)=24/25, (3,4).(0,-2)=-8/10, (4,3).(0,-2)=-6/10
    assert out["update-cosine"] == pytest.approx((0.96 - 0.8 - 0.6) / 3)
    # weights 1/4, 1/4, 1/2: aggregate (1.75, 0.75); mean norm (5 + 5 + 2) / 3 = 4
    assert out["update-norm-ratio"] == pytest.approx(math.sqrt(1.75**2 + 0.75**2) / 4)
    assert out["update-norm"] == pytest.approx(4.0)
    assert update_gram(updates).tolist() == [[25, 24, -8], [24, 25, -6], [-8, -6, 4]]


@pytest.mark.parametrize(
    ("second", "cosine", "ratio"),
    [((1, 0), 1.0, 1.0), ((0, 1), 0.0, math.sqrt(0.5)), ((-1, 0), -1.0, 0.0)],
    ids=["aligned", "orthogonal", "opposite"],
)
def test_two_unit_updates(second, cosine, ratio):
    out = interference_metrics([_u(1, 0), _u(*second)], [5, 5])
    assert out["update-cosine"] == pytest.approx(cosine, abs=1e-12)
    assert out["update-norm-ratio"] == pytest.approx(ratio, abs=1e-12)


def test_degenerate_cases_are_nan_not_errors():
    single = interference_metrics([_u(1, 2)], [3])
    assert math.isnan(single["update-cosine"]) and single["update-norm-ratio"] == 1.0
    zeros = interference_metrics([_u(0, 0), _u(0, 0)], [1, 1])
    assert math.isnan(zeros["update-cosine"]) and math.isnan(zeros["update-norm-ratio"])
    with pytest.raises(ValueError, match="one weight per update"):
        interference_metrics([_u(1, 0)], [1, 2])


def _strategy(cls, **extra):
    return cls(
        partition_to_node={0: 10, 1: 11},
        clients_per_round=2,
        seed=0,
        clock=RoundClock([Phase(TRAIN, 1)]),
        lr_at=lambda r: 0.1,
        **extra,
    )


def _replies(states: list[dict[str, torch.Tensor]], sizes: list[int]) -> list[CheckedReply]:
    """Training replies of partitions 0, 1, ... holding ``states`` and ``sizes`` examples."""
    out = []
    for pid, (state, size) in enumerate(zip(states, sizes, strict=True)):
        metrics = MetricRecord(
            {protocol.NUM_EXAMPLES: size, protocol.PARTITION_ID: pid, protocol.TRAIN_LOSS: 1.0}
        )
        content = RecordDict({protocol.ARRAYS: ArrayRecord(state), protocol.METRICS: metrics})
        out.append(CheckedReply(Message(content, reply_to=_sent()), dict(state)))
    return out


def _sent() -> Message:
    return Message(RecordDict(), dst_node_id=10, message_type=protocol.TRAIN)


def _record() -> RoundRecord:
    return RoundRecord(RoundClock([Phase(TRAIN, 1)]).position(1))


def test_dense_strategy_records_the_metrics_of_client_minus_global(identity):
    glob = {"w": torch.tensor([[1.0, 1.0]]), "steps": torch.tensor([3])}
    clients = [
        {"w": torch.tensor([[4.0, 5.0]]), "steps": torch.tensor([3])},  # update (3, 4)
        {"w": torch.tensor([[5.0, 4.0]]), "steps": torch.tensor([3])},  # update (4, 3)
    ]
    record = _record()
    _strategy(OrderedFedAvg).aggregate_round(ArrayRecord(glob), _replies(clients, [1, 3]), record)
    assert record.get("update-cosine") == pytest.approx(0.96)
    agg = math.hypot(0.25 * 3 + 0.75 * 4, 0.25 * 4 + 0.75 * 3)
    assert record.get("update-norm-ratio") == pytest.approx(agg / 5)
    assert record.get("head-update-cosine") is None  # no head tensor in these updates

    quiet = _record()
    _strategy(OrderedFedAvg, update_metrics=False).aggregate_round(
        ArrayRecord(glob), _replies(clients, [1, 3]), quiet
    )
    assert quiet.get("update-cosine") is None and quiet.get("train-loss") == 1.0


def test_sparse_strategy_measures_updates_on_the_trained_entries_only(identity):
    glob = {"w": torch.tensor([[1.0, 2.0, 3.0]]), "head.b": torch.tensor([0.0])}
    mask = {"w": torch.tensor([[True, False, True]])}
    strategy = _strategy(
        SparseFedAvg,
        eligible=["w"],
        head_mode="train",
        sparsity=0.5,
        mask_strategy="random",
        calibration_schedule="linear",
        calibration_clients=2,
        fisher_config={},
        warmup_lr=0.1,
    )
    strategy.set_mask(mask)
    # clients send the masked entries of w (1 and 3 -> 4 and 3) and the whole head
    sent = [
        gather_masked({"w": torch.tensor([[4.0, 2.0, 3.0]])}, mask)
        | {"head.b": torch.tensor([4.0])},
        gather_masked({"w": torch.tensor([[1.0, 2.0, -1.0]])}, mask) | {"head.b": torch.zeros(1)},
    ]
    record = _record()
    out = strategy.aggregate_round(ArrayRecord(glob), _replies(sent, [1, 1]), record)
    # backbone updates (3, 0) and (0, -4) over (w[0], w[2]): norms 3 and 4, orthogonal
    assert record.get("update-cosine") == pytest.approx(0.0)
    assert record.get("update-norm") == pytest.approx(3.5)
    assert record.get("update-norm-ratio") == pytest.approx(2.5 / 3.5)  # |(1.5, -2)| = 2.5
    # the head apart: updates 4 and 0 (a zero update has no cosine)
    assert math.isnan(record.get("head-update-cosine"))
    assert record.get("head-update-norm") == pytest.approx(2.0)
    assert record.get("head-update-norm-ratio") == pytest.approx(2.0 / 2.0)
    assert out.to_torch_state_dict()["w"].tolist() == [[2.5, 2.0, 1.0]]


def test_dense_updates_are_split_into_backbone_and_head():
    updates = [
        {"blocks.w": torch.tensor([1.0, 0.0]), "head.weight": torch.tensor([2.0])},
        {"blocks.w": torch.tensor([0.0, 1.0]), "head.weight": torch.tensor([2.0])},
    ]
    out = split_interference(updates, [1.0, 1.0])
    assert out["update-cosine"] == pytest.approx(0.0)  # the backbone parts are orthogonal
    assert out["update-norm-ratio"] == pytest.approx(math.sqrt(0.5))
    assert out["head-update-cosine"] == pytest.approx(1.0)  # the heads agree
    assert out["head-update-norm"] == pytest.approx(2.0)
