"""MaskedAdamW: AdamW in which frozen (masked) entries never move, TaLoS's sparse optimizer.

TaLoS (Iurada et al., ICLR 2025) fine-tunes its trainable entries with ``AdaptW``, AdamW
whose step and decoupled weight decay are multiplied by the 0/1 mask (``vision/optimizers.py``
of its reference code; the revision and lines are in docs/sparse.md). Adam is elementwise,
so an entry's trajectory depends on its own gradients only: here the gradient is multiplied
by the mask before it reaches the moments, so frozen entries keep zero moments and a zero
step, and the decay factor is exactly 1 there, so they stay bit-identical; trainable entries
follow ``torch.optim.AdamW`` (decoupled weight decay, bias-corrected moments). Every tensor
of a group is updated by the same few ``torch._foreach_*`` kernels, as in SparseSGDM.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch.optim import Optimizer

from clients.masking import attach_masks


class MaskedAdamW(Optimizer):
    """AdamW (decoupled weight decay, no AMSGrad) restricted to a mask per parameter.

    ``params`` is a list of tensors and ``masks`` is aligned with it: a bool tensor of the
    parameter's shape (True = trainable), the same 0/1 in the parameter's dtype, or None for
    a dense parameter, which steps exactly as ``torch.optim.AdamW``. Parameters whose
    ``grad`` is None are skipped; ``p.grad`` itself is never modified. ``eps`` must be > 0:
    a frozen entry's step is 0 / (0 + eps).

    Caveat: a non-finite gradient on a frozen entry becomes NaN there (0 * inf); a run
    with non-finite gradients is broken anyway.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        masks: Sequence[torch.Tensor | None],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        params = list(params)
        if not all(isinstance(p, torch.Tensor) for p in params):
            raise TypeError("MaskedAdamW takes a list of tensors (no parameter-group dicts)")
        if lr < 0.0:
            raise ValueError(f"lr={lr}: must be >= 0")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"betas[{i}]={beta}: must be in [0, 1)")
        if not eps > 0.0:
            raise ValueError(f"eps={eps}: must be > 0 (frozen entries divide 0 by it)")
        if weight_decay < 0.0:
            raise ValueError(f"weight_decay={weight_decay}: must be >= 0")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        attach_masks(self.state, params, masks)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One AdamW step on the trainable entries of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _state_of(self, p: torch.Tensor) -> dict:
        """The parameter's state, its moments made (zero) at its first step."""
        state = self.state[p]
        if "exp_avg" not in state:
            state["step"] = torch.tensor(0.0)  # on the CPU, as torch.optim.AdamW keeps it
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _step_group(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        if any(p.grad.is_sparse for p in params):
            raise RuntimeError("MaskedAdamW does not support sparse gradients")
        lr, eps = group["lr"], group["eps"]
        beta1, beta2 = group["betas"]
        states = [self._state_of(p) for p in params]
        grads = self._masked_grads(params, states)
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1.0)
        if group["weight_decay"] != 0:
            self._decay(params, states, lr * group["weight_decay"])
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        del grads
        counts = [float(s) for s in steps]
        step_sizes = [(lr / (1 - beta1**t)) * -1 for t in counts]
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denoms, [(1 - beta2**t) ** 0.5 for t in counts])
        torch._foreach_add_(denoms, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denoms, step_sizes)

    def _masked_grads(self, params: list[torch.Tensor], states: list[dict]) -> list[torch.Tensor]:
        """The gradients, masked where a mask is set (copies there; ``.grad`` stays intact)."""
        grads = [p.grad for p in params]
        masked = [i for i, s in enumerate(states) if "mask" in s]
        if masked:
            products = torch._foreach_mul(
                [grads[i] for i in masked], [states[i]["mask"] for i in masked]
            )
            for i, g in zip(masked, products, strict=True):
                grads[i] = g
        return grads

    @staticmethod
    def _decay(params: list[torch.Tensor], states: list[dict], rate: float) -> None:
        """Decoupled weight decay p *= 1 - lr * wd, by a factor exactly 1 on frozen entries."""
        dense = [p for p, s in zip(params, states, strict=True) if "mask" not in s]
        if dense:
            torch._foreach_mul_(dense, 1 - rate)
        masked = [(p, s["mask"]) for p, s in zip(params, states, strict=True) if "mask" in s]
        if masked:
            factors = torch._foreach_mul([m for _, m in masked], -rate)  # -rate or -0.0
            torch._foreach_add_(factors, 1.0)  # 1 - rate on trainable entries, 1.0 on frozen
            torch._foreach_mul_([p for p, _ in masked], factors)
