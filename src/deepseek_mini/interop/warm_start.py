"""Warm start from SmolLM2-135M: copy what maps, derive what the mathematics allows, and say
which is which, tensor by tensor.

SmolLM2 is a dense Llama (GQA attention, SwiGLU MLP); ours has MLA attention and MoE
feed-forwards. What carries over:

* Token embedding (so the tied LM head), every RMSNorm and the final norm: copied.
* Attention. Query head ``i`` is SmolLM2's head ``i`` (heads beyond SmolLM2's start random
  and silent: their ``o_proj`` columns are zero; SmolLM2's extra heads are dropped). When
  the head size or RoPE base differ, each SmolLM2 rotary pair is placed on the target pair
  of nearest frequency (an order-preserving matching), the rest of the head is zero, and
  queries are scaled by ``sqrt(d_target / d_source)`` so that the softmax temperature is
  kept. Each target K/V head is the mean of the SmolLM2 K/V heads its query heads used
  (mean pooling, as in GQA uptraining, Ainslie et al. 2023). The MLA latent holds the stacked
  ``[W_k; W_v]`` exactly when it is wide enough (``k_up`` / ``v_up`` then select the
  halves), else their truncated SVD (``kv_down = sqrt(S) V^T``, ``[k_up; v_up] = U sqrt(S)``;
  the idea of MHA2MLA and TransMLA).
* Feed-forward (sparse upcycling). With S shared experts and top-k routing, the shared
  experts carry ``alpha = S / (S + k)`` of SmolLM2's MLP and every routed expert a copy
  scaled by ``1 - alpha``; routing weights are renormalised to sum to 1 over the chosen
  k, so the layer's output equals the MLP for any routing. SwiGLU experts are exact; GELU
  experts replace ``silu(gate x) * (up x)`` by ``c * gelu(gate x)``, with ``c`` the
  least-squares fit for Gaussian inputs: a rough approximation (BENCHMARKS.md measures how
  rough: the reference config starts worse than random). Routed experts get small noise
  (1% of each tensor's std) so they can diverge, unless the whole mapping is exact.
* Router: random (the model's own init). Its output does not change the layer at step 0
  because the routed experts are equal.

With SmolLM2's own geometry (configs/smollm2-moe.yaml) nothing is approximated and the
model computes SmolLM2's function exactly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn import functional as F

from ..checkpoint import weights_checkpoint
from ..config import Config, ModelConfig
from ..errors import UserError
from ..files import atomic_save
from ..model.attention import MultiHeadLatentAttention
from ..model.moe import MoE
from ..model.transformer import DeepSeekMini
from .smollm2 import LlamaGeometry, SmolLM2Weights, load_smollm2

EXPERT_NOISE = 0.01  # relative std of the noise on routed experts when the mapping is approximate


@dataclass
class TableRow:
    target: str
    shape: tuple[int, ...]
    status: str  # copied | derived | random | zero
    how: str


@dataclass
class WarmStart:
    """The warm-started model and the account of how each of its tensors was made."""

    model: DeepSeekMini
    source: str
    rows: list[TableRow] = field(default_factory=list)
    approximations: list[str] = field(default_factory=list)

    @property
    def function_preserving(self) -> bool:
        return not self.approximations


def warm_start_model(cfg: Config, source: str | None = None,
                     log: Callable[[str], None] | None = print) -> DeepSeekMini:
    """The model of ``cfg.model`` warm-started from SmolLM2 (``train.warm_start: smollm2``);
    the mapping table goes to ``log``."""
    weights = load_smollm2(source, check=geometry_check(cfg.model))
    result = warm_start(cfg.model, weights, seed=cfg.train.seed)
    if log is not None:
        log(format_table(result))
    return result.model


def warm_start(cfg: ModelConfig, weights: SmolLM2Weights, seed: int = 0,
               on_layer: Callable[[], None] | None = None) -> WarmStart:
    """Build ``DeepSeekMini(cfg)`` (its own init for what stays random) and fill it from
    ``weights``. Shapes that cannot map raise UserError naming the config key.
    ``on_layer`` is called after each layer's attention and each layer's experts (2 x
    num_layers calls), for a progress bar."""
    tick = on_layer or (lambda: None)
    geo = weights.geometry
    geometry_check(cfg)(geo, weights.source)
    result = WarmStart(DeepSeekMini(cfg), weights.source)
    model, src = result.model, weights.state
    record = _Recorder(model, result.rows)
    placement = rope_pair_placement(geo.head_dim, cfg.head_dim, geo.rope_theta, cfg.rope_theta)
    with torch.no_grad():
        _map_embeddings(model, src, record)
        energies = []
        for i, layer in enumerate(model.layers):
            layer_src = _layer_state(src, i)
            layer.attn_norm.weight.copy_(layer_src["input_layernorm.weight"])
            record(f"layers.{i}.attn_norm.weight", "copied", "input_layernorm.weight")
            layer.moe_norm.weight.copy_(layer_src["post_attention_layernorm.weight"])
            record(f"layers.{i}.moe_norm.weight", "copied", "post_attention_layernorm.weight")
            energies.append(_map_attention(layer.attn, layer_src, cfg, geo, placement,
                                           record.under(f"layers.{i}.attn.")))
            tick()
        result.approximations = _approximations(cfg, geo) + _latent_loss(cfg, energies)
        noise = 0.0 if result.function_preserving else EXPERT_NOISE
        generator = torch.Generator().manual_seed(seed)
        for i, layer in enumerate(model.layers):
            _map_moe(layer.moe, _layer_state(src, i), cfg, noise, generator,
                     record.under(f"layers.{i}.moe."))
            tick()
    return result


def _layer_state(src: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """Layer ``index``'s tensors, named without the ``model.layers.N.`` prefix."""
    prefix = f"model.layers.{index}."
    return {k[len(prefix):]: v for k, v in src.items() if k.startswith(prefix)}


class _Recorder:
    """Appends one table row per target parameter, with its shape."""

    def __init__(self, model: DeepSeekMini, rows: list[TableRow]) -> None:
        self.shapes = {n: tuple(p.shape)
                       for n, p in model.named_parameters(remove_duplicate=False)}
        self.rows = rows

    def __call__(self, target: str, status: str, how: str) -> None:
        self.rows.append(TableRow(target, self.shapes[target], status, how))

    def under(self, prefix: str) -> Callable[[str, str, str], None]:
        """A recorder for the parameters of one submodule."""
        return lambda target, status, how: self(prefix + target, status, how)


def _map_embeddings(model: DeepSeekMini, src: dict[str, torch.Tensor], record) -> None:
    model.embed.weight.copy_(src["model.embed_tokens.weight"])
    record("embed.weight", "copied", "model.embed_tokens.weight")
    _map_lm_head(model, src, record)
    model.norm.weight.copy_(src["model.norm.weight"])
    record("norm.weight", "copied", "model.norm.weight")


def _latent_loss(cfg: ModelConfig, energies: list[float]) -> list[str]:
    if min(energies) >= 1.0 - 1e-6:
        return []
    return [f"KV latent {cfg.kv_latent_dim} < {2 * cfg.num_kv_heads * cfg.head_dim} stacked K/V "
            f"rows: the truncated SVD keeps {100 * min(energies):.1f}%-"
            f"{100 * max(energies):.1f}% of their energy (mean "
            f"{100 * sum(energies) / len(energies):.1f}%)"]


def geometry_check(cfg: ModelConfig) -> Callable[[LlamaGeometry, str], None]:
    """What ``load_smollm2`` calls with the source's geometry before reading its weights:
    a config the mapping cannot fill is an error before the seconds of loading."""
    return lambda geo, source: _check_compatible(cfg, geo, source)


def _check_compatible(cfg: ModelConfig, geo: LlamaGeometry, source: str) -> None:
    for key, seed in (("attention", "latent"), ("router", "softmax"), ("first_k_dense", 0)):
        if getattr(cfg, key) != seed:
            raise UserError(f"model.{key} is {getattr(cfg, key)!r}: the SmolLM2 warm start "
                            f"maps into the seed's layout only (model.{key}: {seed})")
    for key, ours, theirs in (("vocab_size", cfg.vocab_size, geo.vocab_size),
                              ("hidden_size", cfg.hidden_size, geo.hidden_size),
                              ("num_layers", cfg.num_layers, geo.num_layers),
                              ("expert_hidden", cfg.expert_hidden, geo.intermediate_size)):
        if ours != theirs:
            raise UserError(f"model.{key} is {ours} but SmolLM2 ({source}) has {theirs}: a warm "
                            f"start needs them equal (--set model.{key}={theirs})")


def _approximations(cfg: ModelConfig, geo: LlamaGeometry) -> list[str]:
    """Why the warm-started model will not compute SmolLM2's function (besides the latent,
    which is judged from the SVD itself)."""
    out = []
    if cfg.num_heads != geo.num_heads:
        out.append(f"query heads: {cfg.num_heads} from SmolLM2's {geo.num_heads}")
    if cfg.head_dim != geo.head_dim or not math.isclose(cfg.rope_theta, geo.rope_theta):
        out.append(f"head size {cfg.head_dim} / RoPE base {cfg.rope_theta:g} from SmolLM2's "
                   f"{geo.head_dim} / {geo.rope_theta:g}: rotary pairs placed by nearest "
                   "frequency")
    if not _kv_grouping_exact(cfg, geo):
        out.append(f"K/V heads: {cfg.num_kv_heads} from SmolLM2's {geo.num_kv_heads} by mean "
                   "pooling")
    if cfg.expert_activation != "swiglu":
        out.append(f"{cfg.expert_activation} experts approximate SmolLM2's SwiGLU MLP")
    if not math.isclose(cfg.norm_eps, geo.norm_eps, rel_tol=1e-6):
        out.append(f"RMSNorm eps {cfg.norm_eps:g} vs SmolLM2's {geo.norm_eps:g}")
    return out


def _map_lm_head(model: DeepSeekMini, src: dict[str, torch.Tensor], record) -> None:
    if model.config.tie_embeddings:
        how = "tied to embed.weight"
        if "lm_head.weight" in src:
            how += " (SmolLM2's untied lm_head.weight is dropped)"
        record("lm_head.weight", "copied", how)
        return
    from_embed = "lm_head.weight" not in src
    model.lm_head.weight.copy_(src["model.embed_tokens.weight" if from_embed
                                   else "lm_head.weight"])
    record("lm_head.weight", "copied",
           "model.embed_tokens.weight (SmolLM2 ties them)" if from_embed else "lm_head.weight")


def rope_pair_placement(src_dim: int, dst_dim: int, src_theta: float,
                        dst_theta: float) -> torch.Tensor:
    """A 0/1 matrix [dst_dim, src_dim] moving head features between RoPE geometries.

    In the rotate-half layout, pair j is dims (j, j + d/2) and turns at ``theta^(-2j/d)``.
    Pairs are matched in order by nearest log-frequency (the smaller side all placed), so
    a rotated query/key keeps its angles as closely as the target frequencies allow.
    """
    src_pairs, dst_pairs = src_dim // 2, dst_dim // 2
    src_freq = [2 * j / src_dim * math.log(src_theta) for j in range(src_pairs)]
    dst_freq = [2 * i / dst_dim * math.log(dst_theta) for i in range(dst_pairs)]
    placement = torch.zeros(dst_dim, src_dim)
    for j, i in _monotone_matching(src_freq, dst_freq):
        placement[i, j] = 1.0
        placement[i + dst_pairs, j + src_pairs] = 1.0
    return placement


def _monotone_matching(a: list[float], b: list[float]) -> list[tuple[int, int]]:
    """Order-preserving pairs (j, i) matching every item of the shorter list to a distinct
    item of the longer, minimising the total |a_j - b_i| (dynamic programming)."""
    if len(a) > len(b):
        return [(j, i) for i, j in _monotone_matching(b, a)]
    n, m = len(a), len(b)
    inf = float("inf")
    # cost[j][i]: best cost of matching a[:j] into b[:i]
    cost = [[0.0] * (m + 1)] + [[inf] * (m + 1) for _ in range(n)]
    for j in range(1, n + 1):
        for i in range(j, m + 1):
            cost[j][i] = min(cost[j][i - 1], cost[j - 1][i - 1] + abs(a[j - 1] - b[i - 1]))
    pairs, i = [], m
    for j in range(n, 0, -1):
        while cost[j][i] == cost[j][i - 1] and i > j:
            i -= 1
        pairs.append((j - 1, i - 1))
        i -= 1
    return pairs[::-1]


def _kv_mixing(cfg: ModelConfig, geo: LlamaGeometry) -> torch.Tensor:
    """[target kv heads, SmolLM2 kv heads]: each target K/V head as the mean of the SmolLM2
    heads its query heads used (all of them, for a group with no SmolLM2 query head)."""
    shared = min(cfg.num_heads, geo.num_heads)
    mix = torch.zeros(cfg.num_kv_heads, geo.num_kv_heads)
    for head in range(shared):
        mix[head // (cfg.num_heads // cfg.num_kv_heads),
            head // (geo.num_heads // geo.num_kv_heads)] += 1.0
    mix[mix.sum(dim=1) == 0] = 1.0
    return mix / mix.sum(dim=1, keepdim=True)


def _kv_grouping_exact(cfg: ModelConfig, geo: LlamaGeometry) -> bool:
    return bool((_kv_mixing(cfg, geo).max(dim=1).values == 1.0).all())


def _map_attention(attn: MultiHeadLatentAttention, src: dict[str, torch.Tensor],
                   cfg: ModelConfig, geo: LlamaGeometry, placement: torch.Tensor,
                   record) -> float:
    """Fill one attention block; returns the fraction of K/V energy the latent keeps."""
    h, d_src, d_dst = cfg.hidden_size, geo.head_dim, cfg.head_dim
    shared = min(cfg.num_heads, geo.num_heads)
    same_heads = cfg.num_heads == geo.num_heads and placement.shape[0] == placement.shape[1] \
        and bool((placement == torch.eye(d_src)).all())
    scale = math.sqrt(d_dst / d_src)
    q_src = src["self_attn.q_proj.weight"].view(geo.num_heads, d_src, h)[:shared]
    q = attn.q_proj.weight.view(cfg.num_heads, d_dst, h)
    q[:shared] = scale * torch.einsum("ts,nsh->nth", placement, q_src)
    o_src = src["self_attn.o_proj.weight"].view(h, geo.num_heads, d_src)[:, :shared]
    o = attn.o_proj.weight.view(h, cfg.num_heads, d_dst)
    o.zero_()
    o[:, :shared] = torch.einsum("hns,ts->hnt", o_src, placement)
    heads = f"SmolLM2 heads 0-{shared - 1}"
    if same_heads:
        record("q_proj.weight", "copied", "self_attn.q_proj.weight")
        record("o_proj.weight", "copied", "self_attn.o_proj.weight")
    else:
        extra = (f"; heads {shared}-{cfg.num_heads - 1} random"
                 if cfg.num_heads > shared else "")
        record("q_proj.weight", "derived", f"{heads}, rotary pairs placed by frequency, "
                                           f"x sqrt({d_dst}/{d_src}){extra}")
        extra = (f"; heads {shared}-{cfg.num_heads - 1} zero" if cfg.num_heads > shared else "")
        record("o_proj.weight", "derived", f"{heads}, columns placed as q{extra}")
    mix = _kv_mixing(cfg, geo)
    k, v = (torch.einsum("ts,gk,ksh->gth", placement, mix,
                         src[f"self_attn.{name}.weight"].view(geo.num_kv_heads, d_src, h))
            .reshape(-1, h) for name in ("k_proj", "v_proj"))
    pooled = "" if _kv_grouping_exact(cfg, geo) else "mean-pooled "
    return _map_latent(attn, k, v, pooled, record)


def _map_latent(attn: MultiHeadLatentAttention, k: torch.Tensor, v: torch.Tensor,
                pooled: str, record) -> float:
    """kv_down / k_up / v_up from target-shaped K and V projections [rows, hidden]."""
    latent, rows = attn.kv_down.weight.shape[0], k.shape[0] + v.shape[0]
    stacked = torch.cat([k, v])
    if latent >= rows:
        attn.kv_down.weight.zero_()
        attn.kv_down.weight[:rows] = stacked
        attn.k_up.weight.copy_(torch.eye(k.shape[0], latent))
        attn.v_up.weight.zero_()
        attn.v_up.weight[:, k.shape[0]:rows] = torch.eye(v.shape[0])
        record("kv_down.weight", "copied", f"[{pooled}k_proj; {pooled}v_proj] stacked"
                                           + (", rest zero" if latent > rows else ""))
        record("k_up.weight", "derived", "identity block: selects the K rows of the latent")
        record("v_up.weight", "derived", "identity block: selects the V rows of the latent")
        return 1.0
    # The SVD through the small Gram matrix: LAPACK's SVD of a wide matrix is seconds here.
    eigenvalues, vectors = torch.linalg.eigh(stacked.double() @ stacked.double().T)
    energy = eigenvalues.clamp_min(0).flip(0)
    u = vectors.flip(1)[:, :latent]
    root = energy[:latent].clamp_min(1e-30) ** 0.25  # sqrt of the singular values
    attn.kv_down.weight.copy_((u.T @ stacked.double()) / root[:, None])
    up = u * root
    attn.k_up.weight.copy_(up[:k.shape[0]])
    attn.v_up.weight.copy_(up[k.shape[0]:])
    how = f"truncated SVD of [{pooled}k_proj; {pooled}v_proj] ({rows} rows -> rank {latent})"
    record("kv_down.weight", "derived", f"{how}: sqrt(S) V^T")
    record("k_up.weight", "derived", f"{how}: K rows of U sqrt(S)")
    record("v_up.weight", "derived", f"{how}: V rows of U sqrt(S)")
    return float((energy[:latent].sum() / energy.sum().clamp_min(1e-30)).item())


def gelu_for_swiglu(gate: torch.Tensor, up: torch.Tensor,
                    norm: torch.Tensor) -> torch.Tensor:
    """Per inner unit, the ``c`` minimising E[(silu(g) u - c gelu(g))^2] when the normalised
    input x is standard Gaussian (so g = gate·(norm*x), u = up·(norm*x)): u's part that
    follows g is ``rho g`` and c = rho E[g silu(g) gelu(g)] / E[gelu(g)^2]."""
    g_rows, u_rows = gate * norm, up * norm
    var = g_rows.square().sum(dim=1).clamp_min(1e-12)
    rho = (g_rows * u_rows).sum(dim=1) / var
    z = torch.linspace(-8.0, 8.0, 2001, dtype=torch.float64)
    density = torch.exp(-0.5 * z.square())
    g = var.double().sqrt()[:, None] * z
    gelu = F.gelu(g)
    numerator = (g * F.silu(g) * gelu * density).sum(dim=1)
    denominator = (gelu.square() * density).sum(dim=1).clamp_min(1e-30)
    return (rho.double() * numerator / denominator).float()


def _map_moe(moe: MoE, src: dict[str, torch.Tensor], cfg: ModelConfig, noise: float,
             generator: torch.Generator, record) -> None:
    """Shared experts = alpha * MLP, each routed expert = (1 - alpha) * MLP (+ noise)."""
    up, gate, down = (src[f"mlp.{n}_proj.weight"] for n in ("up", "gate", "down"))
    shared_count = cfg.num_shared_experts
    alpha = shared_count / (shared_count + cfg.top_k)
    swiglu = cfg.expert_activation == "swiglu"
    if swiglu:
        mlp = "SmolLM2's MLP"
    else:
        down = down * gelu_for_swiglu(gate, up, src["post_attention_layernorm.weight"])
        up, mlp = gate, "gelu(gate_proj) with down_proj scaled per unit (Gaussian LS fit)"
    if moe.shared is not None:
        moe.shared.up.weight.copy_(up.repeat(shared_count, 1))
        moe.shared.down.weight.copy_(down.repeat(1, shared_count) * (alpha / shared_count))
        record("shared.up.weight", "copied" if swiglu else "derived",
               f"up_proj x{shared_count}" if swiglu else f"gate_proj x{shared_count}")
        if moe.shared.gate is not None:
            moe.shared.gate.weight.copy_(gate.repeat(shared_count, 1))
            record("shared.gate.weight", "copied", f"gate_proj x{shared_count}")
        record("shared.down.weight", "derived",
               f"{mlp}: down_proj x {alpha:.3g}" + (f" / {shared_count}" if shared_count > 1
                                                    else ""))
    experts = moe.experts
    noisy = f" + noise ({noise:g} x std)" if noise else ""
    targets = [("w_up", up.T, "up_proj" if swiglu else "gate_proj")]
    if experts.w_gate is not None:
        targets.append(("w_gate", gate.T, "gate_proj"))
    targets.append(("w_down", (1 - alpha) * down.T, f"{mlp}: down_proj x {1 - alpha:.3g}"))
    for name, value, how in targets:
        param = getattr(experts, name)
        param.copy_(value.expand_as(param))
        if noise:
            param.add_(torch.randn(param.shape, generator=generator) * (noise * value.std()))
        status = "derived" if noise or name == "w_down" or not swiglu else "copied"
        record(f"experts.{name}", status,
               f"{how}, transposed, in each of {cfg.num_experts} experts{noisy}")
    record("router.weight", "random", "normal(0, 0.02), the model's init")


def format_table(result: WarmStart) -> str:
    """The mapping as text: one row per target tensor (layers collapsed to ``layers.*``)."""
    rows: dict[tuple[str, str, str], tuple[int, ...]] = {}
    for row in result.rows:
        rows.setdefault((re.sub(r"layers\.\d+\.", "layers.*.", row.target), row.status,
                         row.how), row.shape)
    width = max(len(t) for t, _, _ in rows) + 2
    lines = [f"warm start from SmolLM2-135M: {result.source}",
             f"{'target tensor':<{width}}{'shape':<16}{'status':<9}how"]
    for (target, status, how), shape in rows.items():
        lines.append(f"{target:<{width}}{str(list(shape)):<16}{status:<9}{how}")
    counts = {s: sum(r.status == s for r in result.rows) for s in ("copied", "derived", "random")}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()) + " tensors")
    if result.function_preserving:
        lines.append("function-preserving: yes (computes SmolLM2's function at step 0)")
    else:
        lines.append("function-preserving: no, approximated:")
        lines.extend(f"  - {a}" for a in result.approximations)
    return "\n".join(lines)


def save_warm_start(result: WarmStart, cfg: Config, path: str | Path) -> None:
    """A weights checkpoint of the warm-started model, with how it was made."""
    atomic_save(weights_checkpoint(result.model.state_dict(), cfg.to_dict(), step=0,
                                   warm_start={"source": result.source,
                                               "function_preserving": result.function_preserving,
                                               "approximations": result.approximations}), path)
