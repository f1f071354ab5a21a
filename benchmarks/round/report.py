"""Printing and writing a run's figures: the lines per run, memory by K, benchmark.json.

Why: apart from the figures, so what is printed can change without touching how it is computed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from benchmarks.round.figures import RoundFigures, round_figures
from benchmarks.round.floors import Floor
from benchmarks.round.forms import CANONICAL_ROUNDS
from benchmarks.round.memory import memory_per_round, slope_per_round
from benchmarks.round.runs import RunResult


def _median_spread(values: pd.Series) -> str:
    v = values.dropna()
    if v.empty:
        return "n/a"
    q1, q3 = np.percentile(v, [25, 75])
    return f"{v.median():.3f} s (IQR {q1:.3f}-{q3:.3f}, min {v.min():.3f}, max {v.max():.3f})"


def write_round_split(fig: RoundFigures, warmup: int, write: Callable[[str], None]) -> None:
    """Round time, images/s, where a round's time goes, and peak GPU memory."""
    write(f"   rounds measured: {len(fig.round_times)} after {warmup} warm-up")
    write(f"   round time (training, eval excluded): {_median_spread(fig.round_times)}")
    write(f"   images/round {fig.images}, images/s {fig.images / fig.median_round:.1f}")
    w = fig.workers
    server = fig.send + fig.decode + fig.aggregate
    write(
        f"   split (medians, client parts summed over clients / {w} workers): server send "
        f"{fig.send:.3f} s; client phase {fig.client_phase:.3f} s = load "
        f"{fig.load_sum / w:.3f} + compute {fig.client_compute:.3f} + encode "
        f"{fig.encode_sum / w:.3f} + transport/scheduling {fig.transport:.3f}"
    )
    write(
        f"                    server receive/decode+check {fig.decode:.3f} s, aggregation "
        f"{fig.aggregate:.3f} s, other server {fig.median_round - fig.client_phase - server:.3f}"
        f" s; evaluation {fig.eval_s:.3f} s (every {fig.eval_every} rounds, not in the round)"
    )
    write(f"   slowest client's compute {fig.slowest_client:.3f} s")
    if not math.isnan(fig.task_s):
        write(
            f"   task-arithmetic measurement {fig.task_s:.3f} s a round (median; in the round "
            f"time): {100 * fig.task_share:.1f}% of the round (median of the rounds' own "
            f"ratios), so {100 * fig.task_share / (1 - fig.task_share):.1f}% on top of the "
            "round without it"
        )
    write(
        "   GPU memory per worker (peak allocated): "
        + (f"{fig.gpu_mb:.0f} MB" if not math.isnan(fig.gpu_mb) else "n/a (CPU run)")
    )


def write_against_floor(fig: RoundFigures, write: Callable[[str], None]) -> None:
    """The median round against the compute floor, and the projected canonical run."""
    floor, median_round = fig.floor, fig.median_round
    write(
        f"   compute floor {floor.seconds:.3f} s ({floor.best}, {floor.rates[floor.best]:.0f} "
        f"img/s x{floor.parallel}): median round / floor = {fig.ratio_to_floor:.2f}x"
    )
    write(
        f"   carrying cost {fig.carrying:.3f} s (median round {median_round:.3f} s - bare client "
        f"compute {floor.bare_round_s:.3f} s) / copy floor {floor.copy_floor_s:.4g} s "
        f"({floor.copies} copies of {floor.model_mb:.3g} MiB) = {fig.carrying_ratio:.2f}x"
    )
    write(
        f"   projected canonical wall time: {CANONICAL_ROUNDS} x {median_round:.3f} s + "
        f"{fig.canonical_evals} x {fig.eval_s:.3f} s eval = {fig.projected_canonical:.0f} s "
        f"({fig.projected_canonical / 3600:.2f} h; start-up and checkpoints not included)"
    )


def report_run(result: RunResult, floor: Floor, write: Callable[[str], None]) -> dict:
    """Print the figures of one run; return them as a dict (for the JSON report)."""
    spec = result.spec
    write(f"\n== {spec.name}: K={spec.num_clients} ({spec.config['model']}) ==")
    write(f"   {result.detail}; wall {result.wall_s:.1f} s end to end")
    if not result.ok or result.metrics is None:
        return {"run": spec.name, "ok": False, "detail": result.detail}
    figures = round_figures(spec, result.metrics, floor)
    write_round_split(figures, spec.warmup, write)
    write_against_floor(figures, write)
    memory = report_memory(result, write)
    return {
        "run": spec.name,
        "ok": True,
        "num-clients": spec.num_clients,
        "model": spec.config["model"],
        **figures.as_dict(),
        **memory,
    }


def format_slope(slope: float) -> str:
    """A slope in MB/round, or why there is none (a line through 2 rounds says nothing)."""
    return "n/a (needs 3 measured rounds)" if math.isnan(slope) else f"{slope:+.2f} MB/round"


def report_memory(result: RunResult, write: Callable[[str], None]) -> dict[str, float]:
    """Host memory of the simulation's processes, and its slope over the measured rounds."""
    per_round = memory_per_round(result.memory, result.spec.warmup)
    if per_round.empty:
        write("   host memory: no samples")
        return {}
    rss_slope = slope_per_round(per_round, "rss_mb")
    pss_slope = slope_per_round(per_round, "pss_mb")
    peak = max(result.memory, key=lambda s: s.pss_mb)
    last = per_round.iloc[-1]
    write(
        f"   host memory of the simulation ({int(last['processes'])} processes): "
        f"PSS {last['pss_mb']:.0f} MB, RSS sum {last['rss_mb']:.0f} MB after round "
        f"{int(last['rounds_done'])}; PSS peak {peak.pss_mb:.0f} MB"
    )
    write(
        f"   memory slope over {len(per_round)} rounds: PSS {format_slope(pss_slope)}, "
        f"RSS {format_slope(rss_slope)}"
    )
    server = per_round["server_pss_mb"]
    shared_peak = max(s.shared_mb for s in result.memory)
    write(
        f"   ServerApp process PSS {last['server_pss_mb']:.0f} MB after the last round (min "
        f"{server.min():.0f}, max {server.max():.0f} over the rounds; slope "
        f"{format_slope(slope_per_round(per_round, 'server_pss_mb'))}); shared weight files "
        f"{last['shared_mb']:.0f} MB after the last round, peak {shared_peak:.0f} MB"
    )
    return {
        "server-pss-mb": float(last["server_pss_mb"]),
        "server-pss-slope-mb-per-round": slope_per_round(per_round, "server_pss_mb"),
        "shared-files-peak-mb": shared_peak,
        "host-pss-mb": float(last["pss_mb"]),
        "host-rss-mb": float(last["rss_mb"]),
        "host-pss-peak-mb": peak.pss_mb,
        "pss-slope-mb-per-round": pss_slope,
        "rss-slope-mb-per-round": rss_slope,
    }


def print_memory_by_k(report: list[dict]) -> None:
    memory = [r for r in report if r.get("ok") and "pss-slope-mb-per-round" in r]
    if memory:
        print("\nhost memory by K (after the last round; slope = linear fit over rounds):")
        for r in memory:
            print(
                f"   K={r['num-clients']:>5} {r['run']:<12} PSS {r['host-pss-mb']:7.0f} MB  "
                f"RSS {r['host-rss-mb']:7.0f} MB  "
                f"slope {format_slope(r['pss-slope-mb-per-round'])} (PSS)"
            )


def write_benchmark_json(out: Path, device: torch.device, floor: Floor, report: list[dict]) -> None:
    floor_info = {"rates": floor.rates, "best": floor.best, "seconds": floor.seconds}
    floor_info["bare-round-s"] = floor.bare_round_s
    floor_info |= {"copy-floor-s": floor.copy_floor_s, "copies": floor.copies}
    floor_info["model-mb"] = floor.model_mb
    (out / "benchmark.json").write_text(
        json.dumps({"device": device.type, "floor": floor_info, "runs": report}, indent=2) + "\n"
    )
