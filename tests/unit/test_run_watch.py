"""Waiting for a run: its process is watched in /proc, so its end is seen at once and
``flwr ls`` (a CPU-second each) is asked only when it tells something."""

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


class _Link(local_superlink.LocalSuperLink):
    """A LocalSuperLink without processes whose ``flwr ls`` answers from ``finished()`` and
    counts how often it was asked."""

    def __init__(self, home: Path, finished) -> None:
        super().__init__(home, {}, None, 0)  # type: ignore[arg-type]
        self.finished = finished
        self.asked = 0

    def runs(self, app_dir: Path, connection: str = "") -> list[dict]:
        self.asked += 1
        status = "finished:completed" if self.finished() else "running"
        return [{"run-id": 7, "status": status}]


def test_flwr_ls_is_asked_as_soon_as_a_run_process_ends_and_not_while_it_runs(spawn, tmp_path):
    marker = f"FLWR_HOME={tmp_path / 'home'}"
    server = spawn("flwr-serverapp", marker)
    assert _eventually(lambda: run_process_pids(marker.encode()) == {server.pid})
    # the SuperLink's view: over once the process left the table the watch reads (a killed
    # process leaves it while its memory is torn down, a moment before poll() can reap it;
    # asking poll() here made a third ``flwr ls`` on a busy machine)
    link = _Link(tmp_path / "home", lambda: not run_process_pids(marker.encode()))

    kill_later = f"import os, time; time.sleep(1.5); os.kill({server.pid}, 9)"
    killer = subprocess.Popen([sys.executable, "-c", kill_later])
    start = time.monotonic()
    run = link.wait_for_run(7, tmp_path, timeout=30.0)
    waited = time.monotonic() - start
    killer.wait()
    assert run["status"] == "finished:completed"
    assert link.asked == 2  # once at the start, once when the process ended: no polling between
    assert waited < 1.5 + 5 * local_superlink.WATCH_S  # not the 30 s fallback


def test_while_a_run_process_lives_flwr_ls_waits_for_the_fallback(spawn, tmp_path):
    marker = f"FLWR_HOME={tmp_path / 'home'}"
    server = spawn("flwr-simulation", marker)
    assert _eventually(lambda: run_process_pids(marker.encode()) == {server.pid})
    link = _Link(tmp_path / "home", lambda: False)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"run 7 did not finish within 2\.0 s"):
        link.wait_for_run(7, tmp_path, timeout=2.0)
    assert time.monotonic() - start >= 2.0
    assert link.asked == 1 and local_superlink.ALIVE_POLL_S > 2.0


def test_without_a_run_process_flwr_ls_is_asked_at_growing_intervals(tmp_path):
    link = _Link(tmp_path / "nobody", lambda: False)
    with pytest.raises(TimeoutError):
        link.wait_for_run(7, tmp_path, timeout=3.0)
    assert 2 <= link.asked <= 3  # at 0 s, ~1 s and ~2.5 s: a run that has not started yet


def test_names_are_the_commands_flower_starts_for_runs():
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType

    runs = {TASK_TYPE_TO_COMMAND[TaskType.SERVER_APP], TASK_TYPE_TO_COMMAND[TaskType.SIMULATION]}
    assert set(local_superlink.RUN_PROCESSES) == runs
    for name in runs:
        assert (Path(sys.executable).parent / name).is_file(), (
            f"{name} not beside the venv's python"
        )
