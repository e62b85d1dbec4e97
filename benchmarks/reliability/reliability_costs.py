"""What the reliability guards cost, as ratios against the work they guard.

1. The non-finite check before every save (``checkpoint.all_finite`` over the weights and
   AdamW state) against the save itself (``files.atomic_save`` of the run's state).
2. The token-id check when a cache is opened (a max over the memory-mapped ids) against
   reading the same file's bytes.
3. The sampled digest of an input file against hashing the whole file.

    python benchmarks/reliability/reliability_costs.py --config configs/tiny.yaml --tokens 50000000

Fills BENCHMARKS.md, section "Reliability costs".
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from deepseek_mini import Config, DeepSeekMini
from deepseek_mini.checkpoint import all_finite, state_tensors
from deepseek_mini.data.sources import sample_digest
from deepseek_mini.files import atomic_save


def median_seconds(work: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def save_guard(config: str, folder: Path, repeats: int) -> None:
    cfg = Config.from_yaml(config)
    model = DeepSeekMini(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randint(0, cfg.model.vocab_size, (1, 16)),
          targets=torch.randint(0, cfg.model.vocab_size, (1, 16))).loss.backward()
    optimizer.step()
    tensors = [*model.parameters(), *state_tensors(list(optimizer.state.values()))]
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    check = median_seconds(lambda: all_finite(tensors), repeats)
    save = median_seconds(lambda: atomic_save(state, folder / "latest.pt"), repeats)
    size = (folder / "latest.pt").stat().st_size
    print(f"non-finite check: {check * 1e3:.1f} ms over {sum(t.numel() for t in tensors):,} "
          f"values; atomic_save {save * 1e3:.1f} ms ({size / 1e6:.0f} MB): "
          f"check / save = {check / save:.3f}")


def cache_guard(tokens: int, folder: Path, repeats: int) -> None:
    path = folder / "train.bin"
    np.random.default_rng(0).integers(0, 49152, tokens, dtype=np.uint16).tofile(path)
    ids = np.memmap(path, dtype=np.uint16, mode="r")
    check = median_seconds(lambda: int(ids.max()), repeats)
    read = median_seconds(path.read_bytes, repeats)
    print(f"token-id check over {tokens:,} cached ids: {check * 1e3:.1f} ms; reading the file "
          f"{read * 1e3:.1f} ms: check / read = {check / read:.2f}")
    whole = median_seconds(lambda: hashlib.sha256(path.read_bytes()).hexdigest(), repeats)
    sampled = median_seconds(lambda: sample_digest(path, path.stat().st_size), repeats)
    print(f"sampled digest of the {path.stat().st_size / 1e6:.0f} MB file: "
          f"{sampled * 1e3:.2f} ms; whole-file SHA-256 {whole * 1e3:.0f} ms: "
          f"sampled / whole = {sampled / whole:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--tokens", type=int, default=50_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        save_guard(args.config, Path(tmp), args.repeats)
        cache_guard(args.tokens, Path(tmp), args.repeats)


if __name__ == "__main__":
    main()
