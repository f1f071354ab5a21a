"""How the sweep runner runs one run: through ``flwr run`` or in its own process.

``flwr`` is Flower's simulation engine (a local SuperLink, Ray workers): the path every
user's ``flwr run .`` takes, with its start-up cost per run. ``in-process`` drives the same
ServerApp and ClientApp through ``flower_app.studies.in_process`` in the runner's process, so a
sweep of short runs (the miniature study on a CPU) pays none of it. Either way a run counts
only when its ``summary.json`` says it completed, and its log goes to a file.
"""

from __future__ import annotations

import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

ENGINES = ("in-process", "flwr")
PROGRESS_EVERY_S = 10.0  # a miniature run is short: a line or two each


@contextmanager
def polling(poll: Callable[[], None], every: float = PROGRESS_EVERY_S) -> Iterator[None]:
    """Call ``poll`` every ``every`` seconds in a thread while the block runs."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every):
            poll()

    thread = threading.Thread(target=loop, name="sweep-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def console_writer() -> Callable[[str], None]:
    """Lines to the stdout of now, also while a run's output is redirected to its log."""
    console = sys.stdout
    return lambda line: print(line, file=console, flush=True)


def run_here(work: Callable[[], None], log: Path, poll: Callable[[], None]) -> tuple[bool, str]:
    """Run ``work`` in this process with its stdout and stderr in ``log``: (raised nothing,
    the exception's one line). ``poll`` runs meanwhile; an interrupt propagates."""
    with open(log, "w") as out, polling(poll), redirect_stdout(out), redirect_stderr(out):
        try:
            work()
        except Exception as exc:
            traceback.print_exc()
            return False, f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    return True, ""
