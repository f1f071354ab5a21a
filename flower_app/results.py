"""One directory per run: config, partitions, metrics, summary, plot and weights.

Every file is written to a temporary name and renamed, so a crash never leaves a
half-written file behind; ``summary.json`` is written last and only by a run that
finished, so its presence is what says a run succeeded.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from flwr.app import ArrayRecord
from safetensors.torch import save_file

METRIC_COLUMNS = [
    "round",
    "lr",
    "clients",
    "failures",
    "num-examples",
    "train-loss",
    "val-loss",
    "val-accuracy",
    "bytes-down",
    "bytes-up",
    "update-cosine",
    "update-norm-ratio",
    "update-norm",
    "seconds-clients",
    "seconds-client-compute",
    "seconds-client-compute-sum",
    "gpu-memory-mb",
    "seconds-aggregate",
    "seconds-eval",
    "seconds",
]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class RunDirectory:
    """The files of one run under ``output_dir/run_name``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, output_dir: Path, run_name: str) -> RunDirectory:
        """A new run directory; an existing one is refused, so no run overwrites another."""
        path = (output_dir / run_name).resolve()
        if path.exists():
            raise FileExistsError(
                f"run-config key 'run-name' = {run_name!r} is not allowed: {path} exists "
                "already; choose another run-name or leave it empty for a timestamped one"
            )
        path.mkdir(parents=True)
        return cls(path)

    def write_json(self, name: str, obj: Mapping[str, Any]) -> Path:
        text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default)
        atomic_write_bytes(self.path / name, (text + "\n").encode())
        return self.path / name

    def write_csv(self, name: str, frame: pd.DataFrame) -> Path:
        atomic_write_bytes(self.path / name, frame.to_csv(index=False).encode())
        return self.path / name

    def save_weights(self, name: str, state: Mapping[str, torch.Tensor]) -> Path:
        """A safetensors file (contiguous CPU copies, as safetensors requires)."""
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=f".{name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp)
            os.replace(tmp, self.path / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self.path / name


def partitions_frame(replies: list[Mapping[str, Any]]) -> pd.DataFrame:
    """Per client: partition id, number of examples, classes held (space separated)."""
    rows = [
        {
            "partition-id": int(r["partition-id"]),
            "num-examples": int(r["num-examples"]),
            "num-classes": len(r["classes"]),
            "classes": " ".join(str(c) for c in r["classes"]),
            "class-counts": " ".join(str(c) for c in r["class-counts"]),
        }
        for r in replies
    ]
    return pd.DataFrame(rows).sort_values("partition-id").reset_index(drop=True)


class MetricsTable:
    """Round hook: appends the round's row and rewrites its CSV atomically."""

    def __init__(
        self, run_dir: RunDirectory, name: str = "metrics.csv", columns: list[str] | None = None
    ) -> None:
        self.run_dir = run_dir
        self.name = name
        self.columns = METRIC_COLUMNS if columns is None else columns
        self.rows: list[dict[str, float]] = []

    def __call__(self, server_round: int, arrays: ArrayRecord, row: Mapping[str, float]) -> None:
        self.append(row)

    def append(self, row: Mapping[str, float]) -> None:
        self.rows.append(dict(row))
        self.run_dir.write_csv(self.name, self.frame())

    def frame(self) -> pd.DataFrame:
        frame = pd.DataFrame(self.rows)
        extra = [c for c in frame.columns if c not in self.columns]
        return frame.reindex(columns=self.columns + extra)


class BestModel:
    """Round hook: keeps a copy of the weights with the best validation accuracy so far."""

    def __init__(self) -> None:
        self.accuracy = -math.inf
        self.round = -1
        self.state: dict[str, torch.Tensor] | None = None

    def __call__(self, server_round: int, arrays: ArrayRecord, row: Mapping[str, float]) -> None:
        acc = row.get("val-accuracy")
        if acc is not None and not math.isnan(acc) and acc > self.accuracy:
            self.accuracy, self.round = float(acc), server_round
            self.state = {k: v.clone() for k, v in arrays.to_torch_state_dict().items()}


class ProgressLog:
    """Round hook: one line per round on the ServerApp log."""

    def __init__(self, num_rounds: int, write: Callable[[str], None] = print) -> None:
        self.num_rounds = num_rounds
        self.write = write

    def __call__(self, server_round: int, arrays: ArrayRecord, row: Mapping[str, float]) -> None:
        parts = [f"round {server_round}/{self.num_rounds}"]
        for key in ("train-loss", "val-loss", "val-accuracy", "seconds"):
            if key in row:
                parts.append(f"{key} {row[key]:.4f}")
        self.write(" | ".join(parts))


def plot_metrics(frame: pd.DataFrame, path: Path, title: str) -> Path:
    """Validation accuracy, and training/validation loss, against rounds (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    evaluated = frame.dropna(subset=["val-accuracy"])
    ax_acc.plot(evaluated["round"], evaluated["val-accuracy"], marker="o", ms=3)
    ax_acc.set(xlabel="round", ylabel="validation accuracy", title="accuracy")
    trained = frame.dropna(subset=["train-loss"])
    ax_loss.plot(trained["round"], trained["train-loss"], label="train (clients)")
    ax_loss.plot(evaluated["round"], evaluated["val-loss"], marker="o", ms=3, label="validation")
    ax_loss.set(xlabel="round", ylabel="cross-entropy", title="loss")
    ax_loss.legend()
    fig.suptitle(title)
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    """Lay out, write the PNG under a temporary name, rename it over ``path``, close."""
    import matplotlib.pyplot as plt

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.tight_layout()
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return path


def task_vector(
    final: Mapping[str, torch.Tensor], initial: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Final minus initial weights: the object task arithmetic adds and negates."""
    return {k: final[k].float() - initial[k].float() for k in final if final[k].is_floating_point()}


def write_summary(
    run_dir: RunDirectory,
    run_name: str,
    frame: pd.DataFrame,
    best: BestModel,
    rounds: int,
    test: tuple[float, float],
    best_test: tuple[float, float],
    wall_time_s: float,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Plot the metrics, then write ``summary.json`` last: its presence says the run finished.

    ``test`` and ``best_test`` are (loss, accuracy) of the final and the best-validation
    model on the test split; federated and centralized runs share these keys.
    """
    plot_metrics(frame, run_dir.path / "metrics.png", run_name)
    evaluated = frame.dropna(subset=["val-accuracy"])
    summary = {
        "run-name": run_name,
        "status": "completed",
        "rounds": rounds,
        "final-val-accuracy": float(evaluated["val-accuracy"].iloc[-1]) if len(evaluated) else None,
        "best-val-accuracy": best.accuracy if best.state is not None else None,
        "best-val-round": best.round if best.state is not None else None,
        "final-test-accuracy": test[1],
        "final-test-loss": test[0],
        "best-model-test-accuracy": best_test[1],
        "best-model-test-loss": best_test[0],
        "bytes-down": float(frame["bytes-down"].sum()),
        "bytes-up": float(frame["bytes-up"].sum()),
        "wall-time-s": wall_time_s,
    } | dict(extra or {})
    run_dir.write_json("summary.json", summary)
    return summary
