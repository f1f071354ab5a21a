"""Round hooks one by one, on made-up round records (no strategy, no Flower processes)."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord

from flower_app.runs.checkpoint import CHECKPOINT_NAME, Checkpointer, load_checkpoint, restore
from flower_app.runs.hooks import (
    BestModel,
    CentralEvaluation,
    MetricsTable,
    PlacementTable,
    ProgressLog,
    Stopwatch,
    calibration_table,
)
from flower_app.runs.results import RunDirectory
from strategies import protocol
from strategies.fedavg import client_placements
from strategies.plan import CALIBRATION, HEAD_WARMUP, TRAIN, Phase, RoundClock
from strategies.record import RoundRecord

CLOCK = RoundClock([Phase(HEAD_WARMUP, 3), Phase(CALIBRATION, 2), Phase(TRAIN, 4)])


def _record(global_round: int, **values: float) -> RoundRecord:
    record = RoundRecord(CLOCK.position(global_round))
    record.add(values)
    return record


def _arrays(value: float) -> ArrayRecord:
    return ArrayRecord({"w": torch.full((2,), value)})


def test_central_evaluation_runs_at_zero_every_k_and_phase_ends_never_in_calibration():
    calls = []
    hook = CentralEvaluation(lambda arrays: calls.append(1) or (2.0, 0.25), every=2)
    evaluated = []
    for r in range(CLOCK.total_rounds + 1):
        record = _record(r)
        hook(record, _arrays(0))
        if record.get("val-accuracy") is not None:
            evaluated.append(r)
            assert record.get("val-loss") == 2.0 and record.get("seconds-eval") >= 0
    # warm-up 1..3 (2, 3 = end), calibration 4..5 (never), train 6..9 (phase rounds 2, 4)
    assert evaluated == [0, 2, 3, 7, 9] and len(calls) == 5


def test_stopwatch_times_rounds_and_sums_segments():
    first = Stopwatch()
    record = _record(1)
    first(record, _arrays(0))
    assert record.get("seconds") >= 0
    zero = _record(0)
    first(zero, _arrays(0))
    assert zero.get("seconds") is None
    saved = first.state_dict() | {"elapsed": 100.0}
    second = Stopwatch()
    second.load_state_dict(saved)
    assert second.segments == 2 and 100.0 <= second.total() < 101.0


def test_metrics_table_keeps_its_phases_and_writes_the_csv(tmp_path):
    run_dir = RunDirectory(tmp_path)
    metrics, calibration = MetricsTable(run_dir), calibration_table(run_dir)
    for r in range(CLOCK.total_rounds + 1):
        record = _record(r, **{"train-loss": float(r)})
        metrics(record, _arrays(0))
        calibration(record, _arrays(0))
    frame = pd.read_csv(tmp_path / "metrics.csv")
    assert frame["round"].tolist() == [0, 1, 2, 3, 6, 7, 8, 9]
    assert frame["phase"].tolist()[:2] == ["initial", HEAD_WARMUP]
    assert pd.read_csv(tmp_path / "calibration.csv")["round"].tolist() == [4, 5]
    again = MetricsTable(run_dir)
    again.load_state_dict(metrics.state_dict())
    pd.testing.assert_frame_equal(again.frame(), metrics.frame())


def _reply_metrics(pid: int, **placement) -> MetricRecord:
    base = {protocol.PARTITION_ID: pid, protocol.NUM_EXAMPLES: 10, protocol.TRAIN_LOSS: 1.0}
    return MetricRecord(base | {k.replace("_", "-"): v for k, v in placement.items()})


def test_placement_table_writes_where_each_client_trained_only_when_clients_said(tmp_path):
    run_dir = RunDirectory(tmp_path)
    table = PlacementTable(run_dir)
    silent = _record(1)  # the in-process engine, a deployment: no placement in the replies
    silent.clients.extend(client_placements([_reply_metrics(0), _reply_metrics(1)]))
    table(silent, _arrays(0))
    assert silent.clients == [] and not (tmp_path / "placement.csv").exists()
    record = _record(6)
    replies = [
        _reply_metrics(3, worker_pid=11, ray_gpu_ids=[1], cuda_visible_devices=[1]),
        _reply_metrics(0, worker_pid=12, ray_gpu_ids=[0, 1], cuda_device_count=0),
        _reply_metrics(2, worker_pid=13, ray_gpu_ids=[], cuda_visible_devices=[]),
    ]
    record.clients.extend(client_placements(replies))
    table(record, _arrays(0))
    frame = pd.read_csv(tmp_path / "placement.csv", dtype=str, keep_default_na=False)
    assert frame.columns.tolist() == [
        "round",
        "phase",
        "partition-id",
        "worker-pid",
        "ray-gpu-ids",
        "cuda-visible-devices",
        "cuda-device-count",
    ]
    assert frame.values.tolist() == [
        ["6", TRAIN, "3", "11", "1", "1", ""],
        ["6", TRAIN, "0", "12", "0,1", "unset", "0"],
        ["6", TRAIN, "2", "13", "", "", ""],
    ]
    again = PlacementTable(run_dir)  # resumable like the other tables
    again.load_state_dict(table.state_dict())
    pd.testing.assert_frame_equal(again.frame(), table.frame())


def test_best_model_keeps_the_first_best_and_ignores_nan():
    best = BestModel()
    for r, acc in [(1, 0.2), (2, math.nan), (3, 0.5), (6, 0.5), (7, 0.4)]:
        best(_record(r, **{"val-accuracy": acc}), _arrays(float(r)))
    best(_record(8), _arrays(8.0))  # not evaluated
    assert (best.accuracy, best.round) == (0.5, 3)
    assert torch.equal(best.state["w"], torch.full((2,), 3.0))
    again = BestModel()
    again.load_state_dict(best.state_dict())
    assert (again.accuracy, again.round) == (0.5, 3)


def test_progress_line_says_round_phase_elapsed_and_eta():
    lines: list[str] = []
    progress = ProgressLog(CLOCK, elapsed=lambda: 65.0, write=lines.append)
    progress(_record(0, **{"val-accuracy": 0.01}), _arrays(0))
    progress(_record(4, density=0.3, seconds=2.0), _arrays(0))
    progress(_record(6, **{"train-loss": 4.5, "seconds": 4.0}), _arrays(0))
    assert lines[0] == "round 0/9 | val-accuracy 0.0100 | elapsed 0:01:05"
    assert lines[1] == (
        "round 4/9 (calibration 1/2) | density 0.3000 | 2.0 s | elapsed 0:01:05 | eta 0:00:10"
    )
    assert lines[2].startswith("round 6/9 (train 1/4) | train-loss 4.5000 | 4.0 s")
    assert lines[2].endswith("eta 0:00:09")  # 3 rounds left x mean 3.0 s


class Counter:
    """A made-up stateful component."""

    def __init__(self) -> None:
        self.value = 0

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


def test_checkpointer_collects_components_every_k_rounds_and_at_the_end(tmp_path):
    clock = RoundClock([Phase(TRAIN, 5)])
    counter = Counter()
    hook = Checkpointer(
        tmp_path / CHECKPOINT_NAME,
        every=2,
        identity={"seed": 0},
        initial={"w": torch.zeros(2)},
        clock=clock,
        components={"clock": clock, "counter": counter},
    )
    saved = []
    for r in range(1, 6):
        position = clock.next_round()
        clock.complete(position)
        counter.value = 10 * r
        hook(RoundRecord(position), _arrays(float(r)))
        if (tmp_path / CHECKPOINT_NAME).exists():
            saved.append(load_checkpoint(tmp_path / CHECKPOINT_NAME).completed_rounds)
    assert sorted(set(saved)) == [2, 4, 5]
    checkpoint = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert torch.equal(checkpoint.arrays["w"], torch.full((2,), 5.0))
    fresh_clock, fresh_counter = RoundClock([Phase(TRAIN, 5)]), Counter()
    restore(checkpoint, {"clock": fresh_clock, "counter": fresh_counter}, tmp_path)
    assert fresh_clock.finished and fresh_counter.value == 50
    with pytest.raises(Exception, match="holds no state for other"):
        restore(checkpoint, {"other": Counter()}, tmp_path)
