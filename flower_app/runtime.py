"""What a run needs from its run-config: device, precision, data splits, initial model."""

from __future__ import annotations

import torch
from torch import nn

from flower_app.config import RunConfig
from flower_app.data import DatasetSplits, load_splits
from flower_app.model import create_initial_model


def resolve_device(device: str) -> torch.device:
    """``auto`` takes the GPU when this process can see one (Ray hides it with num-gpus=0)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run-config key 'device' = 'cuda' but this process sees no GPU")
    return torch.device(device)


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast on CUDA for ``auto``/``bf16``; CPU runs stay float32 (exact, reproducible)."""
    return device.type == "cuda" and precision in ("auto", "bf16")


def run_splits(cfg: RunConfig) -> DatasetSplits:
    """The run-config's train/validation/test splits (the same on every side of a run)."""
    return load_splits(
        cfg.dataset,
        cfg.data_path,
        cfg.download,
        cfg.val_fraction,
        cfg.seed,
        cfg.synthetic_train_per_class,
    )


def initial_model(cfg: RunConfig) -> nn.Module:
    """The round-0 model of the run-config (federated and centralized start from it)."""
    return create_initial_model(
        cfg.model, cfg.num_classes, cfg.image_size, cfg.weights, cfg.pretrained_path, cfg.seed
    )
