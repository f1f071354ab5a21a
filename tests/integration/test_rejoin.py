"""A SuperNode that dies and comes back (a new node id, the same partition) is used again."""

from __future__ import annotations

import pandas as pd
from flwr.app import Context, RecordDict

from flower_app import client_app, server_app
from strategies import protocol
from tests.conftest import InProcessGrid, quick_run_config, server_context

OLD, NEW = 1002, 2002  # partition 2's node id before and after its restart


class RestartingGrid(InProcessGrid):
    """Partition 2's node is gone after round 1 and back, under a new id, before round 3."""

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        rounds = {
            int(m.content[protocol.CONFIG][protocol.SERVER_ROUND])
            for m in messages
            if protocol.CONFIG in m.content
        }
        if 2 in rounds and OLD in self.contexts:
            self.node_ids.remove(OLD)  # died after round 1: round 2 fails on it
            self.old_context = self.contexts.pop(OLD)
        replies = super().send_and_receive(messages, timeout=timeout)
        if 2 in rounds and NEW not in self.contexts:  # restarted, with a fresh node id
            self.contexts[NEW] = Context(
                run_id=1,
                node_id=NEW,
                node_config=dict(self.old_context.node_config),
                state=RecordDict(),
                run_config=self.old_context.run_config,
            )
            self.node_ids.append(NEW)
        return replies


def _run(tmp_path, **overrides):
    config = quick_run_config(
        synthetic_train_per_class=20,
        synthetic_test_per_class=10,
        num_clients=4,
        fraction_train=1.0,
        local_steps=1,
        num_server_rounds=3,
        eval_every=3,
        output_dir=str(tmp_path),
        run_name="rejoin",
        **overrides,
    )
    grid = RestartingGrid(client_app.app, config, num_nodes=4)
    context = server_context(config)
    server_app.main(grid, context)
    return grid, pd.read_csv(tmp_path / "rejoin" / "metrics.csv").set_index("round")


def test_restarted_node_takes_its_partition_back(tmp_path, capsys):
    grid, metrics = _run(tmp_path)
    assert metrics.loc[1, "failures"] == 0
    assert metrics.loc[2, "failures"] == 1 and metrics.loc[2, "clients"] == 3
    assert metrics.loc[3, "failures"] == 0 and metrics.loc[3, "clients"] == 4
    round_3 = [
        m.metadata.dst_node_id
        for m in grid.sent
        if protocol.CONFIG in m.content
        and int(m.content[protocol.CONFIG][protocol.SERVER_ROUND]) == 3
    ]
    assert NEW in round_3 and OLD not in round_3
    assert f"partition 2 is now on node {NEW} (was node {OLD})" in capsys.readouterr().out


def test_restarted_sparse_node_gets_the_mask_again(tmp_path):
    grid, metrics = _run(
        tmp_path, strategy="sparse-fedavg", mask_strategy="random", head_warmup_rounds=1
    )
    # rounds: 1 warm-up, 2-4 training; partition 2 is back under NEW from round 3 on
    assert metrics.loc[4, "failures"] == 0 and metrics.loc[4, "clients"] == 4
    first_to_new = next(
        m for m in grid.sent if m.metadata.dst_node_id == NEW and "config" in m.content
    )
    # a new node id has no mask yet; it passed the probe, so the mask comes by reference
    assert protocol.ref_key(protocol.MASK) in first_to_new.content
