"""What ``flwr run .`` sends: the FAB must hold every module of the app's packages.

A SuperNode on another machine installs the app from the FAB alone; on this machine an
editable install would hide a module missing from it (``data/`` in .gitignore once left
``flower_app/data`` out of the FAB while every local test passed).
"""

from __future__ import annotations

import subprocess
import zipfile

from flower_app.cli.local_superlink import flower_executable
from tests.conftest import ROOT

PACKAGES = ("flower_app", "clients", "strategies")


def test_the_fab_holds_every_tracked_module_of_the_app(tmp_path):
    built = subprocess.run(
        [flower_executable("flwr"), "build", "--app", str(ROOT)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (fab,) = tmp_path.glob("*.fab")
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
