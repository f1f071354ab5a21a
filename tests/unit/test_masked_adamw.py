"""MaskedAdamW: frozen entries never move and keep zero moments; trainable entries follow
torch.optim.AdamW; weight decay reaches the trainable entries only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clients.masked_adamw import MaskedAdamW

HYPER = [
    {"lr": 1e-2, "weight_decay": 0.1},  # TaLoS's weight decay, a larger lr so entries move
    {"lr": 1e-3, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.0},
    {"lr": 5e-2, "betas": (0.0, 0.5), "eps": 1e-8, "weight_decay": 0.3},
]
SHAPES = [(7, 5), (5,), (3, 2, 4)]


def _bits(v: torch.Tensor) -> torch.Tensor:
    return v.view(torch.int32)


def _masks(shapes, seed: int = 4, p: float = 0.5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(s, generator=g) < p for s in shapes]


def _twins() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    torch.manual_seed(3)
    ours = [torch.randn(s, requires_grad=True) for s in SHAPES]
    return ours, [p.detach().clone().requires_grad_(True) for p in ours]


@pytest.mark.parametrize("hyper", HYPER)
def test_trainable_entries_follow_torch_adamw_and_frozen_ones_keep_their_bits(hyper):
    """Both optimizers see identical (unmasked) gradients for 40 steps, with an lr change
    half way; Adam is elementwise, so where the mask is True they must agree."""
    ours, theirs = _twins()
    start = [p.detach().clone() for p in ours]
    masks: list[torch.Tensor | None] = [*_masks(SHAPES[:2]), None]  # the last one dense
    masked = MaskedAdamW(ours, masks, **hyper)
    reference = torch.optim.AdamW(theirs, **hyper)
    g = torch.Generator().manual_seed(5)
    for step in range(40):
        if step == 20:  # a learning-rate schedule acts through param_groups
            for opt in (masked, reference):
                opt.param_groups[0]["lr"] *= 0.3
        for p, q in zip(ours, theirs, strict=True):
            grad = torch.randn(p.shape, generator=g)
            p.grad, q.grad = grad.clone(), grad.clone()
        masked.step()
        reference.step()
    for p, q, p0, m in zip(ours, theirs, start, masks, strict=True):
        m = torch.ones(p.shape, dtype=torch.bool) if m is None else m
        assert m.any()
        torch.testing.assert_close(p.detach()[m], q.detach()[m], rtol=1e-6, atol=1e-7)
        assert (p.detach()[m] != p0[m]).all()  # every trainable entry moved
        assert torch.equal(_bits(p.detach()[~m]), _bits(p0[~m]))  # frozen: the same bits
        state = masked.state[p]
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.count_nonzero(state[moment][~m]) == 0
            assert torch.count_nonzero(state[moment][m]) == m.sum()
        assert float(state["step"]) == 40


def test_weight_decay_shrinks_only_the_trainable_entries():
    """With zero gradients Adam's step is 0 / eps = 0, so only the decoupled decay acts:
    trainable entries are multiplied by 1 - lr * wd per step, frozen ones not at all."""
    torch.manual_seed(0)
    p = torch.randn(6, 4, requires_grad=True)
    p0 = p.detach().clone()
    (mask,) = _masks([(6, 4)])
    lr, wd, steps = 1e-2, 0.1, 5
    opt = MaskedAdamW([p], [mask], lr=lr, weight_decay=wd)
    for _ in range(steps):
        p.grad = torch.zeros(6, 4)
        opt.step()
    expected = p0[mask] * torch.tensor(1 - lr * wd) ** steps
    torch.testing.assert_close(p.detach()[mask], expected, rtol=1e-6, atol=0)
    assert torch.equal(_bits(p.detach()[~mask]), _bits(p0[~mask]))


def test_a_dense_parameter_steps_as_torch_adamw_bit_for_bit():
    """The head trains densely (mask None): its steps are torch.optim.AdamW's."""
    torch.manual_seed(1)
    a = torch.randn(5, 3, requires_grad=True)
    b = a.detach().clone().requires_grad_(True)
    ours = MaskedAdamW([a], [None], lr=1e-2, weight_decay=0.1)
    reference = torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1, foreach=True)
    g = torch.Generator().manual_seed(2)
    for _ in range(10):
        grad = torch.randn(5, 3, generator=g)
        a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        reference.step()
    assert torch.equal(a.detach(), b.detach())


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))


def test_an_all_true_mask_trains_a_model_as_torch_adamw():
    a, b = _model(), _model()
    masks = [torch.ones(p.shape, dtype=torch.bool) for p in a.parameters()]
    optimizers = (
        MaskedAdamW(a.parameters(), masks, lr=1e-2, weight_decay=0.1),
        torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1),
    )
    g = torch.Generator().manual_seed(2)
    for _ in range(30):
        x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
        for model, opt in zip((a, b), optimizers, strict=True):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


def test_parameters_without_gradient_are_skipped_and_grads_are_not_modified():
    w, h = torch.randn(4, requires_grad=True), torch.randn(3, requires_grad=True)
    h0 = h.detach().clone()
    opt = MaskedAdamW([w, h], [torch.tensor([True, False, True, False]), None], lr=0.1)
    for _ in range(2):
        w.grad = torch.ones(4)  # h has no gradient at all: skipped, no state
        opt.step()
        assert torch.equal(w.grad, torch.ones(4))  # the optimizer masks a copy
    assert torch.equal(h.detach(), h0) and "exp_avg" not in opt.state[h]


def test_a_mask_in_the_parameters_dtype_steps_as_the_bool_mask():
    """A worker converts a mask to 0/1 floats once and reuses it for every message."""
    torch.manual_seed(3)
    start, grad = torch.randn(5, 4), torch.randn(5, 4)
    bits = torch.rand(5, 4) < 0.3
    results = []
    for mask in (bits, bits.to(torch.float32)):
        p = start.clone().requires_grad_(True)
        opt = MaskedAdamW([p], [mask], lr=0.1, weight_decay=0.1)
        for _ in range(3):
            p.grad = grad.clone()
            opt.step()
        results.append(p.detach())
    assert torch.equal(results[0], results[1])
    assert torch.equal(results[0][~bits], start[~bits])


def test_bad_arguments_are_named():
    w = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="1 parameters but 2 masks"):
        MaskedAdamW([w], [None, None])
    with pytest.raises(ValueError, match=r"mask 0 has shape \(4,\)"):
        MaskedAdamW([w], [torch.ones(4, dtype=torch.bool)])
    with pytest.raises(ValueError, match=r"eps=0\.0: must be > 0"):
        MaskedAdamW([w], [None], eps=0.0)
    with pytest.raises(ValueError, match=r"betas\[1\]=1\.0: must be in \[0, 1\)"):
        MaskedAdamW([w], [None], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match=r"lr=-0\.1"):
        MaskedAdamW([w], [None], lr=-0.1)
    with pytest.raises(ValueError, match=r"weight_decay=-1"):
        MaskedAdamW([w], [None], weight_decay=-1)
