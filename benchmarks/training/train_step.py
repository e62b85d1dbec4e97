"""The training step, paired: ours eager and compiled, dense and MoE, fp32 and bf16, and
transformers' DeepseekV3, against the matmul peak measured in the same process.

    python benchmarks/training/train_step.py --config configs/cpu-hour.yaml --ffn dense,moe
    python benchmarks/training/train_step.py --config configs/base.yaml --layers 6 --ffn moe \\
        --set model.expert_activation=swiglu --set train.optimizer=adamw --hf
    python benchmarks/training/train_step.py --quick            # a tiny config, seconds

One process builds every contender (the trainer's own ``train_step`` and optimizer, via
helpers/contenders.py), warms each up (a compiled one pays its compile there: printed),
then times optimizer steps round after round, one step of every contender per round, so
a shared machine's drift stays out of the ratios. Each figure is the median over rounds
of the step's process CPU time (the work, when torch runs one thread) and wall time.

``dense`` and ``moe`` are the same config with every layer a dense MLP of the MoE's
active width (``first_k_dense`` = layers, ``dense_hidden`` = (top_k + shared) x
expert_hidden) or every layer an MoE (``first_k_dense`` 0): the same active FLOPs per
token, so ``moe/dense`` is what routing costs. Model GFLOP/s use ``info``'s training
FLOPs per token (sizes.py; transformers' from its own weights, contenders.py); the peak
is the best ``F.linear`` rate per dtype over a square GEMM and the model's own weight
shapes at the step's token count, measured in this process right before the steps.
``--json PATH`` writes the result.

Fills BENCHMARKS.md, section "Muon on a CPU without native bf16".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import _paths  # noqa: F401, E402 (puts benchmarks/ on sys.path)
import torch  # noqa: E402
from helpers.contenders import build_hf, build_ours  # noqa: E402
from helpers.step_timing import add_step_size_args, cpu_name, random_ids, step_run, timed  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from deepseek_mini import Config  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def variant(path: str, overrides: list[str], ffn: str, dtype: str, compiled: bool) -> Config:
    """The config with every layer dense (of the MoE's active width) or every layer MoE,
    in ``dtype`` on the CPU, compiled or not."""
    m = Config.from_yaml(path, overrides).model
    layers = ([f"model.first_k_dense={m.num_layers}",
               f"model.dense_hidden={(m.top_k + m.num_shared_experts) * m.expert_hidden}"]
              if ffn == "dense" else ["model.first_k_dense=0"])
    return Config.from_yaml(path, [*overrides, *layers, f"train.precision={dtype}",
                                   "train.device=cpu",
                                   f"train.compile={str(compiled).lower()}"])


def linear_shapes(cfg: Config) -> set[tuple[int, int]]:
    """(in, out) of every dense matmul weight of the model, the head's included."""
    m = cfg.model
    from deepseek_mini import DeepSeekMini
    with torch.device("meta"):
        model = DeepSeekMini(m)
    shapes = {(mod.in_features, mod.out_features) for mod in model.modules()
              if isinstance(mod, torch.nn.Linear)}
    shapes.add((m.hidden_size, m.head_vocab + 1 if m.head_vocab else m.vocab_size))
    return shapes


@torch.no_grad()
def matmul_peak(dtype: torch.dtype, shapes: set[tuple[int, int]], tokens: int,
                seconds: float) -> tuple[float, str]:
    """The best FLOP/s of ``F.linear`` in ``dtype`` over a square 1024 product and each
    (tokens x in) @ (in -> out) product of the model, and which shape gave it."""
    best, where = 0.0, ""
    candidates = [(1024, 1024, 1024)] + [(tokens, i, o) for i, o in sorted(shapes)]
    per_shape = seconds / len(candidates)
    for rows, inner, out in candidates:
        a = torch.randn(rows, inner).to(dtype)
        b = torch.randn(out, inner).to(dtype)
        F.linear(a, b)
        fastest, deadline = math.inf, time.perf_counter() + per_shape
        while True:
            start = time.perf_counter()
            F.linear(a, b)
            end = time.perf_counter()
            fastest = min(fastest, end - start)
            if end >= deadline:
                break
        rate = 2 * rows * inner * out / fastest
        if rate > best:
            best, where = rate, f"{rows}x{inner}x{out}"
    return best, where


def build(path: str, overrides: list[str], baseline: list[str],
          names: list[str]) -> dict[str, object]:
    """Every contender named ``impl-ffn-dtype[-compiled|-baseline]`` (``-baseline``: with
    the ``baseline`` settings on top, eager)."""
    contenders = {}
    for name in names:
        impl, ffn, dtype, *rest = name.split("-")
        extra = baseline if rest == ["baseline"] else []
        c = variant(path, overrides + extra, ffn, dtype, compiled=rest == ["compiled"])
        torch.manual_seed(0)
        contenders[name] = build_ours(c, name) if impl == "ours" else build_hf(c)
    return contenders


def contender_names(args: argparse.Namespace) -> list[str]:
    names = []
    for dtype in args.dtypes.split(","):
        for ffn in args.ffn.split(","):
            for compiled in {"off": [False], "on": [True], "both": [False, True]}[args.compile]:
                names.append(f"ours-{ffn}-{dtype}" + ("-compiled" if compiled else ""))
            if args.baseline:
                names.append(f"ours-{ffn}-{dtype}-baseline")
        if args.hf:
            names.append(f"hf-moe-{dtype}")
    return names


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_size_args(p, "configs/cpu-hour.yaml")
    p.add_argument("--steps", type=int, default=3, help="timed rounds")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ffn", default="dense,moe", help="dense, moe or both")
    p.add_argument("--dtypes", default="fp32", help="fp32, bf16 or both")
    p.add_argument("--compile", default="off", choices=["off", "on", "both"])
    p.add_argument("--hf", action="store_true", help="add transformers' DeepseekV3 (MoE)")
    p.add_argument("--baseline", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="add each eager contender again with these settings (a before/after "
                        "pair in one process)")
    p.add_argument("--peak-seconds", type=float, default=2.0)
    p.add_argument("--quick", action="store_true", help="a tiny config, one round")
    p.add_argument("--json", default=None, help="write the result here")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.peak_seconds = 1, 0.1
    cfg, overrides, batch, seq_len = step_run(args)
    names = contender_names(args)
    contenders = build(args.config, overrides, args.baseline, names)
    ids = random_ids(cfg.model.vocab_size, batch, seq_len)
    first = {}
    for name, c in contenders.items():
        start = time.perf_counter()
        c.train_step(ids)  # warm-up; a compiled step compiles here
        first[name] = time.perf_counter() - start
    shapes = linear_shapes(cfg)
    peaks = {d: matmul_peak(DTYPES[d], shapes, batch * seq_len, args.peak_seconds)
             for d in args.dtypes.split(",")}
    times: dict[str, list[tuple[float, float, float, int]]] = {n: [] for n in names}
    for _ in range(args.steps):
        for name, c in contenders.items():
            times[name].append(timed(c.train_step, ids))
    tokens = batch * seq_len
    result: dict = {"baseline": args.baseline,
        "cpu": cpu_name(), "threads": args.threads, "load": [round(x, 2) for x in os.getloadavg()],
        "config": args.config, "overrides": overrides, "batch": f"{batch}x{seq_len}",
        "layers": cfg.model.num_layers, "hidden": cfg.model.hidden_size, "rounds": args.steps,
        "peak_gflops": {d: {"gflops": round(r / 1e9, 1), "shape": s}
                        for d, (r, s) in peaks.items()},
        "contenders": {}}
    for name, c in contenders.items():
        wall, cpu, _, _ = (statistics.median(col) for col in zip(*times[name], strict=True))
        dtype = name.split("-")[2]
        flops = c.train_flops_per_token * tokens / cpu
        result["contenders"][name] = {
            "tokens_per_s": round(tokens / wall, 1), "tokens_per_cpu_s": round(tokens / cpu, 1),
            "model_gflops_per_cpu_s": round(flops / 1e9, 2),
            "share_of_peak": round(flops / peaks[dtype][0], 3),
            "first_step_s": round(first[name], 1), "notes": c.notes}
    rate = {n: r["tokens_per_cpu_s"] for n, r in result["contenders"].items()}
    ratios = {}
    for name in names:
        if name.startswith("ours-moe") and name.replace("-moe-", "-dense-") in rate:
            ratios[f"{name} / dense"] = round(
                rate[name.replace("-moe-", "-dense-")] / rate[name], 3)
        if name.startswith("ours-moe") and (hf := f"hf-moe-{name.split('-')[2]}") in rate:
            ratios[f"{name} / {hf} (speed)"] = round(rate[name] / rate[hf], 3)
        for suffix, what in (("-compiled", "eager"), ("-baseline", "baseline")):
            if name.endswith(suffix) and (own := name.removesuffix(suffix)) in rate:
                key = (f"{name} / {what} (speed)" if suffix == "-compiled"
                       else f"{own} / baseline (speed)")
                ratios[key] = round(rate[name] / rate[own] if suffix == "-compiled"
                                    else rate[own] / rate[name], 3)
    result["ratios"] = ratios  # "moe / dense": the MoE step's cost in dense steps
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
