"""Expert parallelism on paper: memory per rank and bytes moved per step, from model/sizes.py.

    python benchmarks/distributed/expert_parallel_memory.py [--tokens-per-rank 16384] [--json]

For the reference model (configs/base.yaml) and DeepSeek-V3's published sizes (671 B
parameters, 256 routed experts of 2048, top-8, 61 layers of which 3 dense, one MTP
module), on 8 and 64 devices, each layout's
- memory per rank of what training keeps (no activations): fp32 weights, fp32 gradients
  and AdamW's two fp32 moments, 16 bytes per parameter, as this project keeps them
  (precision.py); and, for FSDP, the one MoE layer it gathers whole in 16-bit while the
  layer runs (on top of that; prefetching the next layer doubles it), where EP gathers
  only the dense part and its own experts;
- bytes each rank sends per optimizer step, with 16-bit activations and gathered weights
  and fp32 gradient reductions:
  - DDP: a ring all-reduce of every gradient, 2·(W−1)/W × 4 bytes per parameter;
  - FSDP: all-gathers of the 16-bit weights in forward and backward and a reduce-scatter
    of the fp32 gradients, (W−1)/W × (2 + 2 + 4) bytes per parameter;
  - EP of N: the dense part as DDP or FSDP over all W ranks; the experts' gradients
    reduced over the W/N replicas holding them (nothing when W = N); and the all-to-alls:
    every routed (token, slot) row of ``hidden`` 16-bit values goes to its expert's rank
    and back, in forward and again in backward (4 transfers), of which (N−1)/N leave the
    rank under even routing.

The all-to-all grows with the tokens a rank processes and the weight traffic with the
parameters, so EP pays in bytes below a number of tokens per rank, printed per layout as
``break-even tokens``: where EP's all-to-all equals the FSDP traffic of the experts it
replaces. Memory is EP's point: it divides the expert share of the 16 bytes per parameter
by N without gathering whole layers.

Fills BENCHMARKS.md, section "Distributed".
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from deepseek_mini import Config
from deepseek_mini.config import ModelConfig
from deepseek_mini.model.sizes import (
    attention_params,
    expert_params,
    moe_params,
    mtp_params,
    total_params,
)

# DeepSeek-V3 (arXiv 2412.19437, its config.json): 671 B total, 37 B active per token.
DEEPSEEK_V3 = dict(
    vocab_size=129280, hidden_size=7168, num_layers=61, num_heads=128, num_kv_heads=128,
    kv_latent_dim=512, max_position=4096, num_experts=256, num_shared_experts=1, top_k=8,
    expert_hidden=2048, expert_activation="swiglu", tie_embeddings=False,
    attention="latent_rope", q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, router="sigmoid", routed_scaling_factor=2.5, n_group=8, topk_group=4,
    first_k_dense=3, dense_hidden=18432, mtp_depth=1, aux_loss_coef=0.0, z_loss_coef=0.0)
STATE_BYTES = 16  # fp32 weight + gradient + AdamW's two moments
GiB = 2 ** 30


@dataclasses.dataclass
class Layout:
    name: str
    devices: int
    dense: str  # ddp | fsdp
    ep: int = 1  # expert-parallel group size; 1 = the experts go with the dense part


def moe_layers(cfg: ModelConfig) -> int:
    """MoE layers, the MTP modules' included (mtp_ffn: moe)."""
    return cfg.num_layers - cfg.first_k_dense + (cfg.mtp_depth if cfg.mtp_ffn == "moe" else 0)


def routed_params(cfg: ModelConfig) -> int:
    return moe_layers(cfg) * cfg.num_experts * expert_params(cfg)


def all_params(cfg: ModelConfig) -> int:
    return total_params(cfg) + mtp_params(cfg)


def gathered_layer(cfg: ModelConfig, layout: Layout) -> float:
    """Bytes of one MoE layer FSDP gathers whole in 16-bit while it runs (0 under DDP):
    attention, norms, router, shared and routed experts; under EP only this rank's share of
    the routed experts, and nothing of them when no other rank holds the same ones."""
    if layout.dense == "ddp":
        return 0.0
    routed = cfg.num_experts * expert_params(cfg)
    dense = attention_params(cfg) + 2 * cfg.hidden_size + moe_params(cfg) - routed
    experts = routed / layout.ep if layout.devices // layout.ep > 1 or layout.ep == 1 else 0
    return 2 * (dense + experts)


def per_rank(cfg: ModelConfig, layout: Layout, tokens_per_rank: int) -> dict[str, float]:
    """Memory (GiB) and bytes sent (GiB) per rank per step for one layout."""
    w, n = layout.devices, layout.ep
    experts = routed_params(cfg) if n > 1 else 0
    dense = all_params(cfg) - experts
    held_dense = dense / w if layout.dense == "fsdp" else dense
    replicas = w // n
    # experts: 1/N on each rank; FSDP also shards them over their replicas
    held_experts = experts / n / (replicas if layout.dense == "fsdp" else 1)
    memory = (held_dense + held_experts) * STATE_BYTES
    share = (w - 1) / w
    dense_bytes = (2 * share * 4 if layout.dense == "ddp" else share * 8) * dense
    expert_share = (replicas - 1) / replicas
    expert_bytes = (2 * expert_share * 4 if layout.dense == "ddp" else expert_share * 8) \
        * experts / n
    a2a = 0.0
    if n > 1:
        rows = tokens_per_rank * cfg.top_k * moe_layers(cfg)
        a2a = 4 * rows * cfg.hidden_size * 2 * (n - 1) / n
    return {"memory_gib": memory / GiB,
            "gathered_layer_gib": gathered_layer(cfg, layout) / GiB,
            "weights_and_grads_gib": (dense_bytes + expert_bytes) / GiB,
            "all_to_all_gib": a2a / GiB, "sent_gib": (dense_bytes + expert_bytes + a2a) / GiB}


def break_even_tokens(cfg: ModelConfig, layout: Layout) -> float:
    """Tokens per rank per step at which EP's all-to-all bytes equal what the same experts
    would cost sharded by FSDP over all ranks (all-gathers and reduce-scatter)."""
    w, n = layout.devices, layout.ep
    fsdp_expert_bytes = (w - 1) / w * 8 * routed_params(cfg)
    per_token = 4 * cfg.top_k * moe_layers(cfg) * cfg.hidden_size * 2 * (n - 1) / n
    return fsdp_expert_bytes / per_token


def layouts(devices: int) -> list[Layout]:
    options = [Layout("DDP", devices, "ddp"), Layout("FSDP", devices, "fsdp"),
               Layout(f"EP {devices} + DDP", devices, "ddp", devices),
               Layout(f"EP {devices} + FSDP", devices, "fsdp", devices)]
    if devices > 8:
        options.append(Layout(f"EP 8 x DP {devices // 8} + FSDP", devices, "fsdp", 8))
    return options


def table(name: str, cfg: ModelConfig, tokens_per_rank: int) -> list[dict]:
    rows = []
    for devices in (8, 64):
        for layout in layouts(devices):
            if cfg.num_experts % layout.ep:
                continue
            row = {"model": name, "layout": layout.name, "devices": devices,
                   **per_rank(cfg, layout, tokens_per_rank)}
            if layout.ep > 1:
                row["break_even_tokens"] = break_even_tokens(cfg, layout)
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens-per-rank", type=int, default=16384,
                        help="tokens each rank processes per optimizer step")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    models = {"reference (configs/base.yaml)": Config.from_yaml("configs/base.yaml").model,
              "DeepSeek-V3": Config.from_dict({"model": DEEPSEEK_V3}).model}
    rows = []
    for name, cfg in models.items():
        print(f"{name}: {all_params(cfg) / 1e9:.2f} B parameters ({mtp_params(cfg) / 1e9:.2f} B "
              f"in MTP modules; {routed_params(cfg) / 1e9:.2f} B, "
              f"{routed_params(cfg) / all_params(cfg):.0%}, in routed experts); "
              f"{args.tokens_per_rank:,} tokens per rank per step")
        rows += table(name, cfg, args.tokens_per_rank)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'model':<30} {'layout':<22} {'GPUs':>4} {'memory GiB':>11} {'+ gathered':>10} "
          f"{'weights+grads GiB':>18} {'all-to-all GiB':>15} {'sent GiB':>9} "
          f"{'break-even tokens':>18}")
    for r in rows:
        even = f"{r['break_even_tokens']:,.0f}" if "break_even_tokens" in r else ""
        print(f"{r['model']:<30} {r['layout']:<22} {r['devices']:>4} {r['memory_gib']:>11.2f} "
              f"{r['gathered_layer_gib']:>10.2f} {r['weights_and_grads_gib']:>18.2f} "
              f"{r['all_to_all_gib']:>15.2f} {r['sent_gib']:>9.2f} {even:>18}")


if __name__ == "__main__":
    main()
