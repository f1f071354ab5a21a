"""A client's side of a sparse mask: which entries train, their values, damping.

Knows nothing of Flower or of how a mask travels. The mask arrives decoded (bool tensors,
True = trainable) together with its positions: the flat row-major indices of the True
entries, derived by the caller with ``strategies/sparse_codec.mask_positions``,
the one definition of the order in which sparse values travel. A worker process keeps one
``NodeMask`` per mask, so what is derived from it is derived once, not once per message.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class NodeMask:
    """A decoded mask, its positions, and its 0/1 form per (device, dtype), made on demand."""

    bits: dict[str, torch.Tensor]  # bool, True = trainable
    positions: dict[str, torch.Tensor]  # flat row-major indices of the True entries
    multipliers: dict[tuple, dict[str, torch.Tensor]] = field(default_factory=dict)

    def trainable(self, name: str) -> bool:
        """Whether tensor ``name`` has any trainable entry."""
        return name in self.positions and self.positions[name].numel() > 0

    def multiplier(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The mask of ``name`` as 0/1 in ``like``'s dtype and device (the optimizers' form)."""
        key = (str(like.device), like.dtype)
        cached = self.multipliers.setdefault(key, {})
        if name not in cached:
            cached[name] = self.bits[name].to(device=like.device, dtype=like.dtype)
        return cached[name]

    def gather(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each mask tensor's values at its positions: 1-D, in the positions' order, on the CPU."""
        out = {}
        for name, at in self.positions.items():
            flat = tensors[name].detach().reshape(-1)
            out[name] = flat.index_select(0, at.to(flat.device)).cpu()
        return out


class MaskCache:
    """The last mask a worker process decoded, under a key the caller gives (the content id
    of the record it came in): every node of a simulation holds the same mask, which would
    otherwise be decoded for every message. One entry, since a run has one mask at a time."""

    def __init__(self) -> None:
        self._key: str | None = None
        self._mask: NodeMask | None = None

    def get(self, key: str, decode: Callable[[], NodeMask]) -> NodeMask:
        """The mask under ``key``, decoded by ``decode()`` only when the key is new."""
        if self._mask is None or self._key != key:
            self._mask, self._key = decode(), key
        return self._mask


def trained_values(
    model: nn.Module, mask: NodeMask | None, train_head: bool, head_prefix: str
) -> dict[str, torch.Tensor]:
    """What a client sends back: all weights, or the mask's entries (plus the head when it
    trained, whole)."""
    state = model.state_dict()
    if mask is None:
        return state
    sent = mask.gather(state)
    if train_head:
        sent |= {k: v for k, v in state.items() if k.startswith(head_prefix)}
    return sent


@torch.no_grad()
def damp_frozen(model: nn.Module, bits: Mapping[str, torch.Tensor], damping: float) -> None:
    """Multiply the mask's frozen entries by ``damping``, in place (the caller reloads weights
    before the model trains again).

    TaLoS re-scores in calibration round r >= 2 a network whose already-pruned entries are
    multiplied by the mask value 0.1 in the forward pass (its masked layers compute with
    weight * mask); scaling the frozen weights here scores the same network.
    """
    if damping == 1.0:
        return
    for name, param in model.named_parameters():
        if name in bits:
            param[~bits[name].to(param.device)] *= damping


def attach_masks(
    state: Mapping[torch.Tensor, dict],
    params: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor | None],
) -> None:
    """Check ``masks`` against ``params`` and keep each as 0/1 in its parameter's dtype and
    device in the optimizer ``state`` (key ``"mask"``), so it travels with ``state_dict()``.

    A mask is a bool tensor of the parameter's shape (True = trainable), the same 0/1 in the
    parameter's dtype, or None for a dense parameter.
    """
    if len(params) != len(masks):
        raise ValueError(f"got {len(params)} parameters but {len(masks)} masks")
    for i, (p, m) in enumerate(zip(params, masks, strict=True)):
        if m is None:
            continue
        if m.dtype not in (torch.bool, p.dtype):
            raise TypeError(
                f"mask {i} has dtype {m.dtype}: must be torch.bool or, holding 0/1, "
                f"the parameter's {p.dtype}"
            )
        if m.shape != p.shape:
            raise ValueError(
                f"mask {i} has shape {tuple(m.shape)} but its parameter {tuple(p.shape)}"
            )
        state[p]["mask"] = m.to(device=p.device, dtype=p.dtype)  # no copy if it is already
