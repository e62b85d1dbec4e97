"""Running the project the way a user does, in other processes, for the tests that need
that: a benchmark script or ``python -m deepseek_mini`` from the checkout's root (this
checkout's ``src`` first on the path, offline, one thread), ``torchrun`` over the CLI,
and forked ranks of a gloo group on a free local port."""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
STDERR_TAIL = 3000  # characters of a failed child's stderr that a test failure shows


def child_env() -> dict[str, str]:
    """This process's environment with the checkout's ``src`` first on ``PYTHONPATH`` (so
    the child runs this tree's code even where another copy is installed), no hub access,
    one OpenMP thread and no tokenizer thread pool."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}


def run_python(*args: str, timeout: float = 300, stdin: str | None = None
               ) -> subprocess.CompletedProcess:
    """``python *args`` from the checkout's root, its output captured as text."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=child_env(), input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def run_ok(*args: str, timeout: float = 300, stdin: str | None = None
           ) -> subprocess.CompletedProcess:
    """``run_python`` that fails the test, showing the end of stderr, unless it exits 0."""
    done = run_python(*args, timeout=timeout, stdin=stdin)
    assert done.returncode == 0, done.stderr[-STDERR_TAIL:]
    return done


def run_benchmark(script: str, *args: str) -> subprocess.CompletedProcess:
    """``python benchmarks/<script> *args`` as its docstring says to run it (the script's
    folder first on sys.path), which must exit 0."""
    return run_ok(f"benchmarks/{script}", *args)


def torchrun(*cli_args: str, processes: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node <processes> -m deepseek_mini *cli_args``,
    the user-facing launch (torchrun picks the port), which must exit 0."""
    return run_ok("-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                  str(processes), "-m", "deepseek_mini", *cli_args)


def start_cli(*args: str, **popen: object) -> subprocess.Popen:
    """``python -m deepseek_mini *args`` started, not awaited, stdout and stderr piped, for
    a test that talks to it or signals it while it runs."""
    return subprocess.Popen([sys.executable, "-m", "deepseek_mini", *args], env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_rank(rank: int, world: int, port: int) -> None:
    """In a forked child: the environment torchrun would give rank ``rank`` of ``world``
    on this machine, and one torch thread."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)


def run_forked(target: Callable[..., None], world: int, args: tuple, timeout: float) -> None:
    """``target(rank, world, port, *args)`` in ``world`` forked children sharing a free port
    (the test process's imports are reused, which saves each rank seconds of start-up on a
    busy machine); each waited for up to ``timeout`` seconds, then killed. Fails the test
    unless every child exits 0."""
    ctx = multiprocessing.get_context("fork")
    port = free_port()
    procs = [ctx.Process(target=target, args=(rank, world, port, *args)) for rank in range(world)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=timeout)
        if proc.is_alive():
            proc.kill()
    assert [proc.exitcode for proc in procs] == [0] * world
