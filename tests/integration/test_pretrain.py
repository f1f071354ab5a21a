"""fl-pretrain: a deterministic backbone file with its metadata, reused from the cache, read
through weights=pretrained; a missing one is a one-line error naming the command."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flower_app.centralized import pretrain
from flower_app.centralized.pretrain import PretrainError, ensure_backbone, file_metadata
from flower_app.config import ConfigError, RunConfig
from flower_app.models.backbone_cache import backbone_seed, default_backbone_path, make_command
from flower_app.models.factory import create_initial_model
from strategies import protocol
from tests.conftest import quick_run_config

# the recipe's code path at a size of seconds: 2 training images a class, one epoch, the
# held-out accuracy on 5 test images a class (the recipe's 100 took most of the seconds)
TINY = {
    "synthetic-train-per-class": 3,
    "epochs": 1,
    "val-fraction": 0.34,
    "synthetic-test-per-class": 5,
}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _silent(line: str) -> None:
    pass


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> dict[str, Path]:
    """Seed 0 twice (two folders) and seed 1, all with the tiny recipe."""
    root = tmp_path_factory.mktemp("pretrain")
    return {
        name: ensure_backbone(
            root / name / default_backbone_path(seed).name, seed, TINY, log=_silent
        )
        for name, seed in (("a", 0), ("b", 0), ("c", 1))
    }


def test_the_same_seed_gives_the_same_bytes_and_another_seed_others(tiny_files):
    assert _digest(tiny_files["a"]) == _digest(tiny_files["b"])
    assert _digest(tiny_files["a"]) != _digest(tiny_files["c"])


def test_the_file_is_a_backbone_and_says_what_it_was_trained_on(tiny_files):
    state = load_file(str(tiny_files["a"]))
    assert state and not any(k.startswith(protocol.HEAD_PREFIX) for k in state)
    meta = file_metadata(tiny_files["a"])
    recipe = json.loads(meta["recipe"])
    assert recipe["dataset"] == "synthetic-pretrain" and recipe["epochs"] == 1
    assert recipe["synthetic-train-per-class"] == 3 and meta["seed"] == "0"
    # 100 classes x (3 - round(0.34 x 3) = 2) images, batch 32: 7 steps in the one epoch
    assert meta["steps"] == "7" and meta["model"] == "vit_tiny_test"
    assert 0.0 <= float(meta["held-out-accuracy"]) <= 1.0
    assert "disjoint from the fine-tuning set 'synthetic'" in meta["pretrained-on"]
    assert meta["held-out-split"] == "the pretraining set's own test split (5 images a class)"
    assert meta["content"] == pretrain.CONTENT


def test_a_cached_file_is_reused_not_rebuilt(tiny_files, monkeypatch):
    path = tiny_files["a"]
    before = (path.stat().st_mtime_ns, _digest(path))

    def no_training(*args, **kwargs):
        raise AssertionError("the cached backbone was trained again")

    monkeypatch.setattr(pretrain, "train_backbone", no_training)
    lines: list[str] = []
    assert ensure_backbone(path, 0, TINY, log=lines.append) == path
    assert (path.stat().st_mtime_ns, _digest(path)) == before
    assert lines == [
        f"pretrained backbone {path} exists (held-out accuracy "
        f"{file_metadata(path)['held-out-accuracy']})"
    ]


@pytest.mark.parametrize(
    ("seed", "overrides"), [(1, TINY), (0, TINY | {"epochs": 2})], ids=["seed", "recipe"]
)
def test_a_file_made_otherwise_is_refused_naming_the_remedy(tiny_files, seed, overrides):
    with pytest.raises(PretrainError, match="rerun with --force") as info:
        ensure_backbone(tiny_files["a"], seed, overrides, log=_silent)
    assert f"not made by fl-pretrain with seed {seed} and this recipe" in str(info.value)
    assert "\n" not in str(info.value)


def test_weights_pretrained_reads_the_backbone_and_seeds_a_new_head(tiny_files):
    state = load_file(str(tiny_files["a"]))
    models = [
        create_initial_model("vit_tiny_test", 100, 32, "pretrained", str(tiny_files["a"]), seed)
        for seed in (0, 1)
    ]
    for model in models:
        loaded = model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state.items())
    heads = [m.state_dict()["head.weight"] for m in models]
    assert not torch.equal(heads[0], heads[1])  # the head comes from the run's seed


def test_a_missing_backbone_is_one_line_naming_the_command_that_makes_it(tmp_path):
    default = default_backbone_path(3)
    elsewhere = tmp_path / default.name
    assert backbone_seed(elsewhere) == 3 and backbone_seed(tmp_path / "dino.pth") is None
    assert make_command(elsewhere) == f"fl-pretrain --seed 3 --output {elsewhere}"
    assert make_command(default_backbone_path(0)) == "fl-pretrain"
    config = quick_run_config(weights="pretrained", pretrained_path=str(elsewhere))
    with pytest.raises(ConfigError) as info:
        RunConfig.from_run_config(config)
    message = str(info.value)
    assert message.startswith(f"run-config key 'pretrained-path' = '{elsewhere}' is not allowed")
    assert message.endswith(f"make it with fl-pretrain --seed 3 --output {elsewhere})")
    assert "\n" not in message


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seed", "-1"], "--seed -1 is not allowed: must be an integer >= 0"),
        (["epochs=0"], "run-config key 'epochs' = 0 is not allowed"),
        (["seed=2"], "override 'seed' is not allowed: fl-pretrain sets it"),
        (["dataset=synthetic"], "override 'dataset' is not allowed: fl-pretrain sets it"),
        (["num-rounds=2"], "run-config key 'num-rounds' is unknown"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "b.safetensors"
    assert pretrain.main([*argv, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
