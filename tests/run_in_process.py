"""Run the ServerApp with an in-process Grid from a JSON run-config (a killable subprocess).

``python -m tests.run_in_process CONFIG.json``: the whole simulation lives in this one
process, so SIGKILL of it is a crash of the simulation at an arbitrary point.
"""

from __future__ import annotations

import json
import sys

from flower_app.studies.in_process import run_in_process as run

__all__ = ["run"]

if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        run(json.load(f))
