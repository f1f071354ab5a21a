"""The local optimizer a client (or the centralized baseline) trains with.

Two recipes, dense or over a sparse mask: ``sgdm``, SGD with momentum (the seed study's;
sparse: SparseSGDM), and ``adamw``, TaLoS's AdamW (dense: ``torch.optim.AdamW`` as TaLoS's
``vision/finetune.py``; sparse: MaskedAdamW as its ``AdaptW``). A client builds a fresh
optimizer for every message, so momentum and Adam's moments start from zero each round
(docs/sparse.md says why that is the usual federated choice).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from clients.masked_adamw import MaskedAdamW
from clients.masking import NodeMask
from clients.sparse_sgdm import SparseSGDM

OPTIMIZERS = ("sgdm", "adamw")


@dataclass(frozen=True)
class OptimizerSettings:
    """Which optimizer and its hyperparameters (``momentum`` is sgdm's, ``betas``/``eps``
    adamw's; ``lr`` and ``weight_decay`` both's, decoupled from the lr in adamw)."""

    name: str
    lr: float
    weight_decay: float
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.name!r}: must be one of {', '.join(OPTIMIZERS)}")


def dense_optimizer(
    params: Iterable[torch.Tensor], settings: OptimizerSettings
) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW over every given parameter (foreach kernels)."""
    if settings.name == "adamw":
        return torch.optim.AdamW(
            params,
            lr=settings.lr,
            betas=settings.betas,
            eps=settings.eps,
            weight_decay=settings.weight_decay,
            foreach=True,
        )
    return torch.optim.SGD(
        params,
        lr=settings.lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
        foreach=True,
    )


def masked_optimizer(
    model: nn.Module,
    settings: OptimizerSettings,
    mask: NodeMask,
    train_head: bool,
    head_prefix: str,
) -> torch.optim.Optimizer:
    """SparseSGDM or MaskedAdamW over the mask's tensors (and the head, dense, when it
    trains); every other parameter stops requiring a gradient (no gradient, no change, no
    cost), so the caller turns ``requires_grad`` back on when it reuses the model."""
    params, masks = [], []
    for name, param in model.named_parameters():
        if mask.trainable(name):
            params.append(param)
            masks.append(mask.multiplier(name, param))
        elif train_head and name.startswith(head_prefix):
            params.append(param)
            masks.append(None)
        else:
            param.requires_grad_(False)
    if settings.name == "adamw":
        return MaskedAdamW(
            params,
            masks,
            lr=settings.lr,
            betas=settings.betas,
            eps=settings.eps,
            weight_decay=settings.weight_decay,
        )
    return SparseSGDM(
        params,
        masks,
        lr=settings.lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
    )


def build_optimizer(
    model: nn.Module,
    settings: OptimizerSettings,
    mask: NodeMask | None,
    train_head: bool,
    head_prefix: str,
) -> torch.optim.Optimizer:
    """The optimizer of one local training: dense over the whole model without a mask,
    else over the mask (and the head when ``train_head``)."""
    if mask is None:
        return dense_optimizer(model.parameters(), settings)
    return masked_optimizer(model, settings, mask, train_head, head_prefix)
