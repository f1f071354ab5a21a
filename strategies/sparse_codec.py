"""How masks and sparse tensors travel in messages.

A mask goes down as packed bits (1 bit per entry, ``numpy.packbits``) plus its shape;
a sparse update goes up as the 1-D vector of the values at the mask's True entries,
in row-major order. Both sides derive the positions from the same mask, so no
indices travel.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

SHAPE_SUFFIX = "::shape"


def encode_mask(mask: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Bool tensors -> packed-bit uint8 arrays (and their shapes)."""
    arrays: dict[str, np.ndarray] = {}
    for name, m in mask.items():
        arrays[name] = np.packbits(m.detach().cpu().numpy().astype(bool).ravel())
        arrays[name + SHAPE_SUFFIX] = np.asarray(m.shape, dtype=np.int64)
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def decode_mask(record: ArrayRecord | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``encode_mask``; also of its arrays as tensors (read back from a file)."""
    arrays = {k: v.numpy() for k, v in record.items()}
    out = {}
    for name, packed in arrays.items():
        if name.endswith(SHAPE_SUFFIX):
            continue
        shape = tuple(int(s) for s in arrays[name + SHAPE_SUFFIX])
        count = int(np.prod(shape)) if shape else 1
        bits = np.unpackbits(packed, count=count).astype(bool)
        out[name] = torch.from_numpy(bits.reshape(shape))
    return out


def mask_positions(mask: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each mask tensor's True entries as flat (row-major) indices: gathering and
    scattering with them is much faster than indexing with the bool mask, so a mask
    used many times is turned into positions once."""
    return {name: m.reshape(-1).nonzero().squeeze(1) for name, m in mask.items()}


def gather_at(
    tensors: Mapping[str, torch.Tensor], positions: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The values at the given positions, per tensor (1-D; for a mask's positions, its
    True entries in row-major order)."""
    return {
        name: tensors[name].detach().reshape(-1).index_select(0, at.to(tensors[name].device)).cpu()
        for name, at in positions.items()
    }


def gather_masked(
    tensors: Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The values at the mask's True entries, per tensor (1-D, row-major order)."""
    return gather_at(tensors, mask_positions(mask))


def scatter_at(base: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A copy of ``base`` with the entries at ``positions`` (flat) replaced by ``values``."""
    out = base.clone()
    out.reshape(-1).index_copy_(0, positions.to(out.device), values.to(out.dtype))
    return out
