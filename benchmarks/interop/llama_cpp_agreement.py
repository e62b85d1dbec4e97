"""How closely llama.cpp reproduces a checkpoint from its GGUF export, per weight type and
KV-cache type: greedy tokens equal to ``generate``'s from the start (per prompt), and
the largest next-token logit difference along llama.cpp's own continuation (our forward
over the same ids, teacher-forced), against the logits' own scale.

    deepseek-mini train --config configs/tiny.yaml --set model.attention=latent_rope \\
        --set model.router=sigmoid --set model.expert_activation=swiglu \\
        --set train.out_dir=runs/tiny-v3
    python benchmarks/interop/llama_cpp_agreement.py --checkpoint runs/tiny-v3/best.pt

Fills BENCHMARKS.md, section "GGUF and llama.cpp".
"""

from __future__ import annotations

import argparse
from pathlib import Path

import _paths  # noqa: F401 (puts benchmarks/ on sys.path)
import torch
from helpers import llama_cpp
from llama_cpp_decode import export_for_llama_cpp

from deepseek_mini.data.instruct import instruct_prompt
from deepseek_mini.inference.generate import generate
from deepseek_mini.inference.loading import load_for_inference
from deepseek_mini.inference.prompts import prompt_ids

PROMPTS = [
    instruct_prompt("Daisy's kite gets stuck in a tree, and Ella helps her get it down with "
                    "a stick.", "excited, fly, kite", "Dialogue"),
    instruct_prompt("A cat finds a red hat and wears it to the park.", "hat, red, jump", None),
    "Once upon a time, there was a little girl named Lily. She loved to",
    "Tom and his dog went to the beach. The sun was",
]


def agreement(checkpoint: Path, gguf_file: Path, new_tokens: int, kv_cache: str | None
              ) -> tuple[list[int], float, float]:
    """(tokens equal from the start per prompt, max |logit difference|, max |logit|)."""
    model, tok, _ = load_for_inference(checkpoint)
    answer = llama_cpp.run(gguf_file, PROMPTS, new_tokens, kv_cache=kv_cache, logits="all",
                           context=1024)
    equal, worst, scale = [], 0.0, 0.0
    for prompt, result in zip(PROMPTS, answer["results"], strict=True):
        ids = prompt_ids(tok, [prompt])[0]
        assert result["prompt_ids"] == ids, "llama.cpp tokenised a prompt differently"
        ours = generate(model, torch.tensor([ids]), max_new_tokens=new_tokens)[0, len(ids):]
        same = [a == b for a, b in zip(ours.tolist(), result["tokens"], strict=True)]
        equal.append(same.index(False) if False in same else len(same))
        with torch.no_grad():
            logits = model(torch.tensor([ids + result["tokens"][:-1]])).logits[0, len(ids) - 1:]
        worst = max(worst, (logits - torch.tensor(result["logits"])).abs().max().item())
        scale = max(scale, logits.abs().max().item())
    return equal, worst, scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--work", default=None, help="folder for the GGUF files "
                                                     "(default: beside the checkpoint)")
    parser.add_argument("--dtypes", nargs="+", default=["f32", "f16", "bf16", "q8_0"])
    parser.add_argument("--new-tokens", type=int, default=48)
    args = parser.parse_args()
    missing = llama_cpp.missing()
    if missing:
        raise SystemExit(f"error: {missing}")
    torch.set_num_threads(1)
    checkpoint = Path(args.checkpoint)
    work = Path(args.work) if args.work else checkpoint.parent
    work.mkdir(parents=True, exist_ok=True)
    print(f"{checkpoint}: {len(PROMPTS)} prompts, {args.new_tokens} greedy tokens each")
    print("| GGUF | KV cache | greedy tokens equal from the start | max logit diff | "
          "max logit |")
    print("|---|---|---|---|---|")
    for dtype in args.dtypes:
        gguf_file = export_for_llama_cpp(checkpoint, dtype, work)
        for kv in ("F32", None):
            equal, worst, scale = agreement(checkpoint, gguf_file, args.new_tokens, kv)
            print(f"| {dtype} | {kv or 'F16 (default)'} | "
                  f"{' / '.join(str(e) for e in equal)} of {args.new_tokens} | "
                  f"{worst:.2e} | {scale:.1f} |")


if __name__ == "__main__":
    main()
