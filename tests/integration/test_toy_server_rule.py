"""A server rule added from a test, through the registry alone: the run-config takes its
option, checks it, and a quick in-process run aggregates with it."""

from __future__ import annotations

import json
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load_file

from flower_app.config import ConfigError, RunConfig
from flower_app.models.factory import create_initial_model
from strategies.server_rules import RULES, Bound, RuleOption, ServerRule, registered
from tests.conftest import ONE_ROUND, quick_run_config, run_quick

SHARE = Bound("(0, 1]", "in (0, 1]", lambda v: 0.0 < v <= 1.0)
TINY = ONE_ROUND | {"weights_transport": "message"}


class PartWay(ServerRule):
    """Moves ``share`` of the way from the sent values to the clients' mean."""

    calls: ClassVar[list[tuple[int, float, int]]] = []

    def __init__(self, share: float) -> None:
        self.share = share

    def combine(self, server_round, sent, states, weights, mean):
        PartWay.calls.append((server_round, self.share, len(states)))
        return {n: sent[n] + self.share * (m - sent[n]) for n, m in mean.items()}


def _run(tmp_path, name: str, **overrides) -> dict[str, torch.Tensor]:
    run_quick(tmp_path, name, **(TINY | overrides))
    return load_file(tmp_path / name / "final_model.safetensors")


def test_a_rule_registered_in_a_test_is_a_run_config_choice_and_aggregates(tmp_path, identity):
    option = RuleOption("part-way-share", "share", 1.0, SHARE)
    with registered("part-way", option, doc="`PartWay(share=1.0)`", make=PartWay):
        with pytest.raises(ConfigError) as info:
            RunConfig.from_run_config({"part-way-share": 1.5}, check_files=False)
        assert str(info.value) == (
            "run-config key 'part-way-share' = 1.5 is not allowed: must be in (0, 1]"
        )
        mean = _run(tmp_path, "mean")
        part = _run(tmp_path, "part", server_rule="part-way", part_way_share=0.25)
        saved = json.loads((tmp_path / "part" / "config.json").read_text())
    assert PartWay.calls == [(1, 0.25, 2)]  # the training round's two clients
    assert saved["server-rule"] == "part-way" and saved["part-way-share"] == 0.25
    keys = RunConfig.keys()
    assert "part-way-share" not in keys and "part-way" not in RULES  # gone with the block
    cfg = RunConfig.from_run_config(quick_run_config(**TINY), check_files=False)
    initial = create_initial_model(cfg.model, cfg.num_classes, cfg.image_size, "random", "", 0)
    for name, start in initial.state_dict().items():
        expected = start + 0.25 * (mean[name] - start)
        torch.testing.assert_close(part[name], expected, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(part[n], mean[n]) for n in mean)
