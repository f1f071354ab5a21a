"""Everything a run needs from outside, checked together before Flower starts the work.

A run needs its data, its initial weights, a writable output folder, the package of its
tracker if it has one, and a run folder it may take: a new name, or with resume=true a
checkpoint that no live process is writing. Finding out one at a time (the data after
the SuperNodes came up, the weights after the data, each after a minute of download
retries) costs a new user several attempts; here every missing piece is found in one
pass, in seconds, and reported in one line. Reachability is one TCP connection with a
short timeout (``flower_app/models/network.py``), not a download.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from flower_app.config import ConfigError, RunConfig
from flower_app.models.network import reachable
from flower_app.runs.checkpoint import CHECKPOINT_NAME
from flower_app.runs.results import existing_run_message
from flower_app.runs.run_lock import is_locked, locked_message
from flower_app.runs.tracking import PACKAGES, missing_extra


class PrerequisiteError(ConfigError):
    """Something a run needs is missing; the message lists every missing piece, one line."""


def data_problem(cfg: RunConfig, online: Callable[[str], bool] | None = None) -> str:
    """Why the run's data cannot be had, or "": only a set its registry entry downloads,
    with download=true and nothing local, has a host to reach (a missing local copy with
    download=false, or a user's folder that does not fit, is a run-config error, reported
    by ``RunConfig``; generated sets are always there)."""
    download = cfg.dataset_spec.download
    if download is None or not cfg.download or download.present(cfg.data_path):
        return ""
    if (online or reachable)(download.url):
        return ""
    return download.unreachable_problem(cfg.data_path)


def weights_problem(
    cfg: RunConfig,
    cached: Callable[[str], bool] | None = None,
    offline: Callable[[], bool] | None = None,
) -> str:
    """Why the initial weights cannot be had, or "" (a pretrained-path is checked by
    ``RunConfig``)."""
    if cfg.weights != "pretrained" or cfg.pretrained_path:
        return ""
    # imported here: the factory imports timm (about 1.8 s), which a run from random or
    # local weights, and every refusal of a bad value by fl-run, never needs
    from flower_app.models.factory import hub_weights_problem

    return hub_weights_problem(cfg.model, cached, offline)


def output_problem(output_dir: str) -> str:
    """Why run folders cannot be made under ``output_dir``, or "" (creates nothing: the
    nearest existing folder on the path must take a new file)."""
    folder = Path(os.path.expanduser(output_dir)).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    reason = f"{existing} is not a folder" if not existing.is_dir() else ""
    if not reason:
        try:
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as exc:
            reason = exc.strerror or str(exc)
    if not reason:
        return ""
    return (
        f"run-config key 'output-dir' = {output_dir!r} is not allowed: cannot write to "
        f"{folder} ({reason})"
    )


def tracker_problem(cfg: RunConfig) -> str:
    """The missing package of the chosen tracker, or "" (looked up, not imported: wandb's
    import alone takes seconds)."""
    if cfg.tracking == "none" or importlib.util.find_spec(PACKAGES[cfg.tracking]) is not None:
        return ""
    return missing_extra(cfg.tracking)


def missing_checkpoint_message(path: Path) -> str:
    """Why resume=true cannot continue: ``path`` (the checkpoint file) does not exist."""
    return (
        f"run-config key 'resume' = True is not allowed: no checkpoint at {path} "
        "(a run writes one every checkpoint-every rounds)"
    )


def run_folder_problem(cfg: RunConfig) -> str:
    """Why the run may not take its run folder, or "": a fresh run needs a new name, a
    resumed one a checkpoint that no live process is writing (``run_lock``). A run
    without a run-name gets a new timestamped folder."""
    if not cfg.run_name:
        return ""
    folder = Path(os.path.expanduser(cfg.output_dir)).resolve() / cfg.run_name
    if not cfg.resume:
        return existing_run_message(cfg.run_name, folder) if folder.exists() else ""
    if not (folder / CHECKPOINT_NAME).is_file():
        return missing_checkpoint_message(folder / CHECKPOINT_NAME)
    holder = is_locked(folder)
    return "" if holder is None else locked_message(folder, holder)


def check_prerequisites(cfg: RunConfig, run_folder: bool = True) -> None:
    """Raise one ``PrerequisiteError`` naming every missing prerequisite, or return.

    ``run_folder=False`` leaves the run folder to the caller (the sweep runner decides
    per folder whether a run is done, resumed or fresh).
    """
    checks = (
        output_problem(cfg.output_dir),
        data_problem(cfg),
        weights_problem(cfg),
        tracker_problem(cfg),
        run_folder_problem(cfg) if run_folder else "",
    )
    problems = [p for p in checks if p]
    if problems:
        raise PrerequisiteError("; ".join(problems))
