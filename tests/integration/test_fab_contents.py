"""What ``flwr run .`` sends: the FAB must hold every module of the app's packages.

A SuperNode on another machine installs the app from the FAB alone; on this machine an
editable install would hide a module missing from it (``data/`` in .gitignore once left
``flower_app/data`` out of the FAB while every local test passed).
"""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from flower_app.cli.app_stage import stage_app
from flower_app.cli.local_superlink import flower_executable
from tests.conftest import ROOT

PACKAGES = ("flower_app", "clients", "strategies")


@pytest.fixture(scope="module")
def fab(tmp_path_factory) -> Path:
    """``flwr build --app ROOT``, as a user would build the checkout's app."""
    out = tmp_path_factory.mktemp("fab")
    built = subprocess.run(
        [flower_executable("flwr"), "build", "--app", str(ROOT)],
        cwd=out,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (path,) = out.glob("*.fab")
    return path


def test_the_staged_app_builds_the_same_fab_as_the_checkout(fab, tmp_path):
    """``flwr run`` submissions (fl-run, the sweeps, the tests) go through ``stage_app``."""
    staged = stage_app(ROOT, tmp_path / "app")
    assert not (staged / ".venv").exists() and (staged / "pyproject.toml").is_file()
    assert build_fab_from_disk(staged) == fab.read_bytes()


def test_the_fab_holds_every_tracked_module_of_the_app(fab):
    with zipfile.ZipFile(fab) as archive:
        held = set(archive.namelist())
    tracked = subprocess.run(
        ["git", "ls-files", "--", *PACKAGES], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    modules = {path for path in tracked if path.endswith(".py")}
    assert len(modules) > 50
    assert sorted(modules - held) == []
    assert "pyproject.toml" in held
    assert fab.stat().st_size < 10 * 2**20  # Flower refuses a FAB over 10 MB
