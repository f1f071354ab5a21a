"""``flower-supernode`` that sends its heartbeat every few seconds and declares a 10 s
interval, the least the SuperLink accepts (``HEARTBEAT_MIN_INTERVAL``), so the SuperLink
gives up on a killed node after 20 s instead of Flower's default 60 s.

Flower 1.42 has no option for it: the SuperNode sends the module constant
``HEARTBEAT_DEFAULT_INTERVAL``, read where it is used, so both users are set here before
the SuperNode starts. ``COMMAND`` runs this file (from any working directory) with
``flower-supernode``'s arguments.
"""

from __future__ import annotations

import sys
from pathlib import Path

from flwr.common.constant import HEARTBEAT_MIN_INTERVAL
from flwr.supercore import heartbeat
from flwr.supernode import fleet_http_connection
from flwr.supernode.cli import flower_supernode

COMMAND = [sys.executable, str(Path(__file__).resolve())]

if __name__ == "__main__":
    heartbeat.HEARTBEAT_DEFAULT_INTERVAL = HEARTBEAT_MIN_INTERVAL
    fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL = HEARTBEAT_MIN_INTERVAL
    sys.argv[0] = "flower-supernode"
    sys.exit(flower_supernode())
