"""Running the app: a listening socket opened first (so a busy port is a one-line user
error, and tests can ask for a free port), then uvicorn serving on it."""

from __future__ import annotations

import socket

import uvicorn
from fastapi import FastAPI

from ..errors import UserError


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port`` (port 0: any free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    return sock


def make_server(app: FastAPI) -> uvicorn.Server:
    """A uvicorn server for ``app``, quiet but for errors; ``run(sockets=[bind(...)])``
    serves until Ctrl-C, or until ``should_exit`` is set from another thread."""
    return uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
