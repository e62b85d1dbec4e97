"""A real server for the serving tests: a tiny checkpoint with the tiny BPE, loaded the
way ``serve`` loads it, behind uvicorn on a free port of 127.0.0.1 in a thread. Its
weights make positions matter, so the tests that hold the server's text equal to
``generate``'s would see a token fed at the wrong position."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import tiny_run
import torch

from deepseek_mini import DeepSeekMini
from deepseek_mini.data.tokenizer import Tokenizer
from deepseek_mini.files import atomic_save
from deepseek_mini.inference.batcher import Batcher
from deepseek_mini.inference.loading import load_for_inference


@dataclass
class Served:
    url: str
    batcher: Batcher
    model: DeepSeekMini
    tok: Tokenizer
    checkpoint: Path


def tiny_checkpoint(root: Path, max_position: int = 1024,
                    position_sensitive: bool = False) -> Path:
    """A tiny untrained checkpoint; ``position_sensitive`` redraws its projections so
    its greedy text changes when a token is fed at the wrong RoPE position (at the usual
    initialisation it would not, and a server off by one would pass for ``generate``)."""
    cfg = tiny_run.small_config(vocab_size=tiny_run.VOCAB, max_position=max_position)
    cfg.data.tokenizer = tiny_run.tiny_overrides(root)[-2].split("=", 1)[1]
    torch.manual_seed(0)
    model = DeepSeekMini(cfg.model)
    if position_sensitive:
        tiny_run.position_sensitive(model)
    path = root / "best.pt"
    atomic_save({"model": model.state_dict(), "config": cfg.to_dict()}, path)
    return path


@contextmanager
def running_server(root: Path, max_batch: int = 4) -> Iterator[Served]:
    from deepseek_mini.serve.app import create_app
    from deepseek_mini.serve.server import bind, make_server

    checkpoint = tiny_checkpoint(root, position_sensitive=True)
    model, tok, _ = load_for_inference(checkpoint)
    batcher = Batcher(model, tok.eos_id, max_batch).start()
    sock = bind("127.0.0.1", 0)
    server = make_server(create_app(batcher, tok, "deepseek-mini"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield Served(f"http://127.0.0.1:{sock.getsockname()[1]}", batcher, model, tok,
                     checkpoint)
    finally:
        server.should_exit = True
        thread.join(10)
        batcher.close()
        sock.close()
