"""The run-config schema: one typed, frozen object built from ``context.run_config``.

Every key a user may set lives here with its default, its allowed values and its
error message. Both the ServerApp and the ClientApp build a ``RunConfig`` from the
same run-config, so a bad value stops the run before any data, model or Ray work.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import tomllib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from clients.fisher import FISHER_LABEL_MODES, FISHER_SCORES
from clients.optimizers import OPTIMIZERS, OptimizerSettings
from flower_app.data.partitioning import partition_feasibility_error
from flower_app.data.registry import DatasetSpec, SourceOptions, dataset_names, dataset_spec
from flower_app.data.sources import SYNTHETIC_TEST_PER_CLASS, DataNotFoundError
from flower_app.data.tasks import ALLOWED as TASK_CLASSES_ALLOWED
from flower_app.data.tasks import parse_task_classes
from flower_app.models.backbone_cache import make_command
from flower_app.models.specs import MODEL_SPECS
from flower_app.runs.strategy_registry import STRATEGIES, StrategyEntry
from strategies.masks import CALIBRATION_SCHEDULES, MASK_SCOPES, MASK_STRATEGIES
from strategies.server_rules import RULES as SERVER_RULES
from strategies.server_rules import rule_options

HEAD_MODES = ("train", "frozen")
SHARDINGS = ("iid", "non-iid", "dirichlet")
WEIGHTS = ("pretrained", "random")
LR_SCHEDULES = ("cosine", "constant")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
# how weights travel: a shared-memory file where the node can read it (auto), or always
# in the message; "shared-memory" requires every node to read it
WEIGHTS_TRANSPORTS = ("auto", "message", "shared-memory")
# experiment trackers (optional extras): event files or a W&B run in the run folder
TRACKERS = ("none", "tensorboard", "wandb")
WANDB_MODES = ("offline", "online")
# the keys a data set's registry entry reads (``RunConfig.source_options``)
SOURCE_KEYS = (
    "dataset",
    "data-dir",
    "download",
    "synthetic-train-per-class",
    "synthetic-test-per-class",
)


class ConfigError(ValueError):
    """A run-config value that is not allowed; the message is one line."""


def _err(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"run-config key '{key}' = {value!r} is not allowed: {allowed}")


@dataclass(frozen=True)
class RunConfig:
    """The validated run-config; attribute names are the keys with '-' -> '_'."""

    dataset: str = "cifar100"
    data_dir: str = "~/.cache/fl-task-arithmetic/data"
    download: bool = True
    synthetic_train_per_class: int = 500
    synthetic_test_per_class: int = SYNTHETIC_TEST_PER_CLASS
    # a task: only these classes (flower_app/data/tasks.py), relabelled 0..n-1, n head outputs
    task_classes: str = ""
    model: str = "vit_small_patch16_224.dino"
    weights: str = "pretrained"
    pretrained_path: str = ""
    pretrained_head: bool = False  # also load head.weight/head.bias from pretrained-path
    image_size: int = 224
    num_clients: int = 100
    fraction_train: float = 0.1
    local_steps: int = 4
    batch_size: int = 64
    lr: float = 0.01
    lr_schedule: str = "cosine"
    warmup_rounds: int = 0
    min_lr: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    # the clients' local optimizer (clients/optimizers.py): SGD momentum, or TaLoS's AdamW
    # (betas, eps: torch.optim.AdamW's and TaLoS AdaptW's defaults, vision/optimizers.py:17-18)
    optimizer: str = "sgdm"
    adamw_weight_decay: float = 0.1  # decoupled (TaLoS); weight_decay is SGD's L2 term
    adamw_beta_1: float = 0.9
    adamw_beta_2: float = 0.999
    adamw_eps: float = 1e-8
    num_server_rounds: int = 500
    sharding: str = "iid"
    classes_per_client: int = 10
    # sharding = "dirichlet": label shares per client ~ Dir(alpha), as Flower Datasets'
    # DirichletPartitioner (alpha, min_partition_size=10 are its defaults' meaning)
    dirichlet_alpha: float = 0.5
    dirichlet_min_size: int = 10
    val_fraction: float = 0.1
    eval_every: int = 10
    eval_batch_size: int = 256
    seed: int = 0
    strategy: str = "fedavg"
    output_dir: str = "results"
    run_name: str = ""
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False  # torch.compile the client model (GPU; one compile per worker)
    weights_transport: str = "auto"
    round_timeout: float = 3600.0
    node_wait_timeout: float = 60.0
    update_metrics: bool = True  # per-round cosine / norm ratio of client updates
    # task-arithmetic interference (flower_app/runs/task_metrics.py): validation examples
    # the server scores (0 = off) and the rounds between measurements
    task_metrics_examples: int = 0
    task_metrics_every: int = 1
    # experiment tracking (docs/tracking.md): off, TensorBoard event files, or a W&B run
    tracking: str = "none"
    wandb_project: str = "fl-task-arithmetic"
    wandb_mode: str = "offline"
    # reliability
    checkpoint_every: int = 10
    resume: bool = False
    min_train_clients: int = 1
    max_round_retries: int = 3
    client_failure_rate: float = 0.0
    # sparse fine-tuning (strategy = "sparse-fedavg")
    sparsity: float = 0.9
    mask_strategy: str = "least_sensitive"
    mask_scope: str = "backbone"
    calibration_rounds: int = 4
    calibration_schedule: str = "exponential"
    calibration_damping: float = 0.1
    calibration_fraction: float = 1.0
    fisher_samples: int = 128
    fisher_labels: str = "sampled"
    fisher_score: str = "logit"
    fisher_batch_size: int = 32
    head: str = "frozen"
    head_warmup_rounds: int = 20
    head_warmup_lr: float = 0.0  # the warm-up's SGDM lr; 0 = the run's lr
    # how the server combines the training rounds' updates (strategies/server_rules.py) and
    # FedProx's proximal term on the clients; defaults: Flower 1.42's (flwr.serverapp.strategy)
    server_rule: str = "mean"
    proximal_mu: float = 0.0  # FedProx(proximal_mu=0.0)
    # every registered rule's options by run-config key (fedadam-eta, ...); a key not set
    # has its registry default: strategies/server_rules.py names each option once
    rule_values: tuple[tuple[str, Any], ...] = ()
    # centralized baseline (flower_app/centralized/baseline.py); the federated app ignores them
    epochs: int = 50
    warmup_epochs: int = 0

    # ---- construction ---------------------------------------------------------------
    @classmethod
    def keys(cls) -> list[str]:
        """All run-config keys (kebab-case), as in ``[tool.flwr.app.config]``."""
        return [f.name.replace("_", "-") for f in cls.own_fields()] + list(rule_options())

    @classmethod
    def own_fields(cls) -> list[dataclasses.Field]:
        """The fields that are run-config keys themselves (the rule options are held in
        ``rule_values``, keyed by the registry)."""
        return [f for f in dataclasses.fields(cls) if f.name != "rule_values"]

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any], check_files: bool = True) -> RunConfig:
        """Parse and validate; raises ``ConfigError`` naming the key, value and what is allowed.

        ``check_files=False`` skips the checks of the coordinator's files (``data-dir``,
        ``pretrained-path``): a SuperNode uses neither, so in a deployment where they
        exist on the coordinator only, the nodes must not refuse the run for them.
        """
        known = {f.name: f for f in cls.own_fields()}
        options = rule_options()
        values: dict[str, Any] = {}
        rule_values = []
        for key, raw in run_config.items():
            name = key.replace("-", "_")
            if key in options:
                rule_values.append((key, _coerce(key, raw, options[key].default)))
            elif name not in known or "_" in key:
                raise ConfigError(unknown_key_message(key))
            else:
                values[name] = _coerce(key, raw, known[name].default)
        cfg = cls(**values, rule_values=tuple(sorted(rule_values)))
        cfg.validate(check_files)
        return cfg

    @classmethod
    def data_only(cls, run_config: dict[str, Any]) -> RunConfig:
        """The defaults with ``run_config``'s data keys (what ``source_options`` reads),
        typed but not validated: enough to count a data set's classes from a base
        run-config that a study's settings complete later."""
        names = {key: key.replace("-", "_") for key in SOURCE_KEYS if key in run_config}
        values = {
            name: _coerce(key, run_config[key], getattr(cls, name)) for key, name in names.items()
        }
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config with kebab-case keys (what results/config.json holds)."""
        own = {f.name.replace("_", "-"): getattr(self, f.name) for f in self.own_fields()}
        return own | self.server_rule_values()

    # ---- derived values -------------------------------------------------------------
    @property
    def dataset_spec(self) -> DatasetSpec:
        """The registry's entry of ``dataset`` (``flower_app/data/registry.py``)."""
        _choice("dataset", self.dataset, dataset_names())
        return dataset_spec(self.dataset)

    @property
    def source_options(self) -> SourceOptions:
        """What the data set's entry reads of this run-config."""
        return SourceOptions(
            self.data_path,
            self.download,
            self.synthetic_train_per_class,
            self.synthetic_test_per_class,
        )

    @cached_property
    def class_counts(self) -> tuple[int, ...]:
        """Training images per class of the whole data set, before the validation split, as
        its entry knows them before loading (an image folder's from its file names, so a
        folder that does not fit is a data-dir error wherever a config is built)."""
        try:
            return self.dataset_spec.class_counts(self.source_options)
        except DataNotFoundError as exc:
            raise _err("data-dir", self.data_dir, str(exc)) from None

    @property
    def dataset_classes(self) -> int:
        """Classes of the whole data set."""
        return len(self.class_counts)

    @property
    def task_class_ids(self) -> tuple[int, ...]:
        """The data set's classes this run trains and tests on (``task-classes``)."""
        return parse_task_classes(self.task_classes, self.dataset_classes)

    @property
    def num_classes(self) -> int:
        """Classes of the run's task: its head's outputs (all the data set's by default)."""
        return len(self.task_class_ids) if self.task_classes.strip() else self.dataset_classes

    @property
    def classes_text(self) -> str:
        """Whose classes ``num_classes`` counts, for messages."""
        return f"task-classes={self.task_classes!r}" if self.task_classes.strip() else self.dataset

    @property
    def data_path(self) -> Path:
        """Absolute data directory (``~`` expanded)."""
        return Path(os.path.expanduser(self.data_dir)).resolve()

    @property
    def clients_per_round(self) -> int:
        """Clients sampled per round: round(C*K), at least one."""
        return max(1, round(self.fraction_train * self.num_clients))

    def experiment_identity(self) -> dict[str, Any]:
        """The keys that define what a run computes; a checkpoint must match them all."""
        operational = {
            "resume",
            "run-name",
            "output-dir",
            "round-timeout",
            "node-wait-timeout",
            "checkpoint-every",
            "eval-batch-size",
            "device",
            "compile",
            "weights-transport",
            "data-dir",
            "download",
            "update-metrics",
            "task-metrics-examples",
            "task-metrics-every",
            "tracking",
            "wandb-project",
            "wandb-mode",
            "epochs",  # the centralized baseline's keys do not change a federated run
            "warmup-epochs",
        }
        if self.dataset_spec.data_dir_is_data:  # the folder's images are the data set
            operational.discard("data-dir")
        return {k: v for k, v in self.to_dict().items() if k not in operational}

    def server_rule_values(self) -> dict[str, Any]:
        """Every registered rule option's value by run-config key (set, or its default)."""
        given = dict(self.rule_values)
        return {key: given.get(key, o.default) for key, o in rule_options().items()}

    def optimizer_settings(self, lr: float | None = None, name: str = "") -> OptimizerSettings:
        """The local optimizer's settings, at ``lr`` (a round's scheduled lr) or ``lr``;
        ``name`` another optimizer than the run's (the head warm-up's SGDM)."""
        name = name or self.optimizer
        return OptimizerSettings(
            name=name,
            lr=self.lr if lr is None else lr,
            weight_decay=self.adamw_weight_decay if name == "adamw" else self.weight_decay,
            momentum=self.momentum,
            betas=(self.adamw_beta_1, self.adamw_beta_2),
            eps=self.adamw_eps,
        )

    @property
    def strategy_entry(self) -> StrategyEntry:
        """The registry's entry of ``strategy`` (``flower_app/runs/strategy_registry.py``)."""
        _choice("strategy", self.strategy, tuple(STRATEGIES))
        return STRATEGIES[self.strategy]

    @property
    def calibration_clients(self) -> int:
        """Clients asked for their Fisher per calibration round."""
        return max(1, round(self.calibration_fraction * self.num_clients))

    @property
    def shards_name(self) -> str:
        """The sharding in a word: ``iid``, ``nc5``, ``dir0.5``."""
        return {"iid": "iid", "dirichlet": f"dir{self.dirichlet_alpha:g}"}.get(
            self.sharding, f"nc{self.classes_per_client}"
        )

    def resolved_run_name(self, timestamp: str) -> str:
        """``run-name`` or a name that says what ran."""
        if self.run_name:
            return self.run_name
        shards = self.shards_name
        rule = "" if self.server_rule == "mean" else f"-{self.server_rule}"
        prox = f"-prox{self.proximal_mu:g}" if self.proximal_mu else ""
        optimizer = "" if self.optimizer == "sgdm" else f"-{self.optimizer}"
        name = f"{self.strategy}{rule}{prox}{optimizer}"
        return f"{name}_{shards}_J{self.local_steps}_seed{self.seed}_{timestamp}"

    def title(self, run_name: str, centralized: bool = False) -> str:
        """A figure's title for a run: its name, its scale (model, data, image size) and
        what it ran, naming the strategy and server rule where they are not FedAvg's."""
        scale = f"{self.model} on {self.dataset} at {self.image_size} px"
        if centralized:
            return f"{run_name}: centralized, {scale}, {self.epochs} epochs, seed {self.seed}"
        what = []
        if self.strategy_entry.masked:
            what.append(f"{self.strategy} ({self.mask_strategy}, sparsity {self.sparsity:g})")
        if self.server_rule != "mean":
            what.append(f"server rule {self.server_rule}")
        if self.proximal_mu > 0:
            what.append(f"FedProx mu={self.proximal_mu:g}")
        federation = (
            f"K={self.num_clients}, C={self.fraction_train:g}, J={self.local_steps}, "
            f"{self.shards_name}"
        )
        if self.task_classes.strip():
            federation += f", classes {self.task_classes}"
        parts = [", ".join(what) or "FedAvg", scale, federation, f"seed {self.seed}"]
        return f"{run_name}: " + "; ".join(parts)

    # ---- validation -----------------------------------------------------------------
    def validate(self, check_files: bool = True) -> None:
        """Check every value; cheap (no data, model or network).

        Every key that ``clients/`` and ``strategies/`` also check is checked here, so a
        user sees this one-line run-config error before any work starts. The files the
        coordinator reads are checked only with ``check_files``.
        """
        self._validate_choices()
        self._validate_task_classes()
        self._validate_sparse()
        self._validate_training()
        self._validate_reliability()
        self._validate_server_rule()
        # only Nc shards read classes-per-client: an IID run on 5 classes keeps the default 10
        if self.sharding == "non-iid" and not 1 <= self.classes_per_client <= self.num_classes:
            raise _err(
                "classes-per-client",
                self.classes_per_client,
                f"must be in 1..{self.num_classes} (classes of {self.classes_text})",
            )
        self._validate_model()
        self._validate_partition()
        self._validate_task_metrics()
        if check_files:
            self._validate_paths()

    def _validate_choices(self) -> None:
        _choice("dataset", self.dataset, dataset_names())
        _choice("model", self.model, tuple(MODEL_SPECS))
        _choice("weights", self.weights, WEIGHTS)
        _choice("sharding", self.sharding, SHARDINGS)
        _choice("strategy", self.strategy, tuple(STRATEGIES))
        _choice("lr-schedule", self.lr_schedule, LR_SCHEDULES)
        _choice("device", self.device, DEVICES)
        _choice("precision", self.precision, PRECISIONS)
        _choice("weights-transport", self.weights_transport, WEIGHTS_TRANSPORTS)
        _choice("mask-strategy", self.mask_strategy, MASK_STRATEGIES)
        _choice("mask-scope", self.mask_scope, MASK_SCOPES)
        _choice("calibration-schedule", self.calibration_schedule, CALIBRATION_SCHEDULES)
        _choice("fisher-labels", self.fisher_labels, FISHER_LABEL_MODES)
        _choice("fisher-score", self.fisher_score, FISHER_SCORES)
        _choice("head", self.head, HEAD_MODES)
        _choice("tracking", self.tracking, TRACKERS)
        _choice("wandb-mode", self.wandb_mode, WANDB_MODES)
        if not self.wandb_project.strip():
            raise _err("wandb-project", self.wandb_project, "must be a non-empty W&B project name")

    def _validate_task_classes(self) -> None:
        total = self.dataset_classes  # first: a folder that does not fit is data-dir's error
        try:
            classes = parse_task_classes(self.task_classes, total)
        except ValueError as exc:
            raise _err("task-classes", self.task_classes, str(exc)) from None
        if len(classes) < 2:
            allowed = f"a task needs >= 2 classes; {TASK_CLASSES_ALLOWED}"
            raise _err("task-classes", self.task_classes, allowed)

    def _validate_sparse(self) -> None:
        """Sparse fine-tuning and centralized-epoch keys, in the order they always were
        checked (with several bad keys, the first is the one reported)."""
        _at_least("calibration-rounds", self.calibration_rounds, 1)
        _at_least("fisher-samples", self.fisher_samples, 1)
        _at_least("fisher-batch-size", self.fisher_batch_size, 1)
        _at_least("head-warmup-rounds", self.head_warmup_rounds, 0)
        if not (math.isfinite(self.head_warmup_lr) and self.head_warmup_lr >= 0):
            raise _err("head-warmup-lr", self.head_warmup_lr, "must be a number >= 0 (0: lr)")
        _at_least("epochs", self.epochs, 1)
        _at_least("warmup-epochs", self.warmup_epochs, 0)
        _warmup_below("warmup-epochs", self.warmup_epochs, "epochs", self.epochs)
        if not 0.0 <= self.sparsity < 1.0:
            raise _err("sparsity", self.sparsity, "must be in [0, 1) (the fraction frozen)")
        if not 0.0 < self.calibration_fraction <= 1.0:
            raise _err("calibration-fraction", self.calibration_fraction, "must be in (0, 1]")
        if not 0.0 < self.calibration_damping <= 1.0:
            raise _err(
                "calibration-damping",
                self.calibration_damping,
                "must be in (0, 1] (1.0 re-scores the undamped network)",
            )
        self._validate_head()

    def _validate_head(self) -> None:
        """A frozen head must be a trained one: warmed up here, or loaded with the weights."""
        if self.pretrained_head and not (self.weights == "pretrained" and self.pretrained_path):
            raise _err(
                "pretrained-head",
                True,
                "needs weights=pretrained and pretrained-path to a file with a trained head "
                "(e.g. a run's final_model.safetensors)",
            )
        frozen_random = self.head == "frozen" and self.head_warmup_rounds == 0
        if self.strategy_entry.masked and frozen_random and not self.pretrained_head:
            raise _err(
                "head-warmup-rounds",
                0,
                "with head=frozen the classifier would stay random for the whole run: set "
                "head-warmup-rounds >= 1, head=train, or pretrained-head=true with a "
                "pretrained-path that holds a trained head",
            )

    def _validate_training(self) -> None:
        """Counts, fractions and optimizer settings of the training rounds."""
        _at_least("num-clients", self.num_clients, 1)
        _at_least("local-steps", self.local_steps, 1)
        _at_least("batch-size", self.batch_size, 1)
        _at_least("eval-batch-size", self.eval_batch_size, 1)
        _at_least("num-server-rounds", self.num_server_rounds, 1)
        _at_least("eval-every", self.eval_every, 1)
        _at_least("synthetic-train-per-class", self.synthetic_train_per_class, 2)
        _at_least("synthetic-test-per-class", self.synthetic_test_per_class, 1)
        _at_least("warmup-rounds", self.warmup_rounds, 0)
        rounds = self.num_server_rounds
        _warmup_below("warmup-rounds", self.warmup_rounds, "num-server-rounds", rounds)
        if not 0.0 < self.fraction_train <= 1.0:
            raise _err("fraction-train", self.fraction_train, "must be in (0, 1]")
        if not (self.lr > 0.0 and math.isfinite(self.lr)):
            raise _err("lr", self.lr, "must be a finite number > 0")
        if not 0.0 <= self.min_lr <= self.lr:
            raise _err("min-lr", self.min_lr, f"must be in [0, lr={self.lr}]")
        if not 0.0 <= self.momentum < 1.0:
            raise _err("momentum", self.momentum, "must be in [0, 1)")
        if not 0.0 <= self.weight_decay < 1.0:
            raise _err("weight-decay", self.weight_decay, "must be in [0, 1)")
        self._validate_optimizer()
        if not 0.0 <= self.val_fraction < 1.0:
            raise _err("val-fraction", self.val_fraction, "must be in [0, 1)")

    def _validate_optimizer(self) -> None:
        """The local optimizer and AdamW's options (checked whichever optimizer is chosen)."""
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        if not 0.0 <= self.adamw_weight_decay < 1.0:
            raise _err("adamw-weight-decay", self.adamw_weight_decay, "must be in [0, 1)")
        for key in ("adamw-beta-1", "adamw-beta-2"):
            value = getattr(self, key.replace("-", "_"))
            if not 0.0 <= value < 1.0:
                raise _err(key, value, "must be in [0, 1)")
        if not (self.adamw_eps > 0.0 and math.isfinite(self.adamw_eps)):
            raise _err(
                "adamw-eps",
                self.adamw_eps,
                "must be a finite number > 0 (a frozen entry's step is 0 / eps)",
            )

    def _validate_reliability(self) -> None:
        """Checkpoints, retries, failures, resume and timeouts."""
        _at_least("checkpoint-every", self.checkpoint_every, 1)
        _at_least("max-round-retries", self.max_round_retries, 0)
        if not 1 <= self.min_train_clients <= self.clients_per_round:
            raise _err(
                "min-train-clients",
                self.min_train_clients,
                f"must be in 1..{self.clients_per_round} (clients sampled per round)",
            )
        if self.strategy_entry.masked and self.min_train_clients > self.calibration_clients:
            raise _err(
                "min-train-clients",
                self.min_train_clients,
                f"must be <= the {self.calibration_clients} clients of a calibration round "
                "(calibration-fraction x num-clients)",
            )
        if not 0.0 <= self.client_failure_rate < 1.0:
            raise _err("client-failure-rate", self.client_failure_rate, "must be in [0, 1)")
        if self.resume and not self.run_name:
            raise _err("resume", True, "needs the run-name of the run to continue")
        if self.round_timeout <= 0:
            raise _err("round-timeout", self.round_timeout, "must be > 0 seconds")
        if self.node_wait_timeout <= 0:
            raise _err("node-wait-timeout", self.node_wait_timeout, "must be > 0 seconds")

    def _validate_server_rule(self) -> None:
        """The server rule and every rule's options (all are checked, whichever is chosen)."""
        _choice("server-rule", self.server_rule, tuple(SERVER_RULES))
        if not (self.proximal_mu >= 0.0 and math.isfinite(self.proximal_mu)):
            raise _err("proximal-mu", self.proximal_mu, "must be a finite number >= 0")
        values = self.server_rule_values()
        for key, option in rule_options().items():
            if not option.bound.test(values[key]):
                raise _err(key, values[key], f"must be {option.bound.message}")
        fits = SERVER_RULES[self.server_rule].fits
        problem = fits(values, self.clients_per_round) if fits else None
        if problem:
            raise _err(problem[0], values[problem[0]], problem[1])

    def _validate_model(self) -> None:
        spec = MODEL_SPECS[self.model]
        if self.image_size < spec.patch_size or self.image_size % spec.patch_size:
            raise _err(
                "image-size",
                self.image_size,
                f"must be a positive multiple of the patch size {spec.patch_size} of {self.model}",
            )
        if self.weights == "pretrained" and not spec.hub_id and not self.pretrained_path:
            raise _err(
                "weights",
                self.weights,
                f"{self.model} has no published weights: set weights=random "
                "or pretrained-path to a checkpoint",
            )

    @property
    def task_class_counts(self) -> list[int]:
        """Images per class of the run's classes in the official training set, before the
        validation split (the entry's counts, known before loading)."""
        return [self.class_counts[c] for c in self.task_class_ids]

    def _validate_partition(self) -> None:
        counts = self.task_class_counts
        train_per_class = [n - round(self.val_fraction * n) for n in counts]
        if not (self.dirichlet_alpha > 0.0 and math.isfinite(self.dirichlet_alpha)):
            raise _err("dirichlet-alpha", self.dirichlet_alpha, "must be a finite number > 0")
        _at_least("dirichlet-min-size", self.dirichlet_min_size, 0)
        reason = partition_feasibility_error(
            train_per_class,
            self.num_classes,
            self.num_clients,
            self.sharding,
            self.classes_per_client,
            self.dirichlet_min_size,
        )
        if reason:
            key, value = {
                "non-iid": ("classes-per-client", self.classes_per_client),
                "dirichlet": ("dirichlet-min-size", self.dirichlet_min_size),
            }.get(self.sharding, ("num-clients", self.num_clients))
            raise _err(key, value, reason)

    def _validate_task_metrics(self) -> None:
        """Task metrics score the server's validation split, at least one example a class."""
        _at_least("task-metrics-every", self.task_metrics_every, 1)
        _at_least("task-metrics-examples", self.task_metrics_examples, 0)
        budget = self.task_metrics_examples
        if budget == 0:
            return
        if budget < self.num_classes:
            raise _err(
                "task-metrics-examples",
                budget,
                f"must be 0 (off) or >= {self.num_classes}, one validation example for each "
                f"class of {self.classes_text}",
            )
        if self.val_fraction == 0.0:
            raise _err(
                "task-metrics-examples",
                budget,
                "task metrics score the server's validation split and val-fraction = 0 "
                "leaves the server none: set val-fraction > 0 or task-metrics-examples = 0",
            )
        per_class = min(self.task_class_counts)  # the class with the fewest validation images
        if round(self.val_fraction * per_class) == 0:
            raise _err(
                "task-metrics-examples",
                budget,
                f"needs validation examples of every class: val-fraction = "
                f"{self.val_fraction} leaves round({self.val_fraction} x {per_class}) = 0 a "
                "class; raise val-fraction or set task-metrics-examples = 0",
            )

    @property
    def shard_options(self) -> dict[str, Any]:
        """``partition_indices`` keywords beyond the sharding: one place for every caller
        (the ClientApp, the node-data writer, the ServerApp's check)."""
        return {
            "dirichlet_alpha": self.dirichlet_alpha,
            "dirichlet_min_size": self.dirichlet_min_size,
        }

    def _validate_paths(self) -> None:
        self.check_data_dir()
        self.check_pretrained_path()

    def check_data_dir(self) -> None:
        """The data set's files are in ``data-dir`` as its entry needs them (a set that is
        downloaded on demand only when the run may not download it)."""
        problem = self.dataset_spec.files_problem(self.source_options)
        if problem:
            raise _err("data-dir", self.data_dir, problem)

    def check_pretrained_path(self) -> None:
        """The weights file exists; a missing ``fl-pretrain`` backbone names its command."""
        if self.pretrained_path:
            path = Path(os.path.expanduser(self.pretrained_path))
            if not path.is_file():
                command = make_command(path)
                hint = f" (the pretrained tiny ViT: make it with {command})" if command else ""
                raise _err(
                    "pretrained-path", self.pretrained_path, "must be an existing file" + hint
                )


def unknown_key_message(key: str) -> str:
    """One line naming an unknown key and the closest known ones (typos are the usual cause)."""
    close = difflib.get_close_matches(key.replace("_", "-"), RunConfig.keys(), n=3)
    hint = " or ".join(f"'{k}'" for k in close)
    tail = f"did you mean {hint}?" if close else "the keys are listed in flower_app/config.py"
    return f"run-config key '{key}' is unknown; {tail}"


def overrides_text(run_config: dict[str, Any]) -> str:
    """The keys that differ from the defaults as ``flwr run --run-config`` pairs (strings
    single-quoted, as Flower's TOML parsing of the pairs wants them); "" if none."""
    defaults = RunConfig().to_dict()
    pairs = []
    for key, value in run_config.items():
        if key in defaults and value != defaults[key]:
            text = f"'{value}'" if isinstance(value, str) else json.dumps(value)
            pairs.append(f"{key}={text}")
    return " ".join(pairs)


def _coerce(key: str, raw: Any, default: Any) -> Any:
    """Convert a run-config value to the type of the key's default, or fail naming the key."""
    if isinstance(default, bool):
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "false"):
            return raw.lower() == "true"
        raise _err(key, raw, "must be a boolean (true or false)")
    if isinstance(default, int):
        if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
            raise _err(key, raw, "must be an integer")
        try:
            as_float = float(raw)
        except ValueError:
            raise _err(key, raw, "must be an integer") from None
        if not as_float.is_integer():
            raise _err(key, raw, "must be an integer")
        return int(as_float)
    if isinstance(default, float):
        if isinstance(raw, bool):
            raise _err(key, raw, "must be a number")
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise _err(key, raw, "must be a number") from None
    if not isinstance(raw, str):
        raise _err(key, raw, "must be a string")
    return raw


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise _err(key, value, f"must be one of {', '.join(allowed)}")


def _warmup_below(key: str, value: int, total_key: str, total: int) -> None:
    """A warm-up (0 = none) must leave at least one step of the schedule after it."""
    if value > 0 and value >= total:
        raise _err(key, value, f"must be smaller than {total_key} ({total})")


def _at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise _err(key, value, f"must be an integer >= {low}")


def explain_insufficient_replies(reason: str, cfg: RunConfig) -> str:
    """A strategy's "too few replies" reason, with the run-config keys that decide it."""
    return (
        f"{reason}; check the clients' logs, or lower run-config min-train-clients="
        f"{cfg.min_train_clients} / raise max-round-retries={cfg.max_round_retries}"
    )


# ---- run-configs outside Flower (console scripts, sweeps, benchmarks) -------------------
def app_defaults(app: Path) -> dict[str, Any]:
    """The app folder's ``[tool.flwr.app.config]`` (what Flower itself starts from); a folder
    without it is a one-line ``--app`` error."""
    try:
        with open(app / "pyproject.toml", "rb") as f:
            return dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        raise ConfigError(
            f"--app {str(app)!r} is not allowed: it must be the Flower app folder (with "
            "pyproject.toml and [tool.flwr.app.config]); run from there or pass --app"
        ) from None


def load_preset(path: Path) -> dict[str, Any]:
    """A TOML run-config preset such as ``configs/quick.toml``, as a dict."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"run-config preset {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"run-config preset {str(path)!r} is not valid TOML: {exc}") from None


# flwr.common.config.parse_config_args's pattern, with an empty value allowed (``key=``
# clears a string key; Flower's pattern would drop the pair without a word)
_PAIR = re.compile(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S*)")


def parse_pairs(items: list[str], flag: str = "override") -> dict[str, str]:
    """``key=value`` pairs as ``flwr run --run-config`` / ``--federation-config`` take them.

    The one parser of every command line here: an item may hold several pairs separated by
    spaces, as Flower's; a value in '...' or "..." may hold spaces (the quotes are dropped,
    as Flower's TOML reading drops them), any other runs to the next space; values stay
    strings (the schema types them). Text that is no pair is refused in one line, where
    Flower would drop it silently.
    """
    pairs: dict[str, str] = {}
    for item in items:
        found = _PAIR.findall(item)
        if not found or _PAIR.sub("", item).strip():
            raise ConfigError(
                f"{flag} {item!r} is not allowed: write key=value (several separated by "
                "spaces; quote a value that holds spaces: key='a b')"
            )
        pairs.update((key, _unquoted(value)) for key, value in found)
    return pairs


def _unquoted(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def flower_value(value: str) -> str:
    """A parsed value written back for Flower, which reads it as TOML: numbers and booleans
    bare, anything else quoted."""
    try:
        tomllib.loads(f"v = {value}")
    except tomllib.TOMLDecodeError:
        return json.dumps(value)
    return value


def write_run_config(path: Path, config: dict[str, Any]) -> Path:
    """A TOML file for ``flwr run --run-config``, keys in the given order."""
    lines = []
    for key, value in config.items():
        if not isinstance(value, (str, bool, int, float)):
            raise ConfigError(f"run-config key {key!r} = {value!r}: must be a string or number")
        lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path
