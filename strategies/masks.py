"""Mask strategies, one global threshold, and the calibration schedule.

A mask is ``dict[name, BoolTensor]`` over the eligible parameters, True = trainable.
Every strategy turns weights (and, for the sensitivity ones, the diagonal Fisher)
into a score where *higher means stay trainable*; ``select_mask`` then keeps exactly
round(density * N) entries with the highest scores across all tensors at once, so
layers compete for the budget (a global threshold, as in TaLoS) instead of each
layer keeping the same fraction.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from strategies import protocol

MASK_STRATEGIES = (
    "least_sensitive",
    "most_sensitive",
    "lowest_magnitude",
    "highest_magnitude",
    "random",
)
MASK_SCOPES = ("backbone", "backbone-no-embed", "blocks", "talos")
CALIBRATION_SCHEDULES = ("exponential", "one-shot", "average")
EMBEDDING_NAMES = ("cls_token", "pos_embed", "reg_token")
# ``talos``: weight and bias of every Conv2d, Linear and LayerNorm of a timm VisionTransformer
# (module paths as timm names them; LayerNorms that a config leaves as Identity have no
# parameters). Bare nn.Parameters (cls_token, reg_token, pos_embed, LayerScale ``gamma``)
# match nothing. See ``eligible_names`` for the TaLoS code each entry follows.
_TALOS_PARAMETER = re.compile(
    r"(?:patch_embed\.(?:proj|norm)"  # Conv2d patch embedding (+ its optional LayerNorm)
    r"|norm_pre|norm|fc_norm"  # LayerNorms before and after the blocks
    r"|blocks\.\d+\.(?:norm1|norm2"  # LayerNorms of a block
    r"|attn\.(?:qkv|q_norm|k_norm|norm|proj)"  # attention Linears (+ optional LayerNorms)
    r"|mlp\.(?:fc1|norm|fc2)))"  # MLP Linears (+ optional LayerNorm)
    r"\.(?:weight|bias)"
)


def needs_fisher(strategy: str) -> bool:
    """Sensitivity strategies need federated calibration; the others need only weights."""
    _check_choice("strategy", strategy, MASK_STRATEGIES)
    return strategy in ("least_sensitive", "most_sensitive")


def eligible_names(
    named_shapes: Mapping[str, tuple[int, ...]], scope: str, head_prefix: str = protocol.HEAD_PREFIX
) -> list[str]:
    """Parameters the mask covers, in the given order; the classifier head is never among them.

    ``backbone``: every weight and bias (LayerNorm included), embeddings too;
    ``backbone-no-embed``: without patch embedding, class, register and position tokens;
    ``blocks``: only the transformer blocks;
    ``talos``: the tensors TaLoS masks, i.e. weight and bias of every Conv2d, Linear and
    LayerNorm (timm names: ``patch_embed.proj``, ``blocks.N.norm1/attn.qkv/attn.proj/
    norm2/mlp.fc1/mlp.fc2``, ``norm``, and ``norm_pre``/``fc_norm``/``patch_embed.norm``/
    ``attn.q_norm``/``attn.k_norm``/``attn.norm``/``mlp.norm`` where a config has them);
    not ``cls_token``, ``pos_embed``, ``reg_token``, LayerScale ``gamma`` or the head.
    For the plain ViTs here that is ``backbone`` minus ``cls_token`` and ``pos_embed``.

    Where ``talos`` comes from in TaLoS's code: docs/sparse.md#sources.
    """
    _check_choice("scope", scope, MASK_SCOPES)
    names = [n for n in named_shapes if not n.startswith(head_prefix)]
    if scope == "backbone-no-embed":
        names = [n for n in names if not (n.startswith("patch_embed.") or n in EMBEDDING_NAMES)]
    elif scope == "blocks":
        names = [n for n in names if n.startswith("blocks.")]
    elif scope == "talos":
        names = [n for n in names if _TALOS_PARAMETER.fullmatch(n)]
    return names


def density_schedule(sparsity: float, rounds: int, schedule: str) -> list[float]:
    """Density (fraction trainable) after calibration round r = 1..R; the last is exactly d.

    ``exponential``: d**(r/R), TaLoS's schedule, so each round freezes the same
    fraction of what is left and later Fisher rounds re-score a smaller set;
    ``one-shot``: d from the first round on (later rounds only re-score those entries);
    ``average``: nothing is frozen until the last round, which selects d from the Fisher
    averaged over all rounds.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity!r} is not in [0, 1)")
    if rounds < 1:
        raise ValueError(f"rounds={rounds!r} must be >= 1")
    _check_choice("schedule", schedule, CALIBRATION_SCHEDULES)
    d = 1.0 - sparsity
    if schedule == "one-shot":
        return [d] * rounds
    if schedule == "average":
        return [1.0] * (rounds - 1) + [d]
    return [d ** (r / rounds) for r in range(1, rounds)] + [d]


def scores_for(
    strategy: str,
    params: Mapping[str, torch.Tensor],
    fisher: Mapping[str, torch.Tensor] | None,
    seed: int,
) -> dict[str, torch.Tensor]:
    """Per-entry float32 scores on the CPU, higher = more likely to stay trainable.

    ``random`` draws uniform scores from a generator seeded with ``seed``, tensor by
    tensor in the order of ``params``: same seed and names, same mask.
    """
    _check_choice("strategy", strategy, MASK_STRATEGIES)
    if needs_fisher(strategy):
        if fisher is None:
            raise ValueError(f"mask strategy {strategy!r} needs the Fisher information")
        missing = [n for n in params if n not in fisher]
        if missing:
            raise ValueError(f"no Fisher information for {', '.join(missing)}")
        for n, p in params.items():
            if fisher[n].shape != p.shape:
                raise ValueError(
                    f"Fisher of {n} has shape {tuple(fisher[n].shape)}, not {tuple(p.shape)}"
                )
        sign = -1.0 if strategy == "least_sensitive" else 1.0
        return {n: sign * fisher[n].detach().float().cpu() for n in params}
    if strategy == "lowest_magnitude":
        return {n: -p.detach().float().cpu().abs() for n, p in params.items()}
    if strategy == "highest_magnitude":
        return {n: p.detach().float().cpu().abs() for n, p in params.items()}
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) for n, p in params.items()}


def select_mask(
    scores: Mapping[str, torch.Tensor],
    density: float,
    current: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Keep exactly round(density * N) entries, the highest scores over all tensors (N: all).

    With ``current`` only its True entries may stay trainable (masks are nested, frozen
    stays frozen); the count is still of the full N. Ties are broken by position (earlier
    tensor in ``scores`` order, then earlier entry first), so the count is exact even when
    all scores are equal. The threshold is one ``kthvalue`` on the concatenated scores,
    O(N) (torch.quantile refuses more than 16M elements; a full sort is O(N log N)).
    Returns bool tensors on the CPU, each with its own storage.
    """
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density {density!r} is not allowed: must be in [0, 1]")
    names = list(scores)
    flat = torch.cat([scores[n].detach().reshape(-1).float().cpu() for n in names])
    if torch.isnan(flat).any():
        bad = [n for n in names if torch.isnan(scores[n]).any()]
        raise ValueError(f"NaN scores in {', '.join(bad)}")
    total = flat.numel()
    keep = round(density * total)
    allowed = None
    if current is not None:
        allowed = torch.cat([current[n].detach().reshape(-1).cpu().bool() for n in names])
        available = int(allowed.sum())
        if keep > available:
            raise ValueError(
                f"density {density} needs {keep} of {total} entries trainable, "
                f"but only {available} are trainable now (frozen entries stay frozen)"
            )
        flat.masked_fill_(~allowed, float("-inf"))
    chosen = torch.zeros(total, dtype=torch.bool)
    if keep > 0:
        # the keep-th largest score is the (total - keep + 1)-th smallest
        threshold = torch.kthvalue(flat, total - keep + 1).values
        chosen = flat > threshold
        tied = flat == threshold
        if allowed is not None:  # frozen entries are -inf: tied only if the threshold is
            tied &= allowed
        missing = keep - int(chosen.sum())
        chosen[torch.nonzero(tied).squeeze(1)[:missing]] = True
    out, start = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = chosen[start : start + size].view(scores[n].shape).clone()  # own storage
        start += size
    return out


def mask_density(mask: Mapping[str, torch.Tensor]) -> float:
    """Fraction of True entries over all tensors of a mask (0.0 for an empty mask)."""
    total = sum(m.numel() for m in mask.values())
    return sum(int(m.sum()) for m in mask.values()) / max(total, 1)


def _check_choice(argument: str, value: str, allowed: tuple[str, ...]) -> None:
    """Name the argument, not a run-config key: callers validate their own settings."""
    if value not in allowed:
        raise ValueError(f"{argument}={value!r} is not one of {', '.join(allowed)}")
