"""Is a download source reachable? One TCP connection with a short timeout.

Downloaders retry for a minute or more before giving up offline; one connection attempt
(DNS failure and refusal are immediate) tells the same in at most a few seconds.
"""

from __future__ import annotations

import socket
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0


def reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the URL's host and port opens."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname or "", port), timeout=timeout).close()
    except OSError:
        return False
    return True
