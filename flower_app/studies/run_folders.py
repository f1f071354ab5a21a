"""What a study folder already holds, and whether it is what this sweep would make.

A finished run counts as a planned run's result only if the run-config it was made with
(its ``config.json``) equals the planned one in every key that changes results (the
experiment identity of ``RunConfig``, as a checkpoint compares it). A study folder also
records the base its runs share (``study.json``: the scale and the run-config every
setting starts from), so runs of settings outside this sweep cannot differ from the
planned ones either. A folder made otherwise is refused before any run starts, with the
folder and the differing keys in one line; ``--move-aside`` moves it out of the way.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from flower_app.config import ConfigError, RunConfig
from flower_app.runs.results import atomic_write_bytes
from flower_app.runs.run_lock import is_locked, locked_message
from flower_app.runs.task_vectors import NOT_RUN_CONFIG

STUDY_RECORD = "study.json"
MOVED_ASIDE = "moved-aside"
SHOWN_KEYS = 4  # differing keys named in the one-line refusal
CENTRALIZED_KEYS = ("epochs", "warmup-epochs")  # results of the baseline, not of a federation


class Planned(Protocol):
    """What this module needs of a planned run (``experiments.PlannedRun``)."""

    @property
    def run_dir(self) -> Path: ...

    @property
    def config(self) -> dict[str, Any]: ...

    @property
    def centralized(self) -> bool: ...


def result_identity(config: Mapping[str, Any], centralized: bool = False) -> dict[str, Any]:
    """The keys of a full run-config that change its results, with their typed values.

    ``config`` is what ``config.json`` holds (or a planned run-config merged with the
    app's defaults); keys it lacks take their default, as a resume reads them.
    """
    given = {k: v for k, v in config.items() if k not in NOT_RUN_CONFIG}
    cfg = RunConfig.from_run_config(given, check_files=False)
    identity = cfg.experiment_identity()
    if centralized:
        identity |= {key: cfg.to_dict()[key] for key in CENTRALIZED_KEYS}
    return identity


def differing(made: Mapping[str, Any], planned: Mapping[str, Any]) -> list[str]:
    """``key=made there, planned here`` for every key whose values differ."""
    keys = sorted(set(made) | set(planned))
    return [
        f"{k}={made.get(k)!r} there, {planned.get(k)!r} planned"
        for k in keys
        if made.get(k) != planned.get(k)
    ]


def made_identity(run_dir: Path, centralized: bool) -> tuple[dict[str, Any] | None, str]:
    """The identity a run folder was made with, or (None, why it cannot be read)."""
    path = run_dir / "config.json"
    try:
        return result_identity(json.loads(path.read_text()), centralized), ""
    except FileNotFoundError:
        return None, ""
    except (ValueError, ConfigError) as exc:
        return None, f"its config.json is not a run-config of this version ({exc})"


def run_mismatch(run: Planned, defaults: Mapping[str, Any]) -> list[str]:
    """Why ``run``'s folder is not the planned run (empty: absent, or the planned run)."""
    made, unreadable = made_identity(run.run_dir, run.centralized)
    if unreadable:
        return [unreadable]
    if made is None:
        return []
    return differing(made, result_identity(dict(defaults) | run.config, run.centralized))


@dataclass(frozen=True)
class StudyBase:
    """What every run of a study folder shares: the scale and the base run-config."""

    scale: str
    identity: dict[str, Any]

    def to_json(self) -> str:
        return json.dumps({"scale": self.scale, "base": self.identity}, indent=2, sort_keys=True)


def study_base(
    scale: str, base: Mapping[str, Any], defaults: Mapping[str, Any], centralized: bool = False
) -> StudyBase:
    """The base of a study: app defaults <- scale's preset <- the sweep's overrides."""
    identity = result_identity(dict(defaults) | dict(base), centralized)
    identity.pop("seed", None)  # every sweep runs its own seeds
    return StudyBase(scale, identity)


def read_study_base(study_dir: Path) -> StudyBase | None:
    path = study_dir / STUDY_RECORD
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return StudyBase(str(data.get("scale", "?")), dict(data.get("base", {})))


def study_mismatch(study_dir: Path, base: StudyBase) -> list[str]:
    """Why the study folder's runs share another base than ``base`` (empty: the same)."""
    held = read_study_base(study_dir)
    if held is None:
        return []
    diffs = differing(held.identity, base.identity)
    if held.scale != base.scale:
        diffs.insert(0, f"scale={held.scale!r} there, {base.scale!r} planned")
    return diffs


def refusal(folder: Path, diffs: list[str], others: int) -> str:
    """One line: the folder, the first differing keys, and the way out."""
    shown = "; ".join(diffs[:SHOWN_KEYS])
    more = f"; {len(diffs) - SHOWN_KEYS} more keys" if len(diffs) > SHOWN_KEYS else ""
    also = f" ({others} more folders differ too)" if others else ""
    return (
        f"{folder} was made with another run-config ({shown}{more}){also}: choose another "
        "--output-dir, or add --move-aside to move such folders into "
        f"{MOVED_ASIDE}/ beside them"
    )


def move_aside(folder: Path) -> Path:
    """Move ``folder`` into ``moved-aside/`` beside it, under a timestamped name."""
    target = folder.parent / MOVED_ASIDE / f"{folder.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(folder), str(target))
    return target


def check_locks(runs: Iterable[Planned]) -> None:
    """A planned run's folder that a live process writes is refused (run_lock)."""
    for run in runs:
        holder = is_locked(run.run_dir)
        if holder is not None:
            raise ConfigError(locked_message(run.run_dir, holder))


def check_study_folders(
    runs: list[Planned],
    bases: Mapping[Path, StudyBase],
    defaults: Mapping[str, Any],
    move: bool,
    log: Callable[[str], None] = print,
) -> None:
    """Refuse (or with ``move``, move aside) every study folder and planned run folder
    made with another run-config, before any run starts; then record each study's base."""
    check_locks(runs)
    studies = [(d, study_mismatch(d, base)) for d, base in bases.items()]
    bad_studies = [(d, diffs) for d, diffs in studies if diffs]
    if bad_studies and not move:
        folder, diffs = bad_studies[0]
        raise ConfigError(refusal(folder, diffs, len(bad_studies) - 1))
    for folder, _ in bad_studies:
        log(f"moved {folder} to {move_aside(folder)} (made with another run-config)")
    bad_runs = [(r.run_dir, diffs) for r in runs if (diffs := run_mismatch(r, defaults))]
    if bad_runs and not move:
        folder, diffs = bad_runs[0]
        raise ConfigError(refusal(folder, diffs, len(bad_runs) - 1))
    for folder, _ in bad_runs:
        log(f"moved {folder} to {move_aside(folder)} (made with another run-config)")
    for folder, base in bases.items():
        atomic_write_bytes(folder / STUDY_RECORD, (base.to_json() + "\n").encode())
