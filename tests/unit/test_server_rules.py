"""Server rules inside the project's round arithmetic against Flower 1.42's own strategies,
dense and sparse, over several rounds; FedProx's proximal step by hand."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as flower
from torch import nn

from clients.sparse_sgdm import SparseSGDM
from clients.training import ProximalTerm, sgd_step
from flower_app.config import ConfigError, RunConfig
from strategies.fedavg import OrderedFedAvg
from strategies.plan import TRAIN, Phase, RoundClock, RoundPosition
from strategies.server_rules import RULES, build_rule
from strategies.sparse_codec import gather_masked
from strategies.sparse_fedavg import SparseFedAvg

# Flower Messages are built outside a Flower process here (conftest's ``identity``)
pytestmark = pytest.mark.usefixtures("identity")
ROUNDS = 3
CLIENTS = 6
WEIGHTS = [1.0, 1.0, 2.0, 4.0, 4.0, 4.0]  # dyadic shares: both means are exact in float32
# options that make every rule do something (Flower's defaults make FedAvgM the mean)
OPTIONS = {
    "fedavgm": {"server_learning_rate": 0.5, "server_momentum": 0.9},
    "fedadam": {"eta": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
    "fedyogi": {"eta": 0.01, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
    "fedadagrad": {"eta": 0.1, "tau": 1e-3},
    "fedmedian": {},
    "fedtrimmedavg": {"beta": 0.2},
    "krum": {"num_malicious_nodes": 1},
}
ROBUST = ("fedmedian", "fedtrimmedavg", "krum")
FLOWER = {
    "fedavgm": flower.FedAvgM,
    "fedadam": flower.FedAdam,
    "fedyogi": flower.FedYogi,
    "fedadagrad": flower.FedAdagrad,
    "fedmedian": flower.FedMedian,
    "fedtrimmedavg": flower.FedTrimmedAvg,
    "krum": flower.Krum,
}


class NodesOnly:
    """What Flower's ``configure_train`` asks of a Grid: the node ids."""

    def get_node_ids(self) -> list[int]:
        return list(range(1, CLIENTS + 1))


def flower_reply(values: dict[str, torch.Tensor], num_examples: float) -> Message:
    """A reply as Flower's ``aggregate_train`` reads it: one ArrayRecord, one MetricRecord."""
    arrays = ArrayRecord({n: Array(v.numpy()) for n, v in values.items()})
    metrics = MetricRecord({"num-examples": num_examples})
    return Message(
        RecordDict({"arrays": arrays, "metrics": metrics}), dst_node_id=0, message_type="train"
    )


def run_config_values(rule: str) -> dict[str, float]:
    """``OPTIONS[rule]`` (Flower's keywords) as the registry's run-config keys."""
    return {o.key: OPTIONS[rule][o.argument] for o in RULES[rule].options}


def dyadic(shape: tuple[int, ...], generator: torch.Generator, scale: int) -> torch.Tensor:
    """Values on a grid of 2**-12: sums with dyadic shares stay exact in float32."""
    return torch.randint(-scale, scale + 1, shape, generator=generator).float() / 4096


def client_states(sent: dict[str, torch.Tensor], round_: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(round_)
    return [{n: t + dyadic(t.shape, g, 64) for n, t in sent.items()} for _ in range(CLIENTS)]


def fedavg(rule: str) -> OrderedFedAvg:
    return OrderedFedAvg(
        partition_to_node={i: i + 1 for i in range(CLIENTS)},
        clients_per_round=CLIENTS,
        seed=0,
        clock=RoundClock([Phase(TRAIN, ROUNDS)]),
        lr_at=lambda r: 0.1,
        server_rule=build_rule(rule, run_config_values(rule) if rule in OPTIONS else {}),
    )


def flower_round(strategy, round_: int, current: ArrayRecord, states: list[dict]) -> ArrayRecord:
    """One round as Flower runs it: ``configure_train`` (which records the current arrays),
    then ``aggregate_train`` over the clients' replies."""
    list(strategy.configure_train(round_, current, ConfigRecord(), NodesOnly()))
    replies = [flower_reply(s, w) for s, w in zip(states, WEIGHTS, strict=True)]
    arrays, _ = strategy.aggregate_train(round_, replies)
    # as a float32 PyTorch model holds them for the next round (FedOpt widens to float64)
    return ArrayRecord({n: torch.from_numpy(arrays[n].numpy()).float() for n in arrays})


def our_round(strategy: OrderedFedAvg, round_: int, sent: dict, states: list[dict]) -> dict:
    position = RoundPosition(round_, TRAIN, round_, ROUNDS)
    mean = strategy.mean_update(sent, states, WEIGHTS, None)
    return strategy.apply_rule(position, sent, states, WEIGHTS, mean)


def initial(seed: int = 99) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": dyadic((8, 6), g, 4096), "b": dyadic((6,), g, 4096)}


def assert_close(ours: dict[str, torch.Tensor], theirs: ArrayRecord) -> None:
    """Within 1e-6 relative; Flower's FedOpt rules widen to float64 (a numpy float64
    learning rate), the model's tensors stay float32."""
    for name, value in ours.items():
        expected = torch.from_numpy(theirs[name].numpy()).to(value.dtype)
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("rule", [r for r in RULES if r != "mean"])
def test_every_rule_gives_flowers_weights_over_several_rounds(rule):
    """Each round both sides start from the same sent weights (dyadic, so both means are
    exact and equal: what is compared is the rule and the state it carries across rounds).
    FedAvgM keeps its own current weights from round to round (its ``configure_train``
    takes them only once), so there each round starts from the last round's result, as in
    a run; its step is linear, so float32 rounding of the means stays at its own size."""
    strategy, reference = fedavg(rule), FLOWER[rule](**OPTIONS[rule])
    ours = initial(1)
    for round_ in range(1, ROUNDS + 1):
        sent = ours if rule == "fedavgm" else initial(round_)
        states = client_states(sent, round_)  # the same replies for both
        ours = our_round(strategy, round_, sent, states)
        theirs = flower_round(reference, round_, ArrayRecord(sent), states)
        assert_close(ours, theirs)


@pytest.mark.parametrize("rule", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_server_optimisers_equal_flowers_bit_for_bit_on_the_same_mean(rule):
    """Given the same mean (any float32 values, not only dyadic ones), each step equals
    Flower's class's bit for bit over several rounds: the arithmetic, its order and its
    rounding (numpy's correctly rounded float32 square root included) are Flower's."""
    rule_of, reference = fedavg(rule).server_rule, FLOWER[rule](**OPTIONS[rule])
    g = torch.Generator().manual_seed(3)
    ours = {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g)}
    for round_ in range(1, ROUNDS + 1):
        sent = ours
        mean = {n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in sent.items()}
        ours = rule_of.combine(round_, sent, [mean], [1.0], mean)
        list(reference.configure_train(round_, ArrayRecord(sent), ConfigRecord(), NodesOnly()))
        theirs, _ = reference.aggregate_train(round_, [flower_reply(mean, 1.0)])
        for name, value in ours.items():
            assert torch.equal(value, torch.from_numpy(theirs[name].numpy()).float()), name


@pytest.mark.parametrize("rule", RULES)
def test_rules_do_not_depend_on_the_order_of_the_replies(rule):
    sent = initial()
    states = client_states(sent, 1)
    forward = our_round(fedavg(rule), 1, sent, states)
    order = list(reversed(range(CLIENTS)))
    strategy = fedavg(rule)
    position = RoundPosition(1, TRAIN, 1, ROUNDS)
    backward_states, backward_weights = [states[i] for i in order], [WEIGHTS[i] for i in order]
    mean = strategy.mean_update(sent, backward_states, backward_weights, None)
    backward = strategy.apply_rule(position, sent, backward_states, backward_weights, mean)
    for name in forward:
        torch.testing.assert_close(forward[name], backward[name], rtol=1e-6, atol=1e-7)


def sparse(rule: str, mask: dict[str, torch.Tensor]) -> SparseFedAvg:
    strategy = SparseFedAvg(
        eligible=["w"],
        head_mode="frozen",
        sparsity=0.75,
        mask_strategy="lowest_magnitude",
        calibration_schedule="exponential",
        calibration_clients=CLIENTS,
        fisher_config={},
        warmup_lr=0.1,
        partition_to_node={i: i + 1 for i in range(CLIENTS)},
        clients_per_round=CLIENTS,
        seed=0,
        clock=RoundClock([Phase(TRAIN, ROUNDS)]),
        lr_at=lambda r: 0.1,
        server_rule=build_rule(rule, run_config_values(rule) if rule in OPTIONS else {}),
    )
    strategy.set_mask(mask)
    return strategy


@pytest.mark.parametrize("rule", [r for r in RULES if r != "mean"])
def test_sparse_rules_act_on_the_masks_entries_only(rule):
    """The rule sees the trainable values (as Flower would see a model of just those) and
    frozen entries stay bit for bit what was sent, round after round."""
    mask = {"w": torch.rand(8, 6, generator=torch.Generator().manual_seed(5)) < 0.25}
    strategy, reference = sparse(rule, mask), FLOWER[rule](**OPTIONS[rule])
    weights = {"w": initial(1)["w"]}
    for round_ in range(1, ROUNDS + 1):
        sent = weights if rule == "fedavgm" else {"w": initial(round_)["w"]}
        replies = [gather_masked(s, mask) for s in client_states(sent, round_)]  # sparse replies
        position = RoundPosition(round_, TRAIN, round_, ROUNDS)
        mean = strategy.mean_update(sent, replies, WEIGHTS, None)
        new = strategy.apply_rule(position, sent, replies, WEIGHTS, mean)
        weights = strategy.merge(sent, new).to_torch_state_dict()
        current = ArrayRecord(gather_masked(sent, mask))
        theirs = flower_round(reference, round_, current, replies)
        frozen = ~mask["w"]
        assert torch.equal(weights["w"][frozen], sent["w"][frozen])
        expected = torch.from_numpy(theirs["w"].numpy())
        torch.testing.assert_close(weights["w"][mask["w"]], expected, rtol=1e-6, atol=1e-7)
    state = strategy.state_dict()["server-rule"]
    for moments in state.values():  # optimiser state only for the trainable entries
        assert all(t.numel() == int(mask["w"].sum()) for t in moments.values())


@pytest.mark.parametrize("rule", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_optimiser_state_round_trips_through_its_state_dict(rule):
    """A rule restored from its state dict continues as the uninterrupted one does."""
    sent = initial()
    straight, resumed = fedavg(rule), fedavg(rule)
    after_one = our_round(straight, 1, sent, client_states(sent, 1))
    our_round(resumed, 1, sent, client_states(sent, 1))
    restored = fedavg(rule)
    restored.load_state_dict(resumed.state_dict())
    a = our_round(straight, 2, after_one, client_states(after_one, 2))
    b = our_round(restored, 2, after_one, client_states(after_one, 2))
    assert all(torch.equal(a[n], b[n]) for n in a)
    fresh = our_round(fedavg(rule), 2, after_one, client_states(after_one, 2))
    if rule != "fedadagrad":  # without momentum, FedAdagrad's first step ignores the past m_t
        assert any(not torch.equal(a[n], fresh[n]) for n in a)


def test_robust_rules_keep_no_state():
    for rule in ROBUST:
        assert fedavg(rule).state_dict() == {"server-rule": {}}


def test_the_mean_rule_returns_the_mean_itself():
    sent = initial()
    states = client_states(sent, 1)
    strategy = fedavg("mean")
    mean = strategy.mean_update(sent, states, WEIGHTS, None)
    new = our_round(strategy, 1, sent, states)
    assert all(torch.equal(new[n], mean[n]) for n in mean)


# ---- FedProx: the client's proximal term ------------------------------------------------
def _model() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(4, 3)


def _step_by_hand(model: nn.Linear, anchor: dict, x, y, lr: float, mu: float) -> dict:
    """w - lr * (grad of the cross-entropy + mu (w - w0)), with autograd for the first part."""
    loss = nn.functional.cross_entropy(model(x), y)
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in trained])
    return {
        n: (p - lr * (g + mu * (p - anchor[n]))).detach()
        for (n, p), g in zip(trained, grads, strict=True)
    }


def test_a_fedprox_step_adds_mu_times_the_distance_to_the_global_weights():
    model, mu, lr = _model(), 0.5, 0.1
    x, y = (
        torch.randn(5, 4, generator=torch.Generator().manual_seed(1)),
        torch.tensor([0, 1, 2, 0, 1]),
    )
    proximal = ProximalTerm(model, mu)  # the received global weights
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():  # a client somewhere along its local steps
        for p in model.parameters():
            p.add_(0.05)
    expected = _step_by_hand(model, anchor, x, y, lr, mu)
    sgd_step(model, torch.optim.SGD(model.parameters(), lr=lr), x, y, proximal=proximal)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-6, atol=1e-7)


def test_a_sparse_fedprox_step_keeps_frozen_entries_bit_frozen():
    model, mu, lr = _model(), 0.5, 0.1
    x, y = (
        torch.randn(5, 4, generator=torch.Generator().manual_seed(2)),
        torch.tensor([2, 1, 0, 0, 1]),
    )
    mask = torch.rand(3, 4, generator=torch.Generator().manual_seed(3)) < 0.5
    model.bias.requires_grad_(False)  # as the ClientApp freezes what the mask leaves out
    proximal = ProximalTerm(model, mu)
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.weight[mask] += 0.05  # only trainable entries ever move
    before = model.weight.detach().clone()
    expected = _step_by_hand(model, anchor, x, y, lr, mu)["weight"]
    optimizer = SparseSGDM([model.weight], [mask], lr=lr, momentum=0.0, weight_decay=0.0)
    sgd_step(model, optimizer, x, y, proximal=proximal)
    assert torch.equal(model.weight.detach()[~mask], before[~mask])
    torch.testing.assert_close(model.weight.detach()[mask], expected[mask], rtol=1e-6, atol=1e-7)
    assert torch.equal(model.bias, anchor["bias"])


# ---- the registry: each option named once; pyproject and the docs follow it ------------------
ROOT = Path(__file__).resolve().parents[2]


def _table_rows(page: Path) -> dict[str, list[str]]:
    """The configuration page's table rows by their first cell."""
    rows = {}
    for line in page.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) >= 4:
            rows[cells[0]] = cells[1:]
    return rows


def test_pyproject_and_the_configuration_page_agree_with_the_rule_registry():
    with open(ROOT / "pyproject.toml", "rb") as f:
        defaults = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    rows = _table_rows(ROOT / "docs" / "configuration.md")
    assert rows["`server-rule`"][1] == ", ".join(f"`{name}`" for name in RULES)
    for entry in RULES.values():
        for option in entry.options:
            assert defaults[option.key] == option.default, option.key
        if entry.options:
            row = rows[", ".join(f"`{o.key}`" for o in entry.options)]
            assert row[0] == ", ".join(str(o.default) for o in entry.options)
            assert row[1] == "; ".join(o.bound.text for o in entry.options)
            assert row[2] == entry.doc


def test_every_rule_option_is_named_once_in_the_code():
    """A rule's options are spelled in its registry entry only: the run-config schema, its
    checks and the ServerApp read them from there."""
    sources = [
        path.read_text()
        for package in ("flower_app", "strategies", "clients")
        for path in (ROOT / package).rglob("*.py")
    ]
    for entry in RULES.values():
        for option in entry.options:
            literal = f'"{option.key}"'
            assert sum(text.count(literal) for text in sources) == 1, option.key


def test_a_bad_option_value_is_refused_in_one_line_naming_the_key():
    with pytest.raises(ConfigError) as info:
        RunConfig.from_run_config({"fedyogi-tau": 0.0}, check_files=False)
    assert str(info.value) == (
        "run-config key 'fedyogi-tau' = 0.0 is not allowed: must be a finite number > 0"
    )
