"""Sweep runner: every setting of a study x seeds, then tables, plots and one report.

``python -m flower_app.studies.experiments STUDY [--quick] [--seeds N] [--output-dir DIR]
[--settings a,b] [--strategies fedavg,fedprox,...] [--engine in-process|flwr] [key=value ...]``
(or ``fl-experiments``). With ``--engine flwr`` (the default without ``--quick``) federated
runs go through ``flwr run`` on one local SuperLink that the runner starts with its own
FLWR_HOME and stops by PID at the end; each run's status is read back from ``flwr ls`` and a
run counts as a result only when Flower says it completed and its ``summary.json`` exists.
With ``--engine in-process`` (the default with ``--quick``, the miniature study) the same
ServerApp and ClientApp run in this process (``flower_app.studies.in_process``; the two engines
compute the same numbers), by default one run per core side by side (``--jobs``,
``flower_app.studies.run_pool``). The centralized baseline runs as its console script (in this
process with ``in-process``). A backbone of ``fl-pretrain`` that a run names and that is
missing is made first. Before any run starts, every run's prerequisites (data, weights,
output folder) are checked as ``fl-run`` checks them, and every folder the sweep would reuse
must have been made with the planned run-config (``flower_app.studies.run_folders``).
Started again, a sweep skips finished runs and resumes interrupted ones from their
checkpoint. Results land in ``DIR/STUDY/<setting>-seed<k>/`` (``DIR``: ``results/miniature``
with ``--quick``, else ``results/paper``), with ``sweep.csv``, ``table.csv``, ``table.md``
and the plots beside them, and ``DIR/report.md`` holds every study's table and figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from flower_app.centralized.pretrain import PretrainError, ensure_backbone
from flower_app.cli.local_superlink import LocalSuperLink
from flower_app.cli.run import federation_config
from flower_app.config import (
    ConfigError,
    RunConfig,
    app_defaults,
    parse_pairs,
    write_run_config,
)
from flower_app.models.backbone_cache import backbone_seed, make_command
from flower_app.runs.checkpoint import CHECKPOINT_NAME
from flower_app.runs.prerequisites import check_prerequisites
from flower_app.runs.results import atomic_write_bytes, result_line
from flower_app.server_app import plan_for
from flower_app.studies.catalog import (
    ALL,
    DEFAULT_TASKS,
    STUDIES,
    Setting,
    base_config,
    crossed,
    expand,
    study_settings,
)
from flower_app.studies.engines import ENGINES, console_writer, run_here
from flower_app.studies.in_process import run_in_process
from flower_app.studies.reports import (
    MANIFEST,
    MANIFEST_COLUMNS,
    findings,
    read_summary,
    write_report,
    write_sweep_report,
)
from flower_app.studies.run_folders import StudyBase, check_study_folders, study_base
from flower_app.studies.run_pool import AUTO, ProcessPool, SerialPool, make_pool, parse_jobs
from flower_app.studies.shared_runs import FinishedRuns, copy_run, run_key

DEFAULT_RUN_TIMEOUT_S = 24 * 3600.0
DEFAULT_JOBS = AUTO  # --jobs: one run per core in-process (flower_app/studies/run_pool.py)
# the default --output-dir per scale: a paper-scale sweep never finds the miniature's runs
DEFAULT_OUTPUT = {True: Path("results/miniature"), False: Path("results/paper")}


@dataclass(frozen=True)
class PlannedRun:
    """One run of the sweep: its study, setting, seed and full run-config."""

    study: str
    setting: Setting
    seed: int
    config: dict[str, Any]
    study_dir: Path

    @property
    def name(self) -> str:
        return f"{self.setting.name}-seed{self.seed}"

    @property
    def run_dir(self) -> Path:
        return self.study_dir / self.name

    @property
    def centralized(self) -> bool:
        return self.setting.centralized

    @property
    def num_clients(self) -> int:
        return RunConfig.from_run_config(self.config, check_files=False).num_clients


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fl-experiments", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("study", choices=[*STUDIES, ALL], help="which study to run")
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="default: results/miniature with --quick, results/paper without",
    )
    parser.add_argument("--seeds", type=int, default=1, help="independent seeds 0..N-1")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the miniature: synthetic data, the tiny ViT of fl-pretrain (a CPU)",
    )
    parser.add_argument(
        "--tasks",
        type=int,
        default=DEFAULT_TASKS,
        help="task-arithmetic: disjoint class blocks, one federation each (default 2 halves)",
    )
    parser.add_argument("--settings", default="", help="only these settings (comma separated)")
    add_run_options(parser)
    parser.add_argument("overrides", nargs="*", help="run-config key=value for every run")
    return parser.parse_intermixed_args(argv)


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """How the sweep runs its plan: strategies, engine, federation, folders, limits."""
    parser.add_argument(
        "--strategies",
        default="",
        help="cross each setting with these server strategies (comma separated): fedavg, "
        "fedprox, or a server-rule (fedavgm, fedadam, fedyogi, fedadagrad, fedmedian, "
        "fedtrimmedavg, krum)",
    )
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default=None,
        help="in-process (default with --quick): the ServerApp and ClientApps in this process, "
        "no Ray; flwr (default otherwise): each run through flwr run (Flower's simulation)",
    )
    parser.add_argument(
        "--federation-config",
        default="",
        help='added to "num-supernodes=K"; default: the resources fl-run picks (docs/gpu.md)',
    )
    parser.add_argument(
        "--jobs",
        default=DEFAULT_JOBS,
        help="runs side by side (in-process engine), each with its share of the cores; "
        "auto (default): one per core in-process, one at a time with flwr",
    )
    parser.add_argument("--app", type=Path, default=Path.cwd(), help="the Flower app folder")
    parser.add_argument("--run-timeout", type=float, default=DEFAULT_RUN_TIMEOUT_S)
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    parser.add_argument(
        "--move-aside",
        action="store_true",
        help="move study and run folders made with another run-config into moved-aside/ "
        "(without it such a folder stops the sweep before any run)",
    )


def check_app_dir(app: Path) -> Path:
    """The app folder, resolved: it must hold a pyproject.toml with the app's run-config."""
    app = app.expanduser().resolve()
    app_defaults(app)  # raises the one-line --app error
    return app


def plan(args: argparse.Namespace) -> list[PlannedRun]:
    """Every run of the sweep with its validated run-config (no work starts on a bad one)."""
    if args.seeds < 1:
        raise ConfigError(f"--seeds {args.seeds} is not allowed: must be an integer >= 1")
    overrides = parse_pairs(args.overrides)
    for key in ("seed", "output-dir", "run-name", "resume"):
        if key in overrides:
            raise ConfigError(f"override {key!r} is not allowed: the sweep runner sets it per run")
    wanted = [s for s in args.settings.split(",") if s]
    strategies = [s for s in args.strategies.split(",") if s]
    output_dir = output_dir_of(args)
    defaults = app_defaults(args.app)
    runs: list[PlannedRun] = []
    for study in expand(args.study):
        federated_base = defaults | base_config(args.app, args.quick, centralized=False)
        settings = study_settings(study, federated_base | overrides, args.tasks)
        if wanted:
            names = [s.name for s in settings]
            unknown = [w for w in wanted if w not in names]
            if unknown and args.study != ALL:
                raise ConfigError(
                    f"--settings {','.join(unknown)} is not allowed for study {study!r}: "
                    f"choose from {', '.join(names)}"
                )
            settings = [s for s in settings if s.name in wanted]
        settings = crossed(settings, strategies)
        study_dir = output_dir / study
        for setting in settings:
            base = base_config(args.app, args.quick, setting.centralized)
            for seed in range(args.seeds):
                config = base | setting.overrides | overrides | {"seed": seed}
                run = PlannedRun(study, setting, seed, config, study_dir)
                config |= {"output-dir": str(study_dir), "run-name": run.name}
                check_run_config(config)  # raises the one-line error
                run_federation(args.federation_config, run.num_clients)  # and for this one
                runs.append(run)
    if not runs:
        raise ConfigError(f"--settings {args.settings!r} selects no run of study {args.study!r}")
    return runs


def output_dir_of(args: argparse.Namespace) -> Path:
    """``--output-dir``, or the scale's default, absolute."""
    return (args.output_dir or DEFAULT_OUTPUT[args.quick]).expanduser().resolve()


def scale_of(args: argparse.Namespace) -> str:
    return "miniature" if args.quick else "paper"


def study_bases(args: argparse.Namespace, runs: list[PlannedRun]) -> dict[Path, StudyBase]:
    """Each study folder's base (the scale's preset and the sweep's overrides)."""
    defaults, overrides = app_defaults(args.app), parse_pairs(args.overrides)
    bases = {}
    for run in runs:
        if run.study_dir not in bases:
            centralized = all(r.centralized for r in runs if r.study == run.study)
            base = base_config(args.app, args.quick, centralized) | overrides
            bases[run.study_dir] = study_base(scale_of(args), base, defaults, centralized)
    return bases


def check_outside(runs: list[PlannedRun]) -> None:
    """What every run needs from outside (data, weights, output folder, tracker), checked
    as ``fl-run`` checks it, each distinct need once: a sweep that cannot run stops here,
    in seconds, before anything is written."""
    seen: set[tuple] = set()
    for run in runs:
        cfg = RunConfig.from_run_config(run.config, check_files=False)
        need = (cfg.output_dir, cfg.dataset, str(cfg.data_path), cfg.download, cfg.weights)
        need += (cfg.model, cfg.pretrained_path, cfg.tracking)
        if need not in seen:
            seen.add(need)
            check_prerequisites(cfg, run_folder=False)


def run_federation(given: str, num_clients: int) -> str:
    """``num-supernodes=K`` plus ``--federation-config``, checked as ``fl-run`` checks it;
    with CUDA and no client resources given, those ``fl-run`` picks (two workers per GPU,
    docs/gpu.md). On a CPU the sweep keeps Flower's default of 2 CPUs per client: its
    workers then compute with the threads of the in-process engine on a 2-core machine,
    so both engines give the same bits (in-process with ``--jobs 1``)."""
    import torch

    items = [given] if given.strip() else []
    chosen = federation_config(items, num_clients)  # raises the one-line error
    if torch.cuda.is_available():
        return chosen
    return f"num-supernodes={num_clients} {given}".strip()


def engine_of(args: argparse.Namespace) -> str:
    """``--engine``, or its default: in-process for the miniature (``--quick``), else flwr."""
    return args.engine or ("in-process" if args.quick else "flwr")


def backbone_to_make(cfg: RunConfig) -> tuple[Path, int] | None:
    """The ``fl-pretrain`` backbone the run names, with its seed, if it is missing (also
    with weights=random: the run-config check wants every named file to exist)."""
    seed = backbone_seed(cfg.pretrained_path)
    path = Path(os.path.expanduser(cfg.pretrained_path)).absolute()
    return (path, seed) if seed is not None and not path.is_file() else None


def check_run_config(config: dict[str, Any]) -> None:
    """Every key and file of a run, except a backbone the runner will make first."""
    cfg = RunConfig.from_run_config(config, check_files=False)
    cfg.check_data_dir()
    if backbone_to_make(cfg) is None:
        cfg.check_pretrained_path()


def backbones_to_make(runs: list[PlannedRun]) -> dict[Path, int]:
    """The missing backbones the runs start from (-> their pretraining seed)."""
    configs = (RunConfig.from_run_config(r.config, check_files=False) for r in runs)
    return dict(filter(None, (backbone_to_make(cfg) for cfg in configs)))


def make_backbones(runs: list[PlannedRun]) -> None:
    """Make the missing backbones (``fl-pretrain``'s training, a minute on a CPU)."""
    for path, seed in backbones_to_make(runs).items():
        ensure_backbone(path, seed, log=lambda line: print(line, flush=True))


def record(
    run: PlannedRun,
    status: str,
    seconds: float,
    detail: str = "",
    keep: bool = False,
    engine: str = "",
) -> None:
    """Add or replace the run's line in its study's manifest (sweep.csv).

    ``keep`` leaves an existing line as it is (a skipped run keeps its first record);
    ``engine`` is the engine that ran it (the study's tables and figures name it).
    """
    path = run.study_dir / MANIFEST
    frame = pd.read_csv(path, keep_default_na=False) if path.is_file() else None
    if keep and frame is not None and run.name in set(frame["run-name"]):
        return
    row = {
        "study": run.study,
        "setting": run.setting.name,
        "seed": run.seed,
        "run-name": run.name,
        "status": status,
        "seconds": round(seconds, 1),
        "engine": engine,
        "detail": detail.replace("\n", " ")[:300],
    }
    rows = [] if frame is None else frame.to_dict("records")
    rows = [r for r in rows if r["run-name"] != run.name] + [row]
    data = pd.DataFrame(rows, columns=MANIFEST_COLUMNS).to_csv(index=False)
    atomic_write_bytes(path, data.encode())


def prepare(run: PlannedRun) -> str:
    """``done`` (skip), ``resume`` (checkpoint of an interrupted run) or ``fresh``.

    A run directory without summary and without checkpoint is what an interrupted or
    failed run left behind; it is removed so the run can start again.
    """
    if read_summary(run.run_dir) is not None:
        return "done"
    if (run.run_dir / CHECKPOINT_NAME).is_file():
        return "resume"
    if run.run_dir.exists():
        shutil.rmtree(run.run_dir)
    return "fresh"


class RunProgress:
    """Prints a running run's latest round from its ``metrics.csv`` (written every round),
    so a sweep shows where a run is, not only when it ends; named, as runs may run side by
    side."""

    def __init__(self, run: PlannedRun, write: Callable[[str], None] = print) -> None:
        self.name = run.name
        self.path = run.run_dir / "metrics.csv"
        self.total = plan_for(RunConfig.from_run_config(run.config, check_files=False)).total_rounds
        self.write = write
        self.last: int | None = None

    def __call__(self) -> None:
        try:
            row = pd.read_csv(self.path).iloc[-1]
        except (OSError, pd.errors.EmptyDataError, IndexError):
            return  # not written yet
        if int(row["round"]) == self.last:
            return
        self.last = int(row["round"])
        accuracy = row.get("val-accuracy")
        shown = f" | val-accuracy {accuracy:.4f}" if pd.notna(accuracy) else ""
        self.write(f"    {self.name}: round {self.last}/{self.total} ({row['phase']}){shown}")


class SweepRunner:
    """Runs planned runs one after another on ``engine``; with ``flwr`` it starts the
    SuperLink on first need."""

    def __init__(
        self,
        app_dir: Path,
        output_dir: Path,
        federation: str,
        timeout: float,
        engine: str = "flwr",
    ) -> None:
        self.app_dir = app_dir
        self.output_dir = output_dir
        self.federation = federation
        self.timeout = timeout
        self.engine = engine
        self.link: LocalSuperLink | None = None

    def stop(self) -> None:
        if self.link is not None:
            self.link.stop()
            self.link = None

    def log_path(self, run: PlannedRun) -> Path:
        path = run.study_dir / "logs" / f"{run.name}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def run(self, run: PlannedRun, resume: bool) -> tuple[bool, str]:
        """Run it; (completed, detail). Failure details name the log to read."""
        config = run.config | ({"resume": True} if resume else {})
        configs = run.study_dir / "run-configs"
        configs.mkdir(parents=True, exist_ok=True)
        toml = write_run_config(configs / f"{run.name}.toml", config)
        if run.setting.centralized:
            return self._centralized(run, toml)
        if self.engine == "in-process":
            return self._in_process(run, config)
        return self._federated(run, toml)

    def _in_process(self, run: PlannedRun, config: dict[str, Any]) -> tuple[bool, str]:
        """The run as ``flwr run`` would merge it (app defaults + its run-config), here."""
        log = self.log_path(run)
        merged = RunConfig.from_run_config(app_defaults(self.app_dir) | config).to_dict()
        progress = RunProgress(run, console_writer())
        ok, error = run_here(lambda: run_in_process(merged), log, progress)
        if ok and read_summary(run.run_dir) is not None:
            return True, "in-process"
        return False, f"{error or 'no summary written'}; log: {log}; last line: {_last_line(log)}"

    def _federated(self, run: PlannedRun, toml: Path) -> tuple[bool, str]:
        if self.link is None:
            self.link = LocalSuperLink.start(self.output_dir / ".flwr-home")
        federation = run_federation(self.federation, run.num_clients)
        progress = RunProgress(run, lambda line: print(line, flush=True))
        outcome = self.link.run_to_end(
            self.app_dir, toml, federation, timeout=self.timeout, on_poll=progress
        )
        log = self.log_path(run)
        log.write_text(outcome.log)
        name = f"flwr run {outcome.run_id}"
        if outcome.completed and read_summary(run.run_dir) is not None:
            return True, name
        status = f"timed out after {self.timeout:.0f} s" if outcome.timed_out else outcome.status
        return False, f"{name} {status}; log: {log}; last line: {_last_line(log)}"

    def _centralized(self, run: PlannedRun, toml: Path) -> tuple[bool, str]:
        log = self.log_path(run)
        if self.engine == "in-process":
            return self._centralized_here(run, toml, log)
        with open(log, "w") as out:
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "flower_app.centralized.baseline",
                    "--run-config",
                    str(toml),
                ],
                cwd=self.app_dir,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=self.timeout,
                check=False,
            )
        if proc.returncode == 0 and read_summary(run.run_dir) is not None:
            return True, "centralized"
        return False, f"exit {proc.returncode}; log: {log}; last line: {_last_line(log)}"

    def _centralized_here(self, run: PlannedRun, toml: Path, log: Path) -> tuple[bool, str]:
        from flower_app.centralized import (
            baseline as centralized,  # the trainer: imported when a run needs it
        )

        codes: list[int] = []
        work = lambda: codes.append(centralized.main(["--run-config", str(toml)]))  # noqa: E731
        ok, error = run_here(work, log, poll=lambda: None)
        if ok and codes == [0] and read_summary(run.run_dir) is not None:
            return True, "centralized"
        reason = error or f"exit {codes[0] if codes else '?'}"
        return False, f"{reason}; log: {log}; last line: {_last_line(log)}"


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][-200:] if lines else "(empty log)"


def _accuracy(run: PlannedRun) -> str:
    summary = read_summary(run.run_dir)
    if summary is None or summary.get("final-test-accuracy") is None:
        return ""
    return f" | {result_line(summary, 'epoch' if run.centralized else 'round')}"


def main(argv: list[str] | None = None) -> int:
    """Plan, make missing backbones, run what is not finished, write tables, plots and the
    report; exit 1 if any run failed, 2 on bad input (before any run)."""
    args = parse_args(argv)
    try:
        args.app = check_app_dir(args.app)
        runs = plan(args)
        jobs = parse_jobs(args.jobs, engine_of(args))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    engine, root = engine_of(args), runs[0].study_dir.parent
    studies = list(dict.fromkeys(r.study for r in runs))
    print(
        f"{len(runs)} runs in {', '.join(studies)} -> {root} (scale: {scale_of(args)}, "
        f"engine: {engine}{f', {jobs} at a time' if jobs > 1 else ''})",
        flush=True,
    )
    if args.dry_run:
        return dry_run(runs)
    try:
        check_outside(runs)
        defaults, bases = app_defaults(args.app), study_bases(args, runs)
        check_study_folders(runs, bases, defaults, args.move_aside)
        make_backbones(runs)
    except (ConfigError, PretrainError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t_sweep = time.perf_counter()
    runner = SweepRunner(args.app, root, args.federation_config, args.run_timeout, engine)
    try:
        finished = FinishedRuns.scan(root)
        failed = run_all(runs, runner, t_sweep, finished, defaults, make_pool(jobs))
    finally:
        runner.stop()
    for study in studies:
        outputs = write_report(root / study, study)
        print(f"{study}: " + ", ".join(str(p) for p in outputs.values()), flush=True)
    command = " ".join(["fl-experiments", *(argv if argv is not None else sys.argv[1:])])
    # every study the folder holds, so a folder filled by several sweeps has one report
    held = [s for s in STUDIES if (root / s / MANIFEST).is_file()]
    report = write_sweep_report(root, held, command, engine, time.perf_counter() - t_sweep)
    print(f"report: {report}", flush=True)
    for study in studies:
        print("\n".join(findings(root / study, study)), flush=True)
    if failed:
        print(f"{failed} of {len(runs)} runs failed; they are not in the tables", flush=True)
    return 1 if failed else 0


def dry_run(runs: list[PlannedRun]) -> int:
    """Print the plan and what it would need first; run and write nothing."""
    try:
        check_outside(runs)
    except ConfigError as exc:
        print(f"missing: {exc}")
    for path in backbones_to_make(runs):
        print(f"first: {make_command(path)} (the pretrained backbone {path} is missing)")
    for i, run in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {run.study}/{run.name}: {run.config}")
    return 0


@dataclass
class Outcome:
    """How one planned run ended. ``state``: ``done`` (finished before this sweep), ``copy``
    (of the identical finished run ``source``), or ``fresh``/``resume`` (run by this sweep)."""

    state: str
    ok: bool = True
    detail: str = ""
    seconds: float = 0.0
    source: Path | None = None

    @property
    def status(self) -> str:
        if self.state == "done":
            return "skipped (finished earlier)"
        if self.state == "copy":
            return f"the same run as {_run_label(self.source)}, copied"
        return f"{self.state.replace('fresh', 'run')}, completed" if self.ok else "FAILED"


def _run_label(run_dir: Path | None) -> str:
    return f"{run_dir.parent.name}/{run_dir.name}" if run_dir is not None else ""


def run_all(
    runs: list[PlannedRun],
    runner: SweepRunner,
    t_sweep: float,
    finished: FinishedRuns | None = None,
    defaults: dict[str, Any] | None = None,
    pool: SerialPool | ProcessPool | None = None,
) -> int:
    """Each run (skipped when finished, resumed from a checkpoint, copied from an identical
    finished run of ``finished``), up to ``pool.jobs`` at a time; the failures.

    A run identical to one under way waits for it and is then copied. Lines and
    ``sweep.csv`` rows come in plan order, whatever order the runs end in.
    """
    sweep = _Sweep(runs, runner, t_sweep, finished, defaults or {}, pool or SerialPool())
    try:
        while sweep.waiting or sweep.running:
            sweep.start_what_fits()
            sweep.collect()
            sweep.report_in_order()
    finally:
        sweep.pool.shutdown()
        sweep.report_the_rest()
    return sweep.failed


class _Sweep:
    """``run_all``'s state: runs waiting, under way (future -> index, state) and ended but
    not yet reported (an earlier one is still under way)."""

    def __init__(
        self,
        runs: list[PlannedRun],
        runner: SweepRunner,
        t_sweep: float,
        finished: FinishedRuns | None,
        defaults: dict[str, Any],
        pool: SerialPool | ProcessPool,
    ) -> None:
        self.runs, self.runner, self.t_sweep = runs, runner, t_sweep
        self.finished, self.pool = finished, pool
        # what each run computes, where identical runs are shared (None: never shared)
        self.keys = [
            None if finished is None or run.centralized else run_key(defaults | run.config)
            for run in runs
        ]
        self.waiting = list(range(len(runs)))
        self.running: dict[Future, tuple[int, str]] = {}
        self.ended: dict[int, Outcome] = {}
        self.shown = self.failed = 0

    def start_what_fits(self) -> None:
        """Waiting runs in plan order while a slot is free; one whose twin is under way
        stays waiting (it is copied once that one ends)."""
        for i in list(self.waiting):
            if len(self.running) >= self.pool.jobs:
                return
            busy = {self.keys[j] for j, _ in self.running.values()}
            if self.keys[i] is None or self.keys[i] not in busy:
                self.waiting.remove(i)
                self.start(i)

    def start(self, i: int) -> None:
        """Skip, copy or submit run ``i``."""
        run, key = self.runs[i], self.keys[i]
        run.study_dir.mkdir(parents=True, exist_ok=True)
        state = prepare(run)
        source = None
        if state == "fresh" and key is not None and self.finished is not None:
            source = self.finished.find_key(key)
        if state == "done":
            self.end(i, Outcome("done"))
        elif source is not None:
            t_copy = time.perf_counter()
            copy_run(source, run.run_dir)
            self.end(i, Outcome("copy", seconds=time.perf_counter() - t_copy, source=source))
        else:
            self.report_in_order()  # a serial pool runs it now: earlier lines first
            self.running[self.pool.submit(self.runner.run, run, state == "resume")] = (i, state)

    def collect(self) -> None:
        """Wait for at least one run under way to end (none when nothing is under way)."""
        if not self.running:
            return
        done, _ = wait(self.running, return_when=FIRST_COMPLETED)
        for future in done:
            i, state = self.running.pop(future)
            try:
                ok, detail, seconds = future.result()
            except Exception as exc:  # its worker process died (memory, a signal)
                ok, detail, seconds = False, f"{type(exc).__name__}: {exc}", 0.0
            self.end(i, Outcome(state, ok, detail, seconds))

    def end(self, i: int, outcome: Outcome) -> None:
        """Keep the outcome for its turn; a completed run joins the finished ones."""
        self.ended[i] = outcome
        key = self.keys[i]
        if outcome.ok and key is not None and self.finished is not None:
            self.finished.add_key(key, self.runs[i].run_dir)

    def report_in_order(self) -> None:
        while self.shown in self.ended:
            outcome = self.ended.pop(self.shown)
            self.failed += not outcome.ok
            self.report(self.shown, outcome)
            self.shown += 1

    def report_the_rest(self) -> None:
        """After an interrupt: what ended is still recorded, out of order if it must be."""
        for i in sorted(self.ended):
            self.report(i, self.ended.pop(i))

    def report(self, i: int, outcome: Outcome) -> None:
        """The run's ``sweep.csv`` row and its line."""
        run = self.runs[i]
        if outcome.state == "done":
            record(run, "completed", 0.0, "finished before this sweep started", keep=True)
        elif outcome.state == "copy":
            detail, engine = f"same run as {_run_label(outcome.source)}", ""
            if outcome.source is not None:
                engine = engine_in(outcome.source)
            record(run, "completed", 0.0, detail, engine=engine)
        else:
            status = "completed" if outcome.ok else "failed"
            record(run, status, outcome.seconds, outcome.detail, engine=self.runner.engine)
        elapsed = time.perf_counter() - self.t_sweep
        line = f"[{i + 1}/{len(self.runs)}] {run.study}/{run.name}: {outcome.status} in "
        line += f"{outcome.seconds:.1f} s (elapsed {elapsed:.0f} s){_accuracy(run)}"
        print(line + (f" | {outcome.detail}" if not outcome.ok else ""), flush=True)


def engine_in(run_dir: Path) -> str:
    """The engine that made a finished run, from its study's manifest ('' if unknown)."""
    path = run_dir.parent / MANIFEST
    if not path.is_file():
        return ""
    frame = pd.read_csv(path, keep_default_na=False)
    rows = frame[frame["run-name"] == run_dir.name]
    return str(rows["engine"].iloc[-1]) if len(rows) else ""


if __name__ == "__main__":
    sys.exit(main())
