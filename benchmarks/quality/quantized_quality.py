"""What quantization costs in quality: held-out CE of one checkpoint with fp32, bf16 and
int8 weights (``load_for_inference(..., quantize=)``), and greedy continuations of the
same prompts: the share of new tokens equal to fp32's, position by position, and how
many tokens each row keeps before its first difference.

The scored text is ``--docs`` documents of ``--data`` starting at ``--skip`` (the last
ones of the file by default, never seen by the warm start); the prompts are the opening
``--prompt-words`` words of the ``--prompts`` documents before them (of the first scored
ones when a whole held-out file is scored, ``--skip 0``). All three modes score the same
windows (``evaluation.evaluate``) in one process.

    deepseek-mini warm-start --config configs/smollm2-moe.yaml --out smollm2-moe.pt
    python benchmarks/quality/quantized_quality.py --checkpoint smollm2-moe.pt \\
        --data ../shared/data/tinystories/train.txt --docs 300
    python benchmarks/quality/quantized_quality.py --checkpoint run/best.pt --data heldout.txt \\
        --skip 0 --docs 100000

Fills BENCHMARKS.md, section "Quantization quality".
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from deepseek_mini import generate, load_for_inference, quantize
from deepseek_mini.evaluation import (
    count_bytes,
    deepseek_forward,
    evaluate,
    read_documents,
    select_segments,
    token_stream,
)
from deepseek_mini.inference.prompts import encode_prompts
from deepseek_mini.model.quantize import KERNELS


def greedy(model, tok, prompts: list[str], new_tokens: int) -> torch.Tensor:
    ids, mask, new = encode_prompts(tok, prompts, model.config.max_position, new_tokens)
    out = generate(model, ids, new, attention_mask=mask)  # no eos: every row runs its length
    return out[:, ids.shape[1]:]


def agreement(tokens: torch.Tensor, reference: torch.Tensor) -> tuple[float, float, float]:
    """(share of positions equal to the reference, mean tokens before the first change,
    share of prompts whose every new token equals the reference's)."""
    same = tokens == reference
    prefix = same.long().cumprod(dim=1).sum(dim=1).float()
    return (float(same.float().mean()), float(prefix.mean()),
            float(same.all(dim=1).float().mean()))


def load(checkpoint: str, mode: str):
    """The checkpoint in ``mode``: fp32, bf16, int8 (this CPU's kernel) or int8-KERNEL."""
    if not mode.startswith("int8-"):
        return load_for_inference(checkpoint, quantize=None if mode == "fp32" else mode)
    model, tok, cfg = load_for_inference(checkpoint)
    return quantize(model, "int8", mode.removeprefix("int8-")), tok, cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--docs", type=int, default=300)
    parser.add_argument("--skip", type=int, default=None,
                        help="first scored document (default: the last --docs of the file)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-words", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", nargs="+", default=["fp32", "bf16", "int8"],
                        choices=["fp32", "bf16", "int8", *(f"int8-{k}" for k in KERNELS)],
                        help="fp32 first (the reference); int8-KERNEL: that int8 kernel")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    docs = read_documents(args.data)
    skip = len(docs) - args.docs if args.skip is None else args.skip
    scored = docs[skip:skip + args.docs]
    # a held-out file scored whole has no documents before it: prompt from its first ones
    openings = docs[skip - args.prompts:skip] if skip >= args.prompts else scored
    prompts = [" ".join(d.split()[:args.prompt_words]) for d in openings[:args.prompts]]
    rows = {}
    reference = None
    for mode in args.modes:
        start = time.perf_counter()
        model, tok, _ = load(args.checkpoint, mode)
        load_s = time.perf_counter() - start
        segments = select_segments(scored, tok, None)
        stream = token_stream(segments, tok.encode_batch, tok.eos_id)
        with torch.inference_mode():
            result = evaluate(deepseek_forward(model), stream, args.seq_len, args.batch_size,
                              torch.device("cpu"), count_bytes(segments), progress=False)
        tokens = greedy(model, tok, prompts, args.new_tokens)
        reference = tokens if reference is None else reference
        rows[mode] = (result, agreement(tokens, reference), load_s)
        if mode.startswith("int8"):
            print(f"{mode} sample:", prompts[0] + tok.decode(tokens[0].tolist()), flush=True)
        del model
        gc.collect()
    print(f"{args.checkpoint}: {rows['fp32'][0].tokens:,} held-out tokens ({len(scored)} "
          f"documents from {skip}), {args.prompts} greedy continuations of "
          f"{args.new_tokens} tokens; threads {args.threads}")
    print("| weights | CE (nats/token) | vs fp32 | bits/byte | tokens equal to fp32's | "
          "tokens before the first change | prompts equal throughout | load + quantize s |")
    print("|---|---|---|---|---|---|---|---|")
    base = rows[args.modes[0]][0].ce
    for mode, (result, (share, prefix, whole), load_s) in rows.items():
        print(f"| {mode} | {result.ce:.4f} | {result.ce - base:+.4f} | {result.bpb:.4f} | "
              f"{100 * share:.1f}% | {prefix:.1f} | {100 * whole:.0f}% | {load_s:.1f} |")


if __name__ == "__main__":
    main()
