"""Diagonal Fisher information from per-example gradients (``torch.func``).

F_ii = E_x E_y [(d s(x, y) / d theta_i)^2] for a per-example score s: the mean over
examples of each example's own squared gradient. Squaring a mini-batch gradient would
give (E g)^2 instead, a different and much smaller quantity, so gradients are taken per
example with ``vmap(grad(...))``, ``batch_size`` at a time.

Two scores s (``score=``): ``"log-likelihood"``, s = log softmax(z)_y (the textbook
Fisher; its gradient is minus the cross-entropy gradient), and ``"logit"``, s = z_y,
the raw logit, which is what the TaLoS reference code scores (see ``diagonal_fisher``).

With ``label_mode="sampled"`` y is drawn from the model's own predictive distribution
(the true Fisher, as TaLoS scores parameters); with ``"empirical"`` it is the data label.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

FISHER_LABEL_MODES = ("sampled", "empirical")
FISHER_SCORES = ("log-likelihood", "logit")


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Score without dropout or drop-path noise, then give the caller its mode back."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _check_label_mode(label_mode: str) -> None:
    """Callers validate their own settings (the run-config does); this guards the math."""
    if label_mode not in FISHER_LABEL_MODES:
        raise ValueError(f"label_mode={label_mode!r} is not one of {', '.join(FISHER_LABEL_MODES)}")


def _check_score(score: str) -> None:
    if score not in FISHER_SCORES:
        raise ValueError(f"score={score!r} is not one of {', '.join(FISHER_SCORES)}")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def fisher_labels(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    label_mode: str,
    batch_size: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The labels the Fisher is taken at: drawn from the model (sampled) or the data's.

    All labels are drawn in one ``multinomial`` call from logits computed in eval mode,
    so the draw depends on the generator, not on ``batch_size``; a caller with the same
    seed gets the same labels. Sampling runs on the generator's device (CPU generators
    work with a GPU model). Returned on the model's device.
    """
    _check_label_mode(label_mode)
    device = _device(model)
    if label_mode == "empirical":
        return labels.to(device=device, dtype=torch.long)
    with _eval_mode(model), torch.no_grad():
        logits = torch.cat(
            [
                model(images[s : s + batch_size].to(device)).float()
                for s in range(0, len(images), batch_size)
            ]
        )
    probs = torch.softmax(logits, dim=1)
    if generator is not None:
        probs = probs.to(generator.device)
    drawn = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return drawn.to(device)


def _check_inputs(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    names: Sequence[str],
    label_mode: str,
    batch_size: int,
    score: str,
) -> dict[str, nn.Parameter]:
    """The model's parameters by name, once every argument is known to be usable."""
    _check_label_mode(label_mode)
    _check_score(score)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be >= 1")
    if len(images) == 0 or len(images) != len(labels):
        raise ValueError(
            f"need as many labels as images (>= 1): got {len(images)} images, {len(labels)} labels"
        )
    params = dict(model.named_parameters())
    unknown = [n for n in names if n not in params]
    if unknown:
        raise ValueError(f"not parameters of the model: {', '.join(unknown)}")
    return params


def _example_score(model: nn.Module, fixed: dict[str, torch.Tensor], score: str):
    """s(weights, x, y) of one example, the quantity whose gradient is squared.

    ``"logit"`` follows the TaLoS reference code (github.com/iurada/talos-task-arithmetic,
    ``vision/pruners.py`` at commit b99d422, ``TaLoS.score``, lines 189-212): eval mode
    (191), the class drawn from ``Categorical(logits=z)`` (203-204), its logit picked with
    ``gather`` (205), each example's single logit back-propagated on its own (207-209)
    and the squared gradients added up (210-212). Differences here: the sum is divided
    by N (a uniform scale that keeps the ranking, so an example-weighted mean of clients'
    results is the mean over all their examples), one label is drawn per example (the
    reference's ``R`` repeats, default 1), and ``label_mode="empirical"`` puts the data
    label in place of the draw, which the reference does not offer.
    """

    def example_score(weights: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
        logits = functional_call(model, fixed | weights, (x.unsqueeze(0),)).float()
        if score == "logit":
            return logits.gather(1, y.view(1, 1)).sum()
        # minus the log-likelihood: the sign vanishes when the gradient is squared
        return F.cross_entropy(logits, y.unsqueeze(0))

    return example_score


def diagonal_fisher(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    names: Sequence[str],
    label_mode: str,
    batch_size: int,
    generator: torch.Generator | None,
    *,
    score: str = "log-likelihood",
) -> dict[str, torch.Tensor]:
    """Mean over examples of a squared per-example gradient, per named parameter.

    With z = model(x) the logits of one example and y its label (``label_mode``, see
    ``fisher_labels``), the entry for theta_i is (1/N) sum_n (d s(x_n, y_n) / d theta_i)^2
    with s = log softmax(z)_y for ``score="log-likelihood"`` (with sampled labels, the
    diagonal of the true Fisher) or s = z_y, the raw logit, for ``score="logit"`` (TaLoS's
    vision score; see ``_example_score``). ``images`` are preprocessed inputs (B, 3, S, S),
    ``labels`` int64 (B,). Only the parameters in ``names`` are differentiated; the rest
    and the buffers are constants. Scored in eval mode, the model's mode restored.
    Returns detached float32 tensors on the model's device, keyed like ``names``.
    """
    params = _check_inputs(model, images, labels, names, label_mode, batch_size, score)
    device = _device(model)
    with _eval_mode(model):
        targets = fisher_labels(model, images, labels, label_mode, batch_size, generator)
        wanted = {n: params[n].detach() for n in names}
        fixed = {n: p.detach() for n, p in params.items() if n not in wanted}
        fixed |= dict(model.named_buffers())
        per_example = vmap(grad(_example_score(model, fixed, score)), in_dims=(None, 0, 0))
        sums = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in wanted.items()}
        # The fused attention kernels have no vmap batching rule for their backward and
        # fall back to one example at a time (far slower); the math
        # kernel is batched.
        with sdpa_kernel([SDPBackend.MATH]):
            for start in range(0, len(images), batch_size):
                x = images[start : start + batch_size].to(device)
                grads = per_example(wanted, x, targets[start : start + batch_size])
                for n, g in grads.items():
                    sums[n].add_(g.float().square().sum(dim=0))
    return {n: (s / len(images)).detach() for n, s in sums.items()}
