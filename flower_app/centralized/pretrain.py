"""``fl-pretrain``: the tiny ViT pretrained here, the miniature's stand-in for DINO's weights.

Task arithmetic is about fine-tuning a *pretrained* model. Without CIFAR-100 and the DINO
weights, the miniature study starts from a backbone this command makes: the centralized
baseline's training (same model, step, schedule and evaluation) on ``synthetic-pretrain``,
synthetic classes drawn with another generator seed than the fine-tuning set
``synthetic``, so pretraining and fine-tuning tasks are disjoint (as ImageNet and
CIFAR-100 are). The backbone (no head: a run initialises its own from ``seed``) is written
once, as safetensors with metadata saying what it was trained on, into a cache folder,
and read through ``weights=pretrained pretrained-path=...`` like the DINO file.

``fl-pretrain [--seed N] [--output FILE] [--force] [key=value ...]``: ``key=value``
changes the recipe (run-config keys of the centralized baseline); a file that exists is
reused when its recipe and seed are the ones asked for, and refused otherwise.
On a CPU the same seed gives the same bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from flower_app.config import ConfigError, RunConfig, parse_pairs
from flower_app.data.sources import SYNTHETIC_SEEDS
from flower_app.models.backbone_cache import default_backbone_path, make_command
from flower_app.runs.results import WEIGHTS_FORMAT, atomic_write_bytes
from strategies import protocol

CONTENT = "pretrained backbone (no classifier head)"
# The recipe: the centralized baseline on the pretraining set. 200 images a class (twice
# the miniature's fine-tuning set: a pretraining set is the larger one), 5 epochs of batch
# 32 at the quick presets' lr 0.05 with a cosine decay: enough for the backbone to solve
# its own task (its held-out accuracy is in the file), a minute of CPU or less.
RECIPE: dict[str, Any] = {
    "dataset": "synthetic-pretrain",
    "synthetic-train-per-class": 200,
    "model": "vit_tiny_test",
    "weights": "random",
    "image-size": 32,
    "epochs": 5,
    "warmup-epochs": 0,
    "batch-size": 32,
    "lr": 0.05,
    "lr-schedule": "cosine",
    "min-lr": 0.0,
    "momentum": 0.9,
    "weight-decay": 0.0001,
    "val-fraction": 0.1,
    "eval-batch-size": 500,
}
# set by fl-pretrain itself; ``dataset`` stays the pretraining set, whose classes are
# disjoint from the fine-tuning set's (what the file's metadata says)
OWNED = (
    "seed",
    "output-dir",
    "run-name",
    "resume",
    "pretrained-path",
    "pretrained-head",
    "dataset",
)


class PretrainError(ValueError):
    """The backbone file cannot be used or made as asked; the message is one line."""


def recipe_with(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The default recipe with ``overrides``, checked as a run-config (one-line errors)."""
    recipe = dict(RECIPE)
    for key, value in (overrides or {}).items():
        if key in OWNED:
            raise ConfigError(f"override {key!r} is not allowed: fl-pretrain sets it")
        recipe[key] = value
    cfg = RunConfig.from_run_config(recipe)
    return {key: cfg.to_dict()[key] for key in recipe}  # typed, in the recipe's order


def file_metadata(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file; a file that is not one is a one-line error."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:
        raise PretrainError(f"{path} is not a safetensors file ({exc})") from exc


def check_reusable(path: Path, recipe: Mapping[str, Any], seed: int) -> dict[str, str]:
    """The metadata of an existing backbone, if it was made with ``recipe`` and ``seed``."""
    meta = file_metadata(path)
    made = (meta.get("content"), meta.get("recipe"), meta.get("seed"))
    if made != (CONTENT, json.dumps(recipe, sort_keys=True), str(seed)):
        raise PretrainError(
            f"{path} exists but was not made by fl-pretrain with seed {seed} and this recipe "
            f"(its seed {meta.get('seed')!r}, recipe {meta.get('recipe')!r}); remove it or "
            "rerun with --force"
        )
    return meta


def train_backbone(
    recipe: Mapping[str, Any], seed: int, log: Callable[[str], None]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train the recipe centrally (in a temporary run folder); (backbone, its summary)."""
    from flower_app.centralized.baseline import train_centralized  # the trainer: imported when used

    with tempfile.TemporaryDirectory(prefix="fl-pretrain-") as tmp:
        cfg = RunConfig.from_run_config(
            dict(recipe) | {"seed": seed, "output-dir": tmp, "run-name": "pretrain"}
        )
        # the trainer's lines, less those naming the temporary folder (gone afterwards)
        summary = train_centralized(
            cfg, Path(tmp), "pretrain", lambda line: _unless(tmp, line, log)
        )
        state = load_file(str(Path(tmp) / "pretrain" / "final_model.safetensors"))
    backbone = {k: v for k, v in state.items() if not k.startswith(protocol.HEAD_PREFIX)}
    return backbone, summary


def _unless(tmp: str, line: str, log: Callable[[str], None]) -> None:
    if tmp not in line:
        log(line)


def backbone_metadata(recipe: Mapping[str, Any], seed: int, summary: Mapping) -> dict[str, str]:
    """What the file holds and how it was made, in the file itself."""
    cfg = RunConfig.from_run_config(dict(recipe))
    train_images = cfg.num_classes * (
        cfg.synthetic_train_per_class - round(cfg.val_fraction * cfg.synthetic_train_per_class)
    )
    steps = cfg.epochs * math.ceil(train_images / cfg.batch_size)
    return {
        "format": WEIGHTS_FORMAT,
        "content": CONTENT,
        "model": cfg.model,
        "pretrained-on": (
            f"{cfg.dataset}: {cfg.num_classes} synthetic classes of generator seed "
            f"{SYNTHETIC_SEEDS[cfg.dataset]} ({train_images} training images), "
            f"disjoint from the fine-tuning set 'synthetic' (seed {SYNTHETIC_SEEDS['synthetic']})"
        ),
        "recipe": json.dumps(dict(recipe), sort_keys=True),
        "seed": str(seed),
        "steps": str(steps),
        "held-out-accuracy": f"{summary['final-test-accuracy']:.4f}",
        "held-out-split": (
            f"the pretraining set's own test split ({cfg.synthetic_test_per_class} images a class)"
        ),
    }


def canonical_header(data: bytes) -> bytes:
    """The safetensors bytes with the header's keys sorted, so equal content is equal bytes.

    safetensors writes its metadata in hash-map order, which differs between processes;
    re-sorting the same JSON keeps its length (the header stays padded as it was).
    """
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > size:
        raise ValueError("safetensors header grew when its keys were sorted")
    return data[:8] + text.ljust(size) + data[8 + size :]


def ensure_backbone(
    path: Path,
    seed: int = 0,
    overrides: Mapping[str, Any] | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """The backbone file at ``path``: reused if it was made as asked, else trained and written
    (atomically: an interrupted run leaves no file)."""
    recipe = recipe_with(overrides)
    path = path.expanduser().absolute()
    if path.exists() and not force:
        meta = check_reusable(path, recipe, seed)
        log(f"pretrained backbone {path} exists (held-out accuracy {meta['held-out-accuracy']})")
        return path
    log(f"pretraining the backbone ({make_command(path) or 'fl-pretrain'}) ...")
    backbone, summary = train_backbone(recipe, seed, log)
    data = save(
        {k: v.contiguous() for k, v in backbone.items()},
        metadata=backbone_metadata(recipe, seed, summary),
    )
    atomic_write_bytes(path, canonical_header(data))
    log(
        f"pretrained backbone written to {path} (held-out accuracy "
        f"{summary['final-test-accuracy']:.4f}, {summary['wall-time-s']:.0f} s)"
    )
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fl-pretrain", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--seed", type=int, default=0, help="the pretraining seed (default 0)")
    parser.add_argument(
        "--output", type=Path, default=None, help="the file (default: the cache folder's)"
    )
    parser.add_argument("--force", action="store_true", help="train again even if it exists")
    parser.add_argument("overrides", nargs="*", help="recipe key=value (run-config keys)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Make (or reuse) the backbone; bad input is one line on stderr and exit 2."""
    args = parse_args(argv)
    output = args.output or default_backbone_path(args.seed)
    try:
        if args.seed < 0:
            raise ConfigError(f"--seed {args.seed} is not allowed: must be an integer >= 0")
        ensure_backbone(output, args.seed, parse_pairs(args.overrides), args.force, _print_flushed)
    except (ConfigError, PretrainError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _print_flushed(line: str) -> None:
    print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
