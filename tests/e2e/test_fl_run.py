"""``fl-run`` through a real ``flwr run`` on a SuperLink of the test's own."""

from __future__ import annotations

import subprocess

import pytest

from flower_app.cli.local_superlink import LocalSuperLink, flower_executable
from tests.conftest import ROOT


@pytest.fixture
def superlink(tmp_path):
    """A SuperLink of this test's own (FLWR_HOME, port); stop() ends every process with
    its FLWR_HOME by PID (the SuperLink, the ServerApp, Ray, fl-run and flwr too)."""
    link = LocalSuperLink.start(tmp_path / "flwr-home")
    try:
        yield link
    finally:
        link.stop()


def test_fl_run_runs_the_quick_preset_through_flwr_run(superlink, tmp_path):
    results = tmp_path / "results"
    command = [
        flower_executable("fl-run"),
        "configs/quick.toml",
        "num-server-rounds=1",
        "local-steps=2",
        f"output-dir={results}",
        "run-name=front-door",
    ]
    proc = subprocess.run(
        command, cwd=ROOT, env=superlink.env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert "Successfully started run" in proc.stdout and "round 1/1" in proc.stdout
    assert (results / "front-door" / "summary.json").is_file()
