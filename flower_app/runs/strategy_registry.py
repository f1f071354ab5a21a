"""The strategies a run-config may name (``strategy``), one entry each.

An entry says everything the app needs of a strategy: its class, the phases of a run, the
keyword arguments it takes from the run-config beyond the common ones, the messages its
clients answer, and whether clients train a mask's entries (which the run-config's checks,
figure titles and task arithmetic ask). The ServerApp builds the plan and the strategy from
the entry; the run-config takes its allowed values from the registry. The class is named by
its import path and imported when a ServerApp builds it, so a ClientApp process (one per
message in a deployment) does not import the server's strategies.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from strategies import protocol
from strategies.masks import eligible_names, needs_fisher
from strategies.plan import CALIBRATION, HEAD_WARMUP, TRAIN, Phase

Shapes = Mapping[str, tuple[int, ...]]


class StrategyConfig(Protocol):
    """What the entries read of a run-config (``RunConfig`` has all of it)."""

    num_server_rounds: int
    head_warmup_rounds: int
    calibration_rounds: int
    mask_strategy: str
    mask_scope: str
    head: str
    sparsity: float
    calibration_schedule: str
    fisher_samples: int
    fisher_labels: str
    fisher_score: str
    calibration_damping: float
    head_warmup_lr: float
    lr: float

    @property
    def calibration_clients(self) -> int: ...


@dataclass(frozen=True)
class StrategyEntry:
    """One strategy: ``target`` is its class as ``module:Class``."""

    name: str
    doc: str
    target: str
    phases: Callable[[StrategyConfig], list[Phase]]
    options: Callable[[StrategyConfig, Shapes], dict[str, Any]]
    messages: tuple[str, ...]  # the message types its clients answer
    masked: bool  # clients train a mask's entries only

    def build(self, cfg: StrategyConfig, shapes: Shapes, common: Mapping[str, Any]) -> Any:
        """The strategy with the common keyword arguments and its own options."""
        module, _, name = self.target.partition(":")
        cls = getattr(importlib.import_module(module), name)
        return cls(**common, **self.options(cfg, shapes))


STRATEGIES: dict[str, StrategyEntry] = {}


def register_strategy(entry: StrategyEntry) -> StrategyEntry:
    """Add ``entry``: its name becomes an allowed value of ``strategy``."""
    if entry.name in STRATEGIES:
        raise ValueError(f"strategy {entry.name!r} is registered already")
    STRATEGIES[entry.name] = entry
    return entry


def sparse_phases(cfg: StrategyConfig) -> list[Phase]:
    """Head warm-up, calibration (Fisher masks only), then the training rounds."""
    calibration = cfg.calibration_rounds if needs_fisher(cfg.mask_strategy) else 0
    return [
        Phase(HEAD_WARMUP, cfg.head_warmup_rounds),
        Phase(CALIBRATION, calibration),
        Phase(TRAIN, cfg.num_server_rounds),
    ]


def sparse_options(cfg: StrategyConfig, shapes: Shapes) -> dict[str, Any]:
    """SparseFedAvg's mask, calibration and warm-up settings."""
    return {
        "eligible": eligible_names(shapes, cfg.mask_scope),
        "head_mode": cfg.head,
        "sparsity": cfg.sparsity,
        "mask_strategy": cfg.mask_strategy,
        "calibration_schedule": cfg.calibration_schedule,
        "calibration_clients": cfg.calibration_clients,
        "fisher_config": {
            protocol.FISHER_SAMPLES: cfg.fisher_samples,
            protocol.FISHER_LABELS: cfg.fisher_labels,
            protocol.CALIBRATION_DAMPING: cfg.calibration_damping,
            protocol.FISHER_SCORE: cfg.fisher_score,
        },
        "warmup_lr": cfg.head_warmup_lr or cfg.lr,
    }


register_strategy(
    StrategyEntry(
        name="fedavg",
        doc="FedAvg: every sampled client trains every weight",
        target="strategies.fedavg:OrderedFedAvg",
        phases=lambda cfg: [Phase(TRAIN, cfg.num_server_rounds)],
        options=lambda cfg, shapes: {},
        messages=(protocol.TRAIN,),
        masked=False,
    )
)
register_strategy(
    StrategyEntry(
        name="sparse-fedavg",
        doc="FedAvg over a gradient mask (TaLoS): head warm-up, Fisher calibration, training",
        target="strategies.sparse_fedavg:SparseFedAvg",
        phases=sparse_phases,
        options=sparse_options,
        messages=(protocol.TRAIN, protocol.QUERY_FISHER),
        masked=True,
    )
)
