"""llama.cpp itself, from Python: the prebuilt CPU binary of the ``node-llama-cpp`` npm
package, driven through ``scripts/llama_cpp.mjs`` (one JSON request in, one JSON answer
out). The GGUF export's tests check against it and the benchmarks time it.

Install (what ``.ci/run`` does; 85 MB, no compiler, no GPU binaries):

    npm install --prefix .llama-cpp --no-audit --no-fund --omit=optional \\
        node-llama-cpp@3.22.1 @node-llama-cpp/linux-x64@3.22.1

``DEEPSEEK_MINI_LLAMA_CPP`` names another install folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DRIVER = ROOT / "scripts" / "llama_cpp.mjs"
NODE_LLAMA_CPP = "node-llama-cpp@3.22.1"
INSTALL = ("npm install --prefix .llama-cpp --no-audit --no-fund --omit=optional "
           f"{NODE_LLAMA_CPP} @node-llama-cpp/linux-x64@3.22.1")


def package_dir() -> Path:
    return Path(os.environ.get("DEEPSEEK_MINI_LLAMA_CPP", ROOT / ".llama-cpp"))


def missing() -> str | None:
    """Why llama.cpp cannot run here (None: it can)."""
    if shutil.which("node") is None:
        return "node is not installed"
    if not (package_dir() / "node_modules" / "node-llama-cpp" / "package.json").is_file():
        return f"node-llama-cpp is not installed in {package_dir()} ({INSTALL})"
    return None


def run(model: Path, prompts: list[str], max_tokens: int, *, threads: int = 1,
        context: int = 512, kv_cache: str | None = None, logits: str = "none",
        timeout: float = 600) -> dict[str, Any]:
    """llama.cpp's greedy continuation of each prompt (its own tokenisation, BOS as the
    GGUF asks), with timings and, if asked, logits: see the driver's header. ``kv_cache``
    "F32" keeps the cache in fp32 (llama.cpp's default is F16)."""
    request = {"package": str(package_dir()), "model": str(model), "threads": threads,
               "context": context, "kv_cache": kv_cache, "prompts": prompts,
               "max_tokens": max_tokens, "logits": logits}
    done = subprocess.run(["node", str(DRIVER)], input=json.dumps(request), text=True,
                          capture_output=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"llama.cpp failed ({done.returncode}): {done.stderr.strip()}")
    return json.loads(done.stdout)


def decode_rate(model: Path, prompt: str, new_tokens: int, threads: int = 1
                ) -> tuple[float, float]:
    """(prefill seconds, batch-1 decode tokens/s) of one greedy llama.cpp generation of
    ``new_tokens``; the rate counts the steps after the first token, as
    decode_timing.decode_rate does for ours. Each call is a fresh process: load time
    excluded."""
    result = run(model, [prompt], new_tokens, threads=threads,
                 context=new_tokens + 512)["results"][0]
    return result["prefill_s"], (len(result["tokens"]) - 1) / result["decode_s"]
