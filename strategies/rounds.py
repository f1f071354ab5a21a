"""Where the network is used: the one loop over rounds of every kind, as in Flower's
``Strategy.start``.

A round is configure, send and receive, aggregate (``run_round``). The strategy
configures (a ``RoundRequest``: the messages of each attempt and the check of a reply),
checks each reply (its tensors, decoded once, or why it must not be aggregated) and
aggregates the ``CheckedReply``s (arithmetic only); sending, waiting, retrying and
checking happen here. Training, head warm-up and calibration rounds are all this loop.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from strategies import protocol
from strategies.plan import RoundClock, RoundPosition
from strategies.record import RoundRecord


class InsufficientRepliesError(RuntimeError):
    """A round got fewer usable replies than required, after every allowed retry."""


@dataclass(frozen=True)
class RetryPolicy:
    """At least ``min_replies`` usable replies, resampling up to ``max_retries`` times."""

    min_replies: int = 1
    max_retries: int = 0
    timeout: float = 3600.0


RoundHook = Callable[[RoundRecord, ArrayRecord], None]

# Flower's simulation wraps what a ClientApp raised: "<class '...'>:<'" + Ray's traceback
# + "Exception ClientAppException occurred. Message: " + str(exception) + "'>"
WRAPPED_MESSAGE = " occurred. Message: "


def client_error_text(reason: str) -> str:
    """A client's error on one line: in a simulation, the ClientApp's own exception (its
    class name and message, without Ray's and Flower's tracebacks); otherwise the reason
    with its whitespace collapsed."""
    flat = " ".join(reason.split())
    head, found, message = flat.rpartition(WRAPPED_MESSAGE)
    message = message.removesuffix("'>")
    if not found or not message:
        return flat
    raised = re.search(r"([A-Za-z_][\w.]*): " + re.escape(message), head)
    return f"{raised.group(1).rsplit('.', 1)[-1]}: {message}" if raised else message


def content_bytes(content: RecordDict) -> int:
    """Bytes of the arrays in a message (what dominates communication; a record the Grid
    carried by reference counts what the message would have carried)."""
    return sum(record.count_bytes() for record in content.array_records.values())


@dataclass(frozen=True)
class CheckedReply:
    """A usable reply and the tensors its check decoded: what an aggregation reads."""

    message: Message
    tensors: dict[str, torch.Tensor]

    @property
    def metrics(self) -> MetricRecord:
        return self.message.content[protocol.METRICS]

    @property
    def partition(self) -> int:
        return int(self.metrics[protocol.PARTITION_ID])

    @property
    def examples(self) -> float:
        """The reply's FedAvg weight: its ``num-examples``."""
        return float(self.metrics[protocol.NUM_EXAMPLES])


ReplyCheck = Callable[[Message], CheckedReply | str]  # the checked reply, or why it is not


def accept_all(reply: Message) -> CheckedReply:
    """The default check: every reply without a Flower error is usable (no tensors read)."""
    return CheckedReply(reply, {})


@dataclass(frozen=True)
class RoundRequest:
    """What a strategy configures for a round: each attempt's messages, a reply's check."""

    build: Callable[[int], list[Message]]
    check: ReplyCheck = accept_all


CHECK_THREADS = 4  # replies checked at once: hashing and reading mapped files scale to ~4
PULL_INTERVAL_S = 0.1  # between looks for replies, when the grid does not say (deployment)


@dataclass
class Exchange:
    """The replies to one set of messages, in arrival order, with each one's verdict."""

    replies: list[Message]
    verdicts: list[CheckedReply | str]  # the checked reply, or why it is not (a Flower error too)
    seconds_clients: float  # from the push to the last reply: transport and client work
    seconds_decode: float  # checks still running after the last reply


def exchange(grid: Grid, messages: list[Message], timeout: float, check: ReplyCheck) -> Exchange:
    """Push ``messages``, pull replies until all came or ``timeout``, and check each reply
    as soon as it arrives.

    Checking a reply reads all of its bytes (hash, shape, finiteness). Done after the last
    reply (as with ``send_and_receive``), that time was added to every round; here the
    checks run in a few threads while later replies are still being computed, and only
    the last ones are left when the last reply lands. A check must not depend on another
    reply's (the strategies' checks only read the roster).
    """
    t_sent = time.perf_counter()
    pending = set(grid.push_messages(messages))
    deadline = t_sent + timeout
    interval = float(getattr(grid, "pull_interval", PULL_INTERVAL_S))
    threads = max(1, min(len(messages), CHECK_THREADS, os.cpu_count() or 1))
    replies: list[Message] = []
    last = t_sent
    with ThreadPoolExecutor(threads, thread_name_prefix="reply-check") as pool:
        verdicts = []
        while pending:
            arrived = list(grid.pull_messages(pending))
            if arrived:
                last = time.perf_counter()
            for reply in arrived:
                replies.append(reply)
                verdicts.append(pool.submit(_verdict, reply, check))
                pending.discard(reply.metadata.reply_to_message_id)
            if not pending or time.perf_counter() >= deadline:
                break
            time.sleep(interval)
        checked = [verdict.result() for verdict in verdicts]
    return Exchange(replies, checked, last - t_sent, time.perf_counter() - last)


def _verdict(reply: Message, check: ReplyCheck) -> CheckedReply | str:
    return reply.error.reason if reply.has_error() else check(reply)


def usable_replies(
    done: Exchange, record: RoundRecord, on_failure: Callable[[int], None]
) -> list[CheckedReply]:
    """The usable replies of an exchange, in partition order.

    A Flower error and a rejected reply are the same to a round: a failed client, counted
    with its one-line reason (printed and kept in the record for the CSVs).
    """
    valid = []
    for reply, verdict in zip(done.replies, done.verdicts, strict=True):
        if isinstance(verdict, CheckedReply):
            valid.append(verdict)
            continue
        reason = client_error_text(verdict)  # one line, whatever the client sent
        on_failure(reply.metadata.src_node_id)
        record.failure_reasons.append(reason)
        print(f"round {record.round}: client failed: {reason}", flush=True)
    valid.sort(key=lambda r: r.partition)
    return valid


def send_with_retries(
    grid: Grid,
    build: Callable[[int], list[Message]],
    policy: RetryPolicy,
    record: RoundRecord,
    on_failure: Callable[[int], None] = lambda node_id: None,
    check: ReplyCheck = accept_all,
) -> list[CheckedReply]:
    """Send ``build(0)``; while too few replies are usable, send ``build(k)``, k = 1, 2, ...

    A reply is usable when it carries no error and ``check`` returns it checked, not a
    reason to reject it. Fills the record's ``bytes-down``, ``bytes-up``, ``clients``,
    ``failures``, ``seconds-send`` (building the messages), ``seconds-clients`` (from the push
    to the last reply: the Grid's carrying, writing the shared weights file included,
    transport and client work) and ``seconds-decode`` (checks left after the last reply);
    returns the usable replies of the last attempt in partition order.
    """
    attempt, failures = 0, 0
    while True:
        t_build = time.perf_counter()
        messages = build(attempt)
        record.count("seconds-send", time.perf_counter() - t_build)
        record.count("bytes-down", sum(content_bytes(m.content) for m in messages))
        done = exchange(grid, messages, policy.timeout, check)
        record.count("seconds-clients", done.seconds_clients)
        record.count("seconds-decode", done.seconds_decode)
        valid = usable_replies(done, record, on_failure)
        failures += len(messages) - len(valid)
        if len(valid) >= policy.min_replies or attempt >= policy.max_retries:
            break
        attempt += 1
        print(
            f"round {record.round}: {len(valid)} usable replies < {policy.min_replies} "
            f"required, retry {attempt} of {policy.max_retries}",
            flush=True,
        )
    record.add({"clients": float(len(valid)), "failures": float(failures)})
    record.add({"bytes-up": float(sum(content_bytes(r.message.content) for r in valid))})
    if len(valid) < policy.min_replies:
        raise InsufficientRepliesError(
            f"round {record.round} ({record.phase}): {len(valid)} usable replies, fewer than "
            f"the {policy.min_replies} required, after {attempt + 1} attempts "
            f"({failures} client failures)"
        )
    return valid


class PlannedStrategy(Protocol):
    """What the loop needs of a strategy: configure, check (in the request), aggregate."""

    node_to_partition: dict[int, int]
    retry: RetryPolicy

    def adopt(self, node_id: int, partition_id: int, num_examples: int) -> str: ...

    def enter_phase(self, position: RoundPosition, arrays: ArrayRecord) -> None: ...

    def configure(
        self, position: RoundPosition, arrays: ArrayRecord, record: RoundRecord
    ) -> RoundRequest: ...

    def aggregate(
        self,
        position: RoundPosition,
        arrays: ArrayRecord,
        replies: Sequence[CheckedReply],
        record: RoundRecord,
    ) -> ArrayRecord: ...

    def on_client_failure(self, node_id: int) -> None: ...


def run_round(
    strategy: PlannedStrategy,
    grid: Grid,
    position: RoundPosition,
    arrays: ArrayRecord,
    record: RoundRecord,
) -> ArrayRecord:
    """One round of any kind: configure, send and receive (with retries and checks),
    aggregate (its wall time is the record's ``seconds-aggregate``)."""
    request = strategy.configure(position, arrays, record)
    replies = send_with_retries(
        grid, request.build, strategy.retry, record, strategy.on_client_failure, request.check
    )
    t0 = time.perf_counter()
    arrays = strategy.aggregate(position, arrays, replies, record)
    record.count("seconds-aggregate", time.perf_counter() - t0)
    return arrays


def adopt_new_nodes(grid: Grid, strategy: PlannedStrategy, timeout: float) -> None:
    """Ask nodes that joined since the start which partition they hold; the strategy decides
    whether each takes it over. A SuperNode that died and came back has a new node id, so
    without this its partition would stay on the dead id and fail every round."""
    new = [n for n in grid.get_node_ids() if n not in strategy.node_to_partition]
    if not new:
        return
    messages = [
        Message(RecordDict(), dst_node_id=n, message_type=protocol.QUERY_PARTITION) for n in new
    ]
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            reason = client_error_text(reply.error.reason)
            print(f"node {node} joined but its partition query failed: {reason}", flush=True)
            continue
        metrics = reply.content[protocol.METRICS]
        pid, examples = int(metrics[protocol.PARTITION_ID]), int(metrics[protocol.NUM_EXAMPLES])
        print(strategy.adopt(node, pid, examples), flush=True)


def run_plan(
    strategy: PlannedStrategy,
    clock: RoundClock,
    grid: Grid,
    arrays: ArrayRecord,
    hooks: Sequence[RoundHook],
    rejoin_timeout: float | None = None,
) -> ArrayRecord:
    """Run the clock's remaining rounds; after each (and after round 0 of a fresh run) the hooks.

    A resumed clock continues where it stopped; a phase is entered only at its first round,
    so a resume inside a phase keeps the state the checkpoint restored. With
    ``rejoin_timeout``, nodes that joined since the last round are adopted before each round.
    """
    if clock.completed == 0:
        initial = RoundRecord(clock.position(0))
        for hook in hooks:
            hook(initial, arrays)
    while not clock.finished:
        position = clock.next_round()
        record = RoundRecord(position)
        if rejoin_timeout is not None:
            adopt_new_nodes(grid, strategy, rejoin_timeout)
        if position.phase_round == 1:
            strategy.enter_phase(position, arrays)
        arrays = run_round(strategy, grid, position, arrays, record)
        clock.complete(position)
        for hook in hooks:
            hook(record, arrays)
    return arrays
