"""How the server combines a training round's client updates: their weighted mean, or one of
Flower 1.42's server rules, run by Flower's own strategy classes.

The project keeps its own round loop (seeded sampling, retries, reply checks, weights by
reference, hooks, checkpoints), so a Flower strategy cannot drive the run; its
``aggregate_train`` is called inside the loop instead, on what the rule needs:

- server optimisers (FedAvgM, FedAdam, FedYogi, FedAdagrad) are a step from the values
  that were sent towards the clients' weighted mean. The mean is the loop's own
  (``OrderedFedAvg.mean_update``: partition order, one pass that also gives the
  interference metrics); Flower's class gets it as a single reply of weight 1, which its
  FedAvg averages to itself exactly, and its ``current_arrays`` are set to the sent values
  each round (Flower sets them in ``configure_train``, which samples nodes itself);
- robust rules (FedMedian, FedTrimmedAvg, Krum) need every client's values: each usable
  reply becomes one Flower reply of its values and its ``num-examples``.

Values are whatever a reply trains: whole tensors (dense), or the mask's entries and the
head (sparse), so a rule acts on trainable entries only and its moments exist only for
them. Flower's strategies log each call; their ``flwr`` log lines are held back here.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as flower

NUM_EXAMPLES = "num-examples"
OPTIMISERS = ("fedavgm", "fedadam", "fedyogi", "fedadagrad")
ROBUST = ("fedmedian", "fedtrimmedavg", "krum")
RULES = ("mean", *OPTIMISERS, *ROBUST)
State = dict[str, torch.Tensor]


@contextlib.contextmanager
def quiet_flower() -> Iterator[None]:
    """Flower's strategies log every aggregation at INFO; the run prints its own lines."""
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def flower_reply(values: Mapping[str, torch.Tensor], num_examples: float) -> Message:
    """A reply as Flower's ``aggregate_train`` reads it: one ArrayRecord, one MetricRecord."""
    arrays = ArrayRecord({n: Array(v.detach().cpu().numpy()) for n, v in values.items()})
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({NUM_EXAMPLES: num_examples})})
    return Message(content, dst_node_id=0, message_type="train")


def as_tensors(arrays: ArrayRecord, like: Mapping[str, torch.Tensor]) -> State:
    """Flower's result back as tensors of ``like``'s dtypes (numpy may widen them)."""
    return {n: torch.from_numpy(np.asarray(arrays[n].numpy())).to(t.dtype) for n, t in like.items()}


class ServerRule:
    """The weighted mean (FedAvg): the new values are the mean; nothing is kept."""

    name = "mean"

    def combine(
        self,
        server_round: int,
        sent: Mapping[str, torch.Tensor],
        states: Sequence[Mapping[str, torch.Tensor]],
        weights: Sequence[float],
        mean: Mapping[str, torch.Tensor],
    ) -> State:
        """The new values of the floating tensors of ``sent`` (what was sent), from each
        client's ``states`` (same names and shapes), their ``weights`` and their
        example-weighted ``mean``."""
        return dict(mean)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore."""


class ServerOptimiser(ServerRule):
    """FedAvgM, FedAdam, FedYogi or FedAdagrad: Flower's step from the sent values to the mean.

    State (checkpointed): FedAvgM's momentum vector, or FedOpt's first and second moments,
    one tensor per trained tensor (for sparse runs: per mask entry and head entry).
    """

    def __init__(self, name: str, flower_strategy: flower.FedAvg) -> None:
        self.name = name
        self.flower = flower_strategy
        self.names: list[str] = []  # FedAvgM keeps its momentum as a list in this order

    def combine(self, server_round, sent, states, weights, mean) -> State:
        self.names = list(mean)
        if isinstance(self.flower, flower.FedAvgM):
            self.flower.current_arrays = ArrayRecord(
                {n: Array(v.cpu().numpy()) for n, v in sent.items()}
            )
        else:
            self.flower.current_arrays = {n: v.cpu().numpy() for n, v in sent.items()}
        with quiet_flower():
            arrays, _ = self.flower.aggregate_train(server_round, [flower_reply(mean, 1.0)])
        return as_tensors(arrays, mean)

    def state_dict(self) -> dict[str, Any]:
        f = self.flower
        if isinstance(f, flower.FedAvgM):
            vector = f.momentum_vector or []
            names = self.names if vector else []
            return {
                "momentum": {n: torch.from_numpy(v) for n, v in zip(names, vector, strict=True)}
            }
        moments = {"m_t": f.m_t, "v_t": getattr(f, "v_t", None)}
        return {
            k: {n: torch.from_numpy(a) for n, a in (v or {}).items()} for k, v in moments.items()
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        f = self.flower
        if isinstance(f, flower.FedAvgM):
            momentum = state["momentum"]
            self.names = list(momentum)
            f.momentum_vector = [t.numpy() for t in momentum.values()] or None
            return
        f.m_t = {n: t.numpy() for n, t in state["m_t"].items()} or None
        f.v_t = {n: t.numpy() for n, t in state["v_t"].items()} or None


class RobustRule(ServerRule):
    """FedMedian, FedTrimmedAvg or Krum over the clients' values; nothing is kept."""

    def __init__(self, name: str, flower_strategy: flower.FedAvg) -> None:
        self.name = name
        self.flower = flower_strategy

    def combine(self, server_round, sent, states, weights, mean) -> State:
        replies = [
            flower_reply({n: s[n] for n in mean}, w) for s, w in zip(states, weights, strict=True)
        ]
        with quiet_flower():
            arrays, _ = self.flower.aggregate_train(server_round, replies)
        return as_tensors(arrays, mean)


def build_rule(name: str, options: Mapping[str, float]) -> ServerRule:
    """The rule ``name`` (one of ``RULES``) with Flower's keyword arguments ``options``
    (those of its constructor: ``server_learning_rate``, ``eta``, ``beta``, ...)."""
    classes = {
        "fedavgm": flower.FedAvgM,
        "fedadam": flower.FedAdam,
        "fedyogi": flower.FedYogi,
        "fedadagrad": flower.FedAdagrad,
        "fedmedian": flower.FedMedian,
        "fedtrimmedavg": flower.FedTrimmedAvg,
        "krum": flower.Krum,
    }
    if name == "mean":
        return ServerRule()
    if name not in classes:
        raise ValueError(f"server rule {name!r}: must be one of {', '.join(RULES)}")
    instance = classes[name](**options)
    return ServerOptimiser(name, instance) if name in OPTIMISERS else RobustRule(name, instance)
