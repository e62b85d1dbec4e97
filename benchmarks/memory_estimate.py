"""Training memory by accounting, for a device this machine does not have (an A10G, 24 GB).

    python benchmarks/memory_estimate.py --config configs/base.yaml [--precision fp16]

An estimate, not a measurement of a GPU: the terms are
- parameters, gradients and AdamW's two moments, all fp32 (precision.py keeps master
  weights fp32 in every mode): 16 bytes per parameter;
- what autograd keeps from forward to backward — activations and the 16-bit weight copies
  autocast makes — measured here with ``saved_tensors_hooks`` on a one- and a two-layer
  model at the config's widths, under the same autocast on the CPU; the difference is one
  layer's share, scaled to the config's layers and tokens;
- the LM head's cross-entropy: the fp32 weight gradient it holds from forward to backward
  and one chunk's logits and gradient (cross_entropy.py);
- ``--overhead-gb`` for the CUDA context, cuBLAS workspaces and allocator slack.

With ``--precision fp32`` it predicts this CPU's run, which throughput.py measures as peak
RSS: that comparison is the check on the method.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from deepseek_mini import Config, DeepSeekMini
from deepseek_mini.cross_entropy import CHUNK_ROWS
from deepseek_mini.sizes import total_params

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PROBE_TOKENS = 128  # one sequence: saved tensors grow linearly with tokens at a fixed T


def saved_bytes(cfg: Config, layers: int, dtype: torch.dtype) -> int:
    """Bytes of distinct storages, other than the parameters', that autograd saves in one
    forward of a ``layers``-deep copy of the model (small vocabulary: it cancels out)."""
    probe = Config.from_dict({"model": {**dataclasses.asdict(cfg.model), "num_layers": layers,
                                        "vocab_size": 512}}).model
    torch.manual_seed(0)
    model = DeepSeekMini(probe)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ids = torch.randint(0, probe.vocab_size, (1, PROBE_TOKENS + 1))
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        model(ids[:, :-1], targets=ids[:, 1:])
    return sum(storages.values())


def estimate(cfg: Config, precision: str, overhead_gb: float) -> dict[str, float]:
    dtype = DTYPES[precision]
    m = cfg.model
    per_layer = saved_bytes(cfg, 2, dtype) - saved_bytes(cfg, 1, dtype)
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    head_grad = m.vocab_size * m.hidden_size * 4
    chunk = 2 * min(CHUNK_ROWS, tokens) * m.vocab_size * 4
    gb = 1e9
    parts = {
        "parameters + grads + AdamW (fp32)": 16 * total_params(m) / gb,
        f"saved for backward ({m.num_layers} layers)":
            m.num_layers * per_layer * tokens / PROBE_TOKENS / gb,
        "LM head: weight grad + one CE chunk": (head_grad + chunk) / gb,
        "context, workspaces, allocator slack": overhead_gb,
    }
    parts["total"] = sum(parts.values())
    return parts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/base.yaml")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--precision", default="fp16", choices=list(DTYPES))
    p.add_argument("--overhead-gb", type=float, default=1.0)
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = Config.from_yaml(args.config, overrides=args.set)
    print(f"ESTIMATE: {cfg.model.num_layers} layers, {cfg.model.expert_activation} experts, "
          f"micro-batch {cfg.train.micro_batch_size} x {cfg.data.seq_len}, {args.precision}")
    for name, value in estimate(cfg, args.precision, args.overhead_gb).items():
        print(f"  {name:<40}{value:8.2f} GB")


if __name__ == "__main__":
    main()
