"""``client-failure-rate``: a ClientApp mod that fails training and Fisher messages on purpose.

A mod, so the handlers never see it: it draws before the handler runs, seeded by (seed,
round, attempt, partition) like every draw of a run, so a retried or resumed round fails
the same clients again and the reliability tests know which.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from flwr.app import Context, Message

from flower_app.runs.node_identity import node_partition_id
from strategies import protocol
from strategies.seeds import derive_seed

FAILING_MESSAGES = {protocol.TRAIN: "train", protocol.QUERY_FISHER: "fisher"}


def injected_failures(
    msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
) -> Message:
    """Raise for a train or Fisher message with probability ``client-failure-rate``."""
    rate = float(context.run_config.get("client-failure-rate", 0.0))
    kind = FAILING_MESSAGES.get(msg.metadata.message_type)
    if rate > 0 and kind is not None:
        fail_on_draw(msg, context, rate, kind)
    return call_next(msg, context)


def fail_on_draw(msg: Message, context: Context, rate: float, kind: str) -> None:
    """The seeded draw of this (round, attempt, partition); a failure names all three."""
    config = msg.content[protocol.CONFIG]
    server_round = int(config[protocol.SERVER_ROUND])
    attempt = int(config.get(protocol.ATTEMPT, 0))
    pid = node_partition_id(context.node_config, int(context.run_config["num-clients"]))
    seed = int(context.run_config["seed"])
    if random.Random(derive_seed(seed, "failure", server_round, attempt, pid)).random() < rate:
        raise RuntimeError(
            f"injected failure of partition {pid} in {kind} round {server_round} "
            f"(client-failure-rate={rate})"
        )
