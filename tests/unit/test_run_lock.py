"""One writer per run folder: a live holder is refused by name, a dead one's lock is taken."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from flower_app.runs import run_lock
from flower_app.runs.run_lock import LOCK_NAME, RunFolderLocked

HOLD = """
import sys, time
from pathlib import Path
from flower_app.runs import run_lock
lock = run_lock.acquire(Path(sys.argv[1]), run_lock.holder_record(99, "flwr stop 99"))
print("held", flush=True)
time.sleep(600)
"""


def _holder(folder) -> subprocess.Popen:
    """Another process that takes the folder's lock and keeps it until killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_naming_the_first(tmp_path):
    record = run_lock.holder_record(12, "/v/bin/flwr stop 12")
    lock = run_lock.acquire(tmp_path, record)
    try:
        with pytest.raises(RunFolderLocked) as refused:
            run_lock.acquire(tmp_path, run_lock.holder_record(13, "flwr stop 13"))
        message = str(refused.value)
        assert "\n" not in message
        assert message.startswith(f"run folder {tmp_path} is in use by Flower run 12 (pid ")
        assert f"pid {os.getpid()} on host {record['host']}" in message
        assert message.endswith("stop it with: /v/bin/flwr stop 12")
        assert run_lock.is_locked(tmp_path)["flower-run-id"] == 12
    finally:
        lock.release()
    assert not (tmp_path / LOCK_NAME).exists() and run_lock.is_locked(tmp_path) is None
    run_lock.acquire(tmp_path, record).release()  # free again


def test_another_process_holding_the_lock_is_refused_until_it_is_gone(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(RunFolderLocked, match=f"Flower run 99 \\(pid {proc.pid} on host"):
            run_lock.acquire(tmp_path, run_lock.holder_record(1, "x"))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the killed holder left its file; the kernel released its lock with the process
    assert run_lock.read_holder(tmp_path)["pid"] == proc.pid
    assert run_lock.is_locked(tmp_path) is None
    lines: list[str] = []
    with run_lock.holding(tmp_path, run_lock.holder_record(2, "y"), log=lines.append) as lock:
        assert lock.took_over["pid"] == proc.pid
        assert run_lock.read_holder(tmp_path)["flower-run-id"] == 2
    assert lines == [
        f"took over the lock of Flower run 99 (pid {proc.pid} on host "
        f"{lock.took_over['host']}, since {lock.took_over['since']}): that process is gone"
    ]
    assert not (tmp_path / LOCK_NAME).exists()


def test_the_lock_is_released_when_the_block_raises(tmp_path):
    with pytest.raises(ValueError), run_lock.holding(tmp_path, run_lock.holder_record(3, "z")):
        assert run_lock.is_locked(tmp_path) is not None
        raise ValueError("the run failed")
    assert run_lock.is_locked(tmp_path) is None and not (tmp_path / LOCK_NAME).exists()


def test_a_folder_without_a_lock_file_is_not_locked(tmp_path):
    assert run_lock.is_locked(tmp_path) is None and run_lock.read_holder(tmp_path) is None
    assert run_lock.is_locked(tmp_path / "absent") is None
