"""The analysis notebook run as `jupyter nbconvert --execute` would, from the project root."""

from __future__ import annotations

import os
from pathlib import Path

from tests.conftest import ROOT


def execute_notebook(monkeypatch, results_dir: Path, report_dir: Path):
    """Run analysis.ipynb as Jupyter started in ROOT would: the kernel in notebooks/, the
    shell's PWD = ROOT, RESULTS_DIR relative to ROOT."""
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("PWD", str(ROOT))
    monkeypatch.setenv("RESULTS_DIR", os.path.relpath(results_dir, ROOT))
    monkeypatch.setenv("REPORT_DIR", str(report_dir))
    notebook = nbformat.read(ROOT / "notebooks" / "analysis.ipynb", as_version=4)
    client = NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT / "notebooks")}},
    )
    client.execute()
    return notebook


def notebook_texts(notebook) -> list[str]:
    return [
        o.get("text", "")
        + str(o.get("data", {}).get("text/markdown", ""))
        + str(o.get("data", {}).get("text/plain", ""))
        for c in notebook.cells
        if c.cell_type == "code"
        for o in c.outputs
    ]
