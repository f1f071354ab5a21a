"""The run-config schema: defaults, presets, and one-line errors for bad values."""

from __future__ import annotations

import dataclasses
import tomllib

import pytest

from flower_app import client_app
from flower_app.cli.run import federation_config
from flower_app.config import ConfigError, RunConfig, parse_pairs
from flower_app.models.backbone_cache import PRETRAINED_DIR, backbone_seed
from flower_app.models.factory import create_initial_model
from flower_app.runs.strategy_registry import STRATEGIES
from flower_app.server_app import build_strategy, plan_for
from strategies import protocol
from tests.conftest import ROOT, quick_run_config
from tests.invalid_configs import INVALID

CONFIG_PAGE = ROOT / "docs" / "configuration.md"


def _pyproject_config() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["flwr"]["app"]["config"]


def test_pyproject_defaults_are_the_schema_defaults():
    config = _pyproject_config()
    assert sorted(config) == sorted(RunConfig.keys())
    defaults = RunConfig().to_dict()
    for key, value in config.items():
        assert defaults[key] == value, key


def test_canonical_defaults():
    cfg = RunConfig.from_run_config(_pyproject_config() | {"download": True})
    assert (cfg.num_clients, cfg.fraction_train, cfg.local_steps, cfg.batch_size) == (
        100,
        0.1,
        4,
        64,
    )
    assert cfg.clients_per_round == 10
    assert cfg.model == "vit_small_patch16_224.dino" and cfg.image_size == 224
    assert cfg.strategy == "fedavg" and cfg.sharding == "iid"


PAPER_PRESETS = sorted(
    p.name
    for pattern in ("centralized.toml", "fedavg_*.toml", "sparse_*.toml")
    for p in (ROOT / "configs").glob(pattern)
)
SOURCES = ("seed study", "TaLoS", "this project")


def _load(preset: str) -> dict:
    with open(ROOT / "configs" / preset, "rb") as f:
        return tomllib.load(f)


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_every_paper_preset_value_names_its_source(preset):
    lines = (ROOT / "configs" / preset).read_text().splitlines()
    settings = [line for line in lines if "=" in line.split("#")[0]]
    unsourced = [
        line
        for line in settings
        if not line.startswith(("run-name", "eval-batch-size"))
        and not any(source in line.partition("#")[2] for source in SOURCES)
    ]
    assert len(settings) >= 2 and not unsourced, unsourced


def test_presets_take_the_seed_studys_values():
    centralized = _load("centralized.toml")
    assert (centralized["epochs"], centralized["lr"], centralized["lr-schedule"]) == (
        50,
        0.001,
        "cosine",
    )
    cfg = RunConfig.from_run_config(_pyproject_config() | _load("sparse_least_sensitive.toml"))
    assert (cfg.num_clients, cfg.fraction_train, cfg.local_steps) == (100, 0.1, 4)
    assert (cfg.sparsity, cfg.mask_strategy, cfg.head, cfg.fisher_score) == (
        0.9,
        "least_sensitive",
        "frozen",
        "logit",
    )
    assert cfg.calibration_rounds == 4 and cfg.calibration_damping == 0.1


def test_quick_sparse_is_the_quick_preset_plus_the_sparse_mechanics():
    quick, quick_sparse = _load("quick.toml"), _load("quick_sparse.toml")
    assert {k: quick_sparse[k] for k in quick} == quick
    paper = _load("sparse_least_sensitive.toml")
    sizes = {"fisher-samples", "head-warmup-rounds", "run-name"}  # smaller for a CPU
    assert {k: v for k, v in quick_sparse.items() if k in paper and k not in sizes} == {
        k: v for k, v in paper.items() if k not in sizes
    }


TALOS_ADAMW = {  # TaLoS vision/args.py:56-57, vision/optimizers.py:17-18 (docs/sparse.md)
    "optimizer": "adamw",
    "lr": 1e-5,
    "adamw-weight-decay": 0.1,
    "adamw-beta-1": 0.9,
    "adamw-beta-2": 0.999,
    "adamw-eps": 1e-8,
}


@pytest.mark.parametrize(
    ("preset", "base", "warmup"),
    [
        # the sparse warm-up trains with SGDM at the twin's lr (pyproject's 0.01)
        ("sparse_adamw.toml", "sparse_least_sensitive.toml", {"head-warmup-lr": 0.01}),
        ("fedavg_adamw.toml", "fedavg_iid.toml", {}),
    ],
)
def test_the_adamw_presets_are_their_sgdm_twins_plus_taloss_optimizer(preset, base, warmup):
    assert _load(preset) == _load(base) | TALOS_ADAMW | warmup
    assert _pyproject_config()["lr"] == 0.01


@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "configs").glob("*.toml")))
def test_presets_parse(preset):
    with open(ROOT / "configs" / preset, "rb") as f:
        overrides = tomllib.load(f)
    assert set(overrides) <= set(RunConfig.keys()), set(overrides) - set(RunConfig.keys())
    cfg = RunConfig.from_run_config(_pyproject_config() | overrides, check_files=False)
    if backbone_seed(cfg.pretrained_path) is None:
        cfg.check_pretrained_path()
    else:  # the miniature's backbone, made by fl-pretrain (tests/integration/test_pretrain.py)
        assert cfg.pretrained_path.startswith(PRETRAINED_DIR + "/")
    cfg.check_data_dir()


@pytest.mark.parametrize("case", INVALID, ids=str)
def test_invalid_value_gives_one_line_error(case):
    with pytest.raises(ConfigError) as info:
        RunConfig.from_run_config(quick_run_config(**case.overrides()))
    message = str(info.value)
    assert "\n" not in message
    assert f"'{case.key}'" in message
    assert repr(case.value) in message
    assert case.allowed in message


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="'local_steps' is unknown"):
        RunConfig.from_run_config(quick_run_config() | {"local_steps": 3})


def test_missing_cifar_offline_says_where_to_put_it(tmp_path):
    config = quick_run_config(dataset="cifar100", download=False, data_dir=str(tmp_path))
    with pytest.raises(ConfigError) as info:
        RunConfig.from_run_config(config)
    assert str(tmp_path) in str(info.value) and "cifar-100-python" in str(info.value)


def test_config_is_frozen():
    cfg = RunConfig.from_run_config(quick_run_config())
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("score", [None, "log-likelihood", "logit"])
def test_fisher_score_reaches_the_fisher_query(score):
    """fisher-score defaults to TaLoS's logit score and travels in the Fisher query config."""
    overrides = {"strategy": "sparse-fedavg"} | ({"fisher-score": score} if score else {})
    cfg = RunConfig.from_run_config(quick_run_config(**overrides))
    assert cfg.fisher_score == (score or "logit")
    model = create_initial_model(cfg.model, cfg.num_classes, cfg.image_size, "random", "", 0)
    nodes = {pid: 1000 + pid for pid in range(cfg.num_clients)}
    strategy = build_strategy(cfg, model, nodes, plan_for(cfg))
    assert strategy.fisher_config[protocol.FISHER_SCORE] == cfg.fisher_score


def test_run_names_say_how_the_data_was_sharded():
    def name(**keys):
        return RunConfig.from_run_config(keys).resolved_run_name("T")

    assert name() == "fedavg_iid_J4_seed0_T"
    assert name(sharding="non-iid", **{"classes-per-client": 5}) == "fedavg_nc5_J4_seed0_T"
    assert name(sharding="dirichlet", **{"dirichlet-alpha": 0.1}) == "fedavg_dir0.1_J4_seed0_T"
    assert name(**{"server-rule": "fedadam", "proximal-mu": 0.01}) == (
        "fedavg-fedadam-prox0.01_iid_J4_seed0_T"
    )
    assert name(strategy="sparse-fedavg", optimizer="adamw") == "sparse-fedavg-adamw_iid_J4_seed0_T"


def test_the_optimizer_settings_carry_the_run_configs_values():
    cfg = RunConfig.from_run_config(
        {"optimizer": "adamw", "lr": 1e-5, "adamw-weight-decay": 0.2, "adamw-beta-2": 0.98}
    )
    settings = cfg.optimizer_settings()
    assert (settings.name, settings.lr, settings.weight_decay) == ("adamw", 1e-5, 0.2)
    # the head warm-up's SGD momentum takes SGD's weight decay, not AdamW's
    warmup = cfg.optimizer_settings(0.01, "sgdm")
    assert (warmup.name, warmup.lr, warmup.weight_decay) == ("sgdm", 0.01, 1e-4)
    assert (settings.betas, settings.eps, settings.momentum) == ((0.9, 0.98), 1e-8, 0.9)
    assert cfg.optimizer_settings(lr=2e-6).lr == 2e-6  # a round's scheduled lr
    assert "optimizer" in cfg.experiment_identity() and "adamw-eps" in cfg.experiment_identity()


@pytest.mark.parametrize(
    ("items", "pairs"),
    [
        # where the run-config parser and the federation parser disagreed before they were one
        (["a=1 b=2"], {"a": "1", "b": "2"}),  # several pairs in one item, as flwr takes them
        (["run-name='x y'"], {"run-name": "x y"}),  # quotes dropped, spaces kept
        (['run-name="x"'], {"run-name": "x"}),
        (["pretrained-path="], {"pretrained-path": ""}),  # an empty value clears a string
        # and what both did alike
        (["run-name=a=b"], {"run-name": "a=b"}),
        (["seed=1", "seed=2"], {"seed": "2"}),  # the last one wins
    ],
)
def test_key_value_pairs_are_read_as_flower_reads_them(items, pairs):
    assert parse_pairs(items) == pairs


@pytest.mark.parametrize("item", ["seed", "=3", "seed=1 junk", "run-name=a b"])
def test_text_that_is_no_pair_is_refused_in_one_line(item):
    with pytest.raises(ConfigError, match=r"^--federation-config .* is not allowed: write key="):
        parse_pairs([item], "--federation-config")


def test_federation_values_go_back_to_flower_as_toml():
    given = ["client-resources-num-gpus='0.5' client-resources-num-cpus=2", "backend-name=ray"]
    assert federation_config(given, 10) == (
        "num-supernodes=10 client-resources-num-gpus=0.5 client-resources-num-cpus=2 "
        'backend-name="ray"'
    )


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_a_registered_strategy_is_a_choice_built_from_its_entry(name):
    """The run-config takes the registry's names; the plan and the strategy come from the
    entry; the ClientApp answers every message type the entry says its clients answer;
    the configuration page lists the name."""
    entry = STRATEGIES[name]
    cfg = RunConfig.from_run_config(quick_run_config(strategy=name))
    clock = plan_for(cfg)
    assert clock.phases == [p for p in entry.phases(cfg) if p.rounds > 0]
    model = create_initial_model(cfg.model, cfg.num_classes, cfg.image_size, "random", "", 0)
    nodes = {pid: 1000 + pid for pid in range(cfg.num_clients)}
    strategy = build_strategy(cfg, model, nodes, clock)
    assert type(strategy).__name__ == entry.target.rpartition(":")[2]
    # Flower 1.42 lists a ClientApp's handlers only in this private dict ("train.default")
    handled = set(client_app.app._registered_funcs)
    assert {m if "." in m else f"{m}.default" for m in entry.messages} <= handled
    row = next(
        line for line in CONFIG_PAGE.read_text().splitlines() if line.startswith("| `strategy` |")
    )
    assert f"`{name}`" in row.split("|")[3]
