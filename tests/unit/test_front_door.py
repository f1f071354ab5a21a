"""``fl-run``: merge and validate before anything starts, derive the federation, report
the run's real outcome; the Flower calls are faked (the real one: tests/e2e/test_fl_run.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch

from flower_app.cli import run
from flower_app.config import unknown_key_message
from flower_app.runs import prerequisites, run_lock
from flower_app.runs.checkpoint import CHECKPOINT_NAME
from tests.conftest import ROOT

QUICK = str(ROOT / "configs" / "quick.toml")
STARTED = "Successfully started run 4242"


@pytest.fixture
def flwr(monkeypatch):
    """Fake ``flwr run``/``flwr ls``: records the run-config file and the command."""
    seen: dict = {"status": {"status": run.COMPLETED}, "log": [STARTED, "round 1/1 ..."]}

    def fake_run(command, env, lines):
        seen["command"], seen["env"] = command, env
        app = Path(command[2])  # the app's packaged files, staged for this submission
        seen["staged"] = {p.relative_to(app).as_posix() for p in app.rglob("*") if p.is_file()}
        seen["staged-pyproject"] = (app / "pyproject.toml").read_bytes()
        with open(command[command.index("--run-config") + 1], "rb") as f:
            seen["config"] = tomllib.load(f)
        flag = "--federation-config"
        seen["federation"] = command[command.index(flag) + 1] if flag in command else None
        lines.extend(seen["log"])
        if seen.get("interrupt"):
            raise KeyboardInterrupt
        if seen.get("terminate"):  # as from kill, timeout or a batch scheduler
            if signal.getsignal(signal.SIGTERM) is not signal.default_int_handler:
                raise AssertionError("SIGTERM would end fl-run and leave its run running")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this at once
            raise AssertionError("SIGTERM did not interrupt fl-run")
        return 0

    monkeypatch.setattr(run, "flwr_run", fake_run)
    monkeypatch.setattr(
        run, "run_status", lambda run_id, env, connection="": seen["status"] | {"id": run_id}
    )
    return seen


@pytest.fixture
def no_processes(monkeypatch):
    """Fail the test if anything starts a process."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a process was started: {args}")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)


def _assert_staged_from_root(seen: dict) -> None:
    """``flwr run`` was given a copy of the checkout's app (``app_stage``), not the checkout."""
    assert seen["command"][2] != str(ROOT)
    assert seen["staged-pyproject"] == (ROOT / "pyproject.toml").read_bytes()
    assert {"flower_app/server_app.py", "flower_app/client_app.py"} <= seen["staged"]
    assert not any(p.startswith((".venv/", "results/")) for p in seen["staged"])


def _main(*args: str) -> int:
    return run.main([*args, "--app", str(ROOT)])


def test_preset_and_overrides_are_merged_and_num_supernodes_follows_num_clients(flwr):
    assert _main(QUICK, "num-server-rounds=3", "lr=0.1", "num-clients=20") == 0
    config = flwr["config"]
    assert config["num-server-rounds"] == 3 and config["lr"] == 0.1  # typed, not strings
    assert config["model"] == "vit_tiny_test" and config["local-steps"] == 10  # the preset's
    assert config["momentum"] == 0.9 and config["weight-decay"] == 0.0001
    assert config["eval-every"] == 2 and config["checkpoint-every"] == 10  # preset, default
    assert flwr["federation"].split()[0] == "num-supernodes=20"
    assert flwr["command"][1] == "run" and flwr["command"][3] == "--stream"
    _assert_staged_from_root(flwr)


def test_connection_sends_the_run_to_a_deployment_without_local_checks(flwr, monkeypatch):
    monkeypatch.setattr(prerequisites, "reachable", lambda url, timeout=3.0: False)
    coordinator_files = ["dataset=cifar100", "data-dir=/coordinator/data", "download=false"]
    assert _main(QUICK, "num-clients=3", *coordinator_files, "--connection", "lab") == 0
    command = flwr["command"]
    assert command[3:5] == ["lab", "--stream"]
    _assert_staged_from_root(flwr)
    assert "--federation-config" not in command  # the federation is the joined SuperNodes
    assert flwr["config"]["num-clients"] == 3


def test_connection_with_federation_config_is_refused(no_processes, capsys):
    code = _main(QUICK, "--connection", "lab", "--federation-config", "num-supernodes=10")
    assert "--federation-config is not allowed with --connection" in _one_line_error(capsys, code)


def test_relative_output_dir_is_made_absolute_from_here(flwr, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _main(QUICK, "output-dir=runs") == 0
    assert flwr["config"]["output-dir"] == str(tmp_path / "runs")


def test_missing_prerequisites_are_one_line_exit_2_before_flwr(
    no_processes, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(prerequisites, "reachable", lambda url, timeout=3.0: False)
    data = tmp_path / "data"
    code = _main(QUICK, "dataset=cifar100", f"data-dir={data}", f"output-dir={tmp_path}")
    assert f"no CIFAR-100 in {data}" in _one_line_error(capsys, code)


def test_a_missing_tracker_package_is_one_line_exit_2_before_flwr(
    no_processes, tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if the extra were missing
    code = _main(QUICK, "tracking=tensorboard", f"output-dir={tmp_path}")
    error = _one_line_error(capsys, code)
    assert "pip install 'fl-task-arithmetic[tensorboard]'" in error


def test_child_env_disables_dependency_install_and_puts_this_venv_first(flwr, monkeypatch):
    monkeypatch.delenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", raising=False)
    assert _main(QUICK) == 0
    env = flwr["env"]
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert env["PATH"].split(":")[0] == str(run.Path(sys.executable).parent)
    monkeypatch.setenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "0")
    assert run.child_env()["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "0"


@pytest.mark.parametrize(("cuda", "gpus"), [(False, "0"), (True, "0.5")])
def test_client_resources_are_chosen_for_the_machine(flwr, monkeypatch, cuda, gpus):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert _main(QUICK) == 0
    assert flwr["federation"] == (
        f"num-supernodes=10 client-resources-num-cpus=1 client-resources-num-gpus={gpus}"
    )


def test_user_given_resources_are_kept(flwr, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    federation = "client-resources-num-gpus=0.5 num-supernodes=10"
    assert _main(QUICK, "--federation-config", federation) == 0
    assert flwr["federation"] == (
        "num-supernodes=10 client-resources-num-cpus=1 client-resources-num-gpus=0.5"
    )
    federation = "client-resources-num-cpus=4 client-resources-num-gpus=1"
    assert _main(QUICK, "--federation-config", federation) == 0
    assert flwr["federation"] == f"num-supernodes=10 {federation}"


def _one_line_error(capsys, code: int) -> str:
    captured = capsys.readouterr()
    assert code == 2, captured
    assert captured.out == "" and captured.err.count("\n") == 1, captured.err
    return captured.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["num-rounds=3"], "run-config key 'num-rounds' is unknown; did you mean 'num-server-"),
        (["fraction-train=1.5"], "run-config key 'fraction-train' = 1.5 is not allowed"),
        (["lr=fast"], "run-config key 'lr' = 'fast' is not allowed: must be a number"),
        (["--federation-config", "num-supernodes=3"], "num-supernodes=3 is not allowed"),
        (["seed"], "override 'seed' is not allowed: write key=value"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
    ids=["unknown-key", "bad-value", "bad-type", "supernodes", "not-key-value", "bad-option"],
)
def test_bad_input_is_one_line_exit_2_and_starts_nothing(
    no_processes, tmp_path, capsys, args, message
):
    out = tmp_path / "results"
    assert message in _one_line_error(capsys, _main(QUICK, f"output-dir={out}", *args))
    assert not out.exists()


def test_a_bad_value_is_refused_without_importing_the_model_code():
    """A typo costs no model imports: fl-run refuses before timm and the model factory are
    imported (they took about half of the 5-6 s of every refusal)."""
    code = (  # the child may start no process (as no_processes here), so a regression fails
        "import subprocess, sys; from flower_app.cli import run\n"
        "def refuse(*a, **k): raise AssertionError('fl-run started a process')\n"
        "subprocess.run = subprocess.Popen = refuse\n"
        "code = run.main(['configs/quick.toml', 'fraction-train=1.5']); "
        "print(code, sorted(m for m in ('timm', 'flower_app.models.factory') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "2 []", (out.stdout, out.stderr)
    assert "run-config key 'fraction-train' = 1.5 is not allowed" in out.stderr


def test_unknown_key_in_a_preset_is_reported_too(no_processes, tmp_path, capsys):
    preset = tmp_path / "typo.toml"
    preset.write_text('num_server_rounds = 3\nsharding = "iid"\n')
    err = _one_line_error(capsys, _main(str(preset)))
    assert "'num_server_rounds' is unknown; did you mean 'num-server-rounds'" in err  # first


def test_unknown_key_error_suggests_close_keys_or_says_where_keys_are():
    assert "did you mean 'local-steps'?" in unknown_key_message("local-step")
    assert "flower_app/config.py" in unknown_key_message("xyzzy")


def test_missing_preset_is_one_line(no_processes, tmp_path, capsys):
    err = _one_line_error(capsys, _main(str(tmp_path / "nope.toml")))
    assert "does not exist" in err


def test_last_error_line_is_the_last_line_that_reports_an_error():
    lines = [
        "INFO : round 1",
        "ERROR :     Simulation raised an exception",
        "run-config key 'x' = 1 is not allowed: because",
        "INFO : done",
    ]
    assert run.last_error_line(lines) == "run-config key 'x' = 1 is not allowed: because"
    assert run.last_error_line(lines[:2] + lines[3:]) == ""  # Flower's level name: no
    assert run.last_error_line(["RuntimeError: boom  "]) == "RuntimeError: boom"
    assert run.last_error_line(["all fine"]) == ""


def test_started_run_id_reads_flwrs_line():
    assert run.started_run_id(["Loading...", "Successfully started run 123 in federation x"]) == 123
    assert run.started_run_id(["Failed to start run"]) is None


def test_a_failed_run_exits_1_with_its_last_error_line(flwr, capsys):
    """The log's shape is what Flower 1.42 streams for a ServerApp that raised."""
    error = "flower_app.config.ConfigError: run-config key 'output-dir' = '/x' is not allowed"
    flwr["status"] = {"status": "finished:failed", "status-details": "ServerApp failed"}
    flwr["log"] = [
        STARTED,
        "\x1b[91mERROR \x1b[0m:     Simulation raised an exception",
        "Traceback (most recent call last):",
        '  File "flower_app/server_app.py", line 168, in writable_output_dir',
        "    raise ConfigError(",
        error,
        "\x1b[91mERROR \x1b[0m:     Exit Code: 700",
        "An unhandled exception occurred when running the simulation.",
    ]
    assert _main(QUICK) == 1
    assert capsys.readouterr().err == f"run 4242 finished:failed: {error}\n"


def test_a_failed_run_without_an_error_line_reports_flowers_details(flwr, capsys):
    flwr["status"] = {"status": "finished:stopped", "status-details": "stopped by user"}
    assert _main(QUICK) == 1
    assert capsys.readouterr().err == "run 4242 finished:stopped: stopped by user\n"


def test_flwr_run_that_starts_no_run_exits_1(monkeypatch, capsys):
    def fake_run(command, env, lines):
        lines.append("Error: connection refused")
        return 1

    monkeypatch.setattr(run, "flwr_run", fake_run)
    monkeypatch.setattr(run, "run_status", lambda *a: pytest.fail("no run to ask about"))
    assert _main(QUICK) == 1
    assert capsys.readouterr().err == (
        "flwr run started no run (exit 1): Error: connection refused\n"
    )


def test_console_script_is_declared():
    with open(ROOT / "pyproject.toml", "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts["fl-run"] == "flower_app.cli.run:main"


def test_flwr_run_echoes_each_line_and_keeps_it_without_colours(capsys):
    script = "print('\\x1b[91mERROR \\x1b[0m: boom'); print('Successfully started run 5')"
    lines: list[str] = []
    code = run.flwr_run([sys.executable, "-c", script], run.child_env(), lines)
    assert code == 0 and lines == ["ERROR : boom", "Successfully started run 5"]
    assert capsys.readouterr().out == "\x1b[91mERROR \x1b[0m: boom\nSuccessfully started run 5\n"


# ---- the run folder, the result line, Ctrl-C ---------------------------------------------------
def test_an_existing_run_name_without_resume_is_one_line_exit_2(no_processes, tmp_path, capsys):
    (tmp_path / "try").mkdir()
    error = _one_line_error(capsys, _main(QUICK, f"output-dir={tmp_path}", "run-name=try"))
    assert f"'run-name' = 'try' is not allowed: {tmp_path / 'try'} exists already" in error
    assert "add resume=true to continue that run" in error


def test_resume_without_a_checkpoint_is_one_line_exit_2(no_processes, tmp_path, capsys):
    code = _main(QUICK, f"output-dir={tmp_path}", "run-name=nope", "resume=true")
    error = _one_line_error(capsys, code)
    assert f"'resume' = True is not allowed: no checkpoint at {tmp_path / 'nope'}" in error


def test_resuming_a_folder_another_process_writes_is_refused_naming_it(
    no_processes, tmp_path, capsys
):
    folder = tmp_path / "busy"
    folder.mkdir()
    (folder / CHECKPOINT_NAME).write_bytes(b"")
    lock = run_lock.acquire(folder, run_lock.holder_record(7, "/venv/bin/flwr stop 7"))
    try:
        code = _main(QUICK, f"output-dir={tmp_path}", "run-name=busy", "resume=true")
    finally:
        lock.release()
    error = _one_line_error(capsys, code)
    assert f"run folder {folder} is in use by Flower run 7 (pid {os.getpid()} on host" in error
    assert error.endswith("wait for it to end, or stop it with: /venv/bin/flwr stop 7\n")


def test_a_completed_run_ends_with_its_result(flwr, capsys):
    result = "final test accuracy 0.5000 (best validation accuracy 0.6000 at round 3)"
    flwr["log"] = [STARTED, f"INFO :      {result}; results in /r/quick", "INFO :      done"]
    assert _main(QUICK) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"run 4242 completed: {result}; results in /r/quick"


@pytest.fixture
def stops(monkeypatch):
    """``flwr stop`` as fl-run calls it after Ctrl-C: the commands it was given."""
    calls: list[list[str]] = []

    def fake_stop(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_stop)
    return calls


@pytest.mark.parametrize("signal_", ["interrupt", "terminate"], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_stops_the_run_and_waits_for_its_server_app(
    flwr, stops, tmp_path, capsys, signal_
):
    """SIGTERM (kill, timeout, a batch scheduler) is taken as Ctrl-C; SIGTERM's previous
    handler is back afterwards."""
    flwr[signal_] = True
    flwr["status"] = {"status": "finished:stopped"}
    before = signal.getsignal(signal.SIGTERM)
    assert _main(QUICK, f"output-dir={tmp_path}") == run.EXIT_INTERRUPTED
    assert stops == [[run.flower_executable("flwr"), "stop", "4242"]]
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("fl-run: interrupted; stopping run 4242")
    assert err[-1] == "fl-run: stopped run 4242; its ServerApp has ended"
    assert signal.getsignal(signal.SIGTERM) is before


def test_ctrl_c_waits_while_the_server_app_still_holds_its_folder(
    flwr, stops, tmp_path, capsys, monkeypatch
):
    """The lock names run 4242: fl-run waits for it to be released, here until its limit."""
    flwr["interrupt"] = True
    flwr["status"] = {"status": "finished:stopped"}
    (tmp_path / "run").mkdir()
    lock = run_lock.acquire(tmp_path / "run", run_lock.holder_record(4242, "flwr stop 4242"))
    monkeypatch.setattr(run, "STOP_WAIT_S", 0.5)
    try:
        assert _main(QUICK, f"output-dir={tmp_path}") == run.EXIT_INTERRUPTED
    finally:
        lock.release()
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("fl-run: run 4242 was asked to stop but its ServerApp still runs")


def test_a_second_ctrl_c_leaves_at_once_naming_the_stop_command(
    flwr, tmp_path, capsys, monkeypatch
):
    flwr["interrupt"] = True

    def interrupted_again(command, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(subprocess, "run", interrupted_again)
    assert _main(QUICK, f"output-dir={tmp_path}") == run.EXIT_INTERRUPTED
    last = capsys.readouterr().err.splitlines()[-1]
    assert last == f"fl-run: left run 4242; stop it with: {run.flower_executable('flwr')} stop 4242"
