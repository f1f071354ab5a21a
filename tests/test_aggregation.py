"""FedAvg deciding and aggregating: a weighted average in a fixed order, and seeded sampling."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from strategies import protocol
from strategies.fedavg import OrderedFedAvg, weighted_average
from strategies.plan import TRAIN, Phase, RoundClock
from strategies.seeds import derive_seed, sample_partitions


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


def test_aggregate_train_is_independent_of_reply_order(identity):
    states, sizes = _states(1), [5, 7, 11]
    strategy = _strategy()
    msgs = list(strategy.configure_train(1, ArrayRecord(states[0]), ConfigRecord(), None))
    replies = [_reply(i, sizes[i], states[i], msgs[i]) for i in range(3)]
    forward, metrics = strategy.aggregate_train(1, replies)
    backward, _ = strategy.aggregate_train(1, list(reversed(replies)))
    f, b = forward.to_torch_state_dict(), backward.to_torch_state_dict()
    expected = weighted_average(states, [float(s) for s in sizes])
    for key in expected:
        assert torch.equal(f[key], b[key])
        torch.testing.assert_close(f[key], expected[key])
    assert metrics[protocol.NUM_EXAMPLES] == 23
    assert metrics[protocol.TRAIN_LOSS] == (0 * 5 + 1 * 7 + 2 * 11) / 23


def test_training_messages_carry_the_global_round_the_lr_and_the_attempt(identity):
    strategy = _strategy(rounds=4)
    arrays = ArrayRecord(_states()[0])
    messages = list(strategy.configure_train(3, arrays, ConfigRecord({protocol.ATTEMPT: 2}), None))
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
