"""What one speculative round costs against one plain decoding step, at a given size,
with random weights (so no draft is accepted and every round is pure cost): the bound on
what speculation can gain on this hardware. Batch 1, greedy, alternating, one thread.

    python benchmarks/decoding/speculative_round_cost.py --config configs/smollm2-moe.yaml

Fills BENCHMARKS.md, section "Speculative decoding".
"""

from __future__ import annotations

import argparse
import time

import torch

from deepseek_mini import Config, DeepSeekMini, generate
from deepseek_mini.inference.speculative import SpeculativeStats


def seconds_per_step(model: DeepSeekMini, prompt: torch.Tensor, new_tokens: int,
                     speculative: bool) -> tuple[float, int]:
    """Seconds per decoding round after the first token, and the number of rounds."""
    stats = SpeculativeStats()
    stamps: list[float] = []
    generate(model, prompt, new_tokens, speculative=speculative,
             stats=stats if speculative else None,
             streamer=lambda _: stamps.append(time.perf_counter()))
    rounds = stats.rounds if speculative else len(stamps) - 1
    return (stamps[-1] - stamps[0]) / rounds, rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/smollm2-moe.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--new-tokens", type=int, default=17)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = Config.from_yaml(args.config, ["model.mtp_depth=1", *args.set])
    torch.manual_seed(0)
    model = DeepSeekMini(cfg.model).eval()
    prompt = torch.randint(0, cfg.model.vocab_size, (1, 32),
                           generator=torch.Generator().manual_seed(0))
    best = {False: float("inf"), True: float("inf")}
    for _ in range(args.repeats):
        for speculative in (False, True):
            seconds, _ = seconds_per_step(model, prompt, args.new_tokens, speculative)
            best[speculative] = min(best[speculative], seconds)
    ratio = best[True] / best[False]
    print(f"plain step {1000 * best[False]:.0f} ms, speculative round {1000 * best[True]:.0f} ms: "
          f"a round costs {ratio:.2f} steps, so depth-1 speculation gains at most "
          f"{2 / ratio:.2f}x even when every draft is accepted")


if __name__ == "__main__":
    main()
