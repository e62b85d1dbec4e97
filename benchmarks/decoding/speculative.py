"""Batch-1 greedy decoding, plain against self-speculative (MTP drafts), on one checkpoint.

For each held-out prompt (the first ``--prompt-tokens`` tokens of the last ``--prompts``
stories of ``--data``), both ways decode ``--new-tokens`` tokens, alternating which goes
first so a busy machine's drift hits both alike. Reports tokens/s of each, their ratio,
the mean drafts accepted per verification step, the first draft's acceptance rate, and
whether the outputs were identical (greedy speculation must not change them).

    python benchmarks/decoding/speculative.py --checkpoint runs/x/latest.pt \\
        --data /work/shared/data/tinystories/train.txt

Fills BENCHMARKS.md, section "Speculative decoding".
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from deepseek_mini.evaluation import read_documents
from deepseek_mini.inference.generate import generate
from deepseek_mini.inference.loading import load_for_inference
from deepseek_mini.inference.speculative import SpeculativeStats
from deepseek_mini.model.sizes import draft_cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, _ = load_for_inference(args.checkpoint)
    docs = read_documents(args.data)[-args.prompts:]
    prompts = [torch.tensor([tok.encode(d)[:args.prompt_tokens]]) for d in docs]
    generate(model, prompts[0], 4)  # warm-up
    seconds = {"plain": 0.0, "speculative": 0.0}
    tokens = {"plain": 0, "speculative": 0}
    stats, same = SpeculativeStats(), True
    for i, prompt in enumerate(prompts):
        order = ["plain", "speculative"] if i % 2 == 0 else ["speculative", "plain"]
        outs = {}
        for way in order:
            started = time.perf_counter()
            outs[way] = generate(model, prompt, args.new_tokens, speculative=way != "plain",
                                 stats=stats if way != "plain" else None)
            seconds[way] += time.perf_counter() - started
            tokens[way] += outs[way].shape[1] - prompt.shape[1]
        same &= torch.equal(outs["plain"], outs["speculative"])
    rate = {way: tokens[way] / seconds[way] for way in seconds}
    print(json.dumps({
        "checkpoint": args.checkpoint, "threads": torch.get_num_threads(),
        "draft_cost": round(draft_cost(model.config), 3),
        "plain_tokens_per_s": round(rate["plain"], 2),
        "speculative_tokens_per_s": round(rate["speculative"], 2),
        "speedup": round(rate["speculative"] / rate["plain"], 3),
        "accepted_per_step": round(stats.accepted_per_round, 3),
        "first_draft_acceptance": round(stats.first_acceptance, 3),
        "identical_outputs": bool(same)}))


if __name__ == "__main__":
    main()
