"""What a run needs from its run-config: device, precision, data splits, initial model,
and the evaluation of a model on a split (federated server and centralized baseline)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from clients.training import evaluate, predict
from flower_app.config import RunConfig
from flower_app.data.preprocessing import batch_preprocessor
from flower_app.data.registry import load_splits
from flower_app.data.sources import DatasetSplits, ImageSplit
from flower_app.data.tasks import restrict_splits
from flower_app.models.factory import create_initial_model
from flower_app.runs.worker_gpus import auto_device


def resolve_device(device: str) -> torch.device:
    """``auto``: see ``worker_gpus.auto_device`` (a Ray actor follows what Ray gave it);
    ``cuda`` in a process that sees no GPU is refused in one line."""
    if device == "auto":
        return auto_device()
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run-config key 'device' = 'cuda' but this process sees no GPU")
    return torch.device(device)


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast on CUDA for ``auto``/``bf16``; CPU runs stay float32 (exact, reproducible)."""
    return device.type == "cuda" and precision in ("auto", "bf16")


def run_splits(cfg: RunConfig) -> DatasetSplits:
    """The run-config's train/validation/test splits (the same on every side of a run),
    restricted to its ``task-classes``: the validation split is carved out of all classes
    first, so every task's validation examples are those of the full run."""
    splits = load_splits(cfg.dataset, cfg.source_options, cfg.val_fraction, cfg.seed)
    return restrict_splits(splits, cfg.task_class_ids)


def initial_model(cfg: RunConfig) -> nn.Module:
    """The round-0 model of the run-config (federated and centralized start from it)."""
    return create_initial_model(
        cfg.model,
        cfg.num_classes,
        cfg.image_size,
        cfg.weights,
        cfg.pretrained_path,
        cfg.seed,
        cfg.pretrained_head,
    )


def to_device(split: ImageSplit, device: torch.device) -> ImageSplit:
    return ImageSplit(split.images.to(device), split.labels.to(device))


class ModelEvaluator:
    """Loss and accuracy of one model on a split, batched and preprocessed as configured."""

    def __init__(self, model: nn.Module, cfg: RunConfig, device: torch.device) -> None:
        self.model = model.to(device)
        self.batch_size = cfg.eval_batch_size
        self.bf16 = use_bf16(cfg.precision, device)
        self.preprocess = batch_preprocessor(cfg.image_size)

    def score(self, split: ImageSplit) -> tuple[float, float]:
        """(loss, accuracy) of the model as it is."""
        return evaluate(
            self.model, split.images, split.labels, self.batch_size, self.preprocess, self.bf16
        )

    def __call__(self, state: Mapping[str, torch.Tensor], split: ImageSplit) -> tuple[float, float]:
        """(loss, accuracy) of ``state``; the model keeps ``state`` afterwards."""
        self.model.load_state_dict(state, strict=True)
        return self.score(split)

    def predictions(self, state: Mapping[str, torch.Tensor], split: ImageSplit) -> torch.Tensor:
        """The class ``state`` predicts for each example of ``split`` (on the CPU); the model
        keeps ``state`` afterwards."""
        self.model.load_state_dict(state, strict=True)
        labels = predict(self.model, split.images, self.batch_size, self.preprocess, self.bf16)
        return labels.cpu()
