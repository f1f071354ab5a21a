"""FedAvg deciding and aggregating: a weighted average in a fixed order, and seeded sampling."""

from __future__ import annotations

import math

import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from strategies import interference, protocol
from strategies.fedavg import OrderedFedAvg, weighted_average
from strategies.interference import SplitGram, split_interference
from strategies.plan import TRAIN, Phase, RoundClock
from strategies.record import RoundRecord
from strategies.rounds import CheckedReply
from strategies.seeds import derive_seed, sample_partitions
from strategies.sparse_codec import gather_masked
from strategies.sparse_fedavg import SparseFedAvg


def _states(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g)} for _ in range(3)
    ]


def test_weighted_average_equals_hand_computed():
    states, weights = _states(), [10.0, 30.0, 60.0]
    out = weighted_average(states, weights)
    for key in ("w", "b"):
        expected = 0.1 * states[0][key] + 0.3 * states[1][key] + 0.6 * states[2][key]
        torch.testing.assert_close(out[key], expected, rtol=1e-6, atol=1e-7)


def test_weighted_average_keeps_integer_buffers_and_dtype():
    states = [{"n": torch.tensor([3]), "h": torch.ones(2, dtype=torch.float16) * k} for k in (1, 3)]
    out = weighted_average(states, [1.0, 1.0])
    assert out["n"].dtype == torch.int64 and int(out["n"]) == 3
    assert out["h"].dtype == torch.float16 and torch.equal(out["h"], torch.full((2,), 2.0).half())


def _reply(pid: int, n: int, state, sent: Message) -> Message:
    content = RecordDict(
        {
            protocol.ARRAYS: ArrayRecord(state),
            protocol.METRICS: MetricRecord(
                {protocol.NUM_EXAMPLES: n, protocol.PARTITION_ID: pid, protocol.TRAIN_LOSS: pid}
            ),
        }
    )
    return Message(content, reply_to=sent)


def _strategy(rounds: int = 2) -> OrderedFedAvg:
    return OrderedFedAvg(
        partition_to_node={i: 100 + i for i in range(3)},
        clients_per_round=3,
        seed=0,
        clock=RoundClock([Phase(TRAIN, rounds)]),
        lr_at=lambda r: 0.1 / r,
    )


def test_a_round_aggregates_its_checked_replies_the_same_in_any_order(identity):
    """Configure, check each reply, aggregate: the example-weighted mean of what the
    clients hold and of their losses, bit for bit the same whichever order replies came."""
    states, sizes = _states(1), [5, 7, 11]
    strategy, arrays = _strategy(), ArrayRecord(states[0])
    position, record = strategy.clock.position(1), RoundRecord(strategy.clock.position(1))
    request = strategy.configure(position, arrays, record)
    msgs = request.build(0)
    checked = [request.check(_reply(i, sizes[i], states[i], msgs[i])) for i in range(3)]
    assert all(isinstance(c, CheckedReply) for c in checked)
    forward = strategy.aggregate(position, arrays, checked, record).to_torch_state_dict()
    backward = strategy.aggregate(position, arrays, checked[::-1], RoundRecord(position))
    expected = weighted_average(states, [float(s) for s in sizes])
    for key in expected:
        assert torch.equal(forward[key], backward.to_torch_state_dict()[key])
        torch.testing.assert_close(forward[key], expected[key])
    assert record.get(protocol.NUM_EXAMPLES) == 23 and record.get("lr") == 0.1
    assert record.get(protocol.TRAIN_LOSS) == (0 * 5 + 1 * 7 + 2 * 11) / 23


def test_training_messages_carry_the_global_round_the_lr_and_the_attempt(identity):
    strategy = _strategy(rounds=4)
    arrays, position = ArrayRecord(_states()[0]), strategy.clock.position(3)
    messages = strategy.configure(position, arrays, RoundRecord(position)).build(2)
    assert [m.metadata.dst_node_id for m in messages] == [100, 101, 102]
    config = messages[0].content[protocol.CONFIG]
    assert config[protocol.SERVER_ROUND] == 3 and config[protocol.ATTEMPT] == 2
    assert config[protocol.LR] == 0.1 / 3  # the schedule at the phase's round 3


def test_sampling_is_seeded_and_sorted():
    a = sample_partitions(100, 10, seed=0, server_round=3)
    assert a == sample_partitions(100, 10, seed=0, server_round=3)
    assert a == sorted(a) and len(set(a)) == 10
    assert a != sample_partitions(100, 10, seed=1, server_round=3)
    assert a != sample_partitions(100, 10, seed=0, server_round=4)
    assert a != sample_partitions(100, 10, seed=0, server_round=3, attempt=1)


def test_derived_seeds_differ_by_purpose_and_key_and_repeat():
    seeds = {
        derive_seed(0, purpose, *keys)
        for purpose in ("sample", "batches", "augment")
        for keys in ((1,), (2,), (1, 0), (1, 1))
    }
    assert len(seeds) == 12 and all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(5, "batches", 3, 7) == derive_seed(5, "batches", 3, 7)


# ---- the round's aggregation (mean_update) against the float64 reference -------------------
def _model_like_states(n: int, seed: int) -> tuple[dict, list[dict]]:
    """A sent state and n client states near it (updates ~1e-3 of the weights), with an
    integer buffer and a head, like a model's."""
    g = torch.Generator().manual_seed(seed)
    sent = {
        "blocks.w": torch.randn(64, 48, generator=g),
        "blocks.b": torch.randn(48, generator=g),
        "steps": torch.tensor([7]),
        "head.weight": torch.randn(10, 48, generator=g),
    }
    states = []
    for k in range(n):
        state = {
            name: t + 1e-3 * torch.randn(t.shape, generator=g) if t.is_floating_point() else t
            for name, t in sent.items()
        }
        state["steps"] = torch.tensor([7 + k])
        states.append(state)
    return sent, states


def _round_mean(strategy: OrderedFedAvg, sent: dict, states: list[dict], weights: list[float]):
    gram = SplitGram(len(states))
    mean = strategy.mean_update(sent, states, weights, gram)
    return mean, gram.metrics(weights)


def test_round_mean_equals_the_float64_mean_to_float32_precision():
    """sent + weights @ (updates), float32, against sum_k w_k state_k accumulated in float64:
    the same weights within a few units in the last place; integer buffers from the first."""
    sent, states = _model_like_states(6, seed=2)
    weights = [3.0, 5.0, 8.0, 13.0, 21.0, 34.0]
    mean, _ = _round_mean(_strategy(), sent, states, weights)
    reference = weighted_average(states, weights)
    for name, value in reference.items():
        assert mean[name].dtype == value.dtype and mean[name].shape == value.shape
        if value.is_floating_point():
            ulp = torch.finfo(torch.float32).eps * value.abs().clamp_min(1e-3)
            assert bool(((mean[name] - value).abs() <= 4 * ulp).all()), name
        else:
            assert torch.equal(mean[name], states[0][name])


def test_round_interference_equals_the_metrics_of_whole_updates():
    """The Gram added tensor by tensor in column blocks gives split_interference's numbers."""
    sent, states = _model_like_states(5, seed=3)
    weights = [1.0, 2.0, 3.0, 4.0, 5.0]
    _, metrics = _round_mean(_strategy(), sent, states, weights)
    updates = [{n: s[n] - sent[n] for n in s if s[n].is_floating_point()} for s in states]
    expected = split_interference(updates, weights)
    assert set(metrics) == set(expected)
    for key, value in expected.items():
        assert math.isclose(metrics[key], value, rel_tol=1e-5, abs_tol=1e-9), key


def test_gram_in_column_blocks_equals_one_product(monkeypatch):
    rows = torch.randn(4, 10_000, generator=torch.Generator().manual_seed(5))
    whole = (rows @ rows.T).double()
    monkeypatch.setattr(interference, "GRAM_COLUMNS", 333)  # many blocks, a ragged last one
    torch.testing.assert_close(interference.gram_of_rows(rows), whole, rtol=1e-5, atol=1e-3)


def test_sparse_round_mean_reads_the_masked_entries_of_what_was_sent():
    """Sparse replies hold the mask's values; their updates are taken against the sent
    values at the same positions (gathered once per tensor)."""
    sent, states = _model_like_states(3, seed=4)
    mask = {"blocks.w": torch.rand(64, 48, generator=torch.Generator().manual_seed(6)) < 0.2}
    strategy = SparseFedAvg(
        eligible=["blocks.w"],
        head_mode="train",
        sparsity=0.8,
        mask_strategy="lowest_magnitude",
        calibration_schedule="exponential",
        calibration_clients=3,
        fisher_config={},
        warmup_lr=0.1,
        partition_to_node={i: 100 + i for i in range(3)},
        clients_per_round=3,
        seed=0,
        clock=RoundClock([Phase(TRAIN, 1)]),
        lr_at=lambda r: 0.1,
    )
    strategy.set_mask(mask)
    replies = [gather_masked(s, mask) | {"head.weight": s["head.weight"]} for s in states]
    weights = [2.0, 3.0, 5.0]
    mean, _ = _round_mean(strategy, sent, replies, weights)
    reference = weighted_average(replies, weights)
    for name, value in reference.items():
        torch.testing.assert_close(mean[name], value, rtol=1e-6, atol=1e-6)
    merged = strategy.merge(sent, mean).to_torch_state_dict()
    assert torch.equal(merged["blocks.w"][~mask["blocks.w"]], sent["blocks.w"][~mask["blocks.w"]])
    torch.testing.assert_close(merged["blocks.w"][mask["blocks.w"]], mean["blocks.w"])
    assert torch.equal(merged["blocks.b"], sent["blocks.b"])  # not in the mask: as sent
