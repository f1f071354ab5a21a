"""Run the ServerApp with an in-process Grid from a JSON run-config (a killable subprocess).

``python -m tests.run_in_process CONFIG.json``: the whole simulation lives in this one
process, so SIGKILL of it is a crash of the simulation at an arbitrary point.
"""

from __future__ import annotations

import json
import sys

from flower_app import client_app, server_app
from tests.conftest import InProcessGrid, server_context


def run(config: dict) -> None:
    grid = InProcessGrid(client_app.app, config, num_nodes=int(config["num-clients"]))
    context = server_context(config)
    server_app.main(grid, context)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        run(json.load(f))
