"""A client's optimizer and mask arithmetic (clients/optimizers.py, clients/masking.py):
which optimizer each setting builds, over which entries, and what goes back."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clients.masked_adamw import MaskedAdamW
from clients.masking import MaskCache, NodeMask, damp_frozen, trained_values
from clients.optimizers import OptimizerSettings, build_optimizer
from clients.sparse_sgdm import SparseSGDM
from strategies.sparse_codec import gather_at, mask_positions

HEAD = "head."


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(6, 5)
        self.norm = nn.LayerNorm(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.body(x)))


def _mask(model: nn.Module) -> NodeMask:
    """body.weight partly trainable, body.bias and the LayerNorm frozen (no True entry)."""
    g = torch.Generator().manual_seed(1)
    bits = {
        "body.weight": torch.rand(5, 6, generator=g) < 0.4,
        "body.bias": torch.zeros(5, dtype=torch.bool),
        "norm.weight": torch.zeros(5, dtype=torch.bool),
        "norm.bias": torch.zeros(5, dtype=torch.bool),
    }
    return NodeMask(bits, mask_positions(bits))


SGDM = OptimizerSettings("sgdm", lr=0.1, weight_decay=1e-4, momentum=0.8)
ADAMW = OptimizerSettings("adamw", lr=1e-5, weight_decay=0.1, betas=(0.85, 0.99), eps=1e-7)


@pytest.mark.parametrize(
    ("settings", "dense_type", "sparse_type"),
    [(SGDM, torch.optim.SGD, SparseSGDM), (ADAMW, torch.optim.AdamW, MaskedAdamW)],
    ids=["sgdm", "adamw"],
)
def test_each_setting_builds_its_optimizer_dense_and_over_the_mask(
    settings, dense_type, sparse_type
):
    model = Tiny()
    dense = build_optimizer(model, settings, None, True, HEAD)
    assert type(dense) is dense_type
    assert all(p.requires_grad for p in model.parameters())
    assert len(dense.param_groups[0]["params"]) == len(list(model.parameters()))
    sparse = build_optimizer(model, settings, _mask(model), True, HEAD)
    assert type(sparse) is sparse_type
    trained = {id(p) for p in sparse.param_groups[0]["params"]}
    names = [n for n, p in model.named_parameters() if id(p) in trained]
    assert names == ["body.weight", "head.weight", "head.bias"]  # mask tensors, then the head
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["body.bias", "norm.weight", "norm.bias"]
    group = sparse.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (settings.lr, settings.weight_decay)
    if settings.name == "adamw":
        assert (group["betas"], group["eps"]) == (settings.betas, settings.eps)
        assert (dense.param_groups[0]["betas"], dense.param_groups[0]["eps"]) == (
            (0.85, 0.99),
            1e-7,
        )
    else:
        assert group["momentum"] == dense.param_groups[0]["momentum"] == 0.8


@pytest.mark.parametrize("settings", [SGDM, ADAMW], ids=["sgdm", "adamw"])
def test_a_frozen_head_gets_no_gradient_and_training_moves_only_the_mask(settings):
    model = Tiny()
    mask = _mask(model)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(model, settings, mask, False, HEAD)
    assert not model.head.weight.requires_grad
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 6)).square().mean().backward()
        optimizer.step()
    now = model.state_dict()
    trainable = mask.bits["body.weight"]
    assert torch.equal(now["body.weight"][~trainable], start["body.weight"][~trainable])
    assert (now["body.weight"][trainable] != start["body.weight"][trainable]).all()
    for name in ("body.bias", "norm.weight", "norm.bias", "head.weight", "head.bias"):
        assert torch.equal(now[name], start[name]), name


def test_an_unknown_optimizer_is_named():
    with pytest.raises(ValueError, match="optimizer 'adam': must be one of sgdm, adamw"):
        OptimizerSettings("adam", lr=0.1, weight_decay=0.0)


def test_the_clients_gather_is_the_wire_order_of_sparse_codec():
    """Values go up in the order the server reads them (strategies/sparse_codec)."""
    model = Tiny()
    mask = _mask(model)
    state = model.state_dict()
    ours = mask.gather(state)
    wire = gather_at(state, mask_positions(mask.bits))
    assert ours.keys() == wire.keys()
    assert all(torch.equal(ours[k], wire[k]) for k in ours)
    assert ours["body.weight"].numel() == int(mask.bits["body.weight"].sum())
    assert ours["body.bias"].numel() == 0


def test_trained_values_are_the_whole_model_or_the_mask_plus_the_head():
    model = Tiny()
    mask = _mask(model)
    state = model.state_dict()
    dense = trained_values(model, None, True, HEAD)
    assert dense.keys() == state.keys()
    sparse = trained_values(model, mask, False, HEAD)
    assert sparse.keys() == mask.bits.keys()
    assert torch.equal(sparse["body.weight"], state["body.weight"][mask.bits["body.weight"]])
    with_head = trained_values(model, mask, True, HEAD)
    assert with_head.keys() == mask.bits.keys() | {"head.weight", "head.bias"}
    assert torch.equal(with_head["head.weight"], state["head.weight"])


def test_damping_scales_exactly_the_frozen_entries():
    model = Tiny()
    mask = _mask(model)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    damp_frozen(model, mask.bits, 0.1)
    now = model.state_dict()
    trainable = mask.bits["body.weight"]
    assert torch.equal(now["body.weight"][trainable], start["body.weight"][trainable])
    assert torch.equal(now["body.weight"][~trainable], start["body.weight"][~trainable] * 0.1)
    assert torch.equal(now["norm.weight"], start["norm.weight"] * 0.1)  # all frozen
    assert torch.equal(now["head.weight"], start["head.weight"])  # not in the mask
    damp_frozen(model, mask.bits, 1.0)  # no damping: nothing changes
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in now.items())


def test_the_multiplier_is_made_once_per_dtype_and_device():
    model = Tiny()
    mask = _mask(model)
    first = mask.multiplier("body.weight", model.body.weight)
    assert first.dtype == torch.float32
    assert torch.equal(first.bool(), mask.bits["body.weight"])
    assert mask.multiplier("body.weight", model.body.weight) is first
    double = mask.multiplier("body.weight", model.body.weight.double())
    assert double.dtype == torch.float64 and double is not first
    assert mask.trainable("body.weight") and not mask.trainable("body.bias")
    assert not mask.trainable("head.weight")


def test_the_mask_cache_decodes_once_per_key_and_keeps_one_mask():
    model = nn.Linear(3, 2)
    decoded: list[str] = []

    def decode(name: str):
        def run() -> NodeMask:
            decoded.append(name)
            return _mask(model)

        return run

    cache = MaskCache()
    first = cache.get("a", decode("a"))
    assert cache.get("a", decode("a")) is first and decoded == ["a"]
    second = cache.get("b", decode("b"))
    assert second is not first and decoded == ["a", "b"]
    cache.get("a", decode("a"))  # one entry: the first mask was let go
    assert decoded == ["a", "b", "a"]
