"""Mask strategies, the global threshold with exact counts, the schedule and the scopes."""

from __future__ import annotations

import time
from functools import partial

import pytest
import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from flower_app.models.factory import build_model
from flower_app.models.specs import MODEL_SPECS
from strategies.masks import (
    MASK_SCOPES,
    MASK_STRATEGIES,
    density_schedule,
    eligible_names,
    mask_density,
    needs_fisher,
    scores_for,
    select_mask,
)

WEIGHTS = {"a": torch.tensor([[0.5, -3.0], [0.1, 2.0]]), "b": torch.tensor([-0.2, 1.0, 4.0])}
FISHER = {"a": torch.tensor([[9.0, 1.0], [5.0, 3.0]]), "b": torch.tensor([2.0, 8.0, 0.5])}


def _trainable(mask) -> set[tuple[str, int]]:
    return {
        (n, i) for n, m in mask.items() for i in torch.nonzero(m.reshape(-1)).flatten().tolist()
    }


def _count(mask) -> int:
    return sum(int(m.sum()) for m in mask.values())


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        # 7 entries (a flattened row-major), density 3/7 -> 3 trainable
        ("least_sensitive", {("b", 2), ("a", 1), ("b", 0)}),  # fisher 0.5, 1, 2
        ("most_sensitive", {("a", 0), ("b", 1), ("a", 2)}),  # fisher 9, 8, 5
        ("lowest_magnitude", {("a", 2), ("b", 0), ("a", 0)}),  # |w| 0.1, 0.2, 0.5
        ("highest_magnitude", {("b", 2), ("a", 1), ("a", 3)}),  # |w| 4, 3, 2
    ],
)
def test_each_strategy_picks_the_right_entries(strategy, expected):
    fisher = FISHER if needs_fisher(strategy) else None
    mask = select_mask(scores_for(strategy, WEIGHTS, fisher, seed=0), density=3 / 7)
    assert _trainable(mask) == expected
    assert all(mask[n].dtype == torch.bool and mask[n].shape == WEIGHTS[n].shape for n in mask)


def test_only_sensitivity_strategies_need_fisher():
    assert [s for s in MASK_STRATEGIES if needs_fisher(s)] == ["least_sensitive", "most_sensitive"]
    with pytest.raises(ValueError, match="needs the Fisher"):
        scores_for("least_sensitive", WEIGHTS, None, 0)
    with pytest.raises(ValueError, match="no Fisher information for b"):
        scores_for("most_sensitive", WEIGHTS, {"a": FISHER["a"]}, 0)


def test_random_is_seeded():
    params = {"w": torch.zeros(40, 25), "v": torch.zeros(7)}
    a = select_mask(scores_for("random", params, None, seed=1), 0.3)
    b = select_mask(scores_for("random", params, None, seed=1), 0.3)
    c = select_mask(scores_for("random", params, None, seed=2), 0.3)
    assert all(torch.equal(a[n], b[n]) for n in params)
    assert not torch.equal(a["w"], c["w"])
    assert _count(a) == _count(c) == round(0.3 * 1007)


@pytest.mark.parametrize("density", [0.0, 0.1, 1 / 3, 0.5, 0.999, 1.0])
def test_count_is_exact_when_all_scores_tie(density):
    scores = {"x": torch.ones(7, 11), "y": torch.ones(13)}
    mask = select_mask(scores, density)
    assert _count(mask) == round(density * 90)
    again = select_mask(scores, density)
    assert all(torch.equal(mask[n], again[n]) for n in scores)


def test_ties_at_the_threshold_go_to_earlier_positions():
    scores = {"x": torch.tensor([1.0, 5.0, 1.0, 1.0]), "y": torch.tensor([1.0, 0.0])}
    mask = select_mask(scores, 3 / 6)  # 5 wins, then the first two 1s by position
    assert _trainable(mask) == {("x", 1), ("x", 0), ("x", 2)}


def test_exponential_schedule_gives_nested_masks_with_the_stated_densities():
    sparsity, rounds = 0.9, 4
    densities = density_schedule(sparsity, rounds, "exponential")
    assert densities[:-1] == pytest.approx([0.1 ** (r / 4) for r in range(1, 4)])
    assert densities[-1] == 1.0 - sparsity  # exactly
    g = torch.Generator().manual_seed(0)
    fisher = {"w": torch.rand(50, 40, generator=g), "v": torch.rand(123, generator=g)}
    params = {n: torch.zeros_like(f) for n, f in fisher.items()}
    total = sum(f.numel() for f in fisher.values())
    mask = None
    for d in densities:
        new = select_mask(scores_for("least_sensitive", params, fisher, 0), d, current=mask)
        assert _count(new) == round(d * total)
        assert mask_density(new) == pytest.approx(d, abs=1 / total)
        if mask is not None:
            assert all(not (new[n] & ~mask[n]).any() for n in new)  # frozen stays frozen
        mask = new
        fisher = {n: torch.rand(f.shape, generator=g) for n, f in fisher.items()}  # next round
    assert mask_density(mask) == pytest.approx(0.1, abs=1 / total)


def test_nested_selection_prefers_the_best_of_the_currently_trainable():
    scores = {"x": torch.tensor([9.0, 8.0, 1.0, 2.0, 3.0])}
    current = {"x": torch.tensor([False, False, True, True, True])}
    mask = select_mask(scores, 2 / 5, current=current)
    assert _trainable(mask) == {("x", 3), ("x", 4)}  # 9 and 8 are frozen already
    with pytest.raises(ValueError, match="needs 4 of 5 entries trainable, but only 3"):
        select_mask(scores, 4 / 5, current=current)


def test_schedules_and_their_errors():
    assert density_schedule(0.9, 3, "one-shot") == [pytest.approx(0.1)] * 3
    assert density_schedule(0.75, 1, "exponential") == [0.25]
    assert density_schedule(0.0, 3, "exponential") == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match=r"sparsity=1\.0 is not in \[0, 1\)"):
        density_schedule(1.0, 2, "exponential")
    with pytest.raises(ValueError, match=r"sparsity=-0\.1 "):
        density_schedule(-0.1, 2, "exponential")
    with pytest.raises(ValueError, match=r"rounds=0 must be >= 1"):
        density_schedule(0.9, 0, "exponential")
    with pytest.raises(ValueError, match="schedule='linear' is not one of exponential, one-shot"):
        density_schedule(0.9, 2, "linear")


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"strategy='largest' is not one of least_sensitive"):
        scores_for("largest", WEIGHTS, None, 0)
    with pytest.raises(ValueError, match="NaN scores in b"):
        select_mask({"a": torch.zeros(2), "b": torch.tensor([0.0, float("nan")])}, 0.5)
    with pytest.raises(ValueError, match=r"density 1\.5"):
        select_mask({"a": torch.zeros(2)}, 1.5)


def test_scopes_on_a_real_tiny_vit():
    model = VisionTransformer(
        img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=5, reg_tokens=1
    )
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    embed = {
        "cls_token",
        "reg_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
    }
    assert embed <= set(shapes)
    backbone = eligible_names(shapes, "backbone")
    assert set(shapes) - set(backbone) == {"head.weight", "head.bias"}
    assert backbone == [n for n in shapes if n in backbone]  # model order kept
    assert {"blocks.0.norm1.weight", "blocks.1.mlp.fc2.bias", "norm.weight", "norm.bias"} <= set(
        backbone
    )
    no_embed = eligible_names(shapes, "backbone-no-embed")
    assert set(backbone) - set(no_embed) == embed
    blocks = eligible_names(shapes, "blocks")
    assert set(blocks) == {n for n in shapes if n.startswith("blocks.")}
    assert set(no_embed) - set(blocks) == {"norm.weight", "norm.bias"}
    with pytest.raises(ValueError, match=r"scope='all' is not one of backbone, backbone-no-embed"):
        eligible_names(shapes, "all")


def _talos_expected(depth: int) -> set[str]:
    """TaLoS's masked tensors of a plain timm ViT: weight and bias of the patch-embedding
    Conv2d, of every Linear and LayerNorm in the blocks, and of the final LayerNorm."""
    block_modules = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
    modules = ["patch_embed.proj"]
    modules += [f"blocks.{i}.{m}" for i in range(depth) for m in block_modules]
    modules += ["norm"]
    return {f"{m}.{p}" for m in modules for p in ("weight", "bias")}


@pytest.mark.parametrize(
    ("name", "image_size"), [("vit_tiny_test", 32), ("vit_small_patch16_224.dino", 224)]
)
def test_talos_scope_is_every_linear_conv_and_layernorm(name, image_size):
    assert "talos" in MASK_SCOPES
    depth = MODEL_SPECS[name].depth
    assert depth == {"vit_tiny_test": 2, "vit_small_patch16_224.dino": 12}[name]
    model = build_model(name, 100, image_size)  # architecture only: no download
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    talos = eligible_names(shapes, "talos")
    expected = _talos_expected(depth)
    assert len(expected) == 2 + 12 * depth + 2
    assert set(talos) == expected
    assert len(talos) == len(expected)  # no duplicates
    assert talos == [n for n in shapes if n in expected]  # model order kept
    for excluded in ("cls_token", "pos_embed", "head.weight", "head.bias"):
        assert excluded in shapes and excluded not in talos
    # on these plain ViTs: the backbone less the class and position tokens
    assert set(eligible_names(shapes, "backbone")) - set(talos) == {"cls_token", "pos_embed"}


def test_talos_scope_on_optional_vit_parts():
    """Register tokens and LayerScale gamma are bare parameters (no mask in TaLoS);
    pre-norm, qk-norm, fc_norm and patch-embedding norm are LayerNorms (masked)."""
    model = VisionTransformer(
        img_size=16,
        patch_size=4,
        embed_dim=16,
        depth=1,
        num_heads=2,
        num_classes=5,
        reg_tokens=1,
        init_values=1e-5,
        pre_norm=True,
        qk_norm=True,
        global_pool="avg",
        fc_norm=True,
        embed_layer=partial(PatchEmbed, norm_layer=nn.LayerNorm),
    )
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    talos = set(eligible_names(shapes, "talos"))
    norms = ("patch_embed.norm", "norm_pre", "blocks.0.attn.q_norm", "blocks.0.attn.k_norm")
    norms += ("fc_norm",)  # instead of the final "norm"
    expected = _talos_expected(1) | {f"{m}.{p}" for m in norms for p in ("weight", "bias")}
    # pre_norm drops the patch-embedding bias (CLIP style); fc_norm replaces norm
    expected -= {"patch_embed.proj.bias", "norm.weight", "norm.bias"}
    assert "patch_embed.proj.bias" not in shapes and "norm.weight" not in shapes
    assert talos == expected
    unmasked = {"cls_token", "reg_token", "pos_embed", "blocks.0.ls1.gamma", "blocks.0.ls2.gamma"}
    assert set(shapes) - talos == unmasked | {"head.weight", "head.bias"}


def test_large_input_beyond_the_quantile_limit():
    """ViT-S-sized (~22M entries, beyond torch.quantile's 16M) in a few seconds."""
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(12_000_000, generator=g), "b": torch.rand(10_000_000, generator=g)}
    total = 22_000_000
    start = time.perf_counter()
    first = select_mask(scores, 0.5)
    final = select_mask(scores, 0.1, current=first)
    seconds = time.perf_counter() - start
    assert _count(first) == total // 2 and _count(final) == round(0.1 * total)
    assert all(not (final[n] & ~first[n]).any() for n in scores)
    assert seconds < 20  # about 2 s on 2 CPU cores; the bound only catches a sort blow-up
