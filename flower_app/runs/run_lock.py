"""One writer per run folder: the ServerApp holds ``run.lock`` for the life of its run.

Two ServerApps writing one folder (a resume started while the interrupted run was still
checkpointing) would interleave checkpoints and tables. The lock is an ``flock`` on
``run.lock`` in the run folder, held open by the ServerApp's process: the kernel
releases it when that process ends, however it ends, so a lock left by a killed run is
taken over by the next one, and a live holder is refused. The file says who holds it
(host, process, Flower run id, the command that stops it), so the refusal can name them.
``flock`` works on a local file system, which is where a simulation's or a deployment's
ServerApp writes its results; on a network file system its reach depends on the server.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOCK_NAME = "run.lock"


class RunFolderLocked(RuntimeError):
    """Another live process writes this run folder; the message is one line."""


@dataclass
class RunLock:
    """A held lock: the open file whose ``flock`` excludes every other writer."""

    path: Path
    fd: int
    took_over: dict[str, Any] | None  # the record of a holder that was gone, if any

    def release(self) -> None:
        """Remove the file, then let the lock go (no other writer can slip in between)."""
        with contextlib.suppress(FileNotFoundError):
            if _same_file(self.fd, self.path):
                self.path.unlink()
        os.close(self.fd)


def holder_record(run_id: int, stop_command: str) -> dict[str, Any]:
    """What the lock file says about its holder (this process)."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "flower-run-id": run_id,
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        "stop-command": stop_command,
    }


def read_holder(folder: Path) -> dict[str, Any] | None:
    """The record in ``folder``'s lock file, or None without a readable one."""
    try:
        return json.loads((folder / LOCK_NAME).read_text())
    except (OSError, ValueError):
        return None


def describe(holder: dict[str, Any] | None) -> str:
    """The holder in a few words, for one-line messages."""
    if not holder:
        return "another process"
    return (
        f"Flower run {holder.get('flower-run-id', '?')} (pid {holder.get('pid', '?')} on "
        f"host {holder.get('host', '?')}, since {holder.get('since', '?')})"
    )


def locked_message(folder: Path, holder: dict[str, Any] | None) -> str:
    stop = (holder or {}).get("stop-command") or "end that process"
    return (
        f"run folder {folder} is in use by {describe(holder)}: wait for it to end, "
        f"or stop it with: {stop}"
    )


def acquire(folder: Path, record: dict[str, Any]) -> RunLock:
    """Hold ``folder``'s lock with ``record`` in it; raise ``RunFolderLocked`` if a live
    process holds it. A lock file whose holder is gone is taken over."""
    path = folder / LOCK_NAME
    for _ in range(10):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunFolderLocked(locked_message(folder, read_holder(folder))) from None
        if not _same_file(fd, path):  # its holder removed it as we opened it: again
            os.close(fd)
            continue
        previous = _read_fd(fd)
        _write_fd(fd, json.dumps(record, sort_keys=True).encode())
        return RunLock(path, fd, previous)
    raise RunFolderLocked(f"run folder {folder}: its lock file keeps changing; try again")


def is_locked(folder: Path) -> dict[str, Any] | None:
    """The live holder's record if a process holds ``folder``'s lock, else None (checks
    without taking the lock for longer than the test)."""
    path = folder / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return read_holder(folder) or {}
    finally:
        os.close(fd)
    return None


@contextlib.contextmanager
def holding(
    folder: Path, record: dict[str, Any], log: Callable[[str], None] = print
) -> Iterator[RunLock]:
    """``acquire`` for the life of the block, released on any exit."""
    lock = acquire(folder, record)
    if lock.took_over:
        log(f"took over the lock of {describe(lock.took_over)}: that process is gone")
    try:
        yield lock
    finally:
        lock.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _read_fd(fd: int) -> dict[str, Any] | None:
    os.lseek(fd, 0, os.SEEK_SET)
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    try:
        return json.loads(data) if data.strip() else None
    except ValueError:
        return None


def _write_fd(fd: int, data: bytes) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)
