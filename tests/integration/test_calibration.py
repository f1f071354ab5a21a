"""Calibration as TaLoS does it: damped re-scoring, and the seed study's averaged Fisher."""

from __future__ import annotations

import itertools

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from safetensors.torch import load_file

from flower_app import client_app, server_app
from flower_app.config import RunConfig
from flower_app.models.factory import create_initial_model
from strategies import protocol
from strategies.masks import scores_for, select_mask
from strategies.plan import CALIBRATION, TRAIN, Phase, RoundClock
from strategies.record import RoundRecord
from strategies.rounds import run_round
from strategies.sparse_codec import decode_mask, encode_mask
from strategies.sparse_fedavg import SparseFedAvg
from tests.conftest import InProcessGrid, PushPull, quick_run_config, server_context

SMALL = {
    "synthetic_train_per_class": 20,
    "synthetic_test_per_class": 10,
    "num_clients": 4,
    "fraction_train": 0.5,
    "num_server_rounds": 1,
    "local_steps": 1,
    "strategy": "sparse-fedavg",
    "fisher_labels": "empirical",
    "fisher_samples": 1000,  # more than a shard: every example, so the Fisher is deterministic
}


def _initial(config: dict) -> dict[str, torch.Tensor]:
    cfg = RunConfig.from_run_config(config)
    model = create_initial_model(cfg.model, cfg.num_classes, cfg.image_size, "random", "", 0)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _fisher_query(state, mask, damping: float) -> Message:
    config = ConfigRecord(
        {
            protocol.SERVER_ROUND: 3,
            protocol.FISHER_SAMPLES: 16,
            protocol.FISHER_LABELS: "sampled",
            protocol.FISHER_SCORE: "logit",
            protocol.CALIBRATION_DAMPING: damping,
            protocol.MASK_VERSION: 1,
        }
    )
    content = RecordDict(
        {
            protocol.ARRAYS: ArrayRecord(state),
            protocol.CONFIG: config,
            protocol.MASK: encode_mask(mask),
        }
    )
    return Message(content, dst_node_id=1001, message_type=protocol.QUERY_FISHER)


def test_damped_round_scores_the_network_with_its_frozen_entries_scaled():
    config = quick_run_config(**SMALL)
    state = _initial(config)
    g = torch.Generator().manual_seed(0)
    mask = {
        n: torch.rand(state[n].shape, generator=g) < 0.5
        for n in ("blocks.0.attn.qkv.weight", "blocks.1.mlp.fc1.weight", "patch_embed.proj.weight")
    }
    damped_by_hand = dict(state)
    for name, m in mask.items():
        damped_by_hand[name] = torch.where(m, state[name], state[name] * 0.1)

    def fisher(weights, damping):
        grid = InProcessGrid(client_app.app, config, num_nodes=4)
        (reply,) = grid.send_and_receive([_fisher_query(weights, mask, damping)])
        return reply.content[protocol.FISHER].to_torch_state_dict()

    damped = fisher(state, 0.1)
    by_hand = fisher(damped_by_hand, 1.0)
    undamped = fisher(state, 1.0)
    assert all(torch.equal(damped[n], by_hand[n]) for n in mask)
    assert not all(torch.equal(damped[n], undamped[n]) for n in mask)


def _final_mask(tmp_path, name: str, **overrides) -> tuple[dict, InProcessGrid]:
    small = SMALL | {"synthetic_train_per_class": 8}  # 200 images a client: a quicker Fisher
    config = quick_run_config(**(small | overrides), output_dir=str(tmp_path), run_name=name)
    grid = InProcessGrid(client_app.app, config, num_nodes=4)
    context = server_context(config)
    server_app.main(grid, context)
    mask = load_file(tmp_path / name / "mask.safetensors")
    return {k: v.bool() for k, v in mask.items()}, grid


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_undamped_rounds_give_the_one_shot_mask_and_damped_ones_another(tmp_path):
    one_shot, _ = _final_mask(tmp_path, "one-shot", calibration_rounds=1)
    undamped, _ = _final_mask(tmp_path, "undamped", calibration_rounds=3, calibration_damping=1.0)
    damped, grid = _final_mask(  # masks in the messages, to read them back below
        tmp_path,
        "damped",
        calibration_rounds=3,
        calibration_damping=0.1,
        weights_transport="message",
    )
    assert _same(undamped, one_shot)  # the same network scored three times
    assert not _same(damped, one_shot)
    total = sum(m.numel() for m in damped.values())
    assert sum(int(m.sum()) for m in damped.values()) == round(0.1 * total)
    # the masks the calibration rounds sent, in order, then the final one: each inside the last
    sent = [
        decode_mask(m.content[protocol.MASK])
        for m in grid.sent
        if m.metadata.message_type == protocol.QUERY_FISHER and protocol.MASK in m.content
    ]
    versions = []
    for mask in [*sent, damped]:
        if not versions or not _same(mask, versions[-1]):
            versions.append(mask)
    assert len(versions) == 4  # all True, after round 1, after round 2, final
    for before, after in itertools.pairwise(versions):
        assert all(not bool((after[k] & ~before[k]).any()) for k in after)


class FisherGrid(PushPull):
    """Answers Fisher queries with fixed values per round: round r -> (values, examples)."""

    def __init__(self, per_round: dict[int, list[tuple[torch.Tensor, int]]]) -> None:
        self.per_round = per_round

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for pid, m in enumerate(messages):
            values, n = self.per_round[int(m.content["config"][protocol.SERVER_ROUND])][pid]
            metrics = MetricRecord({protocol.NUM_EXAMPLES: n, protocol.PARTITION_ID: pid})
            content = RecordDict(
                {protocol.FISHER: ArrayRecord({"w": values}), protocol.METRICS: metrics}
            )
            replies.append(Message(content, reply_to=m))
        return replies


def test_average_schedule_selects_once_from_the_example_weighted_mean(identity):
    clock = RoundClock([Phase(CALIBRATION, 2), Phase(TRAIN, 1)])
    strategy = SparseFedAvg(
        partition_to_node={0: 10, 1: 11},
        clients_per_round=2,
        seed=0,
        clock=clock,
        lr_at=lambda r: 0.1,
        eligible=["w"],
        head_mode="train",
        sparsity=0.5,
        mask_strategy="least_sensitive",
        calibration_schedule="average",
        calibration_clients=2,
        fisher_config={},
        warmup_lr=0.1,
    )
    g = torch.Generator().manual_seed(1)
    arrays = ArrayRecord({"w": torch.randn(10, generator=g)})
    rounds = {r: [(torch.rand(10, generator=g), n) for n in (30, 10)] for r in (1, 2)}
    grid = FisherGrid(rounds)
    densities = []
    for _ in range(2):
        position = clock.next_round()
        if position.phase_round == 1:
            strategy.enter_phase(position, arrays)
        record = RoundRecord(position)
        run_round(strategy, grid, position, arrays, record)
        clock.complete(position)
        densities.append(record.get("density"))
    assert densities == [1.0, 0.5]  # nothing frozen until the last round
    values = [v * n for r in (1, 2) for v, n in rounds[r]]
    expected = torch.stack(values).sum(0) / 80  # 2 x (30 + 10) examples
    want = select_mask(
        scores_for("least_sensitive", {"w": arrays.to_torch_state_dict()["w"]}, {"w": expected}, 0),
        0.5,
    )
    assert torch.equal(strategy.mask["w"], want["w"])
