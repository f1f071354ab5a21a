"""The ClientApp: J local steps from the received weights, cached per worker process."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from clients.training import copy_weights_into
from flower_app import client_app
from flower_app.config import ConfigError, RunConfig
from flower_app.models.factory import create_initial_model
from flower_app.runs import node_identity
from strategies import protocol
from tests.conftest import InProcessGrid, quick_run_config

CONFIG = quick_run_config(synthetic_train_per_class=20, num_clients=4, local_steps=3)


def _train_message(state, server_round: int = 1, lr: float = 0.05) -> Message:
    content = RecordDict(
        {
            protocol.ARRAYS: ArrayRecord(state),
            protocol.CONFIG: ConfigRecord({protocol.SERVER_ROUND: server_round, protocol.LR: lr}),
        }
    )
    return Message(content, dst_node_id=1001, message_type=protocol.TRAIN)


def _initial_state():
    cfg = RunConfig.from_run_config(CONFIG)
    model = create_initial_model(cfg.model, cfg.num_classes, cfg.image_size, "random", "", 0)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_train_changes_weights_and_reports_num_examples():
    grid = InProcessGrid(client_app.app, CONFIG, num_nodes=4)
    state = _initial_state()
    (reply,) = grid.send_and_receive([_train_message(state)])
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    metrics = reply.content[protocol.METRICS]
    # 20 synthetic images per class, 10% validation -> 18 x 100 = 1800 training images, 4 shards
    assert metrics[protocol.NUM_EXAMPLES] == 450
    assert metrics[protocol.PARTITION_ID] == 1
    assert metrics[protocol.TRAIN_LOSS] > 0
    new = reply.content[protocol.ARRAYS].to_torch_state_dict()
    assert set(new) == set(state)
    changed = [k for k in state if not torch.equal(new[k], state[k])]
    assert "head.weight" in changed and "blocks.0.attn.qkv.weight" in changed


def test_same_round_same_result_and_cached_model_reused(monkeypatch):
    models: dict = {}
    monkeypatch.setattr(client_app, "_MODELS", models)  # as in a fresh worker process
    grid = InProcessGrid(client_app.app, CONFIG, num_nodes=4)
    state = _initial_state()
    (a,) = grid.send_and_receive([_train_message(state, server_round=2)])
    built = len(models)
    (b,) = grid.send_and_receive([_train_message(state, server_round=2)])
    (c,) = grid.send_and_receive([_train_message(state, server_round=3)])
    assert len(models) == built == 1
    sa, sb, sc = (r.content[protocol.ARRAYS].to_torch_state_dict() for r in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # loaded in place, nothing carried over
    assert not torch.equal(sa["head.weight"], sc["head.weight"])  # new round, new batches


def test_partition_query_reports_shard():
    grid = InProcessGrid(client_app.app, CONFIG, num_nodes=4)
    msg = Message(RecordDict(), dst_node_id=1003, message_type=protocol.QUERY_PARTITION)
    (reply,) = grid.send_and_receive([msg])
    metrics = reply.content[protocol.METRICS]
    assert metrics[protocol.PARTITION_ID] == 3
    assert sum(metrics[protocol.CLASS_COUNTS]) == metrics[protocol.NUM_EXAMPLES] == 450


def test_dirichlet_shards_of_the_simulation_equal_the_node_data_writer(tmp_path):
    """A deployment's node data (written once) holds the shards a simulation deals out."""
    from flower_app.data.node_data import write_node_data
    from flower_app.data.sources import load_node_data

    config = CONFIG | {"sharding": "dirichlet", "dirichlet-alpha": 0.3, "dirichlet-min-size": 5}
    paths = write_node_data(RunConfig.from_run_config(config), tmp_path)
    grid = InProcessGrid(client_app.app, config, num_nodes=4)
    queries = [
        Message(RecordDict(), dst_node_id=1000 + i, message_type=protocol.QUERY_PARTITION)
        for i in range(4)
    ]
    sizes = []
    for reply in grid.send_and_receive(queries):
        metrics = reply.content[protocol.METRICS]
        written = load_node_data(paths[metrics[protocol.PARTITION_ID]].parent).labels
        classes, counts = torch.unique(written, return_counts=True)
        assert metrics[protocol.CLASSES] == classes.tolist()
        assert metrics[protocol.CLASS_COUNTS] == counts.tolist()
        sizes.append(metrics[protocol.NUM_EXAMPLES])
    assert sum(sizes) == 1800 and min(sizes) >= 5 and max(sizes) - min(sizes) > 10  # skewed


def test_node_local_data_dir_replaces_the_shared_partition(tmp_path):
    from flower_app.data.sources import ImageSplit, save_node_data

    g = torch.Generator().manual_seed(0)
    own = ImageSplit(
        torch.randint(0, 256, (37, 3, 32, 32), dtype=torch.uint8, generator=g),
        torch.randint(0, 100, (37,), generator=g),
    )
    save_node_data(tmp_path / "node", own)
    grid = InProcessGrid(client_app.app, CONFIG, num_nodes=4)
    grid.contexts[1002].node_config["data-dir"] = str(tmp_path / "node")
    msg = Message(RecordDict(), dst_node_id=1002, message_type=protocol.QUERY_PARTITION)
    (reply,) = grid.send_and_receive([msg])
    metrics = reply.content[protocol.METRICS]
    assert metrics[protocol.NUM_EXAMPLES] == 37 and metrics[protocol.PARTITION_ID] == 2
    assert metrics[protocol.CLASSES] == sorted(set(own.labels.tolist()))
    (trained,) = grid.send_and_receive([_train_message(_initial_state())])  # node 1001: shared
    assert trained.content[protocol.METRICS][protocol.NUM_EXAMPLES] == 450


def test_missing_node_data_is_a_clear_error(tmp_path):
    from flower_app.data.sources import DataNotFoundError, load_node_data

    with pytest.raises(DataNotFoundError, match=r"node-data\.npz"):
        load_node_data(tmp_path)


def test_node_ignores_the_coordinators_files(tmp_path):
    """A node trains although the coordinator's weights file and data folder are not here."""
    from flower_app.data.sources import ImageSplit, save_node_data

    g = torch.Generator().manual_seed(1)
    own = ImageSplit(
        torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8, generator=g),
        torch.randint(0, 100, (20,), generator=g),
    )
    save_node_data(tmp_path / "node", own)
    coordinator_only = CONFIG | {
        "weights": "pretrained",
        "pretrained-path": "/coordinator/only/dino.pth",
        "dataset": "cifar100",
        "data-dir": "/coordinator/only/data",
        "download": False,
    }
    with pytest.raises(ConfigError, match="'data-dir'"):
        RunConfig.from_run_config(coordinator_only)  # the ServerApp checks them
    with pytest.raises(ConfigError, match="'pretrained-path'"):
        RunConfig.from_run_config(coordinator_only | {"download": True})
    grid = InProcessGrid(client_app.app, coordinator_only, num_nodes=4)
    grid.contexts[1001].node_config["data-dir"] = str(tmp_path / "node")
    (reply,) = grid.send_and_receive([_train_message(_initial_state())])
    assert not reply.has_error(), reply.error.reason
    assert reply.content[protocol.METRICS][protocol.NUM_EXAMPLES] == 20


@pytest.mark.parametrize(
    ("node_config", "message"),
    [
        ({"data-dir": "/x"}, "node-config has no partition-id: every SuperNode needs"),
        ({"partition-id": "one"}, "node-config partition-id='one' is not an integer"),
        ({"partition-id": 4}, "node-config partition-id=4 is outside 0..3"),
        (
            {"partition-id": 1, "num-partitions": 3},
            "node-config num-partitions=3 differs from run-config num-clients=4",
        ),
    ],
)
def test_inconsistent_node_config_is_one_line(node_config, message):
    with pytest.raises(node_identity.NodeConfigError) as info:
        node_identity.node_partition_id(node_config, num_clients=4)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert node_identity.node_partition_id({"partition-id": "2"}, num_clients=4) == 2


def test_node_without_partition_id_replies_with_the_one_line_error():
    grid = InProcessGrid(client_app.app, CONFIG, num_nodes=4)
    del grid.contexts[1002].node_config["partition-id"]
    msg = Message(RecordDict(), dst_node_id=1002, message_type=protocol.QUERY_PARTITION)
    (reply,) = grid.send_and_receive([msg])
    assert reply.has_error() and "node-config has no partition-id" in reply.error.reason


def test_client_app_import_leaves_out_partitioning_libraries():
    """Deployment starts a ClientApp process per message; a node with its own data-dir never
    partitions, so Hugging Face datasets / flwr_datasets (about 0.7 s) must not be imported."""
    code = (
        "import sys, flower_app.client_app; "
        "print(sorted(m for m in ('datasets', 'flwr_datasets') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_weights_are_copied_into_the_model_as_load_state_dict_would():
    """The cached model takes the received weights in place; wrong names or shapes are
    refused with what does not fit (``copy_`` alone would broadcast a wrong shape)."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    reference = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    state = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in model.state_dict().items()}
    params = [p.data_ptr() for p in model.parameters()]
    copy_weights_into(model, state)
    reference.load_state_dict(state)
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert [p.data_ptr() for p in model.parameters()] == params  # in place
    with pytest.raises(ValueError, match=r"missing \['1.bias'\], unexpected \['1.gamma'\]"):
        copy_weights_into(model, {("1.gamma" if k == "1.bias" else k): v for k, v in state.items()})
    with pytest.raises(ValueError, match=r"'0.bias' has shape \(1,\), the model's \(2,\)"):
        copy_weights_into(model, state | {"0.bias": torch.zeros(1)})
