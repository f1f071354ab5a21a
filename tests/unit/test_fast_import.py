"""Imports for one-message processes: an optional extra kept out while a library imports."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

CHECK = """
import sys
from flower_app.perf.fast_import import without_optional_modules
import json  # already imported: left alone
with without_optional_modules("wandb", "json"):
    try:
        import wandb
    except ImportError as exc:
        print("blocked:", type(exc).__name__)
    import json as again
    print("json kept:", again is sys.modules["json"])
print("wandb entry left:", "wandb" in sys.modules)
import flower_app.models.factory
import timm.utils.summary
print("timm took wandb:", hasattr(timm.utils.summary, "wandb"), "wandb" in sys.modules)
import wandb
print("wandb after:", wandb.__name__)
"""


def test_an_optional_module_is_absent_inside_the_block_and_importable_after():
    """In a fresh process (this one may have imported wandb already): inside the block the
    import fails as if wandb were not installed; timm, imported by the model factory, does
    not take wandb; afterwards wandb imports as usual."""
    out = subprocess.run(
        [sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out == [
        "blocked: ModuleNotFoundError",
        "json kept: True",
        "wandb entry left: False",
        "timm took wandb: False False",
        "wandb after: wandb",
    ]
