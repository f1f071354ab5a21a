"""Experiment tracking (docs/tracking.md): TensorBoard event files and W&B offline runs read
back and compared with metrics.csv / calibration.csv, config.json and summary.json; a run
stopped after its checkpoint and resumed continues the same tracker run; a missing extra
is one line before any work."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pandas as pd
import psutil
import pytest

from flower_app import server_app
from flower_app.config import ConfigError, RunConfig
from flower_app.runs.checkpoint import CHECKPOINT_NAME, load_checkpoint
from flower_app.runs.tracking import TENSORBOARD_DIR, Tracker, loggable, make_tracker
from tests.conftest import quick_run_config
from tests.run_in_process import run

BASE = {
    "synthetic_train_per_class": 20,
    "synthetic_test_per_class": 10,
    "num_clients": 4,
    "fraction_train": 0.5,
    "num_server_rounds": 4,
    "eval_every": 2,
    "local_steps": 2,
    "checkpoint_every": 2,
}
SPARSE = {  # 0 initial, 1 head warm-up, 2 calibration, 3-4 training
    "strategy": "sparse-fedavg",
    "num_server_rounds": 2,
    "head_warmup_rounds": 1,
    "calibration_rounds": 1,
    "fisher_samples": 16,
}
STOP_AFTER = 3  # the checkpoint is at round 2; round 3 is logged, then run again on resume


def _config(tmp_path: Path, name: str, **overrides) -> dict:
    return quick_run_config(**(BASE | overrides), output_dir=str(tmp_path), run_name=name)


class Interrupted(Exception):
    """The run stopped on purpose after a round that no checkpoint holds."""


def run_interrupted(monkeypatch, config: dict) -> None:
    """Run ``config`` until round ``STOP_AFTER`` has gone through every hook, then stop."""
    declared = server_app.round_hooks

    def with_stop(*args, **kwargs):
        def stop(record, arrays):
            if record.round == STOP_AFTER:
                raise Interrupted(f"stopped after round {record.round}")

        return [*declared(*args, **kwargs), stop]

    with monkeypatch.context() as patch:
        patch.setattr(server_app, "round_hooks", with_stop)
        with pytest.raises(Interrupted):
            run(config)


def tracker_state(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / CHECKPOINT_NAME).components["tracker"]


def expected_values(run_dir: Path) -> dict[str, dict[int, float]]:
    """Tag -> {round: value} of every numeric column of the run's CSVs, empty cells left out."""
    expected = {}
    for table in ("metrics", "calibration"):
        path = run_dir / f"{table}.csv"
        if not path.exists():
            continue
        frame = pd.read_csv(path).set_index("round")
        for column in frame.select_dtypes("number").columns:
            values = frame[column].dropna()
            if len(values):
                expected[f"{table}/{column}"] = {int(r): float(v) for r, v in values.items()}
    return expected


def assert_same_values(got: dict, expected: dict, rel: float) -> None:
    assert sorted(got) == sorted(expected)
    for tag, values in expected.items():
        assert got[tag] == pytest.approx(values, rel=rel, abs=1e-12), tag


# ---- TensorBoard --------------------------------------------------------------------


def event_accumulator(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()  # as TensorBoard shows the run: purged steps are gone
    return accumulator


def tensorboard_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """Tag -> {step: value}; a step seen twice for one tag fails."""
    accumulator = event_accumulator(log_dir)
    scalars = {}
    for tag in accumulator.Tags()["scalars"]:
        steps = [e.step for e in accumulator.Scalars(tag)]
        assert len(steps) == len(set(steps)), f"{tag} has duplicate steps: {steps}"
        scalars[tag] = {e.step: e.value for e in accumulator.Scalars(tag)}
    return scalars


def tensorboard_texts(log_dir: Path, tag: str) -> dict[int, dict]:
    """Step -> the JSON a text summary holds (a Markdown code block)."""
    events = event_accumulator(log_dir).Tensors(f"{tag}/text_summary")
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in events}
    return {step: json.loads(text.replace("\n    ", "\n")) for step, text in texts.items()}


def raw_steps(log_dir: Path, tag: str) -> list[int]:
    """Every step written for ``tag`` in every event file, purged ones included."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return sorted(
        event.step
        for path in log_dir.glob("events.out.tfevents.*")
        for event in EventFileLoader(str(path)).Load()
        if any(v.tag == tag for v in event.summary.value)
    )


def split(scalars: dict) -> tuple[dict, dict]:
    """The per-round tags and the summary's."""
    rounds = {t: v for t, v in scalars.items() if not t.startswith("summary/")}
    summary = {t.removeprefix("summary/"): v for t, v in scalars.items() if t not in rounds}
    return rounds, summary


def test_tensorboard_event_file_holds_every_column_of_every_round(tmp_path):
    run(_config(tmp_path, "tb", tracking="tensorboard", **SPARSE))
    run_dir = tmp_path / "tb"
    log_dir = run_dir / TENSORBOARD_DIR
    state = tracker_state(run_dir)
    assert state["backend"] == "tensorboard" and state["step"] == 4
    assert [p.name.endswith(f".{state['run-id']}") for p in log_dir.iterdir()] == [True]
    rounds, summary = split(tensorboard_scalars(log_dir))
    expected = expected_values(run_dir)
    assert {"metrics/val-accuracy", "calibration/density"} <= set(expected)
    assert_same_values(rounds, expected, rel=1e-6)  # TensorBoard keeps float32
    summary_json = json.loads((run_dir / "summary.json").read_text())
    assert {tag: sorted(steps) for tag, steps in summary.items()} == {
        tag: [4] for tag in loggable(summary_json)
    }  # at the last round
    assert {tag: steps[4] for tag, steps in summary.items()} == pytest.approx(
        loggable(summary_json), rel=1e-6
    )
    assert tensorboard_texts(log_dir, "summary") == {4: summary_json}
    config_json = json.loads((run_dir / "config.json").read_text())
    assert tensorboard_texts(log_dir, "run-config") == {0: config_json}


def test_tensorboard_resumed_run_continues_the_same_run_without_duplicate_steps(
    tmp_path, monkeypatch
):
    config = _config(tmp_path, "tb-resumed", tracking="tensorboard")
    run_dir, log_dir = tmp_path / "tb-resumed", tmp_path / "tb-resumed" / TENSORBOARD_DIR
    run_interrupted(monkeypatch, config)
    first = tracker_state(run_dir)
    assert first["step"] == 2  # the checkpoint's round; round 3 is logged but not saved
    assert raw_steps(log_dir, "metrics/seconds") == [1, 2, 3]
    run(config | {"resume": True})
    assert tracker_state(run_dir) == first | {"step": 4}
    files = sorted(p.name for p in log_dir.iterdir())
    assert len(files) == 2 and all(name.endswith(f".{first['run-id']}") for name in files)
    # round 3 was written by both segments; the resumed one purged the first one's
    assert raw_steps(log_dir, "metrics/seconds") == [1, 2, 3, 3, 4]
    rounds, _ = split(tensorboard_scalars(log_dir))
    assert_same_values(rounds, expected_values(run_dir), rel=1e-6)  # the resumed round 3's
    assert sorted(tensorboard_texts(log_dir, "run-config")) == [0, 3]  # one per segment


# ---- W&B offline --------------------------------------------------------------------

WANDB_BLOCK, WANDB_HEADER = 32768, 7  # the .wandb file: LevelDB-log records of protobufs


def wandb_records(path: Path):
    """The records of an offline run's ``run-<id>.wandb`` file (W&B's transaction log: a
    7-byte file header, then in 32 KiB blocks records of CRC, length and type (1 whole,
    2 first, 3 middle, 4 last part) with a ``wandb_internal_pb2.Record`` as payload)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    position, parts = WANDB_HEADER, []
    while position + WANDB_HEADER <= len(data):
        left = WANDB_BLOCK - position % WANDB_BLOCK
        _crc, length, kind = struct.unpack("<IHB", data[position : position + WANDB_HEADER])
        if left < WANDB_HEADER or kind == 0:  # the rest of the block is padding
            position += left
            continue
        start = position + WANDB_HEADER
        parts.append(data[start : start + length])
        position = start + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def _items(items) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def wandb_offline_runs(run_dir: Path) -> list[dict]:
    """Each ``offline-run-*`` folder (in the order they were made): id, project, config,
    history (step -> logged values) and the summary's last values."""
    runs = []
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        (log,) = folder.glob("run-*.wandb")
        found = {"folder": folder.name, "history": {}, "summary": {}}
        for record in wandb_records(log):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                found |= {"id": record.run.run_id, "project": record.run.project}
                found["config"] = _items(record.run.config.update)
            elif kind == "history":
                values = _items(record.history.item)
                found["history"][record.history.step.num] = {
                    k: v for k, v in values.items() if not k.startswith("_")
                }
            elif kind == "summary":
                found["summary"] |= _items(record.summary.update)
        runs.append(found)
    return runs


def by_tag(history: dict[int, dict]) -> dict[str, dict[int, float]]:
    tags: dict[str, dict[int, float]] = {}
    for step, values in history.items():
        for tag, value in values.items():
            tags.setdefault(tag, {})[step] = value
    return tags


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B's own folders in the test's, no credentials: nothing leaves the machine."""
    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb-home" / variable.lower()))
    for variable in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_MODE", "WANDB_NAME"):
        monkeypatch.delenv(variable, raising=False)


def test_wandb_offline_run_holds_the_metrics_and_a_resume_keeps_its_id(
    tmp_path, monkeypatch, wandb_offline
):
    config = _config(tmp_path, "wb", tracking="wandb", wandb_project="fl-test")
    run_dir = tmp_path / "wb"
    run_interrupted(monkeypatch, config)
    run_id = tracker_state(run_dir)["run-id"]
    run(config | {"resume": True})
    assert tracker_state(run_dir) == {"backend": "wandb", "run-id": run_id, "step": 4}
    first, second = wandb_offline_runs(run_dir)
    assert first["folder"].endswith(run_id) and second["folder"].endswith(run_id)
    assert first["id"] == second["id"] == run_id and first["project"] == "fl-test"
    assert sorted(first["history"]) == [0, 1, 2, 3] and sorted(second["history"]) == [3, 4]
    logged = by_tag(first["history"] | second["history"])  # round 3: the resumed segment's
    assert_same_values(logged, expected_values(run_dir), rel=1e-12)
    config_json = json.loads((run_dir / "config.json").read_text())
    assert {k: v for k, v in first["config"].items() if k != "_wandb"} == config_json
    assert second["config"]["resume"] is True
    summary_json = json.loads((run_dir / "summary.json").read_text())
    assert {k: second["summary"][k] for k in summary_json} == summary_json
    children = psutil.Process().children(recursive=True)
    assert [p for p in children if "wandb" in p.name()] == []  # W&B's service is gone


# ---- the optional extras ------------------------------------------------------------


@pytest.mark.parametrize("backend", ["tensorboard", "wandb"])
def test_a_missing_extra_is_one_line_naming_the_install_command(tmp_path, monkeypatch, backend):
    monkeypatch.setitem(sys.modules, backend, None)  # import fails as if not installed
    cfg = RunConfig.from_run_config(quick_run_config(tracking=backend))
    with pytest.raises(ConfigError) as info:
        make_tracker(cfg, tmp_path / "run")
    assert str(info.value) == (
        f"run-config key 'tracking' = '{backend}' needs the {backend} package: "
        f"pip install 'fl-task-arithmetic[{backend}]'"
    )


def test_the_server_app_refuses_a_missing_extra_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"pip install 'fl-task-arithmetic\[wandb\]'"):
        run(_config(tmp_path, "no-wandb", tracking="wandb"))
    assert not (tmp_path / "no-wandb").exists()


def test_tracking_none_is_the_tracker_that_logs_nothing():
    tracker = make_tracker(RunConfig.from_run_config(quick_run_config()), Path("unused"))
    assert type(tracker) is Tracker and tracker.state_dict()["backend"] == "none"


def test_only_finite_numbers_are_logged():
    row = {"round": 3, "phase": "train", "lr": 0.1, "val-loss": float("nan"), "clients": 2}
    row |= {"failure-reasons": "timeout", "ok": True}
    assert loggable(row, "metrics/") == {"metrics/lr": 0.1, "metrics/clients": 2.0}
