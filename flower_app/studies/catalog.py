"""The study's experiments as data: which settings each study runs, on which base config.

A study is a list of settings; a setting is a name and the run-config keys it changes
on top of the base (the canonical experiment, or with ``--quick`` the miniature presets
``configs/miniature*.toml``). The sweep runner multiplies settings by seeds; nothing here
runs anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flower_app.config import ConfigError, RunConfig, load_preset
from strategies.masks import MASK_STRATEGIES
from strategies.server_rules import RULES

# the seed study's questions, then this project's extensions; ``all`` runs the seed's and
# the study's own question under the lens of task arithmetic (task addition and negation)
PAPER_STUDIES = ("fedavg", "heterogeneity", "local-steps", "mask-strategies", "centralized")
ALL_STUDIES = (*PAPER_STUDIES, "task-arithmetic")
STUDIES = (*PAPER_STUDIES, "label-skew", "task-arithmetic")
ALL = "all"
CLASSES_PER_CLIENT = (1, 5, 10, 50)
# label-skew: Dir(alpha) shards from near one class (0.05) to near IID (100), the range
# federated papers and FL-bench report (0.1, 0.5 and 1.0 the most common)
DIRICHLET_ALPHAS = (0.05, 0.1, 0.5, 1.0, 100.0)
LOCAL_STEPS = (4, 8, 16)
BASE_LOCAL_STEPS = 4  # the canonical J: rounds at J are base rounds x 4 / J
QUESTIONS = {
    "fedavg": "the reference federated run (K=100, C=0.1, J=4), and the same from random "
    "initial weights: what the pretrained backbone is worth",
    "heterogeneity": "how accuracy and update interference change with Nc classes per client",
    "local-steps": "more local steps, fewer rounds (J x rounds constant)",
    "mask-strategies": "sparse FedAvg at sparsity 0.9 with each mask strategy, against dense, "
    "at IID and Nc=5, with SGD momentum and with TaLoS's masked AdamW: which mask's updates "
    "survive averaging best (normalized accuracy, disagreement per round)",
    "centralized": "the upper bound: the same model and data, trained centrally",
    "label-skew": "the same question with Dirichlet label skew (Dir(alpha) shares per "
    "class), as most federated papers report it",
    "task-arithmetic": "one federation per task (disjoint class blocks), dense and with each "
    "mask: does task addition of the federations' task vectors keep each task, and does "
    "negation forget one task and keep the other (Ilharco et al. 2023; TaLoS)",
}
# task-arithmetic: the arms (dense, then each mask) and the default number of tasks. Dense is
# sparse FedAvg at sparsity 0 (a full mask, no calibration): the same head warm-up, then the
# head frozen, as in every masked arm, so all arms start from the same linear probe and
# differ only in which backbone entries train
DEFAULT_TASKS = 2
ARITHMETIC_ARMS = ("dense", *MASK_STRATEGIES)
TASK_SUFFIX = "-task"
# --quick: the miniature of every study (configs/miniature*.toml, each departure from the
# paper explained there): synthetic data, the tiny ViT pretrained by fl-pretrain, K=100,
# C=0.1, J=4
MINIATURE = "miniature.toml"
MINIATURE_CENTRALIZED = "miniature_centralized.toml"
# --strategies: how the server combines updates, crossed with a study's settings. FedProx's
# mu: Flower's default (0.0) is plain FedAvg, so a sweep's "fedprox" uses 0.01, inside the
# range the FedProx paper searched ({0.001, 0.01, 0.1, 1}); a proximal-mu=... override wins.
FEDPROX_MU = 0.01
SERVER_STRATEGIES: dict[str, dict[str, Any]] = {
    "fedavg": {"server-rule": "mean", "proximal-mu": 0.0},
    "fedprox": {"server-rule": "mean", "proximal-mu": FEDPROX_MU},
    **{rule: {"server-rule": rule} for rule in RULES if rule != "mean"},
}


# mask-strategies: (shards, optimizer) arms. Nc=5 is where clients interfere (update cosine
# 0.06 against 0.22 at IID in the miniature); SGD momentum is the seed's SparseSGDM, AdamW
# TaLoS's masked AdamW. Two arms fit the miniature study's 20 minutes at 3 seeds (18 min 40 s
# on 2 cores, two runs at a time); ("iid", "sgdm") is the next one to add (docs/studies.md).
MASK_SHARDS = {"iid": {"sharding": "iid"}, "nc5": {"sharding": "non-iid", "classes-per-client": 5}}
MASK_ARMS = (("nc5", "sgdm"), ("nc5", "adamw"))
# every mask-strategies run measures task-arithmetic interference (docs/studies.md) on this
# many validation examples per client, at the evaluation cadence of the miniature
MASK_TASK_METRICS = {"task-metrics-examples": 500, "task-metrics-every": 4}
# TaLoS's AdamW: lr 1e-5 for about 2,000 steps (vision/prune_finetune.py:302; Ilharco et
# al. 2023: 2,000 iterations). An arm with fewer steps along the global model's path
# (rounds x J) keeps lr x steps = 0.02, so the miniature's 128 get 1.5625e-4; the
# paper's 500 x 4 keep TaLoS's 1e-5. Its head warm-up trains with SGD momentum at the
# SGDM arm's lr, so both optimizers start sparse training from the same linear probe.
TALOS_ADAMW_LR, TALOS_STEPS = 1e-5, 2000


@dataclass(frozen=True)
class Setting:
    """One point of a study: ``overrides`` on top of the base run-config."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    centralized: bool = False


def scaled_rounds(base_rounds: int, local_steps: int, base_steps: int = BASE_LOCAL_STEPS) -> int:
    """Rounds at ``local_steps`` keeping local steps x rounds at ``base_steps x base_rounds``."""
    total = base_rounds * base_steps
    if total % local_steps:
        raise ConfigError(
            f"num-server-rounds={base_rounds} x local-steps {base_steps} = {total} is not "
            f"divisible by local-steps {local_steps}: choose num-server-rounds as a multiple "
            f"of {local_steps // _gcd(local_steps, base_steps)}"
        )
    return total // local_steps


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def task_blocks(num_classes: int, tasks: int) -> list[str]:
    """``tasks`` disjoint blocks of consecutive classes as ``task-classes`` values."""
    if not 2 <= tasks <= num_classes // 2:
        raise ConfigError(
            f"--tasks {tasks} is not allowed: must be in 2..{num_classes // 2} (disjoint "
            f"blocks of at least 2 of the {num_classes} classes)"
        )
    edges = [t * num_classes // tasks for t in range(tasks + 1)]
    return [f"{edges[t]}-{edges[t + 1] - 1}" for t in range(tasks)]


def arithmetic_settings(base: dict[str, Any], tasks: int) -> list[Setting]:
    """Arm x task. Rounds per task: the base's rounds (and head warm-up) divided by the
    number of tasks, rounded up, so each federation makes as many passes over its own
    task's data as the base run over all data (a task holds 1/tasks of the images)."""
    blocks = task_blocks(RunConfig.data_only(base).dataset_classes, tasks)
    rounds = -(-int(base.get("num-server-rounds", 500)) // tasks)
    warmup = -(-int(base.get("head-warmup-rounds", 20)) // tasks)
    shared = {
        "strategy": "sparse-fedavg",
        "head": "frozen",
        "num-server-rounds": rounds,
        "head-warmup-rounds": warmup,
    }
    arms = mask_arms()
    return [
        Setting(f"{arm}{TASK_SUFFIX}{t}", shared | keys | {"task-classes": block})
        for arm, keys in arms.items()
        for t, block in enumerate(blocks)
    ]


def arm_and_task(setting: str) -> tuple[str, int]:
    """``least_sensitive-task1`` -> (``least_sensitive``, 1)."""
    arm, _, task = setting.rpartition(TASK_SUFFIX)
    return arm, int(task)


def study_settings(study: str, base: dict[str, Any], tasks: int = DEFAULT_TASKS) -> list[Setting]:
    """The settings of ``study``; ``base`` is the federated base run-config, app defaults
    included (rounds, local steps and lr set the local-steps and AdamW settings);
    ``tasks`` the number of tasks of ``task-arithmetic``.

    The same settings at both scales: what differs with ``--quick`` is the base run-config.
    """
    if study == "fedavg":
        scratch = {"sharding": "iid", "weights": "random", "pretrained-path": ""}
        return [Setting("iid", {"sharding": "iid"}), Setting("iid-random-init", scratch)]
    if study == "heterogeneity":
        non_iid = [
            Setting(f"nc{nc}", {"sharding": "non-iid", "classes-per-client": nc})
            for nc in CLASSES_PER_CLIENT
        ]
        return [*non_iid, Setting("iid", {"sharding": "iid"})]
    if study == "local-steps":
        rounds = int(base.get("num-server-rounds", 500))
        return [
            Setting(f"J{j}", {"local-steps": j, "num-server-rounds": scaled_rounds(rounds, j)})
            for j in LOCAL_STEPS
        ]
    if study == "mask-strategies":
        return mask_settings(base)
    if study == "centralized":
        return [Setting("centralized", {}, centralized=True)]
    if study == "label-skew":
        return [
            Setting(f"dir{alpha:g}", {"sharding": "dirichlet", "dirichlet-alpha": alpha})
            for alpha in DIRICHLET_ALPHAS
        ]
    if study == "task-arithmetic":
        return arithmetic_settings(base, tasks)
    raise ConfigError(f"study {study!r} is not allowed: must be one of {', '.join(expand(ALL))}")


def adamw_arm(base: dict[str, Any]) -> dict[str, Any]:
    """The keys that turn a run into TaLoS's masked AdamW at this base's step count."""
    steps = int(base["num-server-rounds"]) * int(base["local-steps"])
    lr = TALOS_ADAMW_LR * TALOS_STEPS / steps
    return {"optimizer": "adamw", "lr": lr, "head-warmup-lr": float(base["lr"])}


def mask_settings(base: dict[str, Any]) -> list[Setting]:
    """Dense and each mask, per (shards, optimizer) arm: ``nc5-adamw-least_sensitive``.

    Every setting is sparse FedAvg with the same head warm-up and a frozen head; ``dense``
    is sparsity 0 (a full mask, no calibration), as in ``task-arithmetic``: all start
    training from the same linear probe and differ only in which backbone entries train.
    (Plain FedAvg trains its new head with the arm's optimizer from the first round: at
    AdamW's lr, 1.5625e-4 in the miniature, 128 steps leave that head at chance.)"""
    out = []
    for shards, optimizer in MASK_ARMS:
        arm = MASK_SHARDS[shards] | MASK_TASK_METRICS | {"strategy": "sparse-fedavg"}
        arm |= adamw_arm(base) if optimizer == "adamw" else {}
        for mask, keys in mask_arms().items():
            out.append(Setting(f"{shards}-{optimizer}-{mask}", arm | keys))
    return out


def mask_arms() -> dict[str, dict[str, Any]]:
    """``dense`` (sparsity 0, a full mask) and each mask strategy, as run-config keys."""
    arms: dict[str, dict[str, Any]] = {"dense": {"sparsity": 0.0, "mask-strategy": "random"}}
    return arms | {m: {"mask-strategy": m} for m in MASK_STRATEGIES}


def crossed(settings: list[Setting], strategies: list[str]) -> list[Setting]:
    """Each federated setting once per server strategy (``iid-fedadam``); the centralized
    baseline has no server and stays as it is. No strategies: the settings unchanged."""
    unknown = [s for s in strategies if s not in SERVER_STRATEGIES]
    if unknown:
        raise ConfigError(
            f"--strategies {','.join(unknown)} is not allowed: choose from "
            f"{', '.join(SERVER_STRATEGIES)}"
        )
    if not strategies:
        return settings
    out = []
    for setting in settings:
        if setting.centralized:
            out.append(setting)
            continue
        for name in strategies:
            overrides = setting.overrides | SERVER_STRATEGIES[name]
            out.append(Setting(f"{setting.name}-{name}", overrides))
    return out


def expand(study: str) -> list[str]:
    """``all`` is every question of the seed study and task arithmetic; any other name is
    itself (``label-skew`` runs only when named)."""
    return list(ALL_STUDIES) if study == ALL else [study]


def base_config(app_dir: Path, quick: bool, centralized: bool) -> dict[str, Any]:
    """The run-config every setting starts from (pyproject defaults fill in the rest)."""
    if centralized:
        preset = MINIATURE_CENTRALIZED if quick else "centralized.toml"
        return load_preset(app_dir / "configs" / preset)
    if quick:
        return load_preset(app_dir / "configs" / MINIATURE)
    return {}
