"""Imports without the cyclic garbage collector, for processes that live for one message.

Why: under the Deployment Engine every message starts a fresh ClientApp process, which
imports torch, timm and Flower again. Those imports create about 450,000 long-lived
objects, and the cyclic collector walks all of them in every full collection that the
imports themselves trigger, freeing almost nothing. With the collector paused the
imports are shorter, and the first full collection after them (inside the weight load of
a message) disappears once the survivors are frozen; ``benchmarks/clientapp_startup.py``
measures both (docs/performance.md).
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def imports_without_gc() -> Iterator[None]:
    """Pause the cyclic collector, then move everything alive to the permanent generation.

    ``gc.freeze`` keeps later collections (in the handler, or over a simulation worker's
    life) from walking the import-time objects again; they live as long as the process
    anyway. The collector is switched back on only if it was on before.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


@contextmanager
def without_optional_modules(*names: str) -> Iterator[None]:
    """While the block runs, ``import NAME`` raises ImportError for each of ``names`` not yet
    imported; afterwards they import as usual.

    For extras a library imports inside ``try`` and can do without: timm imports wandb
    (``timm.utils.summary``, to log its CSV summaries) whenever wandb is installed, 0.3-0.5 s
    of every ClientApp process when this project never uses it there. A module that is
    already imported is left alone.
    """
    blocked = [name for name in names if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]  # the import system's "absent"
    try:
        yield
    finally:
        for name in blocked:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
