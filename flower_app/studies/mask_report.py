"""What the mask study answers: does a mask make client updates interfere less when FedAvg
merges them, and do sparse updates merge better than dense ones?

Interference is read in function space, per (shards, optimizer) arm of the study
(``nc5-adamw-least_sensitive``: arm ``nc5-adamw``, mask ``least_sensitive``): a run's mean
normalized accuracy acc(w + t) / acc(w + t_k) over its measured training rounds (higher:
more of each client's own accuracy survives the merge) and its mean disagreement of
w + t_k and w + t (lower: less interference); docs/studies.md defines both.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from flower_app.runs.results import save_figure

DENSE = "dense"
NORMALIZED, DISAGREEMENT = "task-normalized-accuracy", "task-disagreement"
HYPOTHESIS_MASK = "least_sensitive"  # TaLoS: the least sensitive entries interfere least


def split_setting(setting: str) -> tuple[str, str]:
    """``nc5-adamw-least_sensitive`` -> (``nc5-adamw``, ``least_sensitive``)."""
    shards, optimizer, mask = setting.split("-", 2)
    return f"{shards}-{optimizer}", mask


def arms(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The table's rows per arm (in study order), indexed by mask (``dense`` included)."""
    rows = table.assign(
        arm=[split_setting(s)[0] for s in table["setting"]],
        mask=[split_setting(s)[1] for s in table["setting"]],
    )
    return {arm: rows[rows["arm"] == arm].set_index("mask") for arm in dict.fromkeys(rows["arm"])}


def _value(rows: pd.DataFrame, mask: str, column: str) -> float:
    if mask not in rows.index or f"{column}-mean" not in rows:
        return math.nan
    return float(rows.loc[mask, f"{column}-mean"])


def arm_lines(arm: str, rows: pd.DataFrame) -> list[str]:
    """The two hypotheses for one arm, each with its numbers, whichever way they come out."""
    masks = [m for m in rows.index if m != DENSE]
    scores = {m: _value(rows, m, NORMALIZED) for m in masks}
    scores = {m: v for m, v in scores.items() if not math.isnan(v)}
    if not scores:
        return [f"  {arm}: no normalized accuracy measured (task-metrics-examples = 0)"]
    if HYPOTHESIS_MASK not in scores:
        return [f"  {arm}: no {HYPOTHESIS_MASK} run with normalized accuracy"]
    ranked = sorted(scores, key=lambda m: scores[m], reverse=True)
    order = " > ".join(f"{m} {scores[m]:.3f}" for m in ranked)
    best, ours = ranked[0], scores[HYPOTHESIS_MASK]
    std = float(rows.loc[HYPOTHESIS_MASK, f"{NORMALIZED}-std"])
    if best == HYPOTHESIS_MASK:
        verdict = "holds"
    elif not math.isnan(std) and scores[best] - ours <= std:
        verdict = f"not shown ({best} higher by less than one std, {std:.3f})"
    else:
        verdict = f"does not hold ({best} {scores[best]:.3f} against {ours:.3f})"
    dense = _value(rows, DENSE, NORMALIZED)
    above = sum(v > dense for v in scores.values())
    merges = "holds" if above == len(scores) else ("does not hold" if above == 0 else "partly")
    if math.isnan(dense):
        merges, above = "no dense run to compare", 0
    disagree = {m: _value(rows, m, DISAGREEMENT) for m in [*masks, DENSE]}
    lowest = min((m for m in disagree if not math.isnan(disagree[m])), key=disagree.get, default="")
    counted = f" ({above} of {len(scores)} masks above dense)" if not math.isnan(dense) else ""
    return [
        f"  {arm}: normalized accuracy {order}; dense {dense:.3f}",
        f"    {HYPOTHESIS_MASK} interferes least: {verdict}",
        f"    sparse merges better than dense: {merges}{counted}; lowest disagreement: "
        f"{lowest} {disagree.get(lowest, math.nan):.3f}",
    ]


def hypotheses(table: pd.DataFrame) -> list[str]:
    """Per arm, the study's two hypotheses and the numbers they rest on."""
    lines = ["mask-strategies: the hypotheses, by mean normalized accuracy over seeds"]
    for arm, rows in arms(table).items():
        lines += arm_lines(arm, rows)
    return lines


def plot_mask_interference(metrics: pd.DataFrame, path: Path, title: str) -> Path:
    """Per round, one column per arm: normalized accuracy (top) and disagreement (bottom),
    one line per mask (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    frame = metrics.dropna(subset=[NORMALIZED]).copy()
    frame["arm"] = [split_setting(s)[0] for s in frame["setting"]]
    frame["mask"] = [split_setting(s)[1] for s in frame["setting"]]
    names = list(dict.fromkeys(frame["arm"]))
    ncols = max(len(names), 1)
    fig, axes = plt.subplots(2, ncols, figsize=(6 * ncols, 8), squeeze=False)
    for c, arm in enumerate(names):
        rows = frame[frame["arm"] == arm]
        for r, (column, label) in enumerate(
            ((NORMALIZED, "normalized accuracy"), (DISAGREEMENT, "disagreement"))
        ):
            ax = axes[r, c]
            for mask in dict.fromkeys(rows["mask"]):
                stats = rows[rows["mask"] == mask].groupby("round")[column].mean()
                style = "--" if mask == DENSE else "-"
                ax.plot(stats.index, stats.to_numpy(), style, marker="o", ms=2, label=mask)
            ax.set(xlabel="round", ylabel=label)
            ax.set_title(arm, fontsize=10)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole rounds
            ax.legend(fontsize="x-small")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
