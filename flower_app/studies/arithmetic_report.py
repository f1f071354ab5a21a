"""The task-arithmetic study's table, figure and findings, from its finished runs.

For every arm and seed whose task runs all completed: task addition of all tasks and
negation of task 0 with task 1 as control (``flower_app.runs.task_arithmetic``,
alpha chosen on the validation splits), then mean ± sample std over seeds per arm, below
TaLoS's central ViT-B/32 numbers (Iurada et al., ICLR 2025, Tab. 1 and Tab. 3) as anchors.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from flower_app.runs.results import atomic_write_bytes, save_figure
from flower_app.runs.task_arithmetic import add_tasks, negate_task
from flower_app.runs.task_runs import check_compatible, load_task_run, remember_pretrained
from flower_app.studies.catalog import ARITHMETIC_ARMS, arm_and_task

PER_SEED = "arithmetic_runs.csv"
# TaLoS (Iurada et al., ICLR 2025), central, 8 vision tasks, ViT-B/32, in percent:
# addition normalized accuracy and negation target accuracy at >= 95% control accuracy
ANCHORS = (
    {"arm": "TaLoS paper: TaLoS (central, ViT-B/32)", "addition-normalized": 90.8,
     "negation-target": 11.0},
    {"arm": "TaLoS paper: dense fine-tuning (central, ViT-B/32)", "addition-normalized": 80.4,
     "negation-target": 20.4},
)  # fmt: skip
COLUMNS = {  # per-seed column -> table header
    "single-task": "single-task acc.",
    "pretrained": "pretrained acc.",
    "addition-absolute": "addition abs.",
    "addition-normalized": "addition norm.",
    "addition-alpha": "alpha (add)",
    "negation-target": "negation target",
    "negation-control": "negation control",
    "negation-alpha": "alpha (neg)",
}
PERCENT = frozenset(COLUMNS) - {"addition-alpha", "negation-alpha"}


def arm_seed_result(run_dirs: list[Path]) -> dict[str, float]:
    """Addition of all tasks, and negation of task 0 with task 1 as control (one target and
    one control, as Ilharco et al.), for one arm and seed."""
    runs = [load_task_run(d) for d in run_dirs]
    check_compatible(runs)
    tasks = [r.task for r in runs]
    added = add_tasks(tasks)
    negation = negate_task(tasks[0], tasks[1])
    remember_pretrained(runs)
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    per_task = {}  # each task's own numbers (kept in arithmetic_runs.csv, not in the table)
    for t, scores in enumerate(added.tasks.values()):
        per_task[f"task{t}-pretrained"] = scores.pretrained
        per_task[f"task{t}-added"] = scores.edited
        per_task[f"task{t}-normalized"] = scores.normalized
    return per_task | {
        "single-task": mean([s.fine_tuned for s in added.tasks.values()]),
        "pretrained": mean([s.pretrained for s in added.tasks.values()]),
        "addition-absolute": added.absolute,
        "addition-normalized": added.normalized,
        "addition-alpha": added.alpha,
        "negation-target": negation.target.edited,
        "negation-control": negation.control.edited,
        "negation-alpha": negation.alpha,
    }


def _cached(path: Path, run_dirs: list[Path], arm: str, seed: int) -> dict | None:
    """The row ``path`` already holds for (arm, seed), if written after all its runs ended
    (the runner writes a report after every sweep into the study folder; rows of runs
    that have not changed since are not computed again)."""
    if not path.is_file():
        return None
    written = path.stat().st_mtime
    if any((d / "summary.json").stat().st_mtime > written for d in run_dirs):
        return None
    frame = pd.read_csv(path)
    rows = frame[(frame["arm"] == arm) & (frame["seed"] == seed)].to_dict("records")
    return rows[0] if rows and set(COLUMNS) <= set(rows[0]) else None


def per_seed_results(study_dir: Path, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per arm and seed whose every task run completed."""
    done = runs[runs["status"] == "completed"].copy()
    done["arm"] = [arm_and_task(s)[0] for s in done["setting"]]
    done["task"] = [arm_and_task(s)[1] for s in done["setting"]]
    tasks_planned = {arm_and_task(s)[1] for s in runs["setting"]}
    rows = []
    for (arm, seed), group in done.groupby(["arm", "seed"], sort=False):
        if set(group["task"]) != tasks_planned:
            continue  # a task's run failed: no arithmetic for this arm and seed
        run_dirs = [study_dir / name for name in group.sort_values("task")["run-name"]]
        cached = _cached(study_dir / PER_SEED, run_dirs, arm, int(seed))
        result = cached if cached is not None else arm_seed_result(run_dirs)
        rows.append(result | {"arm": arm, "seed": int(seed)})
    per_task = sorted({k for row in rows for k in row if k.startswith("task")})
    frame = pd.DataFrame(rows, columns=["arm", "seed", *COLUMNS, *per_task])
    order = frame["arm"].map({arm: i for i, arm in enumerate(ARITHMETIC_ARMS)})
    return frame.assign(order=order).sort_values(["order", "seed"]).drop(columns="order")


def arm_table(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample std over seeds per arm, percent where accuracy, anchors first."""
    rows: list[dict] = [dict(a) for a in ANCHORS]
    for arm in dict.fromkeys(per_seed["arm"]):
        group = per_seed[per_seed["arm"] == arm]
        row: dict = {"arm": arm, "seeds": len(group)}
        for col in COLUMNS:
            values = group[col].astype(float) * (100.0 if col in PERCENT else 1.0)
            row[col] = values.mean()
            row[f"{col}-std"] = values.std(ddof=1) if len(values) > 1 else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def _cell(value: float, std: float, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    text = f"{value:.{digits}f}"
    return text if std is None or math.isnan(std) else f"{text} ± {std:.{digits}f}"


def markdown(table: pd.DataFrame, caption: str) -> str:
    header = ["arm", "seeds", *COLUMNS.values()]
    lines = [caption, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.to_dict("records"):
        seeds = row.get("seeds")
        cells = [str(row["arm"]), "-" if pd.isna(seeds) else str(int(seeds))]
        for col in COLUMNS:
            digits = 2 if col in PERCENT else 3
            cells.append(_cell(row.get(col, math.nan), row.get(f"{col}-std", math.nan), digits))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def caption_of(study_caption: str, tasks: int) -> str:
    return (
        f"{study_caption}. Accuracies in percent on the test splits; {tasks} tasks "
        "(disjoint class blocks), each with its own head on its own classes; alpha from "
        "0..1 step 0.05 on the validation splits; negation: target task 0, control task 1, "
        "alpha the largest keeping control >= 95% of pretrained. The TaLoS rows "
        "are central ViT-B/32 numbers on 8 tasks, anchors rather than a like-for-like "
        "comparison."
    )


def plot(table: pd.DataFrame, path: Path, title: str) -> Path:
    """Addition normalized accuracy per arm (TaLoS's anchors as lines) and negation target
    and control accuracy per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ours = table[table["seeds"].notna()]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = np.arange(len(ours))
    std = lambda col: ours[f"{col}-std"].fillna(0.0)  # noqa: E731
    left.bar(x, ours["addition-normalized"], yerr=std("addition-normalized"), capsize=4)
    for anchor, style in zip(ANCHORS, ("-", "--"), strict=True):
        left.axhline(anchor["addition-normalized"], color="gray", ls=style, label=anchor["arm"])
    left.set_xticks(x, ours["arm"], rotation=20)
    left.set(ylabel="addition: normalized accuracy (%)", ylim=(0, 110))
    left.legend(fontsize="x-small", loc="lower right")
    width = 0.38
    for shift, col, name in (
        (-width / 2, "negation-target", "target"),
        (width / 2, "negation-control", "control"),
    ):
        right.bar(x + shift, ours[col], width, yerr=std(col), capsize=3, label=name)
    right.set_xticks(x, ours["arm"], rotation=20)
    right.set(ylabel="negation: test accuracy (%)", ylim=(0, 105))
    right.legend(fontsize="small")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def write_arithmetic_report(
    study_dir: Path, out_dir: Path, runs: pd.DataFrame, caption: str, title: str
) -> dict[str, Path]:
    """arithmetic_runs.csv (per arm and seed), table.csv, table.md and arithmetic.png;
    ``caption`` and ``title`` say the study's scale, engines and seeds (``StudyLabel``)."""
    per_seed = per_seed_results(study_dir, runs)
    tasks = len({arm_and_task(s)[1] for s in runs["setting"]})
    table = arm_table(per_seed)
    out = {n: out_dir / n for n in (PER_SEED, "table.csv", "table.md")}
    atomic_write_bytes(out[PER_SEED], per_seed.to_csv(index=False).encode())
    atomic_write_bytes(out["table.csv"], table.to_csv(index=False).encode())
    atomic_write_bytes(out["table.md"], markdown(table, caption_of(caption, tasks)).encode())
    if len(per_seed):
        out["arithmetic.png"] = plot(table, out_dir / "arithmetic.png", title)
    return out


def arithmetic_findings(study_dir: Path, caption: str) -> list[str]:
    """One line per arm: addition normalized accuracy and negation target / control."""
    path = study_dir / "table.csv"
    table = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=["arm", "seeds"])
    lines = [f"{caption.split(';')[0]}: task addition and negation (%), mean ± std over seeds"]
    for row in table[table["seeds"].notna()].to_dict("records"):
        add = _cell(row["addition-normalized"], row["addition-normalized-std"], 1)
        target = _cell(row["negation-target"], row["negation-target-std"], 1)
        control = _cell(row["negation-control"], row["negation-control-std"], 1)
        lines.append(
            f"  {row['arm']:<18} addition normalized {add}; negation target {target}, "
            f"control {control}"
        )
    return lines
