"""Where ``fl-pretrain`` keeps the tiny ViT's pretrained backbone, and how to ask for it.

Kept apart from the pretraining itself (``flower_app.centralized.pretrain``, which
trains) so that the run-config check can name the command that makes a missing backbone
without importing the trainer.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

PRETRAINED_DIR = "~/.cache/fl-task-arithmetic/pretrained"
FILE_PREFIX = "vit_tiny_test-synthetic-pretrain-seed"
FILE_SUFFIX = ".safetensors"
_NAME = re.compile(re.escape(FILE_PREFIX) + r"(\d+)" + re.escape(FILE_SUFFIX))


def default_backbone_path(seed: int = 0) -> Path:
    """The cache file of the backbone pretrained with ``seed`` (``~`` expanded)."""
    return Path(os.path.expanduser(PRETRAINED_DIR)) / f"{FILE_PREFIX}{seed}{FILE_SUFFIX}"


def backbone_seed(path: str | Path) -> int | None:
    """The pretraining seed a file name of ``fl-pretrain`` says, or None for any other file."""
    match = _NAME.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def make_command(path: str | Path) -> str:
    """The ``fl-pretrain`` command that writes ``path`` ("" when it is no backbone file)."""
    seed = backbone_seed(path)
    if seed is None:
        return ""
    resolved = Path(os.path.expanduser(str(path))).absolute()
    command = "fl-pretrain" + (f" --seed {seed}" if seed else "")
    if resolved != default_backbone_path(seed):
        command += f" --output {resolved}"
    return command
