"""End to end: ``flwr run .`` runs that must fail, and the federation set once on the
SuperLink, on a local simulation SuperLink (Ray).

Runs that complete through ``flwr run`` (dense and sparse) are the quick sweep of
``tests/e2e/test_sweeps.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flower_app.cli.local_superlink import LocalSuperLink
from flower_app.config import load_preset, write_run_config
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def superlink(tmp_path_factory):
    """One SuperLink for the module (a start costs about 6 CPU-seconds): the failing runs
    first, the test that sets its federation's simulation config last."""
    link = LocalSuperLink.start(tmp_path_factory.mktemp("flwr") / "flwr-home")
    try:
        yield link
    finally:
        link.stop()


def _quick_config(path: Path, overrides: dict) -> Path:
    """configs/quick.toml with ``overrides``, written to ``path`` for ``--run-config``."""
    return write_run_config(path, load_preset(ROOT / "configs" / "quick.toml") | overrides)


# (run-config overrides, num-supernodes, what the run's log must say), by case
BAD_RUNS = {
    "federation-mismatch": ({}, 3, '--federation-config "num-supernodes=10"'),
    "invalid-value": (
        {"fraction-train": 1.5},
        10,
        "run-config key 'fraction-train' = 1.5 is not allowed",
    ),
}


def test_bad_runs_are_marked_failed_with_their_one_line_error(superlink, tmp_path):
    """Both bad runs are submitted at once (each mostly waits for its simulation to start
    and end): each is ``finished:failed``, made no run folder and logged its one line."""
    submitted = {}
    for case, (overrides, supernodes, _) in BAD_RUNS.items():
        config = {"output-dir": str(tmp_path / case), "run-name": "bad"} | overrides
        path = _quick_config(tmp_path / f"{case}.toml", config)
        submitted[case] = superlink.submit(ROOT, path, f"num-supernodes={supernodes}")
    for case, run_id in submitted.items():
        status = superlink.wait_for_run(run_id, ROOT, timeout=480)["status"]
        log = superlink.run_log(run_id, ROOT)
        assert status == "finished:failed", (case, run_id, status, log[-3000:])
        assert not (tmp_path / case / "bad").exists(), case
        assert BAD_RUNS[case][2] in log, (case, log[-3000:])


def test_a_simulation_config_set_once_replaces_the_federation_config(superlink, tmp_path):
    """docs/gpu.md's recipe: the SuperLink keeps the federation's size and resources, so
    ``flwr run`` needs no --federation-config string (on a GPU: num-gpus 0.5)."""
    configured = superlink.flwr(
        "federation",
        "simulation-config",
        "--num-supernodes",
        "10",
        "--client-resources-num-cpus",
        "1",
        "--client-resources-num-gpus",
        "0",
        app_dir=ROOT,
    )
    assert configured.returncode == 0, configured.stdout + configured.stderr
    assert "Updated simulation configuration" in configured.stdout
    results = tmp_path / "results"
    config = {"output-dir": str(results), "run-name": "preset", "num-server-rounds": 2}
    config["synthetic-test-per-class"] = 10
    path = _quick_config(tmp_path / "run-config.toml", config)
    run = superlink.run_to_end(ROOT, path, timeout=480)  # no --federation-config
    assert run.status == "finished:completed", (run.run_id, run.status, run.log[-3000:])
    assert "(10 simulated SuperNodes)" in run.log
    assert (results / "preset" / "summary.json").is_file()
    # quiet: Ray's FutureWarning is answered by the environment the app's SuperLinks get
    assert "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO" not in run.log
