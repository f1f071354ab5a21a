"""The one table of invalid run-config values, used by every entry point's tests.

Each entry names the key whose value is refused, that value, what the one-line error
must say is allowed, and any other keys the case needs. The schema test checks every
entry on ``RunConfig``; the ServerApp, the centralized baseline and the sweep runner
check that the same entries stop them before any work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Invalid:
    key: str
    value: Any
    allowed: str
    extra: dict[str, Any] = field(default_factory=dict)

    def overrides(self) -> dict[str, Any]:
        return self.extra | {self.key: self.value}

    def as_cli(self) -> list[str]:
        """``key=value`` items, as a command line gives them."""

        def text(v: Any) -> str:
            return str(v).lower() if isinstance(v, bool) else str(v)

        return [f"{k}={text(v)}" for k, v in self.overrides().items()]

    def __str__(self) -> str:
        return f"{self.key}={self.value!r}"


SPARSE = {"strategy": "sparse-fedavg"}
INVALID = [
    Invalid("num-clients", 0, "must be an integer >= 1"),
    Invalid("fraction-train", 0.0, "must be in (0, 1]"),
    Invalid("fraction-train", 1.5, "must be in (0, 1]"),
    Invalid("local-steps", 0, "must be an integer >= 1"),
    Invalid("local-steps", 2.5, "must be an integer"),
    Invalid("local-steps", True, "must be an integer"),
    Invalid("batch-size", 0, "must be an integer >= 1"),
    Invalid("batch-size", "64x", "must be an integer"),
    Invalid("lr", 0.0, "must be a finite number > 0"),
    Invalid("lr", -0.1, "must be a finite number > 0"),
    Invalid("lr", "fast", "must be a number"),
    Invalid("seed", 1.5, "must be an integer"),
    Invalid("classes-per-client", 0, "must be in 1..100", {"sharding": "non-iid"}),
    Invalid("classes-per-client", 101, "must be in 1..100", {"sharding": "non-iid"}),
    Invalid("classes-per-client", 5, "cover", {"num-clients": 10, "sharding": "non-iid"}),
    Invalid("task-classes", "0-100", "not below the data set's 100 classes"),
    Invalid("task-classes", "7", "a task needs >= 2 classes"),
    Invalid("task-classes", "0-9,5", "class 5 is listed twice"),
    # Nc within a task: 10 classes of the task, not the data set's 100
    Invalid(
        "classes-per-client",
        11,
        "must be in 1..10 (classes of task-classes='0-9')",
        {"task-classes": "0-9", "sharding": "non-iid"},
    ),
    Invalid("dataset", "mnist", "must be one of cifar100, synthetic"),
    Invalid("synthetic-test-per-class", 0, "must be an integer >= 1"),
    Invalid("model", "resnet18", "must be one of"),
    # the miniature presets name a pretrained-path; these cases need none
    Invalid("weights", "pretrained", "no published weights", {"pretrained-path": ""}),
    Invalid("sharding", "pathological", "must be one of iid, non-iid, dirichlet"),
    Invalid("dirichlet-alpha", 0.0, "must be a finite number > 0", {"sharding": "dirichlet"}),
    Invalid("dirichlet-min-size", -1, "must be an integer >= 0"),
    Invalid(
        "dirichlet-min-size",
        500,
        "x dirichlet-min-size=500 = 50000 exceeds the",
        {"sharding": "dirichlet", "num-clients": 100},
    ),
    Invalid("tracking", "mlflow", "must be one of none, tensorboard, wandb"),
    Invalid("wandb-mode", "cloud", "must be one of offline, online"),
    Invalid("strategy", "fedprox", "must be one of"),
    Invalid("pretrained-path", "/nonexistent/dino.pth", "must be an existing file"),
    Invalid("image-size", 30, "multiple of the patch size 4"),
    Invalid("val-fraction", 1.0, "must be in [0, 1)"),
    Invalid("momentum", 1.0, "must be in [0, 1)"),
    # the local optimizer (clients/optimizers.py) and AdamW's options
    Invalid("optimizer", "adam", "must be one of sgdm, adamw"),
    Invalid("adamw-beta-1", 1.0, "must be in [0, 1)", {"optimizer": "adamw"}),
    Invalid("adamw-beta-2", -0.1, "must be in [0, 1)"),
    Invalid("adamw-eps", 0.0, "must be a finite number > 0", {"optimizer": "adamw"}),
    Invalid("adamw-weight-decay", 1.0, "must be in [0, 1)", {"optimizer": "adamw"}),
    Invalid("head-warmup-lr", -0.01, "must be a number >= 0 (0: lr)"),
    Invalid("download", "maybe", "must be a boolean"),
    Invalid("eval-every", 0, "must be an integer >= 1"),
    # task-arithmetic metrics score the server's validation split, at least one a class
    Invalid("task-metrics-every", 0, "must be an integer >= 1"),
    Invalid("task-metrics-examples", -1, "must be an integer >= 0"),
    Invalid("task-metrics-examples", 50, "must be 0 (off) or >= 100, one validation example"),
    Invalid(
        "task-metrics-examples",
        500,
        "val-fraction = 0 leaves the server none",
        {"val-fraction": 0.0},
    ),
    Invalid(
        "task-metrics-examples",
        500,
        "needs validation examples of every class: val-fraction = 0.004 leaves round(0.004 x",
        {"val-fraction": 0.004},
    ),
    Invalid("min-train-clients", 6, "must be in 1..5", {"num-clients": 10, "fraction-train": 0.5}),
    Invalid("client-failure-rate", 1.0, "must be in [0, 1)"),
    Invalid("checkpoint-every", 0, "must be an integer >= 1"),
    Invalid("max-round-retries", -1, "must be an integer >= 0"),
    Invalid("resume", True, "needs the run-name", {"run-name": ""}),
    # sparse fine-tuning (clients/fisher.py and strategies/masks.py check with neutral words)
    Invalid("mask-strategy", "largest", "must be one of least_sensitive, most_sensitive", SPARSE),
    Invalid("mask-scope", "all", "must be one of backbone, backbone-no-embed, blocks", SPARSE),
    Invalid(
        "calibration-schedule", "linear", "must be one of exponential, one-shot, average", SPARSE
    ),
    Invalid("calibration-rounds", 0, "must be an integer >= 1", SPARSE),
    Invalid("fisher-labels", "true", "must be one of sampled, empirical", SPARSE),
    Invalid("fisher-score", "loss", "must be one of log-likelihood, logit", SPARSE),
    Invalid("calibration-damping", 0.0, "must be in (0, 1]", SPARSE),
    Invalid("calibration-damping", 1.5, "must be in (0, 1]", SPARSE),
    Invalid("fisher-batch-size", 0, "must be an integer >= 1", SPARSE),
    Invalid("sparsity", 1.0, "must be in [0, 1)", SPARSE),
    Invalid("sparsity", -0.1, "must be in [0, 1)", SPARSE),
    Invalid("head", "linear", "must be one of train, frozen", SPARSE),
    Invalid("head-warmup-rounds", -1, "must be an integer >= 0", SPARSE),
    Invalid(
        "head-warmup-rounds",
        0,
        "with head=frozen the classifier would stay random for the whole run",
        SPARSE | {"head": "frozen"},
    ),
    Invalid(
        "pretrained-head",
        True,
        "needs weights=pretrained and pretrained-path",
        {"pretrained-path": ""},
    ),
    # server rules and FedProx (strategies/server_rules.py: Flower's classes with these options)
    Invalid("server-rule", "fedsgd", "must be one of"),
    Invalid("proximal-mu", -0.1, "must be a finite number >= 0"),
    Invalid("fedavgm-server-lr", 0.0, "must be a finite number > 0"),
    Invalid("fedavgm-momentum", 1.0, "must be in [0, 1)"),
    Invalid("fedadam-eta", -1.0, "must be a finite number > 0"),
    Invalid("fedadam-beta-1", 1.0, "must be in [0, 1)"),
    Invalid("fedadam-beta-2", -0.5, "must be in [0, 1)"),
    Invalid("fedadam-tau", 0.0, "must be a finite number > 0"),
    Invalid("fedyogi-eta", 0.0, "must be a finite number > 0"),
    Invalid("fedyogi-beta-1", 1.5, "must be in [0, 1)"),
    Invalid("fedyogi-beta-2", 1.0, "must be in [0, 1)"),
    Invalid("fedyogi-tau", -1e-3, "must be a finite number > 0"),
    Invalid("fedadagrad-eta", 0.0, "must be a finite number > 0"),
    Invalid("fedadagrad-tau", 0.0, "must be a finite number > 0"),
    Invalid("trimmed-beta", 0.5, "must be in [0, 0.5)"),
    Invalid("krum-malicious", -1, "must be an integer >= 0"),
    Invalid(
        "krum-malicious",
        2,
        "Krum needs clients per round - krum-malicious - 2 >= 1",
        {"server-rule": "krum", "num-clients": 8, "fraction-train": 0.5},
    ),
]
