"""``stage_app``: the files ``flwr run`` packages, without walking ignored folders, build the
FAB that Flower builds from the app folder itself."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from flower_app.cli.app_stage import stage_app

PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "toyapp"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "tester"

[tool.flwr.app.components]
serverapp = "toyapp.server:app"
clientapp = "toyapp.client:app"

[tool.flwr.app.config]
rounds = 1
"""


def _app(root: Path, gitignore: str) -> Path:
    root.mkdir()
    (root / "pyproject.toml").write_text(PYPROJECT)
    (root / ".gitignore").write_text(gitignore)
    files = {
        "toyapp/__init__.py": "",
        "toyapp/server.py": "app = None\n",
        "toyapp/client.py": "app = None\n",
        "toyapp/settings.yaml": "a: 1\n",
        "toyapp/__pycache__/server.cpython-311.pyc": "x",
        "toyapp/__pycache__/notes.py": "never packaged\n",
        "results/run/summary.json": "{}",
        "results/keep.json": "{}",
        "data/blob.bin": "binary",
        ".venv/lib/site.py": "the venv\n",
        "docs/guide.md": "# guide\n",
    }
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    (root / "toyapp" / "linked.py").symlink_to(root / "toyapp" / "server.py")
    return root


@pytest.mark.parametrize(
    "gitignore",
    ["results/\n__pycache__/\n", "results/*\n!results/keep.json\n"],
    ids=["ignored-folders-pruned", "a-negated-pattern-walks-everything"],
)
def test_the_staged_app_builds_flowers_fab_byte_for_byte(tmp_path, gitignore):
    app = _app(tmp_path / "app", gitignore)
    staged = stage_app(app, tmp_path / "staged")
    assert build_fab_from_disk(staged) == build_fab_from_disk(app)
    held = {p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()}
    assert {"pyproject.toml", "toyapp/server.py", "toyapp/settings.yaml", "docs/guide.md"} <= held
    assert not {".venv/lib/site.py", "toyapp/linked.py", "data/blob.bin"} & held
    assert ("results/keep.json" in held) == gitignore.startswith("results/*")


def test_staging_again_replaces_what_was_staged(tmp_path):
    app = _app(tmp_path / "app", "results/\n")
    staged = stage_app(app, tmp_path / "staged")
    (app / "docs" / "guide.md").unlink()
    stage_app(app, staged)
    assert not (staged / "docs").exists() and (staged / "toyapp" / "client.py").is_file()
