"""One directory per run: config, partitions, metrics, summary, plot and weights.

Every file is written to a temporary name and renamed, so a crash never leaves a
half-written file behind; ``summary.json`` is written last and only by a run that
finished, so its presence is what says a run succeeded. Files get the mode of any new
file under the process umask (typically 0644), so others can read the results; every
safetensors file carries metadata saying what it holds (``weights_metadata``).
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A new empty temporary file next to ``path`` for the caller to write.

    On success it is renamed over ``path`` (atomic: same folder, same file system), so
    readers see the old file or the whole new one; on any exception, interrupts
    included, it is removed and ``path`` is left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_temp_file(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def new_temp_file(path: Path) -> Path:
    """A new empty file ``.<name>.<random>.tmp`` next to ``path``, created with mode 0o666.

    The kernel applies the umask (and any default ACL) as for an ordinary file; no umask
    is read or changed, so other threads are unaffected. ``tempfile.mkstemp`` would create
    it 0600, and the rename would make every result file private to its writer.
    """
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"no free temporary name next to {path}")


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


def existing_run_message(run_name: str, path: Path, resumable: bool = True) -> str:
    """Why a fresh run may not take the folder of ``run-name``: it exists already."""
    resume = "add resume=true to continue that run, " if resumable else ""
    return (
        f"run-config key 'run-name' = {run_name!r} is not allowed: {path} exists already; "
        f"{resume}choose another run-name, or leave it empty for a timestamped one"
    )


class RunDirectory:
    """The files of one run under ``output_dir/run_name``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, output_dir: Path, run_name: str, resumable: bool = True) -> RunDirectory:
        """A new run directory; an existing one is refused, so no run overwrites another
        (``resumable``: the refusal names resume=true)."""
        path = (output_dir / run_name).resolve()
        try:
            path.mkdir(parents=True)
        except FileExistsError:
            raise FileExistsError(existing_run_message(run_name, path, resumable)) from None
        return cls(path)

    def write_json(self, name: str, obj: Mapping[str, Any]) -> Path:
        text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default)
        atomic_write_bytes(self.path / name, (text + "\n").encode())
        return self.path / name

    def write_csv(self, name: str, frame: pd.DataFrame) -> Path:
        atomic_write_bytes(self.path / name, frame.to_csv(index=False).encode())
        return self.path / name

    def save_weights(
        self,
        name: str,
        state: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str] | None = None,
    ) -> Path:
        """A safetensors file (contiguous CPU copies, as safetensors requires) with metadata.

        Serialised in memory and written by ``atomic_write_bytes``: safetensors' own
        ``save_file`` creates its file 0600, whatever the umask.
        """
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        data = save(tensors, metadata=dict(metadata) if metadata else None)
        atomic_write_bytes(self.path / name, data)
        return self.path / name


WEIGHTS_FORMAT = "fl-task-arithmetic/1"
WEIGHTS_CONTENT = {  # file name -> the ``content`` metadata of the file
    "final_model.safetensors": "global model weights after the last round",
    "best_model.safetensors": "best-validation global weights",
    "task_vector.safetensors": "task vector: final minus initial weights",
    "mask.safetensors": "sparse mask, 1 = trainable",
}


def weights_metadata(name: str, *, run_name: str, round_: int, model: str) -> dict[str, str]:
    """What a weights file holds, in the file itself, so a copied file still says it.

    ``round_`` is the global round of the weights (an epoch for centralized runs).
    """
    return {
        "format": WEIGHTS_FORMAT,
        "run-name": run_name,
        "round": str(int(round_)),
        "content": WEIGHTS_CONTENT[name],
        "model": model,
    }


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


def label_counts(partitions: pd.DataFrame, num_classes: int) -> np.ndarray:
    """Images per (client, class) from ``partitions.csv``'s columns, clients by partition id."""
    counts = np.zeros((len(partitions), num_classes), dtype=np.int64)
    columns = zip(partitions["classes"], partitions["class-counts"], strict=True)
    for row, (classes, held) in enumerate(columns):
        for label, count in zip(str(classes).split(), str(held).split(), strict=True):
            counts[row, int(label)] = int(count)
    return counts


def partitions_figure(partitions: pd.DataFrame, num_classes: int, title: str) -> Figure:
    """Labels per client (a heat map, clients by partition id) and shard sizes.

    Drawn from what the nodes reported (``partitions.csv``), so it is the same picture in
    a deployment, where the ServerApp holds no partitioner; Flower Datasets'
    ``plot_label_distributions`` draws from a partitioner and its data set.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    counts = label_counts(partitions, num_classes)
    fig, (ax_map, ax_size) = plt.subplots(
        2, 1, figsize=(10, 7), height_ratios=(3, 1), sharex=True, layout="constrained"
    )
    image = ax_map.imshow(  # from zero: dark means no image of that class
        counts.T, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0
    )
    ax_map.set(ylabel="class", title="images per class and client")
    ax_size.bar(np.arange(len(counts)), counts.sum(axis=1), width=1.0)
    ax_size.set(xlabel="client (partition id)", ylabel="images", title="shard size")
    for axis in (ax_map.yaxis, ax_size.xaxis):  # classes and clients are whole numbers
        axis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(image, ax=[ax_map, ax_size], label="images")  # one width for both panels
    fig.suptitle(title)
    return fig


def metrics_figure(
    frame: pd.DataFrame, title: str, test_accuracy: float | None, num_classes: int | None
) -> Figure:
    """Accuracy and loss against rounds, with the final test accuracy and chance for scale.

    The test accuracy is a marker at the last round (the final model's); the dashed chance
    line (1 / ``num_classes``) shows at a glance whether a run learned anything.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    evaluated = frame.dropna(subset=["val-accuracy"])
    ax_acc.plot(evaluated["round"], evaluated["val-accuracy"], marker="o", ms=3, label="validation")
    if test_accuracy is not None and len(frame):
        last = frame["round"].max()
        ax_acc.plot(
            [last], [test_accuracy], "*", ms=10, label=f"test, final model ({test_accuracy:.4f})"
        )
    if num_classes:
        chance = 1 / num_classes
        ax_acc.axhline(chance, color="gray", linestyle="--", label=f"chance (1/{num_classes})")
    ax_acc.set(xlabel="round", ylabel="accuracy", title="accuracy")
    ax_acc.legend()
    trained = frame.dropna(subset=["train-loss"])
    ax_loss.plot(trained["round"], trained["train-loss"], label="train (clients)")
    ax_loss.plot(evaluated["round"], evaluated["val-loss"], marker="o", ms=3, label="validation")
    ax_loss.set(xlabel="round", ylabel="cross-entropy", title="loss")
    ax_loss.legend()
    for ax in (ax_acc, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no round 0.25
    fig.suptitle(title)
    return fig


def plot_metrics(
    frame: pd.DataFrame,
    path: Path,
    title: str,
    test_accuracy: float | None = None,
    num_classes: int | None = None,
) -> Path:
    """``metrics_figure`` written to ``path`` (PNG)."""
    return save_figure(metrics_figure(frame, title, test_accuracy, num_classes), path)


def save_figure(fig: Figure, path: Path) -> Path:
    """Lay out, write the PNG atomically to ``path``, and close the figure either way."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            if fig.get_layout_engine() is None:  # a figure may bring its own (constrained)
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
    model: str,
    num_classes: int,
    extra_summary: Mapping[str, Any] | None = None,
    extra_weights: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    final_round: int | None = None,
    title: str = "",
) -> dict[str, Any]:
    """Test the final and the best-validation model, save the weights, write the summary.

    The one ending of federated and centralized runs. The best model is tested only when
    it is not the final one (of round ``final_round``, default ``rounds``); ``wall_time_s``
    is the time before this call; ``model`` is for the weights' metadata, ``num_classes``
    for the plot, ``extra_weights`` further files of ``WEIGHTS_CONTENT`` (the mask),
    ``title`` the plot's (default: the run name).
    """
    t_start, last = time.perf_counter(), final_round or rounds
    best_is_final = best_state is None or best_round is None or best_round == last
    final_test = test(final_state)
    best_test = final_test if best_is_final else test(best_state)
    best = (final_state, last) if best_is_final else (best_state, best_round)
    files = run_weight_files(final_state, initial_state, best, last, extra_weights)
    save_run_weights(run_dir, run_name, model, files)
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
        num_classes=num_classes,
        extra=extra_summary,
        title=title,
    )


WeightFiles = dict[str, tuple[Mapping[str, torch.Tensor], int]]  # name -> (state, round)


def run_weight_files(
    final: Mapping[str, torch.Tensor],
    initial: Mapping[str, torch.Tensor],
    best: tuple[Mapping[str, torch.Tensor], int],
    last: int,
    extra: Mapping[str, Mapping[str, torch.Tensor]] | None,
) -> WeightFiles:
    """A finished run's weights files, each with the global round its weights are of."""
    files = {
        "final_model.safetensors": (final, last),
        "best_model.safetensors": best,
        "task_vector.safetensors": (task_vector(final, initial), last),
    }
    return files | {name: (state, last) for name, state in (extra or {}).items()}


def save_run_weights(run_dir: RunDirectory, run_name: str, model: str, files: WeightFiles) -> None:
    """Each weights file (name -> state and its global round) with the metadata saying so."""
    for name, (state, round_) in files.items():
        meta = weights_metadata(name, run_name=run_name, round_=round_, model=model)
        run_dir.save_weights(name, state, meta)


def result_line(summary: Mapping[str, Any], unit: str = "round") -> str:
    """A finished run's result in one line: the final test accuracy, and the best
    validation accuracy with its round (``unit`` "epoch" for the centralized baseline)."""
    line = f"final test accuracy {summary['final-test-accuracy']:.4f}"
    if summary.get("best-val-accuracy") is not None:
        at = f" at {unit} {summary['best-val-round']}" if "best-val-round" in summary else ""
        line += f" (best validation accuracy {summary['best-val-accuracy']:.4f}{at})"
    return line


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
    num_classes: int | None = None,
    extra: Mapping[str, Any] | None = None,
    title: str = "",
) -> dict[str, Any]:
    """Plot the metrics, then write ``summary.json`` last: its presence says the run finished.

    ``best_accuracy``/``best_round`` are the best validation accuracy and its round
    (None when no round was evaluated); ``test`` and ``best_test`` are (loss, accuracy)
    of the final and the best-validation model on the test split. Federated and
    centralized runs share these keys. ``num_classes`` draws the chance line of the plot.
    """
    path = run_dir.path / "metrics.png"
    plot_metrics(frame, path, title or run_name, test[1], num_classes)
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
