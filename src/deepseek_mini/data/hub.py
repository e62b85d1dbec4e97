"""Whether the Hugging Face Hub can be used right now, decided in seconds.

huggingface_hub retries an unreachable host for about 25 s before giving up, and the
address lookup alone can block without a timeout; a command that merely *could* use the
Hub must not make an offline user wait that long, so every Hub route asks here first.
"""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlparse

_TRUTHY = {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    """The user's own switch: HF_HUB_OFFLINE (or the older TRANSFORMERS_OFFLINE)."""
    return any(os.environ.get(k, "").strip().lower() in _TRUTHY
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when offline mode is on or the endpoint does not answer a TCP connect within
    ``timeout`` seconds (the lookup runs in a daemon thread, so it cannot hang us)."""
    if hub_offline():
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])
