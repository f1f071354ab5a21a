"""What a client computes: J local steps of (masked) SGD on its shard, and evaluation.

Knows nothing of Flower. Data arrive as uint8 tensors (possibly already on the GPU)
plus a ``preprocess`` callable that turns a uint8 batch into model input, so the
same loop serves the ViT at 224 px and the tiny ViT at 32 px.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Preprocess = Callable[[torch.Tensor, bool, torch.Generator | None], torch.Tensor]


@dataclass(frozen=True)
class LocalTrainResult:
    """Summary of one client's local training."""

    mean_loss: float
    steps: int
    samples_seen: int


def copy_weights_into(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the model's parameters and buffers, in place.

    What ``load_state_dict(strict=True)`` does for a plain model, without its per-module
    hooks and checks, which cost time on every message. The names and
    shapes must match exactly (``copy_`` would broadcast a wrong shape silently).
    """
    targets = model.state_dict(keep_vars=True)
    if targets.keys() != state.keys():
        missing = sorted(targets.keys() - state.keys())
        extra = sorted(state.keys() - targets.keys())
        raise ValueError(f"weights do not fit the model: missing {missing}, unexpected {extra}")
    with torch.no_grad():
        for name, target in targets.items():
            source = state[name]
            if source.shape != target.shape:
                raise ValueError(
                    f"weights do not fit the model: {name!r} has shape {tuple(source.shape)}, "
                    f"the model's {tuple(target.shape)}"
                )
            target.copy_(source)


def batch_schedule(
    shard_size: int, steps: int, batch_size: int, generator: torch.Generator
) -> torch.Tensor:
    """Indices (steps, batch) into the shard: one permutation per epoch, continued across steps.

    A batch larger than the shard wraps into the next permutation, so every step sees
    ``batch_size`` samples and each epoch visits each sample once.
    """
    needed = steps * batch_size
    epochs = -(-needed // shard_size)
    order = torch.cat([torch.randperm(shard_size, generator=generator) for _ in range(epochs)])
    return order[:needed].view(steps, batch_size)


def autocast_context(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA when asked; float32 everywhere else (exact on CPU)."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def train_local(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    shard: torch.Tensor,
    steps: int,
    batch_size: int,
    preprocess: Preprocess,
    generator: torch.Generator,
    augment_generator: torch.Generator | None = None,
    bf16: bool = False,
    proximal_mu: float = 0.0,
) -> LocalTrainResult:
    """Run ``steps`` optimizer steps on mini-batches of the shard; the model changes in place.

    ``images``/``labels`` hold the whole training split on the compute device; ``shard``
    indexes this client's part of it. The loss is summed on the device and read once,
    so the loop never waits for the GPU. ``proximal_mu`` > 0 adds FedProx's term
    mu/2 ||w - w_start||^2 to every step's loss (``ProximalTerm``), w_start being the
    weights the model holds on entry (the global model the client received).
    """
    device = images.device
    schedule = batch_schedule(len(shard), steps, batch_size, generator)
    batches = shard[schedule].to(device)
    model.train()
    proximal = ProximalTerm(model, proximal_mu) if proximal_mu > 0 else None
    loss_sum = torch.zeros((), device=device)
    for step in range(steps):
        idx = batches[step]
        x = preprocess(images[idx], True, augment_generator)
        loss_sum += sgd_step(model, optimizer, x, labels[idx], bf16, proximal).float()
    return LocalTrainResult(float(loss_sum) / steps, steps, steps * batch_size)


def sgd_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    bf16: bool = False,
    proximal: ProximalTerm | None = None,
) -> torch.Tensor:
    """One optimizer step on the batch ``(x, y)``; the batch's mean cross-entropy, detached.

    Shared by the clients and the centralized baseline, so both train with the same
    arithmetic. Gradients are zeroed in place (not set to None) so their buffers are
    reused; the loss stays on the device, for the caller to sum without a sync.
    """
    with autocast_context(x.device, bf16):
        loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=False)
    loss.backward()
    if proximal is not None:
        proximal.add_gradient()
    optimizer.step()
    return loss.detach()


class ProximalTerm:
    """FedProx's proximal term mu/2 ||w - w0||^2 on the trainable parameters (Li et al.,
    2020), added as its gradient mu (w - w0) after ``backward``: the same step as adding
    the term to the loss, without a second graph. The optimizer then treats it like any
    gradient, so SparseSGDM's mask keeps frozen entries where they are (there w = w0)."""

    def __init__(self, model: nn.Module, mu: float) -> None:
        self.mu = mu
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.anchors = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def add_gradient(self) -> None:
        pairs = [
            (p, a) for p, a in zip(self.params, self.anchors, strict=True) if p.grad is not None
        ]
        if not pairs:
            return
        params, anchors = zip(*pairs, strict=True)
        grads = [p.grad for p in params]
        torch._foreach_add_(grads, torch._foreach_sub(list(params), list(anchors)), alpha=self.mu)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    preprocess: Preprocess,
    bf16: bool = False,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over all given examples (no augmentation)."""
    if len(labels) == 0:
        return float("nan"), float("nan")
    model.eval()
    device = images.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    for start in range(0, len(labels), batch_size):
        x = preprocess(images[start : start + batch_size], False, None)
        y = labels[start : start + batch_size]
        with autocast_context(device, bf16):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        correct += (logits.argmax(dim=1) == y).sum()
    n = len(labels)
    return float(loss_sum) / n, float(correct) / n


@torch.no_grad()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int,
    preprocess: Preprocess,
    bf16: bool = False,
) -> torch.Tensor:
    """The predicted class of every given example, in order (no augmentation): what
    per-example comparisons of two models (their disagreement) need."""
    model.eval()
    out = torch.empty(len(images), dtype=torch.int64, device=images.device)
    for start in range(0, len(images), batch_size):
        x = preprocess(images[start : start + batch_size], False, None)
        with autocast_context(images.device, bf16):
            out[start : start + len(x)] = model(x).argmax(dim=1)
    return out
