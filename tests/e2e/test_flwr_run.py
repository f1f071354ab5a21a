"""End to end: ``flwr run .`` runs that must fail, on a local simulation SuperLink (Ray).

Runs that complete through ``flwr run`` (dense and sparse) are the quick sweep of
``tests/integration/test_experiments.py``.
"""

from __future__ import annotations

import json
import tomllib

import pytest

from flower_app.cli.local_superlink import LocalSuperLink, RunOutcome
from tests.conftest import ROOT


@pytest.fixture
def superlink(tmp_path):
    link = LocalSuperLink.start(tmp_path / "flwr-home")
    try:
        yield link
    finally:
        link.stop()


def _run(link: LocalSuperLink, tmp_path, overrides: dict, supernodes: int) -> RunOutcome:
    with open(ROOT / "configs" / "quick.toml", "rb") as f:
        config = tomllib.load(f) | overrides
    path = tmp_path / "run-config.toml"
    path.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in config.items()) + "\n")
    return link.run_to_end(ROOT, path, f"num-supernodes={supernodes}", timeout=480)


@pytest.mark.parametrize(
    ("overrides", "supernodes", "message"),
    [
        ({}, 3, '--federation-config "num-supernodes=10"'),
        ({"fraction-train": 1.5}, 10, "run-config key 'fraction-train' = 1.5 is not allowed"),
    ],
    ids=["federation-mismatch", "invalid-value"],
)
def test_bad_runs_are_marked_failed_with_their_one_line_error(
    superlink, tmp_path, overrides, supernodes, message
):
    results = tmp_path / "results"
    config = {"output-dir": str(results), "run-name": "bad"} | overrides
    run = _run(superlink, tmp_path, config, supernodes)
    assert run.status == "finished:failed", (run.run_id, run.status, run.log[-3000:])
    assert not (results / "bad").exists()
    assert message in run.log
