"""The bf16 training step against the fp32 one, ours and transformers' DeepseekV3, paired.

    python benchmarks/training/bf16_step.py --config configs/base.yaml --layers 6 --steps 3

One process builds our model (the trainer's ``train_step`` and fused AdamW) and
transformers' ``DeepseekV3ForCausalLM`` of the same config (contenders.py), then times
optimizer steps round after round, each round one step of every contender in turn: ours
fp32, ours bf16, transformers fp32, transformers bf16 (autocast over fp32 weights in
both). Interleaving keeps a shared machine's drift out of the ratios. Each contender's
figure is the median of its steps' process CPU time (user + system: the work itself, as
long as torch runs one thread) and of their wall time; a warm-up step each comes first.
``--contenders`` picks a subset (``ours`` alone skips building transformers' model).
The process keeps freed memory as ``deepseek-mini train`` does (allocator.py), for both
implementations; ``system_share`` and ``page_faults`` show what the kernel still adds.

Fills BENCHMARKS.md, section "The bf16 training step".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import _paths  # noqa: F401, E402 (puts benchmarks/ on sys.path)
import torch  # noqa: E402
from helpers.contenders import adamw, hf_config, hf_train_step  # noqa: E402
from helpers.step_timing import (  # noqa: E402
    add_step_size_args,
    cpu_name,
    fixed_precision,
    random_ids,
    step_config,
    timed,
)

from deepseek_mini import Config, DeepSeekMini  # noqa: E402
from deepseek_mini.allocator import keep_freed_memory  # noqa: E402
from deepseek_mini.train import step as trainer  # noqa: E402
from deepseek_mini.train.optim import build_optimizer  # noqa: E402

Step = Callable[[torch.Tensor], object]
CONTENDERS = ("ours-fp32", "ours-bf16", "hf-fp32", "hf-bf16")


def ours(cfg: Config) -> dict[str, Step]:
    model = DeepSeekMini(cfg.model)
    optimizer = build_optimizer(model, cfg.train)
    t = cfg.train

    def step_in(name: str) -> Step:
        p = fixed_precision(name)
        return lambda ids: trainer.train_step(model, optimizer, ids, t.micro_batch_size,
                                              t.grad_clip, p)

    return {"ours-fp32": step_in("fp32"), "ours-bf16": step_in("bf16")}


def transformers_model(cfg: Config) -> dict[str, Step]:
    from transformers import DeepseekV3ForCausalLM

    model = DeepseekV3ForCausalLM(hf_config(cfg.model))
    optimizer = adamw(model, cfg, fused=True)

    def step_in(name: str) -> Step:
        return hf_train_step(model, optimizer, fixed_precision(name), cfg.train.grad_clip)

    return {"hf-fp32": step_in("fp32"), "hf-bf16": step_in("bf16")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_size_args(p, "configs/base.yaml", batch=8, seq_len=128)
    p.add_argument("--steps", type=int, default=3, help="timed rounds")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the trainer does; process-wide, so transformers' steps too
    overrides = ["model.expert_activation=swiglu", f"data.seq_len={args.seq_len}",
                 f"train.batch_size={args.batch}", f"train.micro_batch_size={args.batch}",
                 *args.set]
    cfg = step_config(args, overrides)
    names = args.contenders.split(",")
    torch.manual_seed(0)
    steps: dict[str, Step] = {}
    if any(n.startswith("ours") for n in names):
        steps.update(ours(cfg))
    if any(n.startswith("hf") for n in names):
        steps.update(transformers_model(cfg))
    ids = random_ids(cfg.model.vocab_size, args.batch, args.seq_len)
    for n in names:
        timed(steps[n], ids)  # warm-up
    times: dict[str, list[tuple[float, float, float, int]]] = {n: [] for n in names}
    for _ in range(args.steps):
        for n in names:
            times[n].append(timed(steps[n], ids))
    tokens = args.batch * args.seq_len
    result = {"cpu": cpu_name(), "threads": args.threads,
              "load": round(os.getloadavg()[0], 2), "batch": f"{args.batch}x{args.seq_len}",
              "layers": cfg.model.num_layers, "hidden": cfg.model.hidden_size}
    for n in names:
        columns = zip(*times[n], strict=True)
        wall, cpu, system, faults = (statistics.median(column) for column in columns)
        result[n] = {"tokens_per_cpu_s": round(tokens / cpu, 1),
                     "tokens_per_s": round(tokens / wall, 1),
                     "system_share": round(system / cpu, 3), "page_faults": int(faults)}
    rate = {n: result[n]["tokens_per_cpu_s"] for n in names}
    for impl in ("ours", "hf"):
        if f"{impl}-fp32" in rate and f"{impl}-bf16" in rate:
            result[f"{impl} bf16/fp32"] = round(rate[f"{impl}-bf16"] / rate[f"{impl}-fp32"], 3)
    for dtype in ("fp32", "bf16"):
        if f"ours-{dtype}" in rate and f"hf-{dtype}" in rate:
            result[f"ours/hf {dtype}"] = round(rate[f"ours-{dtype}"] / rate[f"hf-{dtype}"], 3)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
