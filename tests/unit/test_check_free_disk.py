"""scripts/check_free_disk.sh: the install steps stop in one line when the disk is too full."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "check_free_disk.sh"


def _check(need_mb: int, cwd: Path) -> subprocess.CompletedProcess[str]:
    cmd = ["bash", str(SCRIPT), str(need_mb), "the install"]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


def test_enough_space_passes_silently(tmp_path):
    result = _check(1, tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_too_little_space_fails_in_one_line_with_both_figures(tmp_path):
    free_mb = shutil.disk_usage(tmp_path).free // 2**20
    need_mb = free_mb + 10**6
    result = _check(need_mb, tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    prefix = f"error: the install needs about {need_mb} MB free on the disk of {tmp_path}; "
    assert lines[0].startswith(prefix)
    reported_free = int(lines[0].removeprefix(prefix).removesuffix(" MB free"))
    assert abs(reported_free - free_mb) < 1024  # df and statvfs agree, give or take writes


def test_ci_and_quickstart_check_before_they_install():
    for script in (ROOT / ".ci" / "run", ROOT / "quickstart.sh"):
        text = script.read_text()
        assert text.index("scripts/check_free_disk.sh") < text.index("python3 -m venv .venv")
