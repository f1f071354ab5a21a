"""Weighted FedAvg that configures, checks and aggregates; the loop is strategies/rounds.py.

Flower's FedAvg samples with the global ``random`` and sums replies in arrival order,
so two runs with one seed differ. Here clients are sampled by partition id with a seed
derived from (seed, round, attempt), and the round number comes from the run's
``RoundClock``. Every aggregation of weights goes through ``OrderedFedAvg.mean_update``:
the sent values plus the example-weighted mean of the clients' updates, in partition
order, float32. ``weighted_average`` (float64) is the mean of calibration statistics
(the Fisher), which are not weights.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from strategies import protocol
from strategies.interference import SplitGram
from strategies.plan import TRAIN, RoundClock, RoundPosition
from strategies.record import ClientModel, RoundRecord, TaskModels
from strategies.reply_checks import Layout, dense_layout, reply_tensors, train_metrics_problem
from strategies.rounds import CheckedReply, RetryPolicy, RoundRequest
from strategies.seeds import sample_partitions
from strategies.server_rules import ServerRule

RoundRow = dict[str, float]
NO_RETRIES = RetryPolicy()


def weighted_average(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Sum_k w_k/W * state_k per tensor, accumulated in float64 in the given order.

    Non-floating tensors (integer buffers) are taken from the first state; every state
    must hold the same keys and shapes.
    """
    if not states or len(states) != len(weights):
        raise ValueError("weighted_average needs one weight per state and at least one state")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to > 0, got {list(weights)}")
    keys = list(states[0].keys())
    for state in states[1:]:
        if list(state.keys()) != keys:
            raise ValueError("client states hold different tensor names")
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        first = states[0][key]
        if not first.is_floating_point():
            out[key] = first.clone()
            continue
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for state, weight in zip(states, weights, strict=True):
            acc.add_(state[key].to(torch.float64), alpha=weight / total)
        out[key] = acc.to(first.dtype)
    return out


def mean_loss(replies: Sequence[CheckedReply]) -> dict[str, float]:
    """The example-weighted mean training loss of the replies, and their examples."""
    weights = example_weights(replies)
    losses = [float(r.metrics[protocol.TRAIN_LOSS]) for r in replies]
    total = sum(weights)
    loss = sum(w * x for w, x in zip(weights, losses, strict=True)) / total
    return {protocol.TRAIN_LOSS: loss, protocol.NUM_EXAMPLES: total}


def example_weights(replies: Sequence[CheckedReply]) -> list[float]:
    """The FedAvg weight of each reply: the client's ``num-examples``."""
    return [r.examples for r in replies]


class OrderedFedAvg:
    """FedAvg weighted by ``num-examples``, reproducible for a seed, over a plan of rounds.

    Flower's ``Strategy`` shape without its base class: the loop (``strategies/rounds.py``)
    owns sending, retries and checks, which Flower's ``start`` would own; here a strategy
    configures a round, checks a reply and aggregates. The global model is evaluated on
    the server (a hook), so there is no client evaluation.
    """

    def __init__(
        self,
        *,
        partition_to_node: Mapping[int, int],
        clients_per_round: int,
        seed: int,
        clock: RoundClock,
        lr_at: Callable[[int], float],
        retry: RetryPolicy = NO_RETRIES,
        update_metrics: bool = True,
        shard_sizes: Mapping[int, int] | None = None,
        server_rule: ServerRule | None = None,
        task_rounds: Callable[[RoundPosition], bool] | None = None,
    ) -> None:
        self.partition_to_node = dict(partition_to_node)
        self.node_to_partition = {node: pid for pid, node in self.partition_to_node.items()}
        # examples per partition (the partition query): the only FedAvg weight a reply may claim
        self.shard_sizes = dict(shard_sizes or {})
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.clock = clock
        self.lr_at = lr_at
        self.retry = retry
        self.update_metrics = update_metrics
        # how the training phase's updates are combined: the mean, or one of Flower's rules
        self.server_rule = server_rule or ServerRule()
        # the rounds whose record gets the models task-arithmetic metrics compare (none: off)
        self.task_rounds = task_rounds
        # the tensors of the current global ArrayRecord, decoded (or aggregated) once
        self._tensors: tuple[ArrayRecord, dict[str, torch.Tensor]] | None = None

    # ---- the roster -----------------------------------------------------------------------
    def adopt(self, node_id: int, partition_id: int, num_examples: int) -> str:
        """A node that joined mid-run takes over its partition (a restarted SuperNode has a
        new node id) if it holds that partition's shard; returns what happened, one line."""
        if partition_id not in self.partition_to_node:
            last = len(self.partition_to_node) - 1
            return f"node {node_id} claims partition {partition_id}, not in 0..{last}: ignored"
        expected = self.shard_sizes.get(partition_id)
        if expected is not None and num_examples != expected:
            return (
                f"node {node_id} claims partition {partition_id} with {num_examples} examples, "
                f"not its {expected}: ignored"
            )
        old = self.partition_to_node[partition_id]
        self.node_to_partition.pop(old, None)
        self.partition_to_node[partition_id] = node_id
        self.node_to_partition[node_id] = partition_id
        return f"partition {partition_id} is now on node {node_id} (was node {old})"

    # ---- deciding ------------------------------------------------------------------------
    def sample(self, position: RoundPosition, count: int, attempt: int) -> list[int]:
        """The partitions asked in a round, sorted (a retry draws a new sample)."""
        return sample_partitions(
            len(self.partition_to_node), count, self.seed, position.round, attempt
        )

    def lr(self, position: RoundPosition) -> float:
        """The schedule's learning rate at the position's round of its phase."""
        return float(self.lr_at(position.phase_round))

    def round_config(self, position: RoundPosition, attempt: int) -> ConfigRecord:
        """What every client asked in a training round receives besides the weights."""
        return ConfigRecord(
            {
                protocol.SERVER_ROUND: position.round,
                protocol.LR: self.lr(position),
                protocol.ATTEMPT: attempt,
            }
        )

    def message_for(
        self, pid: int, arrays: ArrayRecord, config: ConfigRecord, message_type: str
    ) -> Message:
        """The message for one partition's node (sparse strategies add the mask)."""
        content = RecordDict({protocol.ARRAYS: arrays, protocol.CONFIG: config})
        return Message(content, dst_node_id=self.partition_to_node[pid], message_type=message_type)

    def tensors_of(self, arrays: ArrayRecord) -> dict[str, torch.Tensor]:
        """The tensors of a global ArrayRecord, decoded once (read-only: shared by callers)."""
        if self._tensors is None or self._tensors[0] is not arrays:
            self._tensors = (arrays, arrays.to_torch_state_dict())
        return self._tensors[1]

    def global_arrays(self, state: dict[str, torch.Tensor]) -> ArrayRecord:
        """The ArrayRecord of new global weights, with ``state`` kept as its tensors."""
        arrays = ArrayRecord(state)
        self._tensors = (arrays, state)
        return arrays

    def train_messages(
        self, position: RoundPosition, arrays: ArrayRecord, attempt: int
    ) -> list[Message]:
        """One training message per sampled partition, in partition order."""
        config = self.round_config(position, attempt)
        pids = self.sample(position, self.clients_per_round, attempt)
        return [self.message_for(pid, arrays, config, protocol.TRAIN) for pid in pids]

    def configure(
        self, position: RoundPosition, arrays: ArrayRecord, record: RoundRecord
    ) -> RoundRequest:
        """A training round: each attempt's messages and the check of a reply."""
        record.add({"lr": self.lr(position)})
        layout = self.train_layout(position, arrays)
        return RoundRequest(
            lambda attempt: self.train_messages(position, arrays, attempt),
            lambda reply: self.check_train_reply(reply, layout),
        )

    # ---- aggregating ---------------------------------------------------------------------
    def aggregate(
        self,
        position: RoundPosition,
        arrays: ArrayRecord,
        replies: Sequence[CheckedReply],
        record: RoundRecord,
    ) -> ArrayRecord:
        """The next global weights from ``arrays`` (what was sent) and the usable replies."""
        return self.aggregate_round(arrays, replies, record)

    def aggregate_round(
        self, base: ArrayRecord, replies: Sequence[CheckedReply], record: RoundRecord
    ) -> ArrayRecord:
        """The next global weights from ``base`` (what was sent) and the usable replies,
        in partition order; each reply's tensors (decoded by its check) are read once per
        tensor (``mean_update``)."""
        replies = sorted(replies, key=lambda r: r.partition)
        if not replies:
            raise ValueError(f"round {record.round}: no replies to aggregate")
        states = [r.tensors for r in replies]
        weights = example_weights(replies)
        record.add(mean_loss(replies))
        metrics = [r.metrics for r in replies]
        record.add(client_compute_metrics(metrics))
        record.clients.extend(client_placements(metrics))
        base_state = self.tensors_of(base)
        gram = SplitGram(len(states)) if self.update_metrics else None
        mean = self.mean_update(base_state, states, weights, gram)
        if gram is not None:
            record.add(gram.metrics(weights))
        if record.phase == TRAIN and self.server_rule.name != "mean":
            mean = self.apply_rule(record.position, base_state, states, weights, mean)
        merged = self.merge(base_state, mean)
        if self.task_rounds is not None and self.task_rounds(record.position):
            record.task_models = self.task_models(base_state, merged, replies, states)
        return merged

    def task_models(
        self,
        base: Mapping[str, torch.Tensor],
        merged: ArrayRecord,
        replies: Sequence[CheckedReply],
        states: Sequence[Mapping[str, torch.Tensor]],
    ) -> TaskModels:
        """References for the task-arithmetic hook: w (sent), w + t (``merged``, after the
        server rule) and per aggregated client a builder of w + t_k from its reply's
        tensors; no tensor is copied here. Read before the next round (the sparse mask
        that places a reply's values may change then)."""
        pids = [r.partition for r in replies]
        clients = [
            ClientModel(pid, functools.partial(self.merged_state, base, state))
            for pid, state in zip(pids, states, strict=True)
        ]
        return TaskModels(base, self.tensors_of(merged), clients)

    def apply_rule(
        self,
        position: RoundPosition,
        base: Mapping[str, torch.Tensor],
        states: Sequence[Mapping[str, torch.Tensor]],
        weights: Sequence[float],
        mean: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """The server rule's new values for the trained floating tensors (what the replies
        hold: whole tensors, or a mask's entries and the head), from the values sent. The
        rule counts the training phase's own rounds (FedAdam's bias correction starts at
        the first training round, after any warm-up or calibration)."""
        floating = {n: t for n, t in mean.items() if t.is_floating_point()}
        sent = {n: self.sent_values(base, n, t).reshape(t.shape) for n, t in floating.items()}
        new = self.server_rule.combine(position.phase_round, sent, states, weights, floating)
        return mean | new

    def mean_update(
        self,
        base: Mapping[str, torch.Tensor],
        states: Sequence[Mapping[str, torch.Tensor]],
        weights: Sequence[float],
        gram: SplitGram | None,
    ) -> dict[str, torch.Tensor]:
        """The sent values plus the weighted mean of the clients' updates, tensor by tensor.

        A client's update (its task vector of the round) is what it holds minus what was
        sent. One tensor's updates at a time go into a reused ``n x numel`` buffer; the
        mean is one matrix-vector product over it and ``gram`` (the interference metrics)
        one matrix product, so no client's whole update is built and each reply is read
        once. float32 throughout: the sum of n float64 products gave the same float32
        weights within one unit in the last place (``tests/unit/test_aggregation.py``).
        Non-floating tensors (integer buffers) are taken from the first reply.
        """
        n = len(states)
        share = torch.tensor(weights, dtype=torch.float64)
        share = (share / share.sum()).to(torch.float32)
        floating = [t.numel() for t in states[0].values() if t.is_floating_point()]
        buffer = torch.empty(n * max(floating, default=0), dtype=torch.float32)
        mean = {}
        for name, first in states[0].items():
            if not first.is_floating_point():
                mean[name] = first.clone()
                continue
            sent = self.sent_values(base, name, first)
            rows = buffer[: n * first.numel()].view(n, first.numel())
            for row, state in zip(rows, states, strict=True):
                torch.sub(state[name].reshape(-1), sent, out=row)
            if gram is not None:
                gram.add(name, rows)
            mean[name] = torch.addmv(sent, rows.T, share).reshape(first.shape).to(first.dtype)
        return mean

    def sent_values(
        self, base: Mapping[str, torch.Tensor], name: str, values: torch.Tensor
    ) -> torch.Tensor:
        """What was sent for the entries a reply's tensor ``name`` holds, flattened (dense
        FedAvg: the whole tensor)."""
        return base[name].reshape(-1).to(values.dtype)

    def merge(self, base: Mapping[str, torch.Tensor], mean: dict[str, torch.Tensor]) -> ArrayRecord:
        """The new global weights from the mean of what the replies hold."""
        return self.global_arrays(self.merged_state(base, mean))

    def merged_state(
        self, base: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Whole weights from the sent ``base`` and ``values`` shaped as a reply holds them
        (one reply's, or their mean): dense FedAvg replies hold every tensor, so the
        values as they are."""
        return dict(values)

    # ---- checking replies ----------------------------------------------------------------
    def train_layout(self, position: RoundPosition, arrays: ArrayRecord) -> Layout:
        """What a training reply must hold: dense FedAvg, every sent tensor as sent."""
        return dense_layout(arrays)

    def check_train_reply(self, reply: Message, layout: Layout) -> CheckedReply | str:
        """A training reply with its tensors decoded once, or why it must not be aggregated.

        Its metrics must name the partition the message went to and that partition's shard
        size; its arrays must fit ``layout`` and be finite.
        """
        pid = self.node_to_partition.get(reply.metadata.src_node_id)
        metrics = reply.content.metric_records.get(protocol.METRICS)
        problem = train_metrics_problem(metrics, pid, self.shard_sizes.get(pid))
        if problem:
            return rejected(reply, pid, problem)
        return self.checked_reply(reply, protocol.ARRAYS, layout, pid)

    def checked_reply(
        self, reply: Message, key: str, layout: Layout, pid: int | None, nonnegative: bool = False
    ) -> CheckedReply | str:
        """The reply with its tensors ``key`` decoded and checked against ``layout``, or why
        they do not fit."""
        tensors, problem = reply_tensors(reply, key, layout, nonnegative)
        if problem:
            return rejected(reply, pid, problem)
        return CheckedReply(reply, tensors)

    # ---- the plan ------------------------------------------------------------------------
    def enter_phase(self, position: RoundPosition, arrays: ArrayRecord) -> None:
        """Called at the first round of each phase (dense FedAvg has only training)."""

    def on_client_failure(self, node_id: int) -> None:
        """Called for each failed reply (sparse strategies forget the node's mask)."""

    def outputs(self) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
        """What a finished run adds to its summary, and the tensor files it writes beside
        the model (dense FedAvg: nothing)."""
        return {}, {}

    # ---- Saveable ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Sampling is derived from the round; what is kept is the server rule's state."""
        return {"server-rule": self.server_rule.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """The server rule's state."""
        self.server_rule.load_state_dict(state["server-rule"])


def rejected(reply: Message, pid: int | None, problem: str) -> str:
    """The one-line reason a rejected reply counts as a failed client with: who, and why."""
    node = reply.metadata.src_node_id
    source = f"node {node}" if pid is None else f"partition {pid} (node {node})"
    return f"reply of {source} rejected: {problem}"


def client_compute_metrics(metrics: Sequence[MetricRecord]) -> RoundRow:
    """Client seconds (compute: slowest and sum; loading the weights, encoding the reply:
    sums) and peak GPU memory of a round.

    The slowest client bounds the round when every client has its own worker; the sum
    is the work to share when fewer workers than clients run.
    """
    seconds = [float(m[protocol.CLIENT_SECONDS]) for m in metrics if protocol.CLIENT_SECONDS in m]
    memory = [float(m[protocol.GPU_MEMORY_MB]) for m in metrics if protocol.GPU_MEMORY_MB in m]
    row: RoundRow = {}
    if seconds:
        row["seconds-client-compute"] = max(seconds)
        row["seconds-client-compute-sum"] = sum(seconds)
    for key, column in (
        (protocol.CLIENT_LOAD_SECONDS, "seconds-client-load-sum"),
        (protocol.CLIENT_ENCODE_SECONDS, "seconds-client-encode-sum"),
    ):
        values = [float(m[key]) for m in metrics if key in m]
        if values:
            row[column] = sum(values)
    if memory:
        row["gpu-memory-mb"] = max(memory)
    return row


def client_placements(metrics: Sequence[MetricRecord]) -> list[dict[str, Any]]:
    """Where each client that reported it (a simulation's Ray actor) trained: its partition
    id and the placement keys (worker PID, Ray's GPU ids, CUDA_VISIBLE_DEVICES, device count)."""
    rows = []
    for m in metrics:
        placed = {key: m[key] for key in protocol.PLACEMENT_KEYS if key in m}
        if placed:
            rows.append({protocol.PARTITION_ID: int(m[protocol.PARTITION_ID])} | placed)
    return rows
