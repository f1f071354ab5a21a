"""How the server combines a training round's client updates, one registry entry per rule.

The weighted mean (FedAvg) and Flower 1.42's server rules, written over tensors:

- server optimisers (FedAvgM, FedAdam, FedYogi, FedAdagrad) step from the values that
  were sent towards the clients' example-weighted mean (the loop's own mean,
  ``OrderedFedAvg.mean_update``, which also gives the interference metrics);
- robust rules (FedMedian, FedTrimmedAvg, Krum) read every client's values.

Each rule gives the weights Flower's class of the same name gives on the same inputs
(``tests/unit/test_server_rules.py`` runs both side by side over several rounds, dense and
sparse), with the same defaults. Values are whatever a reply trains: whole tensors
(dense), or a mask's entries and the head (sparse), so a rule acts on trainable entries
only and its moments exist only for them.

A rule is one entry: ``@register_rule(name, *options, doc=...)`` on its class. An option
is its run-config key, the class's keyword, its default, its bound and a line of doc; the
run-config schema, its checks, ``pyproject.toml``'s defaults and the configuration page's
table follow from the registry (the last two are checked against it by a test).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

State = dict[str, torch.Tensor]
Tensors = Mapping[str, torch.Tensor]


# ---- the registry ------------------------------------------------------------------------
@dataclass(frozen=True)
class Bound:
    """What values an option allows: the docs' text, the error's text and the test."""

    text: str  # the configuration page's "allowed" cell
    message: str  # completes "must be ..." in the one-line error
    test: Callable[[float], bool]


POSITIVE = Bound("> 0", "a finite number > 0", lambda v: v > 0.0 and math.isfinite(v))
FRACTION = Bound("[0, 1)", "in [0, 1)", lambda v: 0.0 <= v < 1.0)
CUT = Bound("[0, 0.5)", "in [0, 0.5) (cut per side)", lambda v: 0.0 <= v < 0.5)
COUNT = Bound("integer >= 0", "an integer >= 0", lambda v: v >= 0)


@dataclass(frozen=True)
class RuleOption:
    """One option of a rule: run-config ``key``, the class's ``argument``, its default."""

    key: str
    argument: str
    default: float | int
    bound: Bound


# why a rule's options do not fit rounds of this many clients: (key, reason), or None
FitCheck = Callable[[Mapping[str, Any], int], tuple[str, str] | None]


@dataclass(frozen=True)
class RuleEntry:
    """A server rule: its class, its options and what the configuration page says of it."""

    name: str
    make: Callable[..., ServerRule]
    options: tuple[RuleOption, ...]
    doc: str
    fits: FitCheck | None = None

    def build(self, values: Mapping[str, Any]) -> ServerRule:
        """The rule with its options' values (by run-config key; defaults where missing)."""
        return self.make(**{o.argument: values.get(o.key, o.default) for o in self.options})


RULES: dict[str, RuleEntry] = {}


def register_rule(
    name: str, *options: RuleOption, doc: str, fits: FitCheck | None = None
) -> Callable[[type[ServerRule]], type[ServerRule]]:
    """Class decorator: the rule ``name`` with its ``options`` becomes a run-config choice."""

    def add(cls: type[ServerRule]) -> type[ServerRule]:
        taken = {o.key for entry in RULES.values() for o in entry.options}
        clash = [o.key for o in options if o.key in taken]
        if name in RULES or clash:
            raise ValueError(f"server rule {name!r} or option {clash} is registered already")
        RULES[name] = RuleEntry(name, cls, options, doc, fits)
        cls.name = name  # what the strategy checks ("mean" skips the rule's pass)
        return cls

    return add


@contextmanager
def registered(name: str, *options: RuleOption, doc: str, make: type[ServerRule]) -> Iterator[None]:
    """A rule registered for the length of a ``with`` block (a test's toy rule)."""
    register_rule(name, *options, doc=doc)(make)
    try:
        yield
    finally:
        RULES.pop(name, None)


def rule_options() -> dict[str, RuleOption]:
    """Every registered rule's options by run-config key."""
    return {o.key: o for entry in RULES.values() for o in entry.options}


def build_rule(name: str, values: Mapping[str, Any] | None = None) -> ServerRule:
    """The registered rule ``name`` with its options' ``values`` (by run-config key)."""
    if name not in RULES:
        raise ValueError(f"server rule {name!r}: must be one of {', '.join(RULES)}")
    return RULES[name].build(values or {})


# ---- the rules ---------------------------------------------------------------------------
@register_rule("mean", doc="the example-weighted mean of the clients' values (FedAvg)")
class ServerRule:
    """The weighted mean (FedAvg): the new values are the mean; nothing is kept."""

    name = "mean"

    def combine(
        self,
        server_round: int,
        sent: Tensors,
        states: Sequence[Tensors],
        weights: Sequence[float],
        mean: Tensors,
    ) -> State:
        """The new values of the floating tensors of ``sent`` (what was sent), from each
        client's ``states`` (same names and shapes), their ``weights`` and their
        example-weighted ``mean``; ``server_round`` counts the training phase's rounds."""
        return dict(mean)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore."""


@register_rule(
    "fedavgm",
    RuleOption("fedavgm-server-lr", "server_learning_rate", 1.0, POSITIVE),
    RuleOption("fedavgm-momentum", "server_momentum", 0.0, FRACTION),
    doc="`FedAvgM(server_learning_rate=1.0, server_momentum=0.0)`",
)
class FedAvgM(ServerRule):
    """SGD with momentum on the pseudo-gradient sent - mean (Flower's FedAvgM; its defaults
    make it the mean itself). State: the momentum, one tensor per trained tensor."""

    def __init__(self, server_learning_rate: float, server_momentum: float) -> None:
        self.lr, self.beta = server_learning_rate, server_momentum
        self.momentum: State = {}

    def combine(self, server_round, sent, states, weights, mean) -> State:
        if self.beta == 0.0 and self.lr == 1.0:
            return dict(mean)
        new = {}
        for name, value in mean.items():
            step = sent[name] - value
            if self.beta > 0.0:
                past = self.momentum.get(name)
                step = step if past is None else self.beta * past + step
                self.momentum[name] = step
            new[name] = sent[name] - self.lr * step
        return new

    def state_dict(self) -> dict[str, Any]:
        return {"momentum": dict(self.momentum)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.momentum = dict(state["momentum"])


class FedOpt(ServerRule):
    """Flower's FedOpt family: first moment m, a second moment v (each rule its own), and
    the step eta m / (sqrt(v) + tau) from the sent values. State: m and v."""

    def __init__(self, eta: float, beta_1: float, beta_2: float, tau: float) -> None:
        self.eta, self.beta_1, self.beta_2, self.tau = eta, beta_1, beta_2, tau
        self.m_t: State = {}
        self.v_t: State = {}

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # Flower computes FedAdam's bias-corrected step size as a numpy float64, which widens
    # its step to float64; the other rules step in the tensors' float32
    widens = False

    def step_size(self, server_round: int) -> float:
        return self.eta

    def combine(self, server_round, sent, states, weights, mean) -> State:
        eta, new = self.step_size(server_round), {}
        for name, value in mean.items():
            delta = value - sent[name]
            m = self.m_t.get(name, torch.zeros_like(delta))
            self.m_t[name] = m = self.beta_1 * m + (1.0 - self.beta_1) * delta
            v = self.v_t.get(name, torch.zeros_like(delta))
            self.v_t[name] = v = self.second_moment(v, delta)
            # correctly rounded as numpy's float32 sqrt (torch's vectorised one is off by
            # one unit in about 0.6% of entries): through float64, exact after rounding
            denominator = v.double().sqrt().to(v.dtype) + self.tau
            if self.widens:
                step = eta * m.double() / denominator.double()
                new[name] = (sent[name].double() + step).to(value.dtype)
            else:
                new[name] = sent[name] + eta * m / denominator
        return new

    def state_dict(self) -> dict[str, Any]:
        return {"m_t": dict(self.m_t), "v_t": dict(self.v_t)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.m_t, self.v_t = dict(state["m_t"]), dict(state["v_t"])


@register_rule(
    "fedadam",
    RuleOption("fedadam-eta", "eta", 0.1, POSITIVE),
    RuleOption("fedadam-beta-1", "beta_1", 0.9, FRACTION),
    RuleOption("fedadam-beta-2", "beta_2", 0.99, FRACTION),
    RuleOption("fedadam-tau", "tau", 1e-3, POSITIVE),
    doc="`FedAdam(eta=1e-1, beta_1=0.9, beta_2=0.99, tau=1e-3)`",
)
class FedAdam(FedOpt):
    """Adam's second moment, and its bias-corrected step size over the training rounds."""

    widens = True

    def second_moment(self, v, delta):
        return self.beta_2 * v + (1.0 - self.beta_2) * delta**2

    def step_size(self, server_round: int) -> float:
        t = server_round + 1.0  # Flower counts from its round 1 as t = 2
        return self.eta * math.sqrt(1.0 - self.beta_2**t) / (1.0 - self.beta_1**t)


@register_rule(
    "fedyogi",
    RuleOption("fedyogi-eta", "eta", 0.01, POSITIVE),
    RuleOption("fedyogi-beta-1", "beta_1", 0.9, FRACTION),
    RuleOption("fedyogi-beta-2", "beta_2", 0.99, FRACTION),
    RuleOption("fedyogi-tau", "tau", 1e-3, POSITIVE),
    doc="`FedYogi(eta=1e-2, beta_1=0.9, beta_2=0.99, tau=1e-3)`",
)
class FedYogi(FedOpt):
    """Yogi's second moment: moves towards delta^2 by a fixed share, in either direction."""

    def second_moment(self, v, delta):
        square = delta**2
        return v - (1.0 - self.beta_2) * square * torch.sign(v - square)


@register_rule(
    "fedadagrad",
    RuleOption("fedadagrad-eta", "eta", 0.1, POSITIVE),
    RuleOption("fedadagrad-tau", "tau", 1e-3, POSITIVE),
    doc="`FedAdagrad(eta=1e-1, tau=1e-3)`",
)
class FedAdagrad(FedOpt):
    """Adagrad's second moment, the sum of delta^2; no momentum (Flower's beta_1 = 0)."""

    def __init__(self, eta: float, tau: float) -> None:
        super().__init__(eta, 0.0, 0.0, tau)

    def second_moment(self, v, delta):
        return v + delta**2


def stacked(states: Sequence[Tensors], name: str) -> torch.Tensor:
    """One tensor's values of every client, as rows (clients x entries)."""
    return torch.stack([s[name].reshape(-1) for s in states])


@register_rule("fedmedian", doc="`FedMedian()`: the entry-wise median, unweighted")
class FedMedian(ServerRule):
    """The entry-wise median (the mean of the two middle values for an even count)."""

    def combine(self, server_round, sent, states, weights, mean) -> State:
        n, new = len(states), {}
        for name, value in mean.items():
            ordered = stacked(states, name).sort(dim=0).values
            middle = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
            new[name] = middle.reshape(value.shape)
        return new


@register_rule(
    "fedtrimmedavg",
    RuleOption("trimmed-beta", "beta", 0.2, CUT),
    doc="`FedTrimmedAvg(beta=0.2)`: the share cut at each end, per entry",
)
class FedTrimmedAvg(ServerRule):
    """The entry-wise mean of what is left after cutting int(beta n) values at each end."""

    def __init__(self, beta: float) -> None:
        self.beta = beta

    def combine(self, server_round, sent, states, weights, mean) -> State:
        cut, new = int(self.beta * len(states)), {}
        for name, value in mean.items():
            ordered = stacked(states, name).sort(dim=0).values
            kept = ordered[cut : len(states) - cut]
            new[name] = kept.mean(dim=0).reshape(value.shape)
        return new


KRUM_MALICIOUS = RuleOption("krum-malicious", "num_malicious_nodes", 0, COUNT)


def krum_fits(values: Mapping[str, Any], clients_per_round: int) -> tuple[str, str] | None:
    """Krum scores each reply by its n - f - 2 closest: at least one must remain."""
    key, most = KRUM_MALICIOUS.key, clients_per_round - 3
    if values[key] <= most:
        return None
    return key, (
        f"Krum needs clients per round - {key} - 2 >= 1: at most {most} "
        f"with {clients_per_round} clients per round"
    )


@register_rule(
    "krum",
    KRUM_MALICIOUS,
    doc="`Krum(num_malicious_nodes=0)`; at most clients per round - 3",
    fits=krum_fits,
)
class Krum(ServerRule):
    """The one client's values whose n - f - 2 nearest others are closest (squared L2 over
    everything it trained), f = ``num_malicious_nodes``."""

    def __init__(self, num_malicious_nodes: int) -> None:
        self.malicious = int(num_malicious_nodes)

    def combine(self, server_round, sent, states, weights, mean) -> State:
        n = len(states)
        distances = torch.zeros(n, n, dtype=torch.float64)
        for name in mean:  # ||a - b||^2 = ||a||^2 + ||b||^2 - 2 a.b, tensor by tensor
            rows = stacked(states, name).double()
            gram = rows @ rows.T
            norms = gram.diagonal()
            distances += norms[:, None] + norms[None, :] - 2.0 * gram
        closest = max(1, n - self.malicious - 2)
        nearest = distances.sort(dim=1).values[:, 1 : closest + 1]  # [0]: itself
        best = int(torch.argmin(nearest.sum(dim=1)))
        return {name: states[best][name].clone() for name in mean}
