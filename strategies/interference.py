"""How much the clients' updates (their task vectors for one round) agree or interfere.

Task arithmetic reads a round of FedAvg as the sum of the clients' task vectors
``u_k = w_k - w``. When they point the same way the average keeps their length; when
they conflict, averaging cancels them. Two numbers per round say which:

- ``update-cosine``: the mean cosine similarity over all pairs of client updates;
- ``update-norm-ratio``: ``||sum_k p_k u_k|| / mean_k ||u_k||`` with ``p_k`` the FedAvg
  weights (1 when all updates are equal, ``1/sqrt(n)`` for orthogonal equal-norm ones);

plus ``update-norm``, the mean client update norm. All three come from one Gram matrix
``G_ij = <u_i, u_j>`` accumulated tensor by tensor, so no flattened copy of the model
is ever built.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from strategies import protocol

UPDATE_METRICS = ("update-cosine", "update-norm-ratio", "update-norm")
HEAD_UPDATE_METRICS = tuple(f"head-{m}" for m in UPDATE_METRICS)


GRAM_COLUMNS = 16384  # an n x 16K block stays in cache; one n x N product does not


def gram_of_rows(rows: torch.Tensor) -> torch.Tensor:
    """``rows @ rows.T`` in float64 for one tensor's updates stacked as ``n x numel`` rows,
    as a sum of products over blocks of columns (float32 products, float64 sum).

    The whole blocks go through one batched product (``bmm`` over a strided view, no copy):
    one small product per block in a Python loop left the threads idle between blocks,
    and one product over all columns runs out of cache.
    """
    n, numel = rows.shape
    whole = numel // GRAM_COLUMNS * GRAM_COLUMNS
    blocks = rows[:, :whole].reshape(n, -1, GRAM_COLUMNS).transpose(0, 1)
    gram = torch.bmm(blocks, blocks.transpose(1, 2)).to(torch.float64).sum(0)
    if whole < numel:
        rest = rows[:, whole:]
        gram += (rest @ rest.T).to(torch.float64)
    return gram.to("cpu")


def update_gram(updates: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """``G[i, j] = <u_i, u_j>`` over all floating tensors (float64, shape n x n)."""
    if not updates:
        raise ValueError("update_gram needs at least one update")
    n = len(updates)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for name, first in updates[0].items():
        if not first.is_floating_point():
            continue
        gram += gram_of_rows(torch.stack([u[name].reshape(-1).to(torch.float32) for u in updates]))
    return gram


class SplitGram:
    """The Gram matrices of a round's updates, backbone and head apart, added tensor by
    tensor: the strategies stack one tensor's updates at a time into a reused buffer, so
    no client's whole update is ever built (``split_interference`` on the same updates
    gives the same numbers)."""

    def __init__(self, n: int, head_prefix: str = protocol.HEAD_PREFIX) -> None:
        self.backbone = torch.zeros(n, n, dtype=torch.float64)
        self.head: torch.Tensor | None = None  # None until a head tensor is added
        self.head_prefix = head_prefix

    def add(self, name: str, rows: torch.Tensor) -> None:
        """Add tensor ``name``'s updates, one float32 row per client."""
        if not name.startswith(self.head_prefix):
            self.backbone += gram_of_rows(rows)
            return
        if self.head is None:
            self.head = torch.zeros_like(self.backbone)
        self.head += gram_of_rows(rows)

    def metrics(self, weights: Sequence[float]) -> dict[str, float]:
        """``update-*`` of the backbone, and ``head-update-*`` when a head tensor was added."""
        out = gram_metrics(self.backbone, weights)
        if self.head is not None:
            out |= {f"head-{k}": v for k, v in gram_metrics(self.head, weights).items()}
        return out


def interference_metrics(
    updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, float]:
    """Mean pairwise cosine, aggregated-to-mean norm ratio and mean norm of the updates.

    The cosine is NaN with fewer than two updates or when an update is zero; the
    ratio is NaN when all updates are zero.
    """
    if len(updates) != len(weights):
        raise ValueError("interference_metrics needs one weight per update")
    return gram_metrics(update_gram(updates), weights)


def gram_metrics(gram: torch.Tensor, weights: Sequence[float]) -> dict[str, float]:
    """The three metrics from the Gram matrix of n updates and their FedAvg weights."""
    if gram.shape[0] != len(weights):
        raise ValueError("interference_metrics needs one weight per update")
    norms = gram.diagonal().clamp_min(0).sqrt()
    n = gram.shape[0]
    cosines = [
        float(gram[i, j] / (norms[i] * norms[j]))
        for i in range(n)
        for j in range(i + 1, n)
        if norms[i] > 0 and norms[j] > 0
    ]
    all_pairs = n * (n - 1) // 2
    cosine = sum(cosines) / len(cosines) if cosines and len(cosines) == all_pairs else math.nan
    p = torch.tensor(weights, dtype=torch.float64)
    p = p / p.sum()
    aggregated = float((p @ gram @ p).clamp_min(0).sqrt())
    mean_norm = float(norms.mean())
    ratio = aggregated / mean_norm if mean_norm > 0 else math.nan
    return {"update-cosine": cosine, "update-norm-ratio": ratio, "update-norm": mean_norm}


def split_interference(
    updates: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    head_prefix: str = protocol.HEAD_PREFIX,
) -> dict[str, float]:
    """The metrics of the backbone part of the updates, and of the head part apart.

    The backbone part is the task vector task arithmetic merges (TaLoS's excludes the
    classifier), so it gives ``update-*``; a head that trains gets ``head-update-*``
    (absent when no update holds a head tensor, e.g. a frozen head).
    """
    backbone = [{k: v for k, v in u.items() if not k.startswith(head_prefix)} for u in updates]
    head = [{k: v for k, v in u.items() if k.startswith(head_prefix)} for u in updates]
    out = interference_metrics(backbone, weights)
    if any(head):
        out |= {f"head-{k}": v for k, v in interference_metrics(head, weights).items()}
    return out
