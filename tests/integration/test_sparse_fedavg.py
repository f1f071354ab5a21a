"""Sparse FedAvg end to end in process: the mask is applied, and only its entries travel up."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from flower_app import client_app, server_app
from flower_app.config import RunConfig
from flower_app.models.factory import build_model, create_initial_model
from strategies import protocol
from strategies.masks import MASK_STRATEGIES
from strategies.server_rules import RULES
from tests.conftest import InProcessGrid, quick_run_config, server_context

SMALL = {
    "synthetic_train_per_class": 20,
    "synthetic_test_per_class": 10,
    "num_clients": 4,
    "fraction_train": 0.5,
    "num_server_rounds": 2,
    "eval_every": 2,
    "local_steps": 2,
    "calibration_rounds": 2,
    "fisher_samples": 16,
    "head": "train",
    "head_warmup_rounds": 0,
}


def _run(tmp_path, name: str, **overrides) -> tuple[dict, object]:
    """A run whose messages carry the weights (the tests read them back from the grid)."""
    overrides = {"weights_transport": "message"} | overrides
    config = quick_run_config(**(SMALL | overrides), output_dir=str(tmp_path), run_name=name)
    grid = InProcessGrid(client_app.app, config, num_nodes=4)
    context = server_context(config)
    server_app.main(grid, context)
    return config, grid


def _initial(config: dict) -> dict[str, torch.Tensor]:
    cfg = RunConfig.from_run_config(config)
    model = create_initial_model(cfg.model, cfg.num_classes, cfg.image_size, "random", "", cfg.seed)
    return model.state_dict()


@pytest.fixture(scope="module")
def dense_bytes_up(tmp_path_factory) -> float:
    tmp = tmp_path_factory.mktemp("dense")
    _run(tmp, "dense")
    metrics = pd.read_csv(tmp / "dense" / "metrics.csv")
    return float(metrics["bytes-up"].dropna().mean())


@pytest.mark.parametrize("strategy", MASK_STRATEGIES)
def test_masked_entries_never_move_and_uplink_is_sparse(tmp_path, strategy, dense_bytes_up):
    config, _ = _run(tmp_path, strategy, strategy="sparse-fedavg", mask_strategy=strategy)
    run = tmp_path / strategy
    mask = {k: v.bool() for k, v in load_file(run / "mask.safetensors").items()}
    final = load_file(run / "final_model.safetensors")
    initial = _initial(config)
    total = sum(m.numel() for m in mask.values())
    assert sum(int(m.sum()) for m in mask.values()) == round(0.1 * total)
    assert not any(k.startswith("head.") for k in mask)
    for name, m in mask.items():
        assert torch.equal(final[name][~m], initial[name][~m]), name  # bit-identical
    moved = sum(int((final[n][m] != initial[n][m]).sum()) for n, m in mask.items())
    assert moved > 0.5 * round(0.1 * total)
    assert not torch.equal(final["head.weight"], initial["head.weight"])  # head = "train"
    # upstream: only the trainable entries (10%) plus the dense head
    head = sum(initial[k].numel() for k in initial if k.startswith("head."))
    dense = sum(v.numel() for v in initial.values())
    metrics = pd.read_csv(run / "metrics.csv")
    sparse_up = float(metrics["bytes-up"].dropna().mean())
    assert sparse_up <= (0.1 + head / dense + 0.01) * dense_bytes_up
    summary = json.loads((run / "summary.json").read_text())
    assert summary["mask-density"] == pytest.approx(0.1, abs=1e-4)
    calibration = pd.read_csv(run / "calibration.csv") if needs_rounds(strategy) else None
    if calibration is not None:
        assert calibration["density"].tolist() == pytest.approx([0.1**0.5, 0.1], abs=1e-4)


def needs_rounds(strategy: str) -> bool:
    return strategy in ("least_sensitive", "most_sensitive")


def test_magnitude_and_random_skip_calibration(tmp_path):
    _, grid = _run(tmp_path, "mag", strategy="sparse-fedavg", mask_strategy="lowest_magnitude")
    assert not any(m.metadata.message_type == "query.fisher" for m in grid.sent)


def test_mask_sent_once_per_version_and_frozen_head_stays(tmp_path):
    config, grid = _run(
        tmp_path,
        "frozen-head",
        strategy="sparse-fedavg",
        head="frozen",
        head_warmup_rounds=1,
        num_server_rounds=3,
    )
    run = tmp_path / "frozen-head"
    final = load_file(run / "final_model.safetensors")
    initial = _initial(config)
    assert not torch.equal(final["head.weight"], initial["head.weight"])  # trained in warm-up
    # the mask travels with the first message of each version to each node, not every round
    seen: dict[int, set[int]] = {}
    for m in grid.sent:
        if "config" not in m.content:
            continue  # the partition query
        version = int(m.content["config"]["mask-version"])
        has_mask = "mask" in m.content
        first = version not in seen.setdefault(m.metadata.dst_node_id, set())
        assert has_mask == first, (m.metadata.message_type, version)
        seen[m.metadata.dst_node_id].add(version)
    metrics = pd.read_csv(run / "metrics.csv")
    assert metrics["mask-density"].dropna().tolist()[0] == 0.0  # warm-up: head only


def _weights_sent_in(grid, server_round: int) -> dict[str, torch.Tensor]:
    """The global weights the server sent in ``server_round`` (every message has them all)."""
    for m in grid.sent:
        config = m.content.get(protocol.CONFIG)
        if config is not None and int(config[protocol.SERVER_ROUND]) == server_round:
            return m.content[protocol.ARRAYS].to_torch_state_dict()
    raise AssertionError(f"nothing sent in round {server_round}")


def test_head_warmup_moves_only_the_head_and_the_frozen_head_stays(tmp_path):
    # rounds: 1-2 head warm-up, 3-4 calibration, 5-6 training
    config, grid = _run(
        tmp_path, "protocol", strategy="sparse-fedavg", head="frozen", head_warmup_rounds=2
    )
    initial = _initial(config)
    after_warmup = _weights_sent_in(grid, 3)
    for name, value in initial.items():
        if name.startswith(protocol.HEAD_PREFIX):
            assert not torch.equal(after_warmup[name], value), name  # the head trained
        else:
            assert torch.equal(after_warmup[name], value), name  # backbone bit-unchanged
    first_training = _weights_sent_in(grid, 5)
    for name, value in after_warmup.items():
        assert torch.equal(first_training[name], value), name  # calibration moves nothing
    final = load_file(tmp_path / "protocol" / "final_model.safetensors")
    for name in ("head.weight", "head.bias"):
        assert torch.equal(final[name], after_warmup[name]), name  # frozen, bit-unchanged
    assert not torch.equal(final["blocks.0.attn.qkv.weight"], initial["blocks.0.attn.qkv.weight"])
    phases = pd.read_csv(tmp_path / "protocol" / "metrics.csv")["phase"].tolist()
    assert phases == ["initial", "head-warmup", "head-warmup", "train", "train"]


def test_frozen_head_from_the_weights_file_needs_no_warmup(tmp_path):
    torch.manual_seed(7)
    trained = build_model("vit_tiny_test", num_classes=100, image_size=32).state_dict()
    path = tmp_path / "final_model.safetensors"
    save_file({k: v.contiguous() for k, v in trained.items()}, str(path))
    _, grid = _run(
        tmp_path,
        "carried-head",
        strategy="sparse-fedavg",
        mask_strategy="lowest_magnitude",
        weights="pretrained",
        pretrained_path=str(path),
        pretrained_head=True,
        head="frozen",
        head_warmup_rounds=0,
    )
    assert torch.equal(_weights_sent_in(grid, 1)["head.weight"], trained["head.weight"])
    final = load_file(tmp_path / "carried-head" / "final_model.safetensors")
    assert torch.equal(final["head.weight"], trained["head.weight"])
    assert torch.equal(final["head.bias"], trained["head.bias"])
    phases = pd.read_csv(tmp_path / "carried-head" / "metrics.csv")["phase"].tolist()
    assert phases == ["initial", "train", "train"]


@pytest.fixture(scope="module")
def sparse_mean_run(tmp_path_factory) -> pd.DataFrame:
    tmp = tmp_path_factory.mktemp("sparse-mean")
    _run(tmp, "mean", strategy="sparse-fedavg", mask_strategy="lowest_magnitude", **RULE_RUN)
    return pd.read_csv(tmp / "mean" / "metrics.csv")


RULE_RUN = {"num_server_rounds": 3, "eval_every": 3, "fraction_train": 1.0}  # Krum: 3 or more


@pytest.mark.parametrize("rule", [r for r in RULES if r != "mean"])
def test_server_rules_keep_frozen_entries_and_sparse_messages(tmp_path, rule, sparse_mean_run):
    """With each server rule: over several training rounds the masked-out entries stay bit
    for bit at their start, and the messages carry what the mean's do, round by round."""
    config, _ = _run(
        tmp_path,
        rule,
        strategy="sparse-fedavg",
        mask_strategy="lowest_magnitude",
        server_rule=rule,
        **RULE_RUN,
    )
    run = tmp_path / rule
    mask = {k: v.bool() for k, v in load_file(run / "mask.safetensors").items()}
    final, initial = load_file(run / "final_model.safetensors"), _initial(config)
    for name, m in mask.items():
        assert torch.equal(final[name][~m], initial[name][~m]), name
    assert any(not torch.equal(final[n][m], initial[n][m]) for n, m in mask.items())
    metrics = pd.read_csv(run / "metrics.csv")
    for key in ("bytes-up", "bytes-down"):
        assert metrics[key].tolist() == pytest.approx(sparse_mean_run[key].tolist(), nan_ok=True)
    assert len(metrics.dropna(subset=["bytes-up"])) == 3
