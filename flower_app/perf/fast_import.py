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
