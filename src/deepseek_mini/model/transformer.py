"""DeepSeekMini: token embedding → decoder layers (MLA + MoE) → RMSNorm → LM head.

Each decoder layer is pre-norm: ``x = x + MLA(norm(x))`` then ``x = x + MoE(norm(x))``;
the first ``first_k_dense`` layers have a dense MLP instead of the MoE (DeepSeek-V3).
With ``model.dropout`` p > 0, training drops (as nanoGPT does) the embeddings, the
attention probabilities and each branch's output before its residual add.
``model.attention`` picks the seed's MLA (attention.py) or the decoupled-RoPE one
(latent_rope_attention.py); ``model.router`` the MoE's router (router.py). With
``mtp_depth`` D, D multi-token-prediction modules (mtp.py) follow the last layer. With
``head_vocab`` N > 0 the head scores N kept ids and an "other" class (head.py), its logits
still a distribution over the whole vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..checkpoint import load_checkpoint, model_config_of, state_dict_mismatch
from ..config import ModelConfig
from ..errors import UserError
from ..memory import check_fits
from .attention import MultiHeadLatentAttention
from .cache import LatentCache
from .head import Rows, TrimmedHead
from .latent_rope_attention import LatentRopeAttention
from .loss import head_cross_entropy, linear_cross_entropy
from .mask import padded_causal_mask
from .moe import FeedForward, MoE, exclude_from_compile
from .mtp import MTPModule
from .norm import RMSNorm
from .rope import rope_tables
from .router import sigmoid_routers
from .sizes import model_memory
from .tied_embedding import tied_lookup


@dataclass
class ModelOutput:
    """Logits and, when targets were given, ``loss = ce + aux`` with aux's two parts.

    ``expert_counts`` [layers, experts] and ``router_entropy`` [layers] are detached
    statistics of the MoE layers (dense layers have none) for logging (None for a forward
    with a cache and no targets); reading them is the caller's (synchronising) choice.
    ``trunk`` is the last layer's output at every position before the final norm: what
    the first MTP module reads.

    With targets, ``logits`` are computed only if read: the loss comes from the final
    hidden states without the [tokens, vocab] tensor (cross_entropy.py), so training never
    builds it.
    """

    hidden: torch.Tensor = field(repr=False)
    head: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)
    trunk: torch.Tensor | None = field(default=None, repr=False)  # all positions, pre-norm
    loss: torch.Tensor | None = None
    ce: torch.Tensor | None = None
    aux: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    expert_counts: torch.Tensor | None = None
    router_entropy: torch.Tensor | None = None
    mtp_ce: torch.Tensor | None = None  # mean over MTP depths (with targets and MTP modules)
    mtp_expert_counts: torch.Tensor | None = None  # [MTP MoE layers, experts], with mtp_ce

    @cached_property
    def logits(self) -> torch.Tensor:
        return self.head(self.hidden)


class DecoderLayer(nn.Module):
    """MLA then MoE; a ``dense_width`` puts one dense MLP of that width in the MoE's place
    (DeepSeek-V3's ``first_k_dense`` layers, or a cheap MTP drafter with ``model.mtp_ffn:
    dense``), which reports no router statistics."""

    def __init__(self, cfg: ModelConfig, layer_index: int,
                 dense_width: int | None = None) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        attention = (LatentRopeAttention if cfg.attention == "latent_rope"
                     else MultiHeadLatentAttention)
        self.attn = attention(cfg, layer_index)
        self.moe_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        if dense_width is None:
            self.moe = MoE(cfg)
        else:
            self.mlp = FeedForward(cfg.hidden_size, dense_width, cfg.expert_activation)
        self.dropout = cfg.dropout  # on each branch's output, before the residual add

    @property
    def is_dense(self) -> bool:
        return hasattr(self, "mlp")

    def forward(self, x: torch.Tensor, rope_q: tuple[torch.Tensor, torch.Tensor],
                rope_k: tuple[torch.Tensor, torch.Tensor], cache: LatentCache | None,
                mask: torch.Tensor | None, with_stats: bool = True):
        p = self.dropout if self.training else 0.0
        x = x + dropout(self.attn(self.attn_norm(x), rope_q, rope_k, cache, mask), p)
        if self.is_dense:
            return x + dropout(self.mlp(self.moe_norm(x)), p), None
        moe_out, stats = self.moe(self.moe_norm(x), with_stats)
        return x + dropout(moe_out, p), stats


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """``F.dropout(x, p)`` (training); ``x`` itself when ``p`` is 0, so a model without
    dropout, and every forward outside training, runs no extra op and draws no random
    numbers (its steps, and its RNG's state, are bitwise those of a model without the
    option)."""
    return F.dropout(x, p, training=True) if p else x


def check_model_fits(cfg: ModelConfig, what: str | None = None) -> None:
    """Refuse, before building anything, a model whose weights cannot fit the default
    device's memory (the CPU's when that device is ``meta``, where a model is built for
    its shapes and made real later): every path that builds a model from someone else's
    config (a checkpoint's, a transformers folder's) passes here."""
    device = torch.get_default_device()
    check_fits(model_memory(cfg), "cpu" if device.type == "meta" else device,
               what or f"a model of hidden_size {cfg.hidden_size} x {cfg.num_layers} layers")


class DeepSeekMini(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        check_model_fits(cfg)
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, cfg.dense_width if i < cfg.first_k_dense else None)
            for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # None keeps the full head (and the state dict's keys) as they always were.
        self.head = (TrimmedHead(cfg.vocab_size, cfg.hidden_size, cfg.head_vocab)
                     if cfg.head_vocab else None)
        # Built on the meta device (drawing no random numbers) and initialised after every
        # main parameter by reset_parameters, so the main model's initial weights do not
        # depend on mtp_depth. Each module's layer index is its slot in the drafting cache.
        with torch.device("meta"):
            self.mtp = nn.ModuleList(
                MTPModule(cfg.hidden_size, cfg.norm_eps,
                          DecoderLayer(cfg, k, cfg.expert_hidden if cfg.mtp_ffn == "dense"
                                       else None))
                for k in range(cfg.mtp_depth))
        self.mtp.to_empty(device=self.embed.weight.device)
        for router in sigmoid_routers(self.mtp):  # to_empty leaves buffers uninitialised
            router.expert_bias.zero_()
        cos, sin = rope_tables(cfg.rope_dim, cfg.max_position, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """normal(0, 0.02) everywhere; residual-output projections scaled by 1/sqrt(2L) so
        the residual stream's variance does not grow with depth (GPT-2). The trimmed
        head's "other" vector is a head row like the embedding's."""
        out_std = 0.02 / math.sqrt(2 * self.config.num_layers)
        for name, p in self.named_parameters():
            if name == "head.other":
                nn.init.normal_(p, std=0.02)
            elif p.dim() < 2:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "w_down", "down.weight")):
                nn.init.normal_(p, std=out_std)
            else:
                nn.init.normal_(p, std=0.02)

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (and the cache's): the float weights', which a
        quantized model (quantize.py) keeps in its norms."""
        return self.norm.weight.dtype

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, *,
                cache: LatentCache | None = None, positions: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                logits_to_keep: int = 0, mtp: bool = True) -> ModelOutput:
        """``input_ids`` and ``targets`` [B, T] (target -100 is ignored).

        ``positions`` [B, T] gives the tokens' RoPE positions (default: 0, 1, ... or, with
        a ``cache``, right after the cached ones) and ``attention_mask`` [B, T] marks real
        tokens (0 for left padding, which no token attends to). With a ``cache``, the
        tokens are appended to it and attend to everything cached before them.
        ``logits_to_keep > 0`` computes logits for the last positions only. With targets
        and MTP modules (unless ``mtp`` is False), ``mtp_ce`` is their mean CE and their
        router losses join ``aux``.
        """
        batch, steps = input_ids.shape
        if positions is None:
            start = cache.length if cache is not None else 0
            if start + steps > self.config.max_position:
                raise ValueError(f"{start + steps} positions exceed model.max_position "
                                 f"({self.config.max_position})")
            positions = torch.arange(start, start + steps, device=input_ids.device)
            positions = positions.expand(batch, steps)
        rope_q = self._rope(positions)
        mask = None
        if cache is not None:
            cache.append(positions, attention_mask)
            # The decoupled rope key is rotated once, when cached: only the seed's needs
            # every cached position's table.
            rope_k = (self._rope(cache.key_positions(steps))
                      if self.config.attention == "latent" else rope_q)
            mask = cache.attention_mask(steps)
        else:
            rope_k = rope_q
            if attention_mask is not None:
                mask = padded_causal_mask(attention_mask.bool(), 0)
        # Router statistics cost a dozen small ops per layer: generation (a cache, no
        # targets) goes without them.
        with_stats = cache is None or targets is not None
        x, tied_head = self._embed(input_ids, targets)
        x = dropout(x, self.config.dropout if self.training else 0.0)
        stats = []
        for layer in self.layers:
            x, layer_stats = layer(x, rope_q, rope_k, cache, mask, with_stats)
            if layer_stats is not None:
                stats.append(layer_stats)
        trunk = x
        x = self.norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        out = ModelOutput(hidden=x, head=self.head_logits, trunk=trunk)
        if targets is None:  # now, under the caller's autocast and grad mode
            out.logits = self.head_logits(x, cache)
        if with_stats:
            out.expert_counts, out.router_entropy = self._router_stats(stats, x)
        if targets is not None:
            # gathered once for the model and its MTP modules
            weight = self._head_weight(tied_head)
            out.ce = self._head_ce(x.flatten(0, 1), weight, targets.flatten())
            if mtp and len(self.mtp):
                out.mtp_ce, mtp_stats = self._mtp_loss(trunk, input_ids, targets, positions,
                                                       attention_mask, weight)
                if mtp_stats:
                    out.mtp_expert_counts = torch.stack([s.expert_counts for s in mtp_stats])
                stats = stats + mtp_stats
            zero = out.ce.new_zeros(())  # a model with no MoE layer has no router loss
            out.balance_loss = sum((s.balance_loss for s in stats), zero)
            out.z_loss = sum((s.z_loss for s in stats), zero)
            out.aux = out.balance_loss + out.z_loss
            out.loss = out.ce + out.aux
        return out

    def _router_stats(self, stats: list, x: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert counts [MoE layers, experts] and router entropies [MoE layers]; empty
        (zero rows) for an all-dense model (``first_k_dense == num_layers``)."""
        if not stats:
            return (x.new_zeros((0, self.config.num_experts), dtype=torch.long),
                    x.new_zeros((0,), dtype=torch.float32))
        return (torch.stack([s.expert_counts for s in stats]),
                torch.stack([s.router_entropy for s in stats]))

    def _embed(self, input_ids: torch.Tensor, targets: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The tokens' embeddings and, in a training forward of a tied model on a CPU, the
        head's weight as handed out by the lookup (tied_embedding.py: the two gradients
        meet in one buffer); otherwise None, and the head reads its own weight. CPU only:
        there ``index_add_`` adds repeated ids in order, where CUDA's atomics would make
        the sum's rounding differ from run to run."""
        weight = getattr(self.embed, "weight", None)
        tied = (targets is not None and torch.is_grad_enabled() and weight is not None
                and weight.device.type == "cpu"
                and isinstance(self.embed, nn.Embedding) and isinstance(self.lm_head, nn.Linear)
                and self.lm_head.weight is weight and weight.requires_grad)
        if not tied:
            return self.embed(input_ids), None
        return tied_lookup(weight, input_ids)

    def _head_weight(self, full: torch.Tensor | None = None) -> Rows | None:
        """The rows the head scores: the full head's [V, h] (``full``, else the head's
        own weight), or the trimmed head's. A quantized model (quantize.py) has no float
        weight: None for a full head, which scores through its own module, and a trimmed
        head's quantized rows (a module)."""
        quantized = not isinstance(self.lm_head, nn.Linear)
        if full is None and not quantized:
            full = self.lm_head.weight
        if self.head is None:
            return full
        return self.head.weight(full)

    def _head_ce(self, hidden: torch.Tensor, weight: Rows | None,
                 targets: torch.Tensor) -> torch.Tensor:
        """Mean CE over the full vocabulary of ``hidden`` [n, h] against ``targets`` [n]
        (a quantized head: forward only, chunked through the head module)."""
        if weight is None:
            return head_cross_entropy(hidden, self.lm_head, targets)
        if self.head is None:
            return linear_cross_entropy(hidden, weight, targets)
        return self.head.cross_entropy(hidden, weight, targets)

    def head_logits(self, hidden: torch.Tensor, cache: LatentCache | None = None
                    ) -> torch.Tensor:
        """Logits over the full vocabulary [..., V] of final-norm states ``hidden``."""
        if self.head is None:
            return self.lm_head(hidden)
        return self.head.logits(hidden, self._generation_rows(cache))

    def _generation_rows(self, cache: LatentCache | None) -> Rows:
        """The trimmed head's rows; a generation (a cache, no gradient) gathers them once,
        in the autocast dtype, and reuses them at every step: the weights do not change
        within it, and a gather per token moves the kept rows twice more than the matmul
        reads them. A quantized head's rows were gathered when it was quantized."""
        if cache is None or torch.is_grad_enabled() or not isinstance(self.lm_head, nn.Linear):
            return self._head_weight()
        if cache.head_rows is None:
            rows, device = self._head_weight(), self.device.type
            if torch.is_autocast_enabled(device):
                rows = rows.to(torch.get_autocast_dtype(device))
            cache.head_rows = rows
        return cache.head_rows

    def _mtp_loss(self, trunk: torch.Tensor, input_ids: torch.Tensor, targets: torch.Tensor,
                  positions: torch.Tensor, attention_mask: torch.Tensor | None,
                  weight: Rows | None):
        """Mean CE over MTP depths, and their MoE layers' router statistics. Depth k at
        position i joins depth k-1's state with the embedding of token i + k (input k
        places on) and is scored on target i + k; each depth is one position shorter."""
        hidden, ces, stats = trunk, [], []
        for k, module in enumerate(self.mtp, start=1):
            steps = input_ids.shape[1] - k
            if steps <= 0:
                raise ValueError(f"sequences of {input_ids.shape[1]} tokens are too short for "
                                 f"model.mtp_depth {len(self.mtp)}")
            rope = self._rope(positions[:, :steps])
            mask = (None if attention_mask is None
                    else padded_causal_mask(attention_mask[:, :steps].bool(), 0))
            hidden, layer_stats = module(hidden[:, :steps], self.embed(input_ids[:, k:]),
                                         rope, rope, None, mask, True)
            ces.append(self._head_ce(self.norm(hidden).flatten(0, 1), weight,
                                     targets[:, k:].flatten()))
            if layer_stats is not None:
                stats.append(layer_stats)
        return torch.stack(ces).mean(), stats

    def mtp_step(self, depth: int, hidden: torch.Tensor, tokens: torch.Tensor,
                 cache: LatentCache, positions: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP module ``depth`` (0-based) over ``hidden`` [B, T, h] and ``tokens`` [B, T] at
        ``positions`` [B, T], against ``cache`` (one layer per depth, ``new_cache(...,
        num_layers=mtp_depth)``): depth 0 reserves the slots, deeper depths fill the same
        slots of their own layer. Returns the module's output [B, T, h] (the next depth's
        input) and the last position's logits [B, V]."""
        steps = tokens.shape[1]
        if depth == 0:
            cache.append(positions, None)
        rope_q = self._rope(positions)
        rope_k = self._rope(cache.key_positions(steps))
        hidden, _ = self.mtp[depth](hidden, self.embed(tokens), rope_q, rope_k, cache,
                                    cache.attention_mask(steps), False)
        return hidden, self.head_logits(self.norm(hidden[:, -1]), cache)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                  static: bool = False, num_layers: int | None = None) -> LatentCache:
        """An empty cache for ``max_len`` tokens per row (``static``: for a compiled
        decode step, see cache.py) of the main layers or ``num_layers`` (MTP drafting)."""
        cfg = self.config
        rope_size = cfg.qk_rope_head_dim if cfg.attention == "latent_rope" else 0
        return LatentCache(num_layers or cfg.num_layers, batch_size, max_len,
                           cfg.kv_latent_dim, self.device, dtype or self.dtype,
                           static, rope_size)

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu"
                        ) -> DeepSeekMini:
        """The model stored in a ``latest.pt`` / ``best.pt`` (or a warm-start file), in
        eval mode (see ``from_checkpoint_dict``)."""
        return cls.from_checkpoint_dict(load_checkpoint(path, map_location), path).to(
            map_location)

    @classmethod
    def from_checkpoint_dict(cls, ckpt: dict, path: str | Path) -> DeepSeekMini:
        """The model of an already read checkpoint (``path`` only names it in errors), for
        callers that also need its other entries. In eval mode: a stored model is for
        using, and one trained with ``model.dropout`` would otherwise drop activations in
        ``generate`` or scoring (``.train()`` to train it on)."""
        model = cls(model_config_of(ckpt, path))
        load_weights(model, ckpt["model"], f"checkpoint {path}")
        return model.eval()


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``model.load_state_dict(state)``, a state that does not fit being a UserError that
    names the first tensor at fault (``what`` names the state's origin)."""
    mismatch = state_dict_mismatch(model.state_dict(), state)
    if mismatch is not None:
        raise UserError(f"{what} does not match its model config: {mismatch}")
    model.load_state_dict(state)


def compile_model(model: nn.Module, **options) -> nn.Module:
    """``torch.compile(model, **options)``, the grouped expert product left to eager mode
    (see ``moe.grouped_matmul``)."""
    exclude_from_compile()
    return torch.compile(model, **options)
