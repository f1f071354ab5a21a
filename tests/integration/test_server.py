"""The ServerApp driven in process: a whole quick run, and the federation-size check."""

from __future__ import annotations

import json
import time

import pandas as pd
import pytest
from flwr.common.config import parse_config_args
from safetensors.torch import load_file

from flower_app import client_app, server_app
from flower_app.config import ConfigError, RunConfig
from tests.conftest import InProcessGrid, quick_run_config, server_context


def test_in_process_run_writes_results(tmp_path):
    config = quick_run_config(
        synthetic_train_per_class=20,
        synthetic_test_per_class=10,
        num_clients=4,
        fraction_train=0.5,
        num_server_rounds=3,
        eval_every=2,
        local_steps=2,
        output_dir=str(tmp_path),
        run_name="inproc",
    )
    grid = InProcessGrid(client_app.app, config, num_nodes=4)
    server_app.main(grid, server_context(config))
    run = tmp_path / "inproc"
    assert {p.name for p in run.iterdir()} >= {
        "config.json",
        "partitions.csv",
        "metrics.csv",
        "summary.json",
        "metrics.png",
        "final_model.safetensors",
        "best_model.safetensors",
        "task_vector.safetensors",
    }
    metrics = pd.read_csv(run / "metrics.csv")
    assert list(metrics["round"]) == [0, 1, 2, 3]
    assert metrics["val-accuracy"].notna().tolist() == [True, False, True, True]
    assert (metrics["clients"].dropna() == 2).all()
    assert (metrics["bytes-up"].dropna() > 0).all()
    partitions = pd.read_csv(run / "partitions.csv")
    assert list(partitions["partition-id"]) == [0, 1, 2, 3]
    assert partitions["num-examples"].sum() == 1800
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 3
    assert 0.0 <= summary["final-test-accuracy"] <= 1.0
    final = load_file(run / "final_model.safetensors")
    vector = load_file(run / "task_vector.safetensors")
    assert set(vector) <= set(final) and float(vector["head.weight"].abs().sum()) > 0
    # trained rounds sent each sampled client the dense model
    trained = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert len(trained) == 6


def test_aggregation_does_not_depend_on_reply_order(tmp_path):
    finals = []
    for reverse in (False, True):
        config = quick_run_config(
            synthetic_train_per_class=20,
            synthetic_test_per_class=10,
            num_clients=4,
            num_server_rounds=2,
            local_steps=1,
            output_dir=str(tmp_path),
            run_name=f"order-{reverse}",
        )
        grid = InProcessGrid(client_app.app, config, num_nodes=4)
        grid.reverse_replies = reverse
        server_app.main(grid, server_context(config))
        finals.append(load_file(tmp_path / f"order-{reverse}" / "final_model.safetensors"))
    assert all((finals[0][k] == finals[1][k]).all() for k in finals[0])


def test_wrong_number_of_nodes_fails_fast_with_the_command_to_use(tmp_path):
    config = quick_run_config(num_clients=10, output_dir=str(tmp_path))
    grid = InProcessGrid(client_app.app, config, num_nodes=2)
    start = time.monotonic()
    with pytest.raises(server_app.FederationMismatchError) as info:
        server_app.main(grid, server_context(config))
    assert time.monotonic() - start < server_app.NODE_COUNT_SETTLE_S + 3
    message = str(info.value)
    assert '--federation-config "num-supernodes=10"' in message
    # the suggested command carries the user's own run-config, not the canonical defaults
    pairs = message.split('--run-config "')[1].split('"')[0]
    parsed = parse_config_args([pairs])
    defaults = RunConfig().to_dict()
    assert parsed == {k: v for k, v in config.items() if v != defaults[k]}
    assert parsed["num-clients"] == 10 and parsed["model"] == "vit_tiny_test"
    assert not any(tmp_path.iterdir())  # no results directory for a run that never started


def test_existing_run_name_is_refused_before_work(tmp_path):
    (tmp_path / "taken").mkdir()
    config = quick_run_config(output_dir=str(tmp_path), run_name="taken")
    grid = InProcessGrid(client_app.app, config, num_nodes=10)
    with pytest.raises(ConfigError, match=r"'run-name' = 'taken' .* add resume=true"):
        server_app.main(grid, server_context(config))


def test_quick_preset_learns_in_process(tmp_path):
    """The quick preset as shipped (8 rounds, 10 clients) reaches 5x chance on 100 classes.

    ``tests/integration/test_experiments.py`` runs the same app through ``flwr run``; learning is
    checked here, without Ray, where it costs a third of the time.
    """
    config = quick_run_config(output_dir=str(tmp_path), run_name="quick")
    grid = InProcessGrid(client_app.app, config, num_nodes=10)
    server_app.main(grid, server_context(config))
    summary = json.loads((tmp_path / "quick" / "summary.json").read_text())
    assert summary["final-val-accuracy"] >= 0.05 and summary["final-test-accuracy"] >= 0.05
    assert pd.read_csv(tmp_path / "quick" / "metrics.csv")["round"].max() == 8


def test_run_without_a_validation_split_evaluates_nothing_and_finishes(tmp_path):
    config = quick_run_config(
        synthetic_train_per_class=20,
        synthetic_test_per_class=10,
        num_clients=4,
        num_server_rounds=2,
        local_steps=1,
        val_fraction=0.0,
        output_dir=str(tmp_path),
        run_name="noval",
    )
    server_app.main(InProcessGrid(client_app.app, config, num_nodes=4), server_context(config))
    summary = json.loads((tmp_path / "noval" / "summary.json").read_text())
    assert summary["best-val-round"] is None and summary["final-val-accuracy"] is None
    assert 0.0 <= summary["final-test-accuracy"] <= 1.0
    assert "val-accuracy" not in pd.read_csv(tmp_path / "noval" / "metrics.csv").dropna(axis=1)
