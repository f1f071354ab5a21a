"""Weighted FedAvg with seeded sampling, a fixed aggregation order and round hooks.

Flower's FedAvg samples with the global ``random`` and sums replies in arrival order,
so two runs with one seed differ. Here clients are sampled by partition id from a
generator seeded by (seed, round), replies are summed in partition order in float64,
and every round ends in one call (``on_round_end``) that runs central evaluation
when due and hands a metrics row to the hooks the ServerApp attached.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from strategies import protocol
from strategies.interference import interference_metrics

RoundRow = dict[str, float]
RoundHook = Callable[[int, ArrayRecord, RoundRow], None]
CentralEvaluate = Callable[[ArrayRecord], tuple[float, float]]


class InsufficientRepliesError(RuntimeError):
    """A training round got no usable reply."""


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


def sample_partitions(
    num_partitions: int, per_round: int, seed: int, server_round: int, attempt: int = 0
) -> list[int]:
    """The partitions trained in a round: seeded by (seed, round, attempt), returned sorted.

    No generator state carries from round to round, so a resumed run samples exactly
    what an uninterrupted one would.
    """
    key = f"sample-{seed}-{server_round}" + (f"-retry{attempt}" if attempt else "")
    return sorted(random.Random(key).sample(range(num_partitions), per_round))


class OrderedFedAvg(FedAvg):
    """FedAvg weighted by ``num-examples``, reproducible for a seed, with round hooks."""

    def __init__(
        self,
        *,
        partition_to_node: Mapping[int, int],
        clients_per_round: int,
        seed: int,
        lr_at: Callable[[int], float],
        num_rounds: int,
        eval_every: int,
        central_evaluate: CentralEvaluate | None = None,
        hooks: Sequence[RoundHook] = (),
        fraction_evaluate: float = 0.0,
        min_train_clients: int = 1,
        max_round_retries: int = 0,
        round_timeout: float = 3600.0,
        update_metrics: bool = True,
    ) -> None:
        num_nodes = len(partition_to_node)
        super().__init__(
            fraction_train=clients_per_round / num_nodes,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=clients_per_round,
            min_evaluate_nodes=1 if fraction_evaluate > 0 else 0,
            min_available_nodes=num_nodes,
            weighted_by_key=protocol.NUM_EXAMPLES,
            arrayrecord_key=protocol.ARRAYS,
            configrecord_key=protocol.CONFIG,
        )
        self.partition_to_node = dict(partition_to_node)
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.lr_at = lr_at
        self.num_rounds = num_rounds
        self.eval_every = eval_every
        self.central_evaluate = central_evaluate
        self.hooks = list(hooks)
        self.min_train_clients = min_train_clients
        self.max_round_retries = max_round_retries
        self.round_timeout = round_timeout
        self.update_metrics = update_metrics
        self._row: RoundRow = {}
        self._round_start = time.perf_counter()
        self._t_sent = self._round_start
        self._pending: tuple[Grid, ArrayRecord, ConfigRecord] | None = None
        self.phase = "train"
        self.round_offset = 0  # rounds of an earlier phase (sparse head warm-up)
        self.resume_offset = 0  # rounds of this phase done before a resume

    def phase_round(self, server_round: int) -> int:
        """Flower counts the rounds of each ``start``; a resumed run continues the count."""
        return self.resume_offset + server_round

    # ---- training ------------------------------------------------------------------
    def round_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        """What every sampled client receives besides the weights."""
        out = ConfigRecord(dict(config))
        out[protocol.SERVER_ROUND] = server_round
        out[protocol.LR] = float(self.lr_at(server_round))
        return out

    def message_for(
        self,
        pid: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        message_type: str = protocol.TRAIN,
    ) -> Message:
        """The message for one partition's node (sparse strategies add the mask)."""
        content = RecordDict({protocol.ARRAYS: arrays, protocol.CONFIG: config})
        return Message(content, dst_node_id=self.partition_to_node[pid], message_type=message_type)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Seeded sample of partitions, one message each, in partition order."""
        self._round_start = time.perf_counter()
        phase_round = self.phase_round(server_round)
        self._pending = (grid, arrays, config)
        messages = self.train_messages(phase_round, arrays, config, attempt=0)
        self._row = {
            "round": self.round_offset + phase_round,
            "lr": float(self.lr_at(phase_round)),
            "clients": len(messages),
            "bytes-down": float(sum(content_bytes(m.content) for m in messages)),
        }
        self._t_sent = time.perf_counter()
        return messages

    def train_messages(
        self, phase_round: int, arrays: ArrayRecord, config: ConfigRecord, attempt: int
    ) -> list[Message]:
        pids = sample_partitions(
            len(self.partition_to_node), self.clients_per_round, self.seed, phase_round, attempt
        )
        config = self.round_config(phase_round, config)
        config[protocol.ATTEMPT] = attempt
        return [self.message_for(pid, arrays, config) for pid in pids]

    def valid_replies(
        self, replies: Iterable[Message], sent: int, what: str
    ) -> tuple[list[Message], int]:
        """Replies without error in partition order, and how many of ``sent`` failed."""
        replies = list(replies)
        valid = [r for r in replies if not r.has_error()]
        for r in replies:
            if r.has_error():
                self.on_client_failure(r.metadata.src_node_id)
                print(f"{what}: client failed: {r.error.reason}", flush=True)
        valid.sort(key=lambda r: int(r.content[protocol.METRICS][protocol.PARTITION_ID]))
        return valid, sent - len(valid)

    def with_retries(
        self,
        replies: Iterable[Message],
        sent: int,
        resend: Callable[[int], list[Message]],
        grid: Grid,
        what: str,
    ) -> tuple[list[Message], int, int]:
        """At least ``min-train-clients`` replies, resampling up to ``max-round-retries`` times.

        Returns the usable replies, the failures over all attempts and the bytes of the
        extra messages sent.
        """
        valid, failures = self.valid_replies(replies, sent, what)
        extra_bytes, attempt = 0, 0
        while len(valid) < self.min_train_clients and attempt < self.max_round_retries:
            attempt += 1
            print(f"{what}: {len(valid)} replies < min-train-clients, retry {attempt}", flush=True)
            messages = resend(attempt)
            extra_bytes += sum(content_bytes(m.content) for m in messages)
            again = grid.send_and_receive(messages, timeout=self.round_timeout)
            valid, failed = self.valid_replies(again, len(messages), what)
            failures += failed
        if len(valid) < self.min_train_clients:
            raise InsufficientRepliesError(
                f"{what}: {len(valid)} replies, fewer than min-train-clients="
                f"{self.min_train_clients}, after {attempt + 1} attempts ({failures} client "
                "failures); check the clients' logs, or lower min-train-clients / raise "
                "max-round-retries"
            )
        return valid, failures, extra_bytes

    def on_client_failure(self, node_id: int) -> None:
        """Called for each failed reply (sparse strategies forget the node's mask)."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the replies in partition order, weighted by their ``num-examples``."""
        t_received = time.perf_counter()
        grid, arrays_sent, config = self._pending
        phase_round = self.phase_round(server_round)
        valid, failures, extra_bytes = self.with_retries(
            replies,
            self.clients_per_round,
            lambda attempt: self.train_messages(phase_round, arrays_sent, config, attempt),
            grid,
            f"round {self.round_offset + phase_round}",
        )
        metrics = [r.content[protocol.METRICS] for r in valid]
        weights = [float(m[protocol.NUM_EXAMPLES]) for m in metrics]
        arrays = self.aggregate_arrays(server_round, [r.content for r in valid], weights)
        total = sum(weights)
        losses = [float(m[protocol.TRAIN_LOSS]) for m in metrics]
        train_loss = sum(w * x for w, x in zip(weights, losses, strict=True)) / total
        self._row["bytes-down"] += extra_bytes
        self._row.update(
            {
                "train-loss": train_loss,
                "failures": float(failures),
                "num-examples": total,
                "bytes-up": float(sum(content_bytes(r.content) for r in valid)),
                "seconds-clients": t_received - self._t_sent,
                "seconds-aggregate": time.perf_counter() - t_received,
            }
        )
        self._row.update(client_compute_metrics(metrics))
        return arrays, MetricRecord({protocol.TRAIN_LOSS: train_loss})

    def aggregate_arrays(
        self, server_round: int, contents: list[RecordDict], weights: list[float]
    ) -> ArrayRecord:
        """Dense FedAvg of the full weights (sparse strategies override this)."""
        states = [c[protocol.ARRAYS].to_torch_state_dict() for c in contents]
        if self.update_metrics:
            sent = self._pending[1].to_torch_state_dict()
            updates = [{k: s[k] - sent[k] for k in s if s[k].is_floating_point()} for s in states]
            self.log_interference(updates, weights)
        return ArrayRecord(weighted_average(states, weights))

    def log_interference(
        self, updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
    ) -> None:
        """Put the round's update cosine and norm ratio (strategies/interference.py) in the row."""
        self._row.update(interference_metrics(updates, weights))

    # ---- end of round: central evaluation and hooks ----------------------------------
    def eval_due(self, phase_round: int) -> bool:
        return phase_round % self.eval_every == 0 or phase_round in (0, self.num_rounds)

    def on_round_end(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower calls this after every round (and at round 0) as its ``evaluate_fn``."""
        if server_round == 0 and (self.round_offset > 0 or self.resume_offset > 0):
            return None  # round 0 of a later phase or a resume: evaluated already
        server_round = self.phase_round(server_round)
        row: RoundRow = dict(self._row) if server_round > 0 else {"round": 0}
        self._row = {}
        result = None
        if self.central_evaluate is not None and self.eval_due(server_round):
            t_eval = time.perf_counter()
            loss, acc = self.central_evaluate(arrays)
            row.update(
                {
                    "val-loss": loss,
                    "val-accuracy": acc,
                    "seconds-eval": time.perf_counter() - t_eval,
                }
            )
            result = MetricRecord({"val-loss": loss, "val-accuracy": acc})
        if server_round > 0:
            row["seconds"] = time.perf_counter() - self._round_start
        for hook in self.hooks:
            hook(server_round, arrays, row)
        return result


def client_compute_metrics(metrics: Sequence[MetricRecord]) -> RoundRow:
    """Client compute seconds (slowest client, and the sum) and peak GPU memory of a round.

    The slowest client bounds the round when every client has its own worker; the sum
    is the work to share when fewer workers than clients run. Replies of older clients
    without these keys are skipped.
    """
    seconds = [float(m[protocol.CLIENT_SECONDS]) for m in metrics if protocol.CLIENT_SECONDS in m]
    memory = [float(m[protocol.GPU_MEMORY_MB]) for m in metrics if protocol.GPU_MEMORY_MB in m]
    row: RoundRow = {}
    if seconds:
        row["seconds-client-compute"] = max(seconds)
        row["seconds-client-compute-sum"] = sum(seconds)
    if memory:
        row["gpu-memory-mb"] = max(memory)
    return row


def content_bytes(content: RecordDict) -> int:
    """Bytes of the arrays in a message (what dominates communication)."""
    return sum(record.count_bytes() for record in content.array_records.values())
