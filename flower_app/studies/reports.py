"""Tables and plots across the runs of a study (what the sweep runner and the notebook show).

A study folder holds one run directory per (setting, seed) and ``sweep.csv``, the
runner's manifest: which run belongs to which setting and seed, and how it ended.
Only runs whose ``summary.json`` says completed count as results; failed runs are
counted in the table's ``failed`` column and nowhere else.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from flower_app.runs.results import atomic_write_bytes, save_figure
from flower_app.studies.arithmetic_report import arithmetic_findings, write_arithmetic_report
from flower_app.studies.catalog import QUESTIONS, STUDIES
from flower_app.studies.mask_report import hypotheses, plot_mask_interference
from flower_app.studies.run_folders import read_study_base
from strategies.plan import HEAD_WARMUP

MANIFEST = "sweep.csv"
ARITHMETIC = "task-arithmetic"  # the study whose table is made of task arithmetic
MANIFEST_COLUMNS = [
    "study",
    "setting",
    "seed",
    "run-name",
    "status",
    "seconds",
    "engine",
    "detail",
]
RESULT_KEYS = {  # summary.json key -> table column
    "final-test-accuracy": "test-accuracy",
    "final-val-accuracy": "final-val-accuracy",
    "best-val-accuracy": "best-val-accuracy",
    "rounds": "rounds",
    "wall-time-s": "wall-time-s",
    "bytes": "bytes",
}
LABELS = {
    "test-accuracy": "final test acc.",
    "probe-val-accuracy": "val. acc. after head warm-up",
    "final-val-accuracy": "final val. acc.",
    "best-val-accuracy": "best val. acc.",
    "rounds": "rounds",
    "wall-time-s": "wall time (s)",
    "bytes": "MB communicated",
    "update-cosine": "update cosine",
    "update-norm-ratio": "update norm ratio",
    "task-normalized-accuracy": "normalized acc.",
    "task-retained-gain": "retained gain",
    "task-disagreement": "disagreement",
}
# a run's mean over its training rounds (the task columns over the measured ones)
INTERFERENCE = (
    "update-cosine",
    "update-norm-ratio",
    "task-normalized-accuracy",
    "task-retained-gain",
    "task-disagreement",
)
# columns of the table only where some run has them (runs with task-metrics-examples > 0;
# sparse runs, whose head warm-up ends with a linear probe: its accuracy beside the final)
WHERE_PRESENT = frozenset({"task-normalized-accuracy", "task-retained-gain", "task-disagreement"})
WITH_PROBE = ("probe-val-accuracy", "final-val-accuracy")
PANELS = (  # the interference figure: metrics.csv column, axis label
    ("update-cosine", "mean pairwise cosine of client updates"),
    ("update-norm-ratio", "norm of the aggregate / mean client norm"),
    ("task-normalized-accuracy", "normalized accuracy acc(w+t) / acc(w+t_k)"),
    ("task-retained-gain", "retained gain of the clients' own gains"),
    ("task-disagreement", "disagreement of w+t_k and w+t"),
)


def read_manifest(study_dir: Path) -> pd.DataFrame:
    """The runner's record of the study's runs (empty if it never ran)."""
    path = study_dir / MANIFEST
    if not path.is_file():
        return pd.DataFrame(columns=MANIFEST_COLUMNS)
    frame = pd.read_csv(path, keep_default_na=False).astype({"seed": int})
    return frame.reindex(columns=MANIFEST_COLUMNS, fill_value="")  # a manifest before "engine"


@dataclass(frozen=True)
class StudyLabel:
    """What a reader of a study's table or figure must know: the study, its scale, the
    engines that ran it, the seeds, and a server strategy all its runs share."""

    study: str
    scale: str
    engines: tuple[str, ...]
    seeds: tuple[int, ...]
    strategy: str = ""

    @property
    def seeds_text(self) -> str:
        if not self.seeds:
            return "no completed run"
        span = (
            f"{self.seeds[0]}-{self.seeds[-1]}"
            if len(self.seeds) > 2
            else ", ".join(str(s) for s in self.seeds)
        )
        return f"{len(self.seeds)} seed{'s' if len(self.seeds) > 1 else ''} ({span})"

    @property
    def engines_text(self) -> str:
        return "engine " + (" and ".join(self.engines) or "unknown")

    @property
    def title(self) -> str:
        """A figure's title in two lines: study, scale and engine; the server strategy
        (when not the defaults) and the seeds."""
        second = " · ".join(p for p in (self.strategy, self.seeds_text) if p)
        return f"{self.study} · {self.scale} scale · {self.engines_text}\n{second}"

    @property
    def caption(self) -> str:
        """A table's first line: the same facts."""
        strategy = f", {self.strategy}" if self.strategy else ""
        return (
            f"{self.study}: {self.scale} scale{strategy}, {self.engines_text}, "
            f"{self.seeds_text}; mean ± sample std over seeds"
        )


def engines_of(manifest: pd.DataFrame) -> tuple[str, ...]:
    """The engines that made the study's runs, as the manifest records them."""
    return tuple(sorted({str(e) for e in manifest["engine"] if str(e)}))


def shared_strategy(base: dict) -> str:
    """The server strategy every run of a study shares, in words, when not FedAvg's mean
    (what a setting changes shows in the setting's name instead)."""
    parts = []
    if base.get("server-rule", "mean") != "mean":
        parts.append(f"server rule {base['server-rule']}")
    if float(base.get("proximal-mu", 0.0) or 0.0) > 0:
        parts.append(f"FedProx mu={base['proximal-mu']:g}")
    if base.get("strategy", "fedavg") != "fedavg":
        parts.append(str(base["strategy"]))
    return ", ".join(parts)


def study_label(study_dir: Path, study: str, runs: pd.DataFrame) -> StudyLabel:
    """The label of a study folder: its recorded base (``study.json``), its manifest's
    engines and the seeds of its completed runs."""
    base = read_study_base(study_dir)
    done = runs[runs["status"] == "completed"]
    seeds = tuple(sorted({int(s) for s in done["seed"]}))
    return StudyLabel(
        study,
        base.scale if base else "unrecorded",
        engines_of(read_manifest(study_dir)),
        seeds,
        shared_strategy(base.identity) if base else "",
    )


def read_summary(run_dir: Path) -> dict | None:
    """A finished run's summary, or None when the run did not complete."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("status") == "completed" else None


def calibration_bytes(run_dir: Path) -> float:
    """Bytes moved by a sparse run's calibration rounds (``calibration.csv``), else 0."""
    path = run_dir / "calibration.csv"
    if not path.is_file() or path.stat().st_size == 0:
        return 0.0
    frame = pd.read_csv(path)
    columns = [c for c in ("bytes-down", "bytes-up") if c in frame]
    return float(frame[columns].fillna(0.0).to_numpy().sum()) if columns else 0.0


def read_metrics(run_dir: Path) -> pd.DataFrame:
    """A run's ``metrics.csv`` (empty when it has none), read once for every column taken."""
    path = run_dir / "metrics.csv"
    return pd.read_csv(path) if path.is_file() else pd.DataFrame()


def probe_accuracy(metrics: pd.DataFrame) -> float:
    """Validation accuracy at the end of the head warm-up (the linear probe sparse training
    starts from; the evaluation hook always measures a phase's last round), else NaN."""
    if "phase" not in metrics or "val-accuracy" not in metrics:
        return math.nan
    warmup = metrics[metrics["phase"] == HEAD_WARMUP].dropna(subset=["val-accuracy"])
    return float(warmup["val-accuracy"].iloc[-1]) if len(warmup) else math.nan


def training_means(metrics: pd.DataFrame, columns: tuple[str, ...]) -> dict[str, float]:
    """Each column's mean over the run's training rounds (NaN when it has none: a
    centralized run, or interference metrics turned off)."""
    train = metrics[metrics["phase"] == "train"] if "phase" in metrics else metrics
    return {c: float(train[c].mean()) if c in train else math.nan for c in columns}


def load_runs(study_dir: Path) -> pd.DataFrame:
    """One row per run of the manifest: setting, seed, status and its summary's results."""
    rows = []
    for entry in read_manifest(study_dir).to_dict("records"):
        summary = read_summary(study_dir / entry["run-name"])
        row = {k: entry[k] for k in ("setting", "seed", "run-name")}
        row["status"] = "completed" if summary is not None else "failed"
        if summary is not None:
            # the summary counts every phase's traffic (calibration included)
            summary["bytes"] = summary.get("bytes-down", 0.0) + summary.get("bytes-up", 0.0)
            row |= {col: summary.get(key) for key, col in RESULT_KEYS.items()}
            metrics = read_metrics(study_dir / entry["run-name"])
            row |= training_means(metrics, INTERFERENCE)
            row["probe-val-accuracy"] = probe_accuracy(metrics)
        rows.append(row)
    return pd.DataFrame(rows, columns=["setting", "seed", "run-name", "status", *LABELS])


def summary_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per setting (in study order): completed and failed runs, mean and std over seeds.

    The std is the sample standard deviation (ddof=1), so it is NaN with one seed.
    """
    out = []
    for setting in dict.fromkeys(runs["setting"]):
        group = runs[runs["setting"] == setting]
        done = group[group["status"] == "completed"]
        row: dict[str, float | str | int] = {
            "setting": setting,
            "runs": len(done),
            "failed": len(group) - len(done),
        }
        for col in LABELS:
            values = done[col].astype(float)
            row[f"{col}-mean"] = values.mean() if len(values) else math.nan
            row[f"{col}-std"] = values.std(ddof=1) if len(values) > 1 else math.nan
        out.append(row)
    table = pd.DataFrame(out)
    absent = [c for c in WHERE_PRESENT if f"{c}-mean" in table and table[f"{c}-mean"].isna().all()]
    if "probe-val-accuracy-mean" in table and table["probe-val-accuracy-mean"].isna().all():
        absent += WITH_PROBE
    return table.drop(columns=[f"{c}-{stat}" for c in absent for stat in ("mean", "std")])


def _cell(mean: float, std: float, scale: float = 1.0, digits: int = 4) -> str:
    if math.isnan(mean):
        return "-"
    text = f"{mean / scale:.{digits}f}"
    return text if math.isnan(std) else f"{text} ± {std / scale:.{digits}f}"


def markdown_table(table: pd.DataFrame, caption: str = "") -> str:
    """The table as GitHub Markdown, values as mean ± std, after its ``caption`` line."""
    labels = {col: label for col, label in LABELS.items() if f"{col}-mean" in table}
    header = ["setting", "runs", "failed", *labels.values()]
    lines = [caption, ""] if caption else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    formats = {
        "rounds": (1.0, 0),
        "wall-time-s": (1.0, 1),
        "bytes": (1e6, 1),
        "update-cosine": (1.0, 3),
        "update-norm-ratio": (1.0, 3),
        "task-normalized-accuracy": (1.0, 3),
        "task-retained-gain": (1.0, 3),
        "task-disagreement": (1.0, 3),
    }
    for row in table.to_dict("records"):
        cells = [str(row["setting"]), str(row["runs"]), str(row["failed"])]
        for col in labels:
            scale, digits = formats.get(col, (1.0, 4))
            cells.append(_cell(row[f"{col}-mean"], row[f"{col}-std"], scale, digits))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def load_metrics(study_dir: Path, runs: pd.DataFrame) -> pd.DataFrame:
    """Every completed run's metrics.csv, with setting, seed, local steps and bytes so far.

    Bytes so far start with the calibration traffic of sparse runs, so accuracy against
    bytes compares dense and sparse runs at their full cost.
    """
    frames = []
    for run in runs[runs["status"] == "completed"].to_dict("records"):
        run_dir = study_dir / run["run-name"]
        frame = pd.read_csv(run_dir / "metrics.csv")
        config = json.loads((run_dir / "config.json").read_text())
        frame["setting"], frame["seed"] = run["setting"], run["seed"]
        frame["strategy"] = config.get("strategy", "fedavg")
        frame["client-steps"] = frame["round"] * int(config.get("local-steps", 1))
        sent = frame[["bytes-down", "bytes-up"]].fillna(0.0).sum(axis=1)
        frame["bytes-cumulative"] = calibration_bytes(run_dir) + sent.cumsum()
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _figure(ncols: int = 1, nrows: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=(6 * ncols, 4 * nrows), squeeze=False)


def integer_ticks(ax) -> None:
    """Rounds and steps are whole numbers: no tick at 0.25 of a round."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


MANY_SETTINGS = 6  # beyond this, a figure's legend goes beside the axes


def legend(ax, metrics: pd.DataFrame) -> None:
    """The settings' legend: inside the axes for a few, beside them for many (a study of
    12 settings would cover its own lines)."""
    if metrics["setting"].nunique() > MANY_SETTINGS:
        ax.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig = ax.figure
        if not getattr(fig, "widened_for_legends", False):  # once: 2.5 in a column
            columns = ax.get_subplotspec().get_gridspec().ncols
            width, height = fig.get_size_inches()
            fig.set_size_inches(width + 2.5 * columns, height)
            fig.widened_for_legends = True
    else:
        ax.legend(fontsize="small")


def _lines(ax, metrics: pd.DataFrame, x: str, y: str) -> None:
    """One line per setting: the mean over seeds, and a band of ± one std where seeds > 1;
    20 distinct colours where there are more settings than the default cycle's 10."""
    if metrics["setting"].nunique() > 10:
        import matplotlib.pyplot as plt

        ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)
    for setting in dict.fromkeys(metrics["setting"]):
        rows = metrics[(metrics["setting"] == setting)].dropna(subset=[y])
        if rows.empty:
            continue
        stats = rows.groupby(x)[y].agg(["mean", "std", "count"]).reset_index()
        (line,) = ax.plot(stats[x], stats["mean"], marker="o", ms=2, label=str(setting))
        band = stats[stats["count"] > 1]
        if len(band):
            ax.fill_between(
                band[x],
                band["mean"] - band["std"],
                band["mean"] + band["std"],
                color=line.get_color(),
                alpha=0.2,
            )


def plot_accuracy(metrics: pd.DataFrame, path: Path, title: str, x: str = "round") -> Path:
    """Validation accuracy against rounds (or client steps), one line per setting."""
    fig, axes = _figure()
    ax = axes[0, 0]
    _lines(ax, metrics, x, "val-accuracy")
    xlabel = "round x local steps" if x == "client-steps" else x
    ax.set(xlabel=xlabel, ylabel="validation accuracy")
    ax.set_title(title, fontsize=10)
    integer_ticks(ax)
    legend(ax, metrics)
    return save_figure(fig, path)


def plot_final_accuracy(table: pd.DataFrame, path: Path, title: str) -> Path:
    """Final test accuracy per setting with its value: a bar at the mean with an error bar
    of one std over seeds, or, for a setting with one seed, a point (no zero-length bar)."""
    fig, axes = _figure()
    ax = axes[0, 0]
    names = table["setting"].astype(str).tolist()
    means = table["test-accuracy-mean"].to_numpy(dtype=float)
    stds = table["test-accuracy-std"].to_numpy(dtype=float)
    several = ~np.isnan(stds)
    positions = np.arange(len(names))
    if several.any():
        ax.bar(positions[several], means[several], yerr=stds[several], capsize=4, alpha=0.8)
    ax.plot(positions[~several], means[~several], "o", ms=7)
    for x, mean, std in zip(positions, means, stds, strict=True):
        if not np.isnan(mean):
            text = f"{mean:.3f}" if np.isnan(std) else f"{mean:.3f}\n±{std:.3f}"
            top = mean + (0.0 if np.isnan(std) else std)
            ax.annotate(
                text,
                (x, top),
                textcoords="offset points",
                xytext=(0, 4),
                ha="center",
                fontsize="small",
            )
    if len(names) > 5:  # long setting names (nc5-adamw-least_sensitive): room and a slant
        fig.set_size_inches(max(6.0, 1.1 * len(names)), 5.5)
        ax.set_xticks(positions, names, rotation=30, ha="right", fontsize="small")
    else:
        ax.set_xticks(positions, names)
    ax.set_ylim(0, min(1.0, np.nanmax(means + np.nan_to_num(stds)) * 1.15) if len(means) else 1)
    ax.set(xlabel="setting", ylabel="final test accuracy")
    ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


def plot_accuracy_vs_bytes(metrics: pd.DataFrame, path: Path, title: str) -> Path:
    """Validation accuracy against megabytes communicated so far (down + up)."""
    frame = metrics.assign(mb=metrics["bytes-cumulative"] / 1e6)
    fig, axes = _figure()
    ax = axes[0, 0]
    for setting in dict.fromkeys(frame["setting"]):
        rows = frame[frame["setting"] == setting].dropna(subset=["val-accuracy"])
        stats = rows.groupby("round")[["mb", "val-accuracy"]].mean()
        ax.plot(stats["mb"], stats["val-accuracy"], marker="o", ms=2, label=str(setting))
    ax.set(xlabel="MB communicated (down + up)", ylabel="validation accuracy")
    ax.set_title(title, fontsize=10)
    legend(ax, metrics)
    return save_figure(fig, path)


def has_values(metrics: pd.DataFrame, column: str) -> bool:
    return column in metrics and bool(metrics[column].notna().any())


def plot_interference(metrics: pd.DataFrame, path: Path, title: str, x: str = "round") -> Path:
    """Per round, one panel per interference metric the runs have: geometric (update cosine,
    norm ratio) in the first row, task-arithmetic (normalized accuracy, retained gain,
    disagreement; only the measured rounds) in the second."""
    rows = [
        [p for p in PANELS[:2] if has_values(metrics, p[0])],
        [p for p in PANELS[2:] if has_values(metrics, p[0])],
    ]
    rows = [row for row in rows if row]
    fig, axes = _figure(max(len(row) for row in rows), len(rows))
    for r, row in enumerate(rows):
        for c in range(axes.shape[1]):
            ax = axes[r, c]
            if c >= len(row):
                ax.set_axis_off()
                continue
            column, label = row[c]
            _lines(ax, metrics, x, column)
            ax.set(xlabel=x, ylabel=label)
            integer_ticks(ax)
            legend(ax, metrics)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def write_report(study_dir: Path, study: str, out_dir: Path | None = None) -> dict[str, Path]:
    """table.csv, table.md and the study's plots, from what the study folder holds now.

    They go to the study folder (the sweep runner's record) unless ``out_dir`` is given:
    a reader such as the notebook passes its own folder, so reading never rewrites results.
    """
    out_dir = study_dir if out_dir is None else out_dir
    runs = load_runs(study_dir)
    table = summary_table(runs)
    label = study_label(study_dir, study, runs)
    if study == ARITHMETIC:  # its table is per arm; the per-setting one is runs_table.*
        out = write_arithmetic_report(study_dir, out_dir, runs, label.caption, label.title)
        names = {"table.csv": "runs_table.csv", "table.md": "runs_table.md"}
    else:
        out, names = {}, {"table.csv": "table.csv", "table.md": "table.md"}
    out[names["table.csv"]] = out_dir / names["table.csv"]
    out[names["table.md"]] = out_dir / names["table.md"]
    atomic_write_bytes(out[names["table.csv"]], table.to_csv(index=False).encode())
    atomic_write_bytes(out[names["table.md"]], markdown_table(table, label.caption).encode())
    metrics = load_metrics(study_dir, runs)
    if metrics.empty:
        return out
    x, title = ("client-steps" if study == "local-steps" else "round"), label.title
    out["accuracy.png"] = plot_accuracy(metrics, out_dir / "accuracy.png", title, x)
    out["final_accuracy.png"] = plot_final_accuracy(table, out_dir / "final_accuracy.png", title)
    if (metrics["strategy"] == "sparse-fedavg").any():
        path = out_dir / "accuracy_vs_bytes.png"
        out["accuracy_vs_bytes.png"] = plot_accuracy_vs_bytes(metrics, path, title)
    if any(has_values(metrics, column) for column, _ in PANELS):
        path = out_dir / "interference.png"
        out["interference.png"] = plot_interference(metrics, path, title, x)
    if study == "mask-strategies" and has_values(metrics, "task-normalized-accuracy"):
        path = out_dir / "mask_interference.png"
        out["mask_interference.png"] = plot_mask_interference(metrics, path, title)
    return out


def findings(study_dir: Path, study: str) -> list[str]:
    """The study's final test accuracy per setting, one line each, for a reader at a glance."""
    runs = load_runs(study_dir)
    table, label = summary_table(runs), study_label(study_dir, study, runs)
    if study == ARITHMETIC:
        return arithmetic_findings(study_dir, label.caption)
    lines = [f"{label.caption.split(';')[0]}: final test accuracy, mean ± std over seeds"]
    width = max((len(str(s)) for s in table["setting"]), default=0)
    for row in table.to_dict("records"):
        cell = _cell(row["test-accuracy-mean"], row["test-accuracy-std"])
        failed = f" ({row['failed']} failed)" if row["failed"] else ""
        lines.append(f"  {row['setting']!s:<{width}}  {cell}{failed}")
    if study == "mask-strategies":
        lines += hypotheses(table)
    return lines


def ordering(table: pd.DataFrame) -> str:
    """The settings from the best mean final test accuracy to the worst."""
    done = table.dropna(subset=["test-accuracy-mean"])
    done = done.sort_values("test-accuracy-mean", ascending=False, kind="stable")
    return " > ".join(f"{r['setting']} ({r['test-accuracy-mean']:.3f})" for _, r in done.iterrows())


FIGURES = {
    "accuracy.png": "validation accuracy per round (mean ± std over seeds)",
    "final_accuracy.png": "final test accuracy per setting (mean, std error bars)",
    "interference.png": "interference of the client updates per round",
    "accuracy_vs_bytes.png": "validation accuracy against MB communicated",
    "mask_interference.png": "normalized accuracy and disagreement per round, per arm and mask",
    "arithmetic.png": "task addition (normalized accuracy) and negation (target, control)",
}


def study_section(root: Path, study: str) -> list[str]:
    """A study's part of the report: its question, table, ordering, run time and figures."""
    study_dir = root / study
    runs = load_runs(study_dir)
    table, label = summary_table(runs), study_label(study_dir, study, runs)
    seconds = read_manifest(study_dir)["seconds"].astype(float).sum()
    lines = [f"## {study}", "", QUESTIONS.get(study, ""), ""]
    if study == ARITHMETIC and (study_dir / "table.md").is_file():
        lines += [(study_dir / "table.md").read_text()]
        lines += ["Single-task runs:", "", markdown_table(table, label.caption)]
    else:
        lines += [markdown_table(table, label.caption)]
        lines += [f"By final test accuracy: {ordering(table)}.", ""]
    if study == "mask-strategies":
        lines += ["```", *hypotheses(table), "```", ""]
    lines += [f"Run time: {seconds:.0f} s, the sum over its runs (`{study}/{MANIFEST}`).", ""]
    for name, caption in FIGURES.items():
        if (study_dir / name).is_file():
            lines += [f"![{study}: {caption}]({study}/{name})", ""]
    return lines


def write_sweep_report(
    root: Path, studies: list[str], command: str, engine: str, seconds: float
) -> Path:
    """``report.md`` in the sweep's folder: a section per study in ``studies``, and how
    the last sweep into it was made."""
    import platform

    import flwr
    import torch

    machine = (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, torch "
        f"{torch.__version__}, flwr {flwr.__version__}"
    )
    lines = [
        "# Study results",
        "",
        f"Last written by `{command}` (engine {engine}) on {machine}; that invocation took "
        f"{seconds:.0f} s (runs finished earlier were skipped, their times are in each study's "
        f"`{MANIFEST}`). Tables: mean ± sample std over seeds; update cosine and norm ratio "
        "are each run's mean over its training rounds.",
        "",
    ]
    for study in studies:
        lines += study_section(root, study)
    path = root / "report.md"
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path


def resolve_launch_path(value: str, launch_dir: str | None = None) -> Path:
    """A path typed in the shell: absolute as is, else relative to ``launch_dir``.

    A Jupyter kernel runs in the notebook's folder, not in the folder Jupyter was started
    from; the notebook passes that folder (the shell's ``PWD``), so ``RESULTS_DIR=results/x``
    means what it means on the command line. Without ``launch_dir``: the working directory.
    """
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = Path(launch_dir or os.getcwd()) / path
    return path.resolve()


def studies_with_results(results_dir: Path) -> list[str]:
    """The studies (in study order) that ``results_dir`` holds; no completed run is an error.

    A wrong or empty folder must stop the notebook with a reason, not show nothing.
    """
    hint = (
        "run python -m flower_app.studies.experiments STUDY --output-dir DIR first, or set "
        "RESULTS_DIR to the runner's --output-dir"
    )
    if not results_dir.is_dir():
        raise FileNotFoundError(f"no results in {results_dir}: the folder does not exist; {hint}")
    studies = [s for s in STUDIES if (results_dir / s / MANIFEST).is_file()]
    if not any((load_runs(results_dir / s)["status"] == "completed").any() for s in studies):
        raise FileNotFoundError(
            f"no results in {results_dir}: no study folder ({', '.join(STUDIES)}) with a "
            f"completed run; {hint}"
        )
    return studies
