"""The fast path (``compile = true``) computes what the plain path computes.

A speed-up must change no result: one in-process round with the client model compiled
gives the weights of the plain round (same seed, float32, CPU) within 1e-5 relative,
and in a sparse run the entries outside the mask stay exactly where they started.

The default tests compile with the ``aot_eager`` backend: the same Dynamo graph capture
and AOTAutograd backward as the real path, without inductor's C++ build (about a minute
on a 2-core CPU). The inductor test is in ``tests/e2e/test_compiled_round.py``.
"""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from safetensors.torch import load_file

from flower_app import client_app
from flower_app.config import RunConfig
from flower_app.models.factory import create_initial_model
from strategies import protocol
from strategies.fedavg import client_compute_metrics
from tests.conftest import ONE_ROUND, InProcessGrid, quick_run_config, run_quick

RTOL = 1e-5


def _final_weights(tmp_path, name: str, **overrides) -> dict[str, torch.Tensor]:
    run_quick(tmp_path, name, **(ONE_ROUND | overrides))
    return load_file(tmp_path / name / "final_model.safetensors")


def _assert_close(fast: dict[str, torch.Tensor], plain: dict[str, torch.Tensor]) -> None:
    """Per tensor, |fast - plain| / |plain| <= 1e-5 (norms), and the round did train."""
    assert set(fast) == set(plain)
    for key, ref in plain.items():
        if not ref.is_floating_point():
            assert torch.equal(fast[key], ref), key
            continue
        diff = float((fast[key].double() - ref.double()).norm())
        assert diff <= RTOL * max(float(ref.double().norm()), 1e-12), (key, diff)


def _initial(**overrides) -> dict[str, torch.Tensor]:
    cfg = RunConfig.from_run_config(quick_run_config(**(ONE_ROUND | overrides)))
    model = create_initial_model(cfg.model, cfg.num_classes, cfg.image_size, "random", "", cfg.seed)
    return model.state_dict()


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setattr(client_app, "COMPILE_BACKEND", "aot_eager")


def test_compiled_round_gives_the_plain_weights(tmp_path, aot_eager):
    plain = _final_weights(tmp_path, "plain")
    fast = _final_weights(tmp_path, "fast", compile=True)
    _assert_close(fast, plain)
    initial = _initial()
    assert not torch.equal(plain["head.weight"], initial["head.weight"])


def test_compiled_sparse_round_keeps_masked_entries_and_matches_plain(tmp_path, aot_eager):
    sparse = {"strategy": "sparse-fedavg", "mask_strategy": "lowest_magnitude", "sparsity": 0.9}
    plain = _final_weights(tmp_path, "sparse-plain", **sparse)
    fast = _final_weights(tmp_path, "sparse-fast", compile=True, **sparse)
    _assert_close(fast, plain)
    mask = {
        k: v.bool() for k, v in load_file(tmp_path / "sparse-fast" / "mask.safetensors").items()
    }
    initial = _initial()
    moved = 0
    for name, trainable in mask.items():
        assert torch.equal(fast[name][~trainable], initial[name][~trainable]), name
        moved += int((fast[name][trainable] != initial[name][trainable]).sum())
    assert moved > 0


def test_train_reply_reports_client_compute_and_the_row_aggregates_it():
    config = quick_run_config(**ONE_ROUND)
    grid = InProcessGrid(client_app.app, config, num_nodes=4)
    content = RecordDict(
        {
            protocol.ARRAYS: ArrayRecord(_initial()),
            protocol.CONFIG: ConfigRecord({protocol.SERVER_ROUND: 1, protocol.LR: 0.05}),
        }
    )
    (reply,) = grid.send_and_receive(
        [Message(content, dst_node_id=1000, message_type=protocol.TRAIN)]
    )
    metrics = reply.content[protocol.METRICS]
    assert metrics[protocol.CLIENT_SECONDS] > 0
    assert protocol.GPU_MEMORY_MB not in metrics  # CUDA only
    replies = [
        MetricRecord({protocol.CLIENT_SECONDS: 0.5, protocol.GPU_MEMORY_MB: 900.0}),
        MetricRecord({protocol.CLIENT_SECONDS: 1.5, protocol.GPU_MEMORY_MB: 1000.0}),
    ]
    assert client_compute_metrics(replies) == {
        "seconds-client-compute": 1.5,
        "seconds-client-compute-sum": 2.0,
        "gpu-memory-mb": 1000.0,
    }
    assert client_compute_metrics([MetricRecord({protocol.NUM_EXAMPLES: 1})]) == {}
