"""Imports without the cyclic garbage collector, for processes that live for one message.

Why: under the Deployment Engine every message starts a fresh ClientApp process, which
imports torch, timm and Flower again. Those imports create about 450,000 long-lived
objects, and the cyclic collector walks all of them in every full collection that the
imports themselves trigger, freeing almost nothing (about 10,000 objects). Measured with
``benchmarks/clientapp_startup.py`` on the 2-core machine: importing
``flower_app.client_app`` took 2.1 s with the collector on and 1.7 s with it paused, and
the first full collection after the imports (0.15 s, inside the weight load of a
ViT-S/16 message) disappears once the survivors are frozen.
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
