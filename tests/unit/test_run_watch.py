"""Waiting for a run: its process is watched in /proc, so its end is seen at once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flower_app.cli import local_superlink
from flower_app.cli.local_superlink import run_process_pids

SLEEPER = "import time\ntime.sleep(60)\n"


@pytest.fixture
def spawn(tmp_path):
    """Start ``python <tmp>/<name>`` (a 60 s sleeper) with ``marker`` in its environment."""
    procs: list[subprocess.Popen] = []

    def _spawn(name: str, marker: str) -> subprocess.Popen:
        script = tmp_path / name
        script.write_text(SLEEPER)
        key, value = marker.split("=", 1)
        proc = subprocess.Popen([sys.executable, str(script)], env=os.environ | {key: value})
        procs.append(proc)
        return proc

    yield _spawn
    for proc in procs:
        proc.kill()
        proc.wait()


def _eventually(predicate, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_only_run_processes_with_the_marker_are_found(spawn, tmp_path):
    marker = f"FLWR_HOME={tmp_path / 'home'}"
    server = spawn("flwr-serverapp", marker)
    simulation = spawn("flwr-simulation", marker)
    spawn("flwr-clientapp", marker)  # a ClientApp ends every message: not a run's end
    spawn("flwr-serverapp-elsewhere", f"FLWR_HOME={tmp_path / 'other'}")
    wanted = {server.pid, simulation.pid}
    assert _eventually(lambda: run_process_pids(marker.encode()) == wanted)


def test_watch_returns_as_soon_as_a_run_process_ends(spawn, tmp_path):
    marker = f"FLWR_HOME={tmp_path / 'home'}"
    server = spawn("flwr-serverapp", marker)
    assert _eventually(lambda: run_process_pids(marker.encode()) == {server.pid})

    kill_later = f"import os, time; time.sleep(0.5); os.kill({server.pid}, 9)"
    killer = subprocess.Popen([sys.executable, "-c", kill_later])
    start = time.monotonic()
    ended = local_superlink._watch_until_one_ends(marker.encode(), 30.0)
    waited = time.monotonic() - start
    killer.wait()
    server.wait()
    assert ended is True
    assert waited < 0.5 + 5 * local_superlink.WATCH_S  # not the 30 s it was given


def test_watch_sleeps_its_time_when_nothing_ends(spawn, tmp_path):
    marker = f"FLWR_HOME={tmp_path / 'home'}"
    spawn("flwr-simulation", marker)
    start = time.monotonic()
    assert local_superlink._watch_until_one_ends(marker.encode(), 0.6) is False
    assert time.monotonic() - start >= 0.6


def test_watch_without_any_run_process_sleeps_its_time(tmp_path):
    start = time.monotonic()
    marker = f"FLWR_HOME={tmp_path / 'nobody'}".encode()
    assert local_superlink._watch_until_one_ends(marker, 0.3) is False
    assert time.monotonic() - start >= 0.3


def test_names_are_the_commands_flower_starts_for_runs():
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType

    runs = {TASK_TYPE_TO_COMMAND[TaskType.SERVER_APP], TASK_TYPE_TO_COMMAND[TaskType.SIMULATION]}
    assert set(local_superlink.RUN_PROCESSES) == runs
    for name in runs:
        assert (Path(sys.executable).parent / name).is_file(), (
            f"{name} not beside the venv's python"
        )
