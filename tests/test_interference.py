"""Interference of client updates: hand-computed values, and the strategies' rows."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from strategies import protocol
from strategies.fedavg import OrderedFedAvg
from strategies.interference import interference_metrics, update_gram
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
        lr_at=lambda r: 0.1,
        num_rounds=1,
        eval_every=1,
        **extra,
    )


def _content(state: dict[str, torch.Tensor]) -> RecordDict:
    return RecordDict({protocol.ARRAYS: ArrayRecord(state)})


def test_dense_strategy_logs_the_metrics_of_client_minus_global():
    glob = {"w": torch.tensor([[1.0, 1.0]]), "steps": torch.tensor([3])}
    clients = [
        {"w": torch.tensor([[4.0, 5.0]]), "steps": torch.tensor([3])},  # update (3, 4)
        {"w": torch.tensor([[5.0, 4.0]]), "steps": torch.tensor([3])},  # update (4, 3)
    ]
    strategy = _strategy(OrderedFedAvg)
    strategy._pending = (None, ArrayRecord(glob), ConfigRecord())
    strategy.aggregate_arrays(1, [_content(c) for c in clients], [1.0, 3.0])
    assert strategy._row["update-cosine"] == pytest.approx(0.96)
    agg = math.hypot(0.25 * 3 + 0.75 * 4, 0.25 * 4 + 0.75 * 3)
    assert strategy._row["update-norm-ratio"] == pytest.approx(agg / 5)

    quiet = _strategy(OrderedFedAvg, update_metrics=False)
    quiet._pending = strategy._pending
    quiet.aggregate_arrays(1, [_content(c) for c in clients], [1.0, 3.0])
    assert "update-cosine" not in quiet._row


def test_sparse_strategy_measures_updates_on_the_trained_entries_only():
    glob = {"w": torch.tensor([[1.0, 2.0, 3.0]]), "head": torch.tensor([0.0])}
    mask = {"w": torch.tensor([[True, False, True]])}
    strategy = _strategy(
        SparseFedAvg,
        eligible=["w"],
        head_mode="train",
        head_warmup_rounds=0,
        sparsity=0.5,
        mask_strategy="random",
        calibration_rounds=1,
        calibration_schedule="linear",
        calibration_clients=2,
        fisher_config={},
        warmup_lr=0.1,
    )
    strategy.mask, strategy._global = mask, glob
    strategy._pending = (None, ArrayRecord(glob), ConfigRecord())
    # clients send the masked entries of w (1 and 3 -> 4 and 3) and the whole head
    sent = [
        gather_masked({"w": torch.tensor([[4.0, 2.0, 3.0]])}, mask) | {"head": torch.tensor([4.0])},
        gather_masked({"w": torch.tensor([[1.0, 2.0, -1.0]])}, mask) | {"head": torch.zeros(1)},
    ]
    out = strategy.aggregate_arrays(1, [_content(s) for s in sent], [1.0, 1.0])
    # updates (3, 0, 4) and (0, -4, 0) over (w[0], w[2], head): norms 5 and 4
    assert strategy._row["update-cosine"] == pytest.approx(0.0)
    assert strategy._row["update-norm"] == pytest.approx(4.5)
    aggregated = math.sqrt(1.5**2 + 2**2 + 2**2)  # (1.5, -2, 2)
    assert strategy._row["update-norm-ratio"] == pytest.approx(aggregated / 4.5)
    assert out.to_torch_state_dict()["w"].tolist() == [[2.5, 2.0, 1.0]]
