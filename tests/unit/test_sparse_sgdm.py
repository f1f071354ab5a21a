"""SparseSGDM: frozen entries never move; trainable entries follow torch.optim.SGD."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clients.sparse_sgdm import SparseSGDM

HYPER = [
    {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": False},
    {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True},
    {"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-2},
    {"lr": 0.05, "momentum": 0.0, "weight_decay": 1e-2},
    {"lr": 0.05, "momentum": 0.8, "weight_decay": 0.0, "nesterov": True},
]


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))


def _masks(params, seed: int = 1, p: float = 0.4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(q.shape, generator=g) < p for q in params]


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 50) -> None:
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


@pytest.mark.parametrize("nesterov", [False, True])
def test_frozen_entries_are_bit_identical_after_50_steps(nesterov):
    model = _model()
    start = [p.detach().clone() for p in model.parameters()]
    masks = _masks(model.parameters())
    opt = SparseSGDM(
        model.parameters(), masks, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=nesterov
    )
    _train(model, opt)
    for p, p0, m in zip(model.parameters(), start, masks, strict=True):
        assert m.any() and (~m).any()
        frozen_now, frozen_start = p.detach()[~m], p0[~m]
        assert torch.equal(frozen_now.view(torch.int32), frozen_start.view(torch.int32))  # bits
        assert (p.detach()[m] != p0[m]).all()  # every trainable entry moved
        buf = opt.state[p]["momentum_buffer"]
        assert torch.count_nonzero(buf[~m]) == 0 and torch.count_nonzero(buf[m]) > 0


@pytest.mark.parametrize("hyper", HYPER)
def test_all_true_mask_matches_torch_sgd_on_a_model(hyper):
    a, b = _model(), _model()
    masks = [torch.ones(p.shape, dtype=torch.bool) for p in a.parameters()]
    _train(a, SparseSGDM(a.parameters(), masks, **hyper))
    _train(b, torch.optim.SGD(b.parameters(), **hyper))
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("hyper", HYPER)
def test_trainable_entries_match_torch_sgd_on_the_same_gradients(hyper):
    """Both optimizers see identical gradients; where the mask is True they must agree."""
    torch.manual_seed(3)
    shapes = [(7, 5), (5,), (3, 2, 4)]
    sparse_ps = [torch.randn(s, requires_grad=True) for s in shapes]
    dense_ps = [p.detach().clone().requires_grad_(True) for p in sparse_ps]
    start = [p.detach().clone() for p in sparse_ps]
    masks: list[torch.Tensor | None] = [*_masks(sparse_ps[:2], seed=4, p=0.5), None]
    sparse = SparseSGDM(sparse_ps, masks, **hyper)
    dense = torch.optim.SGD(dense_ps, **hyper)
    g = torch.Generator().manual_seed(5)
    for step in range(40):
        if step == 20:  # a learning-rate schedule acts through param_groups
            for opt in (sparse, dense):
                opt.param_groups[0]["lr"] *= 0.3
        for ps, pd in zip(sparse_ps, dense_ps, strict=True):
            grad = torch.randn(ps.shape, generator=g)
            ps.grad, pd.grad = grad.clone(), grad.clone()
        sparse.step()
        dense.step()
    for ps, pd, p0, m in zip(sparse_ps, dense_ps, start, masks, strict=True):
        m = torch.ones(ps.shape, dtype=torch.bool) if m is None else m
        torch.testing.assert_close(ps.detach()[m], pd.detach()[m], rtol=1e-6, atol=1e-7)
        assert torch.equal(ps.detach()[~m], p0[~m])


def test_parameters_without_gradient_are_skipped_and_grads_are_not_modified():
    w, h = torch.randn(4, requires_grad=True), torch.randn(3, requires_grad=True)
    h0 = h.detach().clone()
    opt = SparseSGDM([w, h], [None, torch.ones(3, dtype=torch.bool)], lr=0.1, momentum=0.5)
    for _ in range(2):
        w.grad = torch.ones(4)  # h has no gradient at all: skipped, no state
        opt.step()
        assert torch.equal(w.grad, torch.ones(4))  # the optimizer works on copies
    assert torch.equal(h.detach(), h0) and "momentum_buffer" not in opt.state[h]


def test_dense_parameter_takes_a_plain_sgd_step():
    w = torch.randn(4, requires_grad=True)
    w0 = w.detach().clone()
    opt = SparseSGDM([w], [None], lr=0.1, momentum=0.5)
    w.grad = torch.ones(4)
    opt.step()  # first step: buffer = grad, update = lr * grad
    torch.testing.assert_close(w.detach(), w0 - 0.1)
    opt.step()  # buffer = 0.5 * 1 + 1
    torch.testing.assert_close(w.detach(), w0 - 0.1 - 0.15)


def test_state_dict_round_trip_keeps_the_mask():
    p = torch.zeros(6, requires_grad=True)
    mask = torch.tensor([True, False, True, False, True, False])
    opt = SparseSGDM([p], [mask], lr=1.0, momentum=0.9, weight_decay=0.1)
    p.grad = torch.ones(6)
    opt.step()
    q = p.detach().clone().requires_grad_(True)
    fresh = SparseSGDM([q], [torch.ones(6, dtype=torch.bool)], lr=1.0, momentum=0.9)
    fresh.load_state_dict(opt.state_dict())
    q.grad = torch.ones(6)
    fresh.step()
    assert torch.equal(q.detach()[~mask], torch.zeros(3))


def test_works_on_a_model_with_a_mixed_group():
    model = _model()
    params = list(model.parameters())
    masks = [m if i % 2 == 0 else None for i, m in enumerate(_masks(params))]
    start = [p.detach().clone() for p in params]
    _train(model, SparseSGDM(params, masks, lr=0.1, momentum=0.9), steps=5)
    for p, p0, m in zip(params, start, masks, strict=True):
        if m is None:
            assert not torch.equal(p.detach(), p0)
        else:
            assert torch.equal(p.detach()[~m], p0[~m])


def test_bad_arguments_are_named():
    w = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="1 parameters but 2 masks"):
        SparseSGDM([w], [None, None], lr=0.1)
    with pytest.raises(ValueError, match=r"mask 0 has shape \(4,\)"):
        SparseSGDM([w], [torch.ones(4, dtype=torch.bool)], lr=0.1)
    with pytest.raises(TypeError, match=r"torch\.bool or, holding 0/1, the parameter's"):
        SparseSGDM([w], [torch.ones(3, dtype=torch.int64)], lr=0.1)
    with pytest.raises(ValueError, match=r"lr=-0\.1"):
        SparseSGDM([w], [None], lr=-0.1)
    with pytest.raises(ValueError, match="Nesterov"):
        SparseSGDM([w], [None], lr=0.1, nesterov=True)


def test_a_mask_in_the_parameters_dtype_steps_as_the_bool_mask():
    """A worker converts a mask to 0/1 floats once and reuses it for every message."""
    torch.manual_seed(3)
    start, grad = torch.randn(5, 4), torch.randn(5, 4)
    bits = torch.rand(5, 4) < 0.3
    results = []
    for mask in (bits, bits.to(torch.float32)):
        p = start.clone().requires_grad_(True)
        opt = SparseSGDM([p], [mask], lr=0.1, momentum=0.9, weight_decay=0.01)
        for _ in range(3):
            p.grad = grad.clone()
            opt.step()
        results.append(p.detach())
    assert torch.equal(results[0], results[1])
    assert torch.equal(results[0][~bits], start[~bits])
    assert not torch.equal(results[0][bits], start[bits])
