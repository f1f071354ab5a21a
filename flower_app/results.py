"""One directory per run: config, partitions, metrics, summary, plot and weights.

Every file is written to a temporary name and renamed, so a crash never leaves a
half-written file behind; ``summary.json`` is written last and only by a run that
finished, so its presence is what says a run succeeded.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import save_file


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A new empty temporary file next to ``path`` for the caller to write.

    On success it is renamed over ``path`` (atomic: same folder, same file system), so
    readers see the old file or the whole new one; on any exception, interrupts
    included, it is removed and ``path`` is left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, fsynced so a crash cannot leave it empty."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


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
        with atomic_path(self.path / name) as tmp:
            save_file(tensors, str(tmp))
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
    """Lay out, write the PNG atomically to ``path``, and close the figure either way."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.tight_layout()
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
    return path


def task_vector(
    final: Mapping[str, torch.Tensor], initial: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Final minus initial weights: the object task arithmetic adds and negates."""
    return {k: final[k].float() - initial[k].float() for k in final if final[k].is_floating_point()}


def finish_run(
    run_dir: RunDirectory,
    run_name: str,
    *,
    metrics: pd.DataFrame,
    rounds: int,
    final_state: dict[str, torch.Tensor],
    initial_state: dict[str, torch.Tensor],
    best_state: dict[str, torch.Tensor] | None,
    best_accuracy: float | None,
    best_round: int | None,
    test: Callable[[Mapping[str, torch.Tensor]], tuple[float, float]],
    wall_time_s: float,
    extra_summary: Mapping[str, Any] | None = None,
    extra_weights: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    final_round: int | None = None,
) -> dict[str, Any]:
    """Test the final and the best-validation model, save the weights, write the summary.

    The one ending of federated and centralized runs, so both leave the same files.
    ``test`` gives (loss, accuracy) on the test split of a state dict; the best model is
    tested only when it is not the final one (``best_state`` None or ``best_round`` ==
    ``final_round``, the round of the final model: ``rounds`` unless given).
    ``wall_time_s`` is the time the run took before this call; the time spent here is
    added, so the summary's ``wall-time-s`` covers the whole run.
    ``extra_weights`` are further safetensors files (file name -> state), e.g. a mask.
    """
    t_start = time.perf_counter()
    final_test = test(final_state)
    if best_state is None or best_round == (final_round or rounds):  # the best is the final
        best_state, best_test = final_state, final_test
    else:
        best_test = test(best_state)
    run_dir.save_weights("final_model.safetensors", final_state)
    run_dir.save_weights("best_model.safetensors", best_state)
    run_dir.save_weights("task_vector.safetensors", task_vector(final_state, initial_state))
    for name, weights in (extra_weights or {}).items():
        run_dir.save_weights(name, weights)
    return write_summary(
        run_dir,
        run_name,
        metrics,
        rounds=rounds,
        best_accuracy=best_accuracy,
        best_round=best_round,
        test=final_test,
        best_test=best_test,
        wall_time_s=wall_time_s + time.perf_counter() - t_start,
        extra=extra_summary,
    )


def write_summary(
    run_dir: RunDirectory,
    run_name: str,
    frame: pd.DataFrame,
    *,
    rounds: int,
    best_accuracy: float | None,
    best_round: int | None,
    test: tuple[float, float],
    best_test: tuple[float, float],
    wall_time_s: float,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Plot the metrics, then write ``summary.json`` last: its presence says the run finished.

    ``best_accuracy``/``best_round`` are the best validation accuracy and its round
    (None when no round was evaluated); ``test`` and ``best_test`` are (loss, accuracy)
    of the final and the best-validation model on the test split. Federated and
    centralized runs share these keys.
    """
    plot_metrics(frame, run_dir.path / "metrics.png", run_name)
    evaluated = frame.dropna(subset=["val-accuracy"])
    summary = {
        "run-name": run_name,
        "status": "completed",
        "rounds": rounds,
        "final-val-accuracy": float(evaluated["val-accuracy"].iloc[-1]) if len(evaluated) else None,
        "best-val-accuracy": best_accuracy,
        "best-val-round": best_round,
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
