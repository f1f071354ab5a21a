"""``fl-run``: one front door for a federated run (``python -m flower_app.cli.run``).

``fl-run [PRESET] [key=value ...] [--federation-config "..." | --connection NAME] [--app DIR]``
merges the app's defaults, a preset and overrides, validates them with ``RunConfig`` before
anything starts, derives ``num-supernodes`` (and client resources) from them, streams
``flwr run`` and exits with the run's real outcome: ``flwr run`` itself exits 0 even when
the run failed, so the status is read back with ``flwr ls``.

Exit codes: 0 the run completed (the last line names its final test accuracy), 1 it
failed (one line ``run ID STATUS: last error`` on stderr), 2 the command or its run-config
is not allowed (nothing was started), 130 interrupted: Ctrl-C stops the run it started
with Flower's own ``flwr stop`` and waits for its ServerApp to end; a second Ctrl-C leaves
at once and names the command that stops the run. SIGTERM (``kill``, ``timeout``, a batch
scheduler's time limit) is taken as Ctrl-C: the run lives in the SuperLink, so an fl-run
ended without stopping it would leave it running unseen.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NoReturn

from flower_app.cli.app_stage import stage_app
from flower_app.cli.local_superlink import RAY_ENV, flower_executable
from flower_app.config import (
    ConfigError,
    RunConfig,
    app_defaults,
    flower_value,
    load_preset,
    parse_pairs,
    write_run_config,
)
from flower_app.runs.prerequisites import check_prerequisites
from flower_app.runs.run_lock import LOCK_NAME, is_locked

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
COMPLETED = "finished:completed"
STATUS_WAIT_S = 60.0  # the status may trail the end of the log stream by a moment
STOP_WAIT_S = 120.0  # a stopped run's ServerApp ends within seconds; then we stop waiting
GPU_SHARE = "0.5"  # two client workers per GPU, one CPU each: the one choice (docs/gpu.md)
RESOURCE_KEYS = ("client-resources-num-cpus", "client-resources-num-gpus")
_STARTED = re.compile(r"Successfully started run (\d+)")  # flwr 1.42, cli/run/run.py
_RESULT = re.compile(r"(final test accuracy .*); results in (.*)$")  # server_app.finish
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line, like every other fl-run error."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see fl-run --help)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(
        prog="fl-run",
        usage="fl-run [PRESET] [key=value ...] [--federation-config ...] [--app DIR]",
        description="Validate a run-config (app defaults <- PRESET <- key=value), run it "
        "with flwr run --stream, exit 0 only if the run completed.",
    )
    parser.add_argument(
        "items",
        nargs="*",
        metavar="PRESET key=value",
        help="a run-config preset (e.g. configs/quick.toml) first, if any, then overrides",
    )
    parser.add_argument(
        "--federation-config",
        action="append",
        default=[],
        help='e.g. "client-resources-num-gpus=0.5"; num-supernodes comes from num-clients',
    )
    parser.add_argument(
        "--connection",
        default="",
        metavar="NAME",
        help="a SuperLink connection in FLWR_HOME/config.toml (Deployment Engine); "
        "without it the run goes to the local simulation",
    )
    parser.add_argument(
        "--app", type=Path, default=Path.cwd(), metavar="DIR", help="the Flower app folder"
    )
    return parser.parse_intermixed_args(argv)


# ---- the run-config -------------------------------------------------------------------------
def split_items(items: list[str]) -> tuple[Path | None, list[str]]:
    """An optional leading preset file, then key=value overrides."""
    if items and "=" not in items[0]:
        return Path(items[0]), items[1:]
    return None, items


def merged_run_config(app: Path, items: list[str], local: bool = True) -> dict[str, Any]:
    """Defaults <- preset <- overrides, validated; values typed as the schema reads them.

    Typed values (not the overrides' strings) go into the file, so the ServerApp and the
    ClientApps see exactly what was validated here. Relative ``output-dir`` and
    ``data-dir`` become absolute from this shell's directory: a run resolves them from
    the directory its SuperLink was started in, which need not be this one. The
    prerequisites (data, weights, output folder) are checked here only for a ``local``
    simulation; in a deployment the ServerApp checks them on the coordinator.
    """
    preset, overrides = split_items(items)
    merged = app_defaults(app)
    if preset is not None:
        merged |= load_preset(preset)
    merged |= parse_pairs(overrides)
    for key in ("output-dir", "data-dir"):
        value = merged.get(key)
        if isinstance(value, str) and value and not value.startswith("~"):
            merged[key] = str(Path(value).absolute())
    cfg = RunConfig.from_run_config(merged, check_files=local)  # unknown keys: closest named
    if local:
        check_prerequisites(cfg)
    resolved = cfg.to_dict()
    return {key: resolved[key] for key in merged}


# ---- the federation -------------------------------------------------------------------------
def machine_resources() -> dict[str, str]:
    """Client resources for this machine: half a GPU per client with CUDA, else CPU only."""
    import torch

    gpus = GPU_SHARE if torch.cuda.is_available() else "0"
    return {"client-resources-num-cpus": "1", "client-resources-num-gpus": gpus}


def federation_config(items: list[str], num_clients: int) -> str:
    """``num-supernodes=K`` from num-clients (the app refuses a mismatch), plus resources.

    Resources the user gave are kept; missing ones are chosen for this machine.
    """
    pairs = parse_pairs(items, "--federation-config")
    given = pairs.pop("num-supernodes", None)
    if given is not None and not _same_int(given, num_clients):
        raise ConfigError(
            f"--federation-config num-supernodes={given} is not allowed: it must equal "
            f"num-clients={num_clients} (or leave it out: fl-run sets it)"
        )
    if any(key not in pairs for key in RESOURCE_KEYS):
        pairs = machine_resources() | pairs
    pairs = {"num-supernodes": str(num_clients)} | pairs
    return " ".join(f"{key}={flower_value(value)}" for key, value in pairs.items())


def _same_int(raw: str, value: int) -> bool:
    try:
        return int(raw) == value
    except ValueError:
        return False


# ---- Flower ---------------------------------------------------------------------------------
def child_env() -> dict[str, str]:
    """The environment of ``flwr``: no per-run dependency install, this venv's bin first.

    ``flwr run`` starts ``flower-superlink`` by name, so the venv's bin goes first on PATH
    (the venv need not be activated); unbuffered, so the log streams as it comes.
    """
    env = RAY_ENV | os.environ
    env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    path = (str(Path(sys.executable).parent), env.get("PATH", ""))
    env["PATH"] = os.pathsep.join(p for p in path if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def flwr_run_command(app: Path, run_config: Path, federation: str, connection: str) -> list[str]:
    """``flwr run APP [CONNECTION] --stream --run-config FILE [--federation-config ...]``."""
    return [
        flower_executable("flwr"),
        "run",
        str(app),
        *([connection] if connection else []),
        "--stream",
        "--run-config",
        str(run_config),
        *(["--federation-config", federation] if federation else []),
    ]


def flwr_run(command: list[str], env: dict[str, str], lines: list[str]) -> int:
    """Run ``flwr run --stream``, echo its output line by line into ``lines`` (which the
    caller keeps on Ctrl-C: the run id is in them); its exit code."""
    with subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    ) as proc:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                lines.append(_ANSI.sub("", line).rstrip("\n"))
        except KeyboardInterrupt:
            proc.terminate()  # the stream only: the run goes on in the SuperLink
            raise
    return proc.returncode


def run_status(run_id: int, env: dict[str, str], connection: str = "") -> dict[str, Any]:
    """The run's ``flwr ls`` entry, waiting (up to STATUS_WAIT_S) until it is finished."""
    deadline = time.monotonic() + STATUS_WAIT_S
    target = [connection] if connection else []
    while True:
        out = subprocess.run(
            [flower_executable("flwr"), "ls", *target, "--run-id", str(run_id), "--format", "json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        try:
            run = json.loads(out.stdout)["runs"][0]
        except (ValueError, KeyError, IndexError):
            text = (out.stdout + out.stderr).strip().replace("\n", " ")
            return {"status": "unknown", "status-details": f"flwr ls: {text[-300:]}"}
        if run["status"].startswith("finished") or time.monotonic() > deadline:
            return run
        time.sleep(1.0)


# ---- the outcome ----------------------------------------------------------------------------
def started_run_id(lines: Iterable[str]) -> int | None:
    """The id in flwr's ``Successfully started run <id>`` line, if it started one."""
    for line in lines:
        match = _STARTED.search(line)
        if match:
            return int(match.group(1))
    return None


def last_error_line(lines: Iterable[str]) -> str:
    """The last log line that reports an error: a traceback's ``...Error: message`` line.

    Case-sensitive on purpose: Flower ends a failed run with ``ERROR : Exit Code: 700``,
    which says nothing; the exception line just before it says what went wrong.
    """
    found = ""
    for line in lines:
        if "is not allowed" in line or "Error" in line or "error" in line:
            found = line.strip()
    return found


def result_of(lines: Iterable[str]) -> str:
    """The run's result as its ServerApp printed it last (``server_app.finish``), or ""."""
    found = ""
    for line in lines:
        match = _RESULT.search(line)
        if match:
            found = f"{match.group(1)}; results in {match.group(2).strip()}"
    return found


def outcome(run_id: int, status: dict[str, Any], lines: list[str]) -> int:
    """0 for a completed run, whose result is the last line; else one line ``run ID
    STATUS: error`` on stderr and 1."""
    if status["status"] == COMPLETED:
        result = result_of(lines)
        print(f"run {run_id} completed" + (f": {result}" if result else ""), flush=True)
        return 0
    reason = last_error_line(lines) or status.get("status-details") or "(no error in the log)"
    print(f"run {run_id} {status['status']}: {reason}", file=sys.stderr)
    return EXIT_FAILED


def fail(message: str, code: int) -> int:
    print(message.replace("\n", " "), file=sys.stderr)
    return code


def prepare(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """The validated run-config and the federation config ("" for a deployment, whose
    federation is the SuperNodes that joined); raises ConfigError, starts nothing."""
    if args.connection and args.federation_config:
        raise ConfigError(
            "--federation-config is not allowed with --connection: a deployed federation "
            "is the SuperNodes that joined its SuperLink"
        )
    config = merged_run_config(args.app, args.items, local=not args.connection)
    if args.connection:
        return config, ""
    return config, federation_config(args.federation_config, config["num-clients"])


def submit(
    app: Path, config: dict[str, Any], federation: str, connection: str, lines: list[str]
) -> int:
    """Write the run-config to a temp TOML (flwr reads it at once) and stream the run of the
    app's packaged files, staged beside it (``app_stage``: no walk through a ``.venv``)."""
    with tempfile.TemporaryDirectory(prefix="fl-run-") as tmp:
        toml = write_run_config(Path(tmp) / "run-config.toml", config)
        staged = stage_app(app, Path(tmp) / "app")
        command = flwr_run_command(staged, toml, federation, connection)
        return flwr_run(command, child_env(), lines)


def stop_command(run_id: int, connection: str) -> list[str]:
    return [flower_executable("flwr"), "stop", str(run_id), *([connection] if connection else [])]


def interrupted(run_id: int | None, config: dict[str, Any], connection: str) -> int:
    """Ctrl-C: stop the run this command started (``flwr stop``) and wait until its
    ServerApp has ended; a second Ctrl-C leaves at once, naming the stop command."""
    if run_id is None:
        return fail("fl-run: interrupted before a run started", EXIT_INTERRUPTED)
    command = stop_command(run_id, connection)
    print(
        f"fl-run: interrupted; stopping run {run_id} and waiting for its ServerApp to end "
        "(Ctrl-C again leaves it running)",
        file=sys.stderr,
        flush=True,
    )
    try:
        subprocess.run(command, env=child_env(), capture_output=True, timeout=120, check=False)
        ended = wait_until_ended(run_id, config, connection)
    except KeyboardInterrupt:
        message = f"fl-run: left run {run_id}; stop it with: {' '.join(command)}"
        return fail(message, EXIT_INTERRUPTED)
    if not ended:
        return fail(
            f"fl-run: run {run_id} was asked to stop but its ServerApp still runs after "
            f"{STOP_WAIT_S:.0f} s; stop it with: {' '.join(command)}",
            EXIT_INTERRUPTED,
        )
    return fail(f"fl-run: stopped run {run_id}; its ServerApp has ended", EXIT_INTERRUPTED)


def wait_until_ended(run_id: int, config: dict[str, Any], connection: str) -> bool:
    """Whether the run's status is ``finished:*`` and, where its run folder is on this
    machine, its ServerApp has let go of the folder's lock (it holds it until it ends)."""
    deadline = time.monotonic() + STOP_WAIT_S
    status = run_status(run_id, child_env(), connection)
    if not status["status"].startswith("finished"):
        return False
    output = Path(os.path.expanduser(str(config.get("output-dir", "results"))))
    while time.monotonic() < deadline:
        if not any(held_by(run_id, lock.parent) for lock in output.glob(f"*/{LOCK_NAME}")):
            return True
        time.sleep(0.2)
    return False


def held_by(run_id: int, folder: Path) -> bool:
    holder = is_locked(folder)
    return holder is not None and holder.get("flower-run-id") == run_id


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt while the block runs (signals reach the main thread
    only, so elsewhere nothing changes); the previous handler is restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Validate, run, and exit with the run's real outcome (flwr run exits 0 either way)."""
    try:
        args = parse_args(argv)
        args.app = args.app.expanduser().resolve()
        config, federation = prepare(args)
    except ConfigError as exc:
        return fail(f"error: {exc}", EXIT_USAGE)
    lines: list[str] = []
    with sigterm_as_ctrl_c():
        try:
            code = submit(args.app, config, federation, args.connection, lines)
        except KeyboardInterrupt:
            return interrupted(started_run_id(lines), config, args.connection)
    run_id = started_run_id(lines)
    if run_id is None:
        reason = last_error_line(lines) or (lines[-1] if lines else "(no output)")
        return fail(f"flwr run started no run (exit {code}): {reason}", EXIT_FAILED)
    return outcome(run_id, run_status(run_id, child_env(), args.connection), lines)


if __name__ == "__main__":
    sys.exit(main())
