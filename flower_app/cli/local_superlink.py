"""A local SuperLink that its caller owns: start it, submit runs, read their status, stop it.

``flwr run`` would start a detached SuperLink whose PID nobody knows; here the caller
(a test, the sweep runner, the benchmark) starts it on a free port with its own
FLWR_HOME, so ``flwr run`` reuses it, and ``stop`` ends every process that carries
that FLWR_HOME in its environment (the SuperLink, the ServerApp, Ray's workers), by PID.
``run_to_end`` is the one place that spells a run's life: submit, wait, stop on timeout, log.

The Flower executables are taken from beside the running interpreter (the venv's ``bin``),
so ``.venv/bin/python -m pytest`` works without an activated venv.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from flower_app.cli.app_stage import stage_app

TIMED_OUT = "timeout"  # RunOutcome.status of a run stopped by run_to_end's timeout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_executable(name: str) -> str:
    """Path of a Flower executable (``flwr``, ``flower-superlink``, ...).

    The one beside the running interpreter first (``Path(sys.executable).parent``, the
    venv's ``bin``, also when the venv is not activated), else the one on PATH.
    """
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is neither beside {sys.executable} nor on PATH")
    return found


@dataclass(frozen=True)
class RunOutcome:
    """How a run ended (``LocalSuperLink.run_to_end``).

    ``status`` is Flower's (``finished:completed``, ``finished:failed``, ...) or
    ``TIMED_OUT``; ``log`` is what the run's ServerApp printed; ``seconds`` runs from
    submitting the run until it finished or was stopped (fetching the log not included).
    """

    run_id: int
    status: str
    log: str
    seconds: float

    @property
    def completed(self) -> bool:
        return self.status == "finished:completed"

    @property
    def timed_out(self) -> bool:
        return self.status == TIMED_OUT


@dataclass(frozen=True)
class TlsFiles:
    """PEM files that make a SuperLink serve HTTPS on its one port (Fleet, Control, Runtime).

    Flower 1.42 wants all three (``--ssl-ca-certfile``, ``--ssl-certfile``,
    ``--ssl-keyfile``); SuperNodes, ``flwr`` and the ServerApp's SuperExec trust ``ca_cert``,
    so ``cert`` must name the address they dial (127.0.0.1 here) in its SANs.
    """

    ca_cert: Path
    cert: Path
    key: Path

    def superlink_args(self) -> list[str]:
        return [
            *("--ssl-ca-certfile", str(self.ca_cert)),
            *("--ssl-certfile", str(self.cert)),
            *("--ssl-keyfile", str(self.key)),
        ]


def superlink_security_args(tls: TlsFiles | None, supernode_auth: bool) -> list[str]:
    """``--insecure``, or TLS files (and ``--enable-supernode-auth``, which needs TLS)."""
    if tls is None:
        if supernode_auth:
            raise ValueError("flower-superlink refuses --enable-supernode-auth without TLS")
        return ["--insecure"]
    return [*tls.superlink_args(), *(["--enable-supernode-auth"] if supernode_auth else [])]


def pids_with_env(marker: bytes) -> list[int]:
    """PIDs whose environment holds ``marker`` (a ``KEY=value`` entry), through psutil (so
    wherever psutil reads environments: Linux, macOS, Windows); other users' processes,
    which it may not read, are skipped."""
    key, _, value = marker.decode().partition("=")
    me = os.getpid()
    pids = []
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        with contextlib.suppress(psutil.Error, OSError):
            if proc.environ().get(key) == value:
                pids.append(proc.pid)
    return pids


RUN_PROCESSES = ("flwr-simulation", "flwr-serverapp")  # one per running run, ends with it


def is_run_process(pid: int) -> bool:
    """Whether ``pid`` runs a run's simulation or ServerApp (by its first two arguments:
    the executable, or the interpreter and the script)."""
    try:
        argv = psutil.Process(pid).cmdline()[:2]
    except psutil.Error:
        return False
    return any(Path(arg).name in RUN_PROCESSES for arg in argv)


def run_process_pids(marker: bytes) -> set[int]:
    """PIDs of the runs' own processes (a run's simulation or ServerApp) with ``marker``.

    A process table scan costs milliseconds where a ``flwr ls`` costs a CPU-second, so a
    wait can watch these often and ask ``flwr ls`` as soon as one of them ends.
    """
    return {pid for pid in pids_with_env(marker) if is_run_process(pid)}


def wait_until_gone(marker: bytes, seconds: float) -> bool:
    """Wait up to ``seconds`` until no process carries ``marker``; True when none does."""
    deadline = time.monotonic() + seconds
    while pids_with_env(marker):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


# Ray's coming default, chosen now: it warns (FutureWarning) in every run until one is
# chosen. Actors given no GPU are then no longer hidden from it, so the ClientApp asks
# Ray which GPUs it was given (flower_app.runs.runtime.resolve_device). The user's wins.
RAY_ENV = {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}


def _superlink_env(home: Path, http_port: int, bin_dir: Path) -> dict[str, str]:
    """The environment of a SuperLink the caller owns (and of every ``flwr`` that talks to
    it): its own FLWR_HOME, no per-run installs, Flower's helpers found in ``bin_dir``
    (Flower starts flower-superexec, flwr-simulation, ... by name)."""
    path = [str(bin_dir), os.environ.get("PATH", "")]
    return (
        RAY_ENV
        | os.environ
        | {
            "PATH": os.pathsep.join(p for p in path if p),
            "FLWR_HOME": str(home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
            "PYTHONUNBUFFERED": "1",
        }
    )


@dataclass
class LocalSuperLink:
    """A simulation SuperLink for one test; ``env`` makes ``flwr`` talk to it.

    ``tls`` is set when it serves HTTPS: SuperNodes and connections then trust its CA.
    """

    home: Path
    env: dict[str, str]
    process: subprocess.Popen
    port: int
    supernodes: list[subprocess.Popen] = field(default_factory=list)
    tls: TlsFiles | None = None

    @property
    def marker(self) -> bytes:
        """The environment entry that every process of this SuperLink carries."""
        return f"FLWR_HOME={self.home}".encode()

    @classmethod
    def start(
        cls,
        home: Path,
        timeout: float = 60.0,
        simulation: bool = True,
        *,
        tls: TlsFiles | None = None,
        supernode_auth: bool = False,
    ) -> LocalSuperLink:
        """``simulation=False`` starts a Deployment Engine SuperLink for real SuperNodes.

        ``tls`` serves HTTPS instead of ``--insecure``; ``supernode_auth`` adds
        ``--enable-supernode-auth`` (only registered public keys may join; needs ``tls``).
        """
        security = superlink_security_args(tls, supernode_auth)
        home.mkdir(parents=True, exist_ok=True)
        http_port = free_port()
        superlink = flower_executable("flower-superlink")
        env = _superlink_env(home, http_port, Path(superlink).parent)
        log = open(home / "superlink.out", "wb")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(
            [
                superlink,
                *security,
                *(["--simulation", "--isolation", "subprocess"] if simulation else []),
                "--host",
                "127.0.0.1",
                "--port",
                str(http_port),
                "--database",
                str(home / "state.db"),
            ],
            env=env,
            cwd=home,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        link = cls(home, env, process, http_port, tls=tls)
        link.wait_until_healthy(timeout)
        return link

    def wait_until_healthy(self, timeout: float) -> None:
        """Return once ``/health`` answers; a SuperLink that exits or stays silent is stopped
        and reported with the end of its log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"flower-superlink exited: {self.log()[-2000:]}")
            if self.healthy():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"flower-superlink did not answer on port {self.port} in time")

    def healthy(self) -> bool:
        """Whether ``/health`` answers (over HTTPS, trusting the CA, when ``tls`` is set)."""
        scheme = "https" if self.tls else "http"
        context = ssl.create_default_context(cafile=self.tls.ca_cert) if self.tls else None
        try:
            with urllib.request.urlopen(
                f"{scheme}://127.0.0.1:{self.port}/health", timeout=1, context=context
            ):
                return True
        except OSError:
            return False

    def supernode_connection_args(self) -> list[str]:
        """How a SuperNode reaches this SuperLink: ``--insecure`` or ``--root-certificates CA``."""
        if self.tls is None:
            return ["--insecure"]
        return ["--root-certificates", str(self.tls.ca_cert)]

    def start_supernode(
        self,
        node_config: str,
        *,
        connection_args: Sequence[str] | None = None,
        auth_private_key: Path | None = None,
        cwd: Path | None = None,
        command: Sequence[str] | None = None,
    ) -> subprocess.Popen:
        """A SuperNode process connected to this SuperLink (like a separate machine).

        ``connection_args`` replaces ``supernode_connection_args()`` (to start one that
        should be refused); ``auth_private_key`` is its ``--auth-supernode-private-key``.
        Its output goes to ``supernode-<index>.out`` in FLWR_HOME (see ``supernode_log``);
        ``cwd`` (default FLWR_HOME) is its working directory, so relative paths in a
        run-config can name files that only the coordinator's processes see; ``command``
        replaces ``flower-supernode`` (it gets the same arguments).
        """
        index = len(self.supernodes)
        log = open(self.home / f"supernode-{index}.out", "wb")  # noqa: SIM115
        if connection_args is None:
            connection_args = self.supernode_connection_args()
        auth = ["--auth-supernode-private-key", str(auth_private_key)] if auth_private_key else []
        process = subprocess.Popen(
            [
                *(command or [flower_executable("flower-supernode")]),
                *connection_args,
                *auth,
                "--superlink",
                f"127.0.0.1:{self.port}",
                "--port",
                str(free_port()),
                "--node-config",
                node_config,
            ],
            env=self.env,
            cwd=cwd or self.home,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.supernodes.append(process)
        return process

    def add_connection(self, name: str) -> None:
        """A ``[superlink.NAME]`` entry in FLWR_HOME/config.toml for ``flwr run . NAME``.

        ``insecure = true``, or under TLS ``root-certificates`` = the CA (an absolute path,
        as flwr 1.42 requires).
        """
        config = self.home / "config.toml"
        default = '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
        text = config.read_text() if config.exists() else default
        trust = (
            f"root-certificates = {json.dumps(str(self.tls.ca_cert.resolve()))}"
            if self.tls
            else "insecure = true"
        )
        text += f'\n[superlink.{name}]\naddress = "127.0.0.1:{self.port}"\n{trust}\n'
        config.write_text(text)

    def log(self) -> str:
        return (self.home / "superlink.out").read_text(errors="replace")

    def supernode_log(self, index: int) -> str:
        """What SuperNode ``index`` (in start order) printed."""
        return (self.home / f"supernode-{index}.out").read_text(errors="replace")

    def register_supernode(self, public_key: Path, connection: str) -> int:
        """``flwr supernode register KEY CONNECTION``: the node id the SuperLink assigned.

        Under ``--enable-supernode-auth`` only keys registered this way may join.
        """
        args = ("supernode", "register", str(public_key), connection, "--format", "json")
        out = self.flwr(*args, app_dir=self.home, timeout=120)
        return int(_json_field(out, "node-id", "flwr supernode register failed"))

    def supernode_list(self, connection: str) -> list[dict]:
        """``flwr supernode ls CONNECTION``: the SuperLink's nodes (``node-id``, ``status``)."""
        out = self.flwr(
            "supernode", "ls", connection, "--format", "json", app_dir=self.home, timeout=120
        )
        return _json_field(out, "nodes", "flwr supernode ls failed")

    def flwr(self, *args: str, app_dir: Path, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(
            [flower_executable("flwr"), *args],
            env=self.env,
            cwd=app_dir,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def submit(
        self,
        app_dir: Path,
        run_config: Path,
        federation_config: str = "",
        timeout: float = 600,
        *,
        connection: str = "",
    ) -> int:
        """``flwr run APP [CONNECTION] --run-config FILE [--federation-config ...]``.

        The app's packaged files are staged in FLWR_HOME/app first (``app_stage``: the same
        FAB without walking a ``.venv`` in APP). Returns the run id; raises RuntimeError when
        ``flwr run`` started no run.
        """
        staged = stage_app(app_dir, self.home / "app")
        out = self.flwr(
            "run",
            str(staged),
            *_target(connection),
            "--format",
            "json",
            "--run-config",
            str(run_config),
            *(["--federation-config", federation_config] if federation_config else []),
            app_dir=app_dir,
            timeout=timeout,
        )
        return int(_json_field(out, "run-id", "flwr run did not start a run"))

    def run_log(self, run_id: int, app_dir: Path, connection: str = "") -> str:
        """What the run's ServerApp printed (``flwr log RUN --show``)."""
        target = _target(connection)
        out = self.flwr("log", str(run_id), *target, "--show", app_dir=app_dir, timeout=120)
        return out.stdout + out.stderr

    def stop_run(self, run_id: int, app_dir: Path, connection: str = "") -> None:
        """``flwr stop RUN``: the SuperLink ends the run (the SuperLink keeps running)."""
        self.flwr("stop", str(run_id), *_target(connection), app_dir=app_dir, timeout=120)

    def runs(self, app_dir: Path, connection: str = "") -> list[dict]:
        target = _target(connection)
        out = self.flwr("ls", *target, "--format", "json", app_dir=app_dir, timeout=120)
        return json.loads(out.stdout)["runs"]

    def run_to_end(
        self,
        app_dir: Path,
        run_config: Path,
        federation_config: str = "",
        *,
        connection: str = "",
        timeout: float,
        on_submitted: Callable[[int], None] | None = None,
        on_poll: Callable[[], None] | None = None,
    ) -> RunOutcome:
        """Submit a run, wait until it is ``finished:*``, and return its status and log.

        Without ``connection`` the run goes to this simulation SuperLink (``flwr run APP
        --federation-config ...``); with one (see ``add_connection``) it goes to that
        connection (``flwr run APP CONNECTION``), and ``flwr ls/stop/log`` name it too.
        ``on_submitted(run_id)``, if given, is called once the run is submitted (to act
        on it while it runs); ``timeout`` counts the seconds after it returns;
        ``on_poll()``, if given, is called at every status poll (to show progress).

        A run not finished within ``timeout`` does not raise: it is stopped with ``flwr
        stop`` and its outcome has status ``TIMED_OUT`` ("timeout"), so the caller still
        gets its log. The log (``flwr log RUN --show``) is fetched in every case. Raises
        RuntimeError when ``flwr run`` starts no run; an exception from ``on_submitted``
        propagates and leaves the run to the caller (``stop`` ends it with the SuperLink).
        """
        start = time.monotonic()
        run_id = self.submit(app_dir, run_config, federation_config, connection=connection)
        if on_submitted is not None:
            on_submitted(run_id)
        try:
            status = self.wait_for_run(run_id, app_dir, timeout, connection, on_poll)["status"]
        except TimeoutError:
            self.stop_run(run_id, app_dir, connection)
            status = TIMED_OUT
        seconds = time.monotonic() - start
        return RunOutcome(run_id, status, self.run_log(run_id, app_dir, connection), seconds)

    def wait_for_run(
        self,
        run_id: int,
        app_dir: Path,
        timeout: float,
        connection: str = "",
        on_poll: Callable[[], None] | None = None,
    ) -> dict:
        """The run's entry in ``flwr ls`` once its status is ``finished:*``.

        Each ``flwr ls`` is a new Python process (about a CPU-second), which on a small
        machine competes with the run itself. So the runs' own processes are watched
        (``run_process_pids``) every ``WATCH_S`` instead: ``flwr ls`` is asked at once when
        one ends; while one runs, only every ``ALIVE_POLL_S``; while none runs (the run is
        starting, or ended unseen), at intervals growing from 1 s to 5 s.
        """
        deadline = time.monotonic() + timeout
        interval, next_ls, next_tick = 1.0, 0.0, 0.0
        seen = run_process_pids(self.marker)
        while (now := time.monotonic()) < deadline:
            if now >= next_ls:
                for run in self.runs(app_dir, connection):
                    if int(run["run-id"]) == run_id and run["status"].startswith("finished"):
                        return run
                alive = bool(seen)
                next_ls = time.monotonic() + (ALIVE_POLL_S if alive else interval)
                interval = min(5.0, interval * 1.5)
            if on_poll is not None and now >= next_tick:
                on_poll()
                next_tick = now + 1.0
            time.sleep(WATCH_S)
            current = run_process_pids(self.marker)
            if seen - current:  # a run process ended: ask now
                next_ls, interval = 0.0, 1.0
                seen = current
            else:
                seen |= current
        raise TimeoutError(f"run {run_id} did not finish within {timeout} s")

    def stop(self) -> None:
        """End the SuperLink's process group, then anything else with this FLWR_HOME."""
        marker = self.marker
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            left = pids_with_env(marker)
            if not left:
                break
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            wait_until_gone(marker, 1.0)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


WATCH_S = 0.25  # how often wait_for_run looks for an ended run process
ALIVE_POLL_S = 30.0  # flwr ls while a run process is alive: a fallback, the watch decides


def _json_field(out: subprocess.CompletedProcess, key: str, failed: str) -> Any:
    """``key`` of a ``flwr ... --format json`` answer; anything else is a RuntimeError that
    shows what flwr printed."""
    try:
        return json.loads(out.stdout)[key]
    except (ValueError, KeyError) as exc:
        shown = (out.stdout + out.stderr).strip()[-2000:]
        raise RuntimeError(f"{failed} (exit {out.returncode}): {shown}") from exc


def _target(connection: str) -> list[str]:
    """The SUPERLINK argument of a flwr command: the named connection, or none (local)."""
    return [connection] if connection else []
