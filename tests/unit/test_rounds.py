"""The round clock, the one send-with-retries, and the run loop, without Flower processes."""

from __future__ import annotations

import time

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from strategies import protocol
from strategies.plan import CALIBRATION, HEAD_WARMUP, INITIAL, TRAIN, Phase, RoundClock
from strategies.record import RoundRecord
from strategies.rounds import (
    CheckedReply,
    InsufficientRepliesError,
    RetryPolicy,
    RoundRequest,
    accept_all,
    client_error_text,
    exchange,
    run_plan,
    send_with_retries,
)
from tests.conftest import PushPull


def _clock() -> RoundClock:
    return RoundClock([Phase(HEAD_WARMUP, 2), Phase(CALIBRATION, 0), Phase(TRAIN, 3)])


def test_clock_numbers_rounds_across_phases_once():
    clock = _clock()
    assert clock.total_rounds == 5 and clock.describe() == "2 head-warmup, 3 train"
    positions = [clock.position(r) for r in range(6)]
    assert [(p.phase, p.phase_round) for p in positions] == [
        (INITIAL, 0),
        (HEAD_WARMUP, 1),
        (HEAD_WARMUP, 2),
        (TRAIN, 1),
        (TRAIN, 2),
        (TRAIN, 3),
    ]
    assert positions[2].last_of_phase and not positions[3].last_of_phase
    with pytest.raises(ValueError, match="past the plan"):
        clock.position(6)


def test_clock_completes_in_order_and_saves_itself():
    clock = _clock()
    clock.complete(clock.next_round())
    with pytest.raises(ValueError, match="expected 2"):
        clock.complete(clock.position(3))
    again = _clock()
    again.load_state_dict(clock.state_dict())
    assert again.next_round() == clock.position(2)
    other = RoundClock([Phase(TRAIN, 5)])
    with pytest.raises(ValueError, match="not this run's plan"):
        other.load_state_dict(clock.state_dict())


class FakeGrid(PushPull):
    """Answers each message with a reply, or an error for the partitions in ``fail[attempt]``."""

    def __init__(self, fail: list[set[int]]) -> None:
        self.fail = fail
        self.calls = 0

    def send_and_receive(self, messages, timeout=None):
        failing = self.fail[min(self.calls, len(self.fail) - 1)]
        self.calls += 1
        replies = []
        for m in reversed(messages):  # arrival order is not partition order
            pid = int(m.content["config"]["pid"])
            if pid in failing:
                replies.append(Message(Error(code=0, reason=f"boom {pid}"), reply_to=m))
                continue
            metrics = MetricRecord({protocol.PARTITION_ID: pid, protocol.NUM_EXAMPLES: 1})
            replies.append(Message(RecordDict({protocol.METRICS: metrics}), reply_to=m))
        return replies


def _build(attempt: int) -> list[Message]:
    pids = [0, 1, 2] if attempt == 0 else [3, 4, 5]
    return [
        Message(
            RecordDict({"config": ConfigRecord({"pid": p})}),
            dst_node_id=10 + p,
            message_type=protocol.TRAIN,
        )
        for p in pids
    ]


def _record() -> RoundRecord:
    return RoundRecord(RoundClock([Phase(TRAIN, 1)]).position(1))


def test_enough_replies_in_the_first_attempt(identity):
    record, failed = _record(), []
    grid = FakeGrid([{1}])
    replies = send_with_retries(grid, _build, RetryPolicy(2, 3), record, failed.append)
    pids = [r.partition for r in replies]
    assert pids == [0, 2] and grid.calls == 1 and failed == [11]
    assert record.get("clients") == 2 and record.get("failures") == 1
    assert record.failure_reasons == ["boom 1"]


def test_too_few_replies_then_rescued_by_a_new_sample(identity):
    record = _record()
    grid = FakeGrid([{0, 1, 2}, {5}])
    replies = send_with_retries(grid, _build, RetryPolicy(2, 3), record)
    pids = [r.partition for r in replies]
    assert pids == [3, 4] and grid.calls == 2
    assert record.get("failures") == 4 and record.get("clients") == 2


def test_too_few_replies_after_all_retries(identity):
    record = _record()
    grid = FakeGrid([{0, 1, 2, 3, 4, 5}])
    with pytest.raises(InsufficientRepliesError) as info:
        send_with_retries(grid, _build, RetryPolicy(1, 2), record)
    assert "0 usable replies, fewer than the 1 required, after 3 attempts" in str(info.value)
    assert "\n" not in str(info.value) and grid.calls == 3 and record.get("failures") == 9


class TricklingGrid:
    """Replies one at a time, one per look, last message first; ``silent`` partitions never
    answer. Records when each reply was handed out."""

    pull_interval = 0.001

    def __init__(self, silent: set[int] = frozenset()) -> None:
        self.silent = silent
        self.queue: list[Message] = []
        self.handed: dict[int, float] = {}  # pid -> when its reply was pulled

    def push_messages(self, messages):
        for i, m in enumerate(messages):
            m.metadata.__dict__["_message_id"] = f"m{i}"
        self.queue = [m for m in reversed(messages) if _pid(m) not in self.silent]
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids):
        if not self.queue:
            return []
        m = self.queue.pop(0)
        self.handed[_pid(m)] = time.perf_counter()
        metrics = MetricRecord({protocol.PARTITION_ID: _pid(m), protocol.NUM_EXAMPLES: 1})
        return [Message(RecordDict({protocol.METRICS: metrics}), reply_to=m)]


def _pid(message: Message) -> int:
    return int(message.content["config"]["pid"])


def test_replies_are_checked_as_they_arrive(identity):
    """The first reply's check runs before the last reply is pulled; verdicts keep the
    arrival order, and the round's usable replies come back in partition order."""
    grid, checked = TricklingGrid(), {}

    def check(reply: Message) -> CheckedReply | str:
        pid = int(reply.content[protocol.METRICS][protocol.PARTITION_ID])
        checked[pid] = time.perf_counter()
        time.sleep(0.02)  # a check takes a while: the next replies arrive meanwhile
        return "odd partition" if pid % 2 else CheckedReply(reply, {})

    done = exchange(grid, _build(0), timeout=10.0, check=check)
    arrival = [int(r.content[protocol.METRICS][protocol.PARTITION_ID]) for r in done.replies]
    verdicts = [v if isinstance(v, str) else v.message for v in done.verdicts]
    assert arrival == [2, 1, 0] and verdicts == [done.replies[0], "odd partition", done.replies[2]]
    assert checked[2] < grid.handed[0]  # checked while partition 0's reply was not in yet
    assert 0 < done.seconds_decode < 1.0 and done.seconds_clients > 0

    record, failed = _record(), []
    replies = send_with_retries(
        TricklingGrid(), _build, RetryPolicy(1), record, failed.append, check
    )
    assert [r.partition for r in replies] == [0, 2] and failed == [11]
    assert record.failure_reasons == ["odd partition"] and record.get("seconds-decode") > 0


def _pid_of(reply: Message) -> int:
    return int(reply.content[protocol.METRICS][protocol.PARTITION_ID])


def test_a_node_that_never_answers_fails_the_round_at_the_timeout(identity):
    grid = TricklingGrid(silent={1})
    t0 = time.perf_counter()
    done = exchange(grid, _build(0), timeout=0.2, check=accept_all)
    assert 0.2 <= time.perf_counter() - t0 < 2.0
    assert sorted(_pid_of(r) for r in done.replies) == [0, 2]
    record = _record()
    replies = send_with_retries(TricklingGrid({1}), _build, RetryPolicy(1, timeout=0.2), record)
    assert [r.partition for r in replies] == [0, 2] and record.get("failures") == 1


class NoNodes:
    """A Grid with no node: every push is empty, nothing comes back."""

    pull_interval = 0.001

    def push_messages(self, messages):
        return []

    def pull_messages(self, ids):
        return []


class CountingStrategy:
    """Sends nothing and adds 1 to every weight each round; records the phases it entered."""

    retry = RetryPolicy(min_replies=0)

    def __init__(self) -> None:
        self.entered: list[str] = []

    def enter_phase(self, position, arrays):
        self.entered.append(position.phase)

    def configure(self, position, arrays, record):
        record.add({"phase-round": position.phase_round})
        return RoundRequest(lambda attempt: [])

    def aggregate(self, position, arrays, replies, record):
        state = arrays.to_torch_state_dict()
        return ArrayRecord({k: v + 1 for k, v in state.items()})

    def on_client_failure(self, node_id):
        raise AssertionError("no client was asked")


def test_run_plan_calls_hooks_after_round_zero_and_each_round():
    seen = []
    strategy = CountingStrategy()
    clock = _clock()
    out = run_plan(
        strategy,
        clock,
        NoNodes(),
        ArrayRecord({"w": torch.zeros(1)}),
        [lambda record, arrays: seen.append((record.round, record.phase))],
    )
    assert float(out.to_torch_state_dict()["w"]) == 5.0 and clock.finished
    assert seen[0] == (0, INITIAL) and [r for r, _ in seen] == [0, 1, 2, 3, 4, 5]
    assert strategy.entered == [HEAD_WARMUP, TRAIN]


def test_resumed_plan_skips_round_zero_and_does_not_reenter_the_phase():
    clock = _clock()
    clock.load_state_dict({"completed": 4, "phases": [(HEAD_WARMUP, 2), (TRAIN, 3)]})
    seen, strategy = [], CountingStrategy()
    run_plan(
        strategy,
        clock,
        NoNodes(),
        ArrayRecord({"w": torch.zeros(1)}),
        [lambda r, a: seen.append(r.round)],
    )
    assert seen == [5] and strategy.entered == []


# The shape of a reason Flower 1.42's simulation gives for a ClientApp that raised
# (vce_api.py: str(type(ex)) + ":<'" + str(ex) + "'>", ex a RayTaskError around
# ClientAppException), shortened; seen in tests/e2e/test_ray_gpus.py's failing run.
SIMULATION_REASON = (
    "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run() "
    '(pid=13232, ip=192.0.2.2)\n  File "flower_app/runs/worker_gpus.py", line 82, in '
    "auto_device\n    raise GpuMismatchError(gpu_mismatch(given))\n"
    "flower_app.runs.worker_gpus.GpuMismatchError: it said: no GPU\n\nThe above exception "
    "was the direct cause of the following exception:\n\nray::ClientAppActor.run()\n"
    "flwr.clientapp.client_app.ClientAppException: \nException ClientAppException occurred. "
    "Message: it said: no GPU'>"
)


@pytest.mark.parametrize(
    ("reason", "text"),
    [
        (SIMULATION_REASON, "GpuMismatchError: it said: no GPU"),
        (SIMULATION_REASON.replace("GpuMismatchError: it", "it"), "it said: no GPU"),
        ("<class 'KeyError'>:<''x''>", "<class 'KeyError'>:<''x''>"),  # a deployment's
        ("boom\non two lines", "boom on two lines"),
        ("Exception X occurred. Message: '>", "Exception X occurred. Message: '>"),
    ],
    ids=["simulation", "simulation-without-the-class", "deployment", "plain", "empty-message"],
)
def test_a_client_error_is_one_line_with_the_clientapps_own_exception(reason, text):
    assert client_error_text(reason) == text
