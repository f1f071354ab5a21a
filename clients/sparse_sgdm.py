"""SparseSGDM: SGD with momentum in which frozen (masked) entries never move.

Sparse fine-tuning only means something if the frozen entries of a parameter stay
exactly at their starting value, weight decay included. So the gradient, after weight
decay is added to it (as ``torch.optim.SGD`` does), is multiplied by the 0/1 mask
before it reaches the momentum buffer: frozen entries get a zero step and a zero
buffer, and trainable entries follow ``torch.optim.SGD`` operation for operation (the
mask multiplies them by exactly 1). Every tensor of a group is updated by the same few
``torch._foreach_*`` kernels, so the cost does not grow with a Python loop over tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch.optim import Optimizer

from clients.masking import attach_masks


class SparseSGDM(Optimizer):
    """SGD (momentum, dampening, weight decay, Nesterov) restricted to a mask per parameter.

    ``params`` is a list of tensors and ``masks`` is aligned with it: a bool tensor of
    the parameter's shape (True = trainable) or None for a dense parameter. Parameters
    whose ``grad`` is None are skipped, as in ``torch.optim.SGD``; ``p.grad`` itself is
    never modified. The mask lives in the optimizer state (key ``"mask"``, in the
    parameter's dtype), so it travels with ``state_dict()``.

    Caveat: a non-finite gradient on a frozen entry becomes NaN there (0 * inf); a run
    with non-finite gradients is broken anyway.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        masks: Sequence[torch.Tensor | None],
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        params = list(params)
        if not all(isinstance(p, torch.Tensor) for p in params):
            raise TypeError("SparseSGDM takes a list of tensors (no parameter-group dicts)")
        if lr < 0.0:
            raise ValueError(f"lr={lr}: must be >= 0")
        if momentum < 0.0:
            raise ValueError(f"momentum={momentum}: must be >= 0")
        if weight_decay < 0.0:
            raise ValueError(f"weight_decay={weight_decay}: must be >= 0")
        if nesterov and (momentum <= 0.0 or dampening != 0.0):
            raise ValueError("Nesterov momentum needs momentum > 0 and dampening = 0")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
        }
        super().__init__(params, defaults)
        attach_masks(self.state, params, masks)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One SGD step on the trainable entries of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        if any(p.grad.is_sparse for p in params):
            raise RuntimeError("SparseSGDM does not support sparse gradients")
        lr, wd = group["lr"], group["weight_decay"]
        momentum, dampening = group["momentum"], group["dampening"]
        grads = [p.grad for p in params]
        # d_p = grad + wd * p, as torch.optim.SGD; new tensors, p.grad stays untouched
        d_p = torch._foreach_add(grads, params, alpha=wd) if wd != 0 else list(grads)
        masked = [i for i, p in enumerate(params) if "mask" in self.state[p]]
        if masked:
            masks = [self.state[params[i]]["mask"] for i in masked]
            picked = [d_p[i] for i in masked]
            if wd != 0:  # d_p are our own tensors: mask in place
                torch._foreach_mul_(picked, masks)
            else:  # d_p are the .grad tensors: masking makes the copies
                for i, g in zip(masked, torch._foreach_mul(picked, masks), strict=True):
                    d_p[i] = g
        if momentum != 0:
            states = [self.state[p] for p in params]
            old = [i for i, s in enumerate(states) if "momentum_buffer" in s]
            if old:
                bufs = [states[i]["momentum_buffer"] for i in old]
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, [d_p[i] for i in old], alpha=1 - dampening)
            for i, s in enumerate(states):
                if "momentum_buffer" not in s:  # first step: the buffer is the gradient
                    s["momentum_buffer"] = d_p[i].detach().clone()
            bufs = [s["momentum_buffer"] for s in states]
            d_p = torch._foreach_add(d_p, bufs, alpha=momentum) if group["nesterov"] else bufs
        torch._foreach_add_(params, d_p, alpha=-lr)
