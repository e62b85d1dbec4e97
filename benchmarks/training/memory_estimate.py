"""Training memory by accounting, for a device this machine does not have (an A10G, 24 GB).

    python benchmarks/training/memory_estimate.py --config configs/base.yaml [--precision fp16]

An estimate, not a measurement of a GPU: the terms are
- parameters, gradients and AdamW's two moments, all fp32 (precision.py keeps master
  weights fp32 in every mode): 16 bytes per parameter;
- what autograd keeps from forward to backward — the 16-bit weight copies autocast makes
  and the activations — measured here with ``saved_tensors_hooks`` on one- and two-layer
  models at the config's widths and sequence length, under the same autocast on the CPU:
  the difference is one layer's share, taken at one and at two sequences to split what
  grows with the batch from what does not, then scaled to the config;
- the LM head's cross-entropy: the fp32 weight gradient it holds from forward to backward
  and one chunk's logits and gradient (cross_entropy.py);
- ``--overhead-gb`` for the CUDA context, cuBLAS workspaces and allocator slack.

With ``--precision fp32`` it predicts this CPU's run, which throughput.py measures as peak
RSS: that comparison is the check on the method.

Fills BENCHMARKS.md, section "Memory".
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from deepseek_mini import Config, DeepSeekMini
from deepseek_mini.model.loss import CHUNK_ROWS
from deepseek_mini.model.sizes import total_params

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def saved_bytes(cfg: Config, layers: int, sequences: int, dtype: torch.dtype) -> int:
    """Bytes of distinct storages, other than the parameters', that autograd saves in one
    forward of a ``layers``-deep copy of the model over ``sequences`` of the config's
    length (small vocabulary: it cancels out)."""
    probe = Config.from_dict({"model": {**dataclasses.asdict(cfg.model), "num_layers": layers,
                                        "vocab_size": 512}}).model
    torch.manual_seed(0)
    model = DeepSeekMini(probe)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ids = torch.randint(0, probe.vocab_size, (sequences, cfg.data.seq_len + 1))
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
    # One layer's share at one and at two sequences: what does not grow with the batch
    # (autocast's 16-bit weight copies) and what does (activations).
    one_seq, two_seq = (saved_bytes(cfg, 2, n, dtype) - saved_bytes(cfg, 1, n, dtype)
                        for n in (1, 2))
    per_sequence = two_seq - one_seq
    fixed = one_seq - per_sequence
    sequences = cfg.train.micro_batch_size
    tokens = sequences * cfg.data.seq_len
    head_grad = m.vocab_size * m.hidden_size * 4
    chunk = 2 * min(CHUNK_ROWS, tokens) * m.vocab_size * 4
    gb = 1e9
    parts = {
        "parameters + grads + AdamW (fp32)": 16 * total_params(m) / gb,
        "16-bit weight copies kept for backward": m.num_layers * fixed / gb,
        f"activations kept for backward ({m.num_layers} layers)":
            m.num_layers * per_sequence * sequences / gb,
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
