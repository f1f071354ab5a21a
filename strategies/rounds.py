"""Where the network is used: one send-with-retries for every kind of round, and the run loop.

As in Flower's own ``Strategy.start``, strategies only decide (which clients, which
messages) and aggregate (arithmetic over replies); sending, waiting and retrying happen
here. Training, head warm-up and calibration rounds all go through ``send_with_retries``.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid

from strategies import protocol
from strategies.plan import RoundClock, RoundPosition
from strategies.record import RoundRecord
from strategies.transport.carrier import WeightCarrier
from strategies.transport.shared_weights import WeightRef


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
    """Bytes of the arrays in a message (what dominates communication), also when they
    travel by reference (the reference states what the message would have carried)."""
    carried = sum(record.count_bytes() for record in content.array_records.values())
    return carried + sum(
        WeightRef.from_record(record).nbytes
        for key, record in content.config_records.items()
        if key.endswith(protocol.REF_SUFFIX)
    )


ReplyCheck = Callable[[Message], str]  # "" when a reply may be aggregated, else the reason


def accept_all(reply: Message) -> str:
    """The default check: every reply without a Flower error is usable."""
    return ""


CHECK_THREADS = 4  # replies checked at once: hashing and reading mapped files scale to ~4
PULL_INTERVAL_S = 0.1  # between looks for replies, when the grid does not say (deployment)


@dataclass
class Exchange:
    """The replies to one set of messages, in arrival order, with each one's verdict."""

    replies: list[Message]
    reasons: list[str]  # "" for a usable reply, else why it is not (a Flower error too)
    seconds_clients: float  # from the push to the last reply: transport and client work
    seconds_decode: float  # checks still running after the last reply


def exchange(grid: Grid, messages: list[Message], timeout: float, check: ReplyCheck) -> Exchange:
    """Push ``messages``, pull replies until all came or ``timeout``, and check each reply
    as soon as it arrives.

    Checking a reply reads all of its bytes (hash, shape, finiteness). Done after the last
    reply (as with
    ``send_and_receive``), that time was added to every round; here the checks run in a
    few threads while later replies are still being computed, and only the last ones are
    left when the last reply lands. A check must not depend on another reply's (the
    strategies' checks read the roster and keep what they decoded).
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
        reasons = [verdict.result() for verdict in verdicts]
    return Exchange(replies, reasons, last - t_sent, time.perf_counter() - last)


def _verdict(reply: Message, check: ReplyCheck) -> str:
    return reply.error.reason if reply.has_error() else check(reply)


def usable_replies(
    done: Exchange, record: RoundRecord, on_failure: Callable[[int], None]
) -> list[Message]:
    """The usable replies of an exchange, in partition order.

    A Flower error and a rejected reply are the same to a round: a failed client, counted
    with its one-line reason (printed and kept in the record for the CSVs).
    """
    valid = []
    for reply, reason in zip(done.replies, done.reasons, strict=True):
        if reason:
            reason = client_error_text(reason)  # one line, whatever the client sent
            on_failure(reply.metadata.src_node_id)
            record.failure_reasons.append(reason)
            print(f"round {record.round}: client failed: {reason}", flush=True)
        else:
            valid.append(reply)
    valid.sort(key=lambda r: int(r.content[protocol.METRICS][protocol.PARTITION_ID]))
    return valid


def send_with_retries(
    grid: Grid,
    build: Callable[[int], list[Message]],
    policy: RetryPolicy,
    record: RoundRecord,
    on_failure: Callable[[int], None] = lambda node_id: None,
    check: ReplyCheck = accept_all,
) -> list[Message]:
    """Send ``build(0)``; while too few replies are usable, send ``build(k)``, k = 1, 2, ...

    A reply is usable when it carries no error and ``check`` finds no reason to reject it.
    Fills the record's ``bytes-down``, ``bytes-up``, ``clients``, ``failures``,
    ``seconds-send`` (building the messages, writing shared weights), ``seconds-clients``
    (from sending to the last reply: transport and client work) and ``seconds-decode``
    (checks left after the last reply); returns the usable replies of the last attempt
    in partition order.
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
    record.add({"bytes-up": float(sum(content_bytes(r.content) for r in valid))})
    if len(valid) < policy.min_replies:
        raise InsufficientRepliesError(
            f"round {record.round} ({record.phase}): {len(valid)} usable replies, fewer than "
            f"the {policy.min_replies} required, after {attempt + 1} attempts "
            f"({failures} client failures)"
        )
    return valid


class PlannedStrategy(Protocol):
    """What ``run_plan`` needs of a strategy."""

    node_to_partition: dict[int, int]
    carrier: WeightCarrier

    def adopt(self, node_id: int, partition_id: int, num_examples: int) -> str: ...

    def enter_phase(self, position: RoundPosition, arrays: ArrayRecord) -> None: ...

    def run_round(
        self, grid: Grid, position: RoundPosition, arrays: ArrayRecord, record: RoundRecord
    ) -> ArrayRecord: ...


def adopt_new_nodes(grid: Grid, strategy: PlannedStrategy, timeout: float) -> None:
    """Ask nodes that joined since the start which partition they hold; the strategy decides
    whether each takes it over. A SuperNode that died and came back has a new node id, so
    without this its partition would stay on the dead id and fail every round."""
    new = [n for n in grid.get_node_ids() if n not in strategy.node_to_partition]
    if not new:
        return
    messages = [
        Message(
            strategy.carrier.probe_content(), dst_node_id=n, message_type=protocol.QUERY_PARTITION
        )
        for n in new
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
        strategy.carrier.accept_probe(node, reply)


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
        arrays = strategy.run_round(grid, position, arrays, record)
        clock.complete(position)
        for hook in hooks:
            hook(record, arrays)
    return arrays
