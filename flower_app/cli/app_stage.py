"""The files ``flwr run APP`` packages, copied into a folder of their own before a submission.

Flower 1.42 builds the FAB by walking every file under APP (``flwr.cli.utils.collect_files``)
and only then drops what ``.gitignore`` names. An app folder that holds its virtual
environment (this project's quickstart makes ``.venv`` there, about 56,000 files) costs every
``flwr run`` about 4 CPU-seconds of walking before it submits. ``stage_app`` walks once, never
entering a folder that ``.gitignore`` ignores as a whole, keeps what Flower's own publish
filter keeps, and copies those files (a few hundred) into ``dest``: ``flwr run dest`` then
builds the same FAB, byte for byte, in a fraction of the time.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path


def stage_app(app_dir: Path, dest: Path) -> Path:
    """Copy the files Flower would package from ``app_dir`` into ``dest`` (emptied first)."""
    from flwr.cli.utils import build_pathspec, filter_paths_for_publish, load_gitignore_patterns
    from flwr.supercore.constant import APP_PUBLISH_EXCLUDE_PATTERNS

    app_dir = app_dir.expanduser().resolve()
    patterns = load_gitignore_patterns(app_dir / ".gitignore")
    # a negated pattern could re-include a file below an ignored folder: then walk everything
    prune = not any(p.lstrip().startswith("!") for p in patterns)
    with warnings.catch_warnings():  # pathspec deprecates the pattern kind Flower 1.42 names
        warnings.simplefilter("ignore", DeprecationWarning)
        ignored = build_pathspec([*patterns, *APP_PUBLISH_EXCLUDE_PATTERNS])
        files: dict[str, Path | bytes] = {}
        for dirpath, dirnames, filenames in os.walk(app_dir, followlinks=False):
            folder = Path(dirpath)
            relative = folder.relative_to(app_dir).as_posix()
            prefix = "" if relative == "." else f"{relative}/"
            if prune:
                dirnames[:] = [d for d in dirnames if not ignored.match_file(f"{prefix}{d}/x")]
            for name in filenames:
                path = folder / name
                if not path.is_symlink():  # Flower skips symlinks too
                    files[f"{prefix}{name}"] = path
        kept = filter_paths_for_publish(files)
    if dest.exists():
        shutil.rmtree(dest)
    for relative, source in kept.items():
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)  # type: ignore[arg-type]
    return dest
