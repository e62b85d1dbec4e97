"""Self-speculative decoding: the model's MTP modules draft, the model itself verifies.

Each round, with the newest kept token at index ``n`` not yet fed to the model:

1. *Draft*: MTP depth 1 reads the main model's last hidden state at ``n - 1`` and token
   ``n`` and guesses token ``n + 1``; depth 2 reads depth 1's state and that guess, and so
   on, up to ``d <= mtp_depth`` guesses. The MTP layers attend over their own latent cache,
   which first catches up on the positions kept since the last round.
2. *Verify*: one forward of the main model over token ``n`` and the ``d`` guesses (a
   ``d + 1``-token step over the latent cache) gives the model's own distribution after
   each of them.
3. *Accept*: greedy keeps the guesses that equal the model's argmax; sampling keeps guess
   ``x`` with probability ``min(1, p(x) / q(x))`` and, at the first refusal, draws from
   ``max(0, p - q)`` renormalised (Leviathan et al., 2023), so every kept token has
   exactly the distribution plain sampling gives it. Either way one token of the
   model's own follows the accepted guesses, so a round keeps ``1 .. d + 1`` tokens.
4. *Roll back*: both caches are truncated past what rested on a refused guess; nothing is
   recomputed but the few MTP positions whose inputs changed.

Batch 1 only: rows would accept different numbers of guesses, and the caches keep one
length for all rows. Each round reads the accepted count on the host (one sync).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..model.cache import LatentCache
from ..model.transformer import DeepSeekMini
from .sampling import draw, probabilities

Streamer = Callable[[torch.Tensor], None]


@dataclass
class SpeculativeStats:
    """Counts over one or more speculative generations (fill one by passing it in)."""

    rounds: int = 0  # verification forwards
    drafted: int = 0  # guesses made
    accepted: int = 0  # guesses kept
    first_drafted: int = 0  # rounds that made at least one guess
    first_accepted: int = 0  # ... whose first guess was kept

    @property
    def accepted_per_round(self) -> float:
        return self.accepted / self.rounds if self.rounds else 0.0

    @property
    def first_acceptance(self) -> float:
        return self.first_accepted / self.first_drafted if self.first_drafted else 0.0


@dataclass
class Sampler:
    """How tokens are chosen: greedy at temperature 0, else from ``probabilities``."""

    temperature: float
    top_k: int | None
    top_p: float | None
    generator: torch.Generator | None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return probabilities(logits, self.temperature, self.top_k, self.top_p)

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        """One index per row of ``probs`` [B, V] (weights need not sum to one)."""
        return draw(probs, self.generator)

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """One token per row of ``logits`` [B, V], as plain decoding chooses it."""
        return logits.argmax(dim=-1) if self.greedy else self.draw(self.probs(logits))


def accept_drafts(target_logits: torch.Tensor, drafts: torch.Tensor,
                  draft_probs: torch.Tensor | None, sampler: Sampler
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """How many of each row's ``d`` guesses to keep, and the token that follows them.

    ``target_logits`` [B, d + 1, V]: the model's logits after the kept token and after
    each guess; ``drafts`` [B, d]; ``draft_probs`` [B, d, V]: the distributions the
    guesses were drawn from (None when greedy). Returns ``accepted`` [B] and ``next`` [B].
    """
    rows = torch.arange(drafts.shape[0], device=drafts.device)
    if drafts.shape[1] == 0:  # no room left to guess: a plain step
        return torch.zeros_like(rows), sampler.choose(target_logits[:, 0])
    if sampler.greedy:
        choice = target_logits.argmax(dim=-1)
        accepted = (drafts == choice[:, :-1]).long().cumprod(dim=-1).sum(dim=-1)
        return accepted, choice[rows, accepted]
    p = sampler.probs(target_logits)
    guess = drafts[..., None]
    ratio_ok = (torch.rand(drafts.shape, device=drafts.device, generator=sampler.generator)
                * draft_probs.gather(-1, guess)[..., 0] < p[:, :-1].gather(-1, guess)[..., 0])
    accepted = ratio_ok.long().cumprod(dim=-1).sum(dim=-1)
    # After a refusal, the residual max(0, p - q) at that position; after d acceptances,
    # p itself (q padded with zeros). A residual of zero mass cannot be reached (p = q
    # accepts surely) but rounding could leave one: p then.
    q = torch.cat([draft_probs, torch.zeros_like(p[:, :1])], dim=1)
    residual = (p[rows, accepted] - q[rows, accepted]).clamp_min(0)
    empty = residual.sum(dim=-1, keepdim=True) <= 0
    return accepted, sampler.draw(torch.where(empty, p[rows, accepted], residual))


@dataclass
class _State:
    """One generation's buffers: token ids (room for guesses past the end), the main
    model's last hidden state per position, positions, and the two caches."""

    ids: torch.Tensor
    trunk: torch.Tensor
    positions: torch.Tensor
    cache: LatentCache
    draft_cache: LatentCache


def _draft(model: DeepSeekMini, state: _State, n: int, depths: int, sampler: Sampler
           ) -> torch.Tensor | None:
    """Write ``depths`` guesses into ``ids[n + 1 : n + 1 + depths]``; return the
    distributions they were drawn from [1, depths, V] (None when greedy).

    The MTP cache first catches up: every depth runs over the positions from its length
    to ``n - 1``, depth k (0-based) reading token ``i + k + 1`` at position ``i``."""
    start = state.draft_cache.length
    hidden = state.trunk[:, start:n]
    positions = state.positions[:, start:n]
    dists = []
    for k in range(depths):
        hidden, logits = model.mtp_step(k, hidden, state.ids[:, start + k + 1:n + k + 1],
                                        state.draft_cache, positions)
        if sampler.greedy:
            state.ids[:, n + k + 1] = logits.argmax(dim=-1)
        else:
            dists.append(sampler.probs(logits))
            state.ids[:, n + k + 1] = sampler.draw(dists[-1])
    return torch.stack(dists, dim=1) if dists else None


def speculative_generate(model: DeepSeekMini, prompt_ids: torch.Tensor, max_new_tokens: int,
                         sampler: Sampler, eos_id: int | None = None,
                         streamer: Streamer | None = None,
                         stats: SpeculativeStats | None = None) -> torch.Tensor:
    """Continue one prompt [1, T] (checked by ``generate``) by drafting and verifying;
    returns ``[1, T + m]`` ids, ``m <= max_new_tokens``, ending at ``eos_id`` if produced."""
    if max_new_tokens == 0:
        return prompt_ids
    depth = model.config.mtp_depth
    prompt_len = prompt_ids.shape[1]
    total = prompt_len + max_new_tokens
    device = model.device
    ids = torch.empty(1, total + depth, dtype=torch.long, device=device)
    ids[:, :prompt_len] = prompt_ids
    state = _State(ids, torch.empty(1, total, model.config.hidden_size, device=device,
                                    dtype=model.dtype),
                   torch.arange(total + depth, device=device)[None],
                   model.new_cache(1, total), model.new_cache(1, total, num_layers=depth))
    out = model(ids[:, :prompt_len], cache=state.cache, positions=state.positions[:, :prompt_len],
                logits_to_keep=1)
    state.trunk[:, :prompt_len] = out.trunk
    ids[:, prompt_len] = sampler.choose(out.logits[:, -1])
    n = prompt_len
    if _emit(ids[0, n:n + 1], streamer, eos_id):
        return ids[:, :n + 1]
    while n + 1 < total:
        depths = min(depth, total - n - 2)
        draft_probs = _draft(model, state, n, depths, sampler)
        out = model(ids[:, n:n + depths + 1], cache=state.cache,
                    positions=state.positions[:, n:n + depths + 1], logits_to_keep=depths + 1)
        accepted, following = accept_drafts(out.logits, ids[:, n + 1:n + depths + 1],
                                            draft_probs, sampler)
        kept = int(accepted[0])  # the round's one host sync
        ids[:, n + kept + 1] = following
        state.cache.truncate(n + kept + 1)
        state.trunk[:, n:n + kept + 1] = out.trunk[:, :kept + 1]
        if depths:
            state.draft_cache.truncate(min(n, n + kept - depths + 1))
        _count(stats, depths, kept)
        finished = _emit(ids[0, n + 1:n + kept + 2], streamer, eos_id)
        n += kept + 1
        if finished is not None:
            return ids[:, :n - kept + finished]
    return ids[:, :total]


def _emit(tokens: torch.Tensor, streamer: Streamer | None, eos_id: int | None) -> int | None:
    """Stream ``tokens`` one at a time up to and including the first ``eos_id``; the
    number of them kept when one was found, else None."""
    tokens = tokens.tolist()
    end = tokens.index(eos_id) + 1 if eos_id in tokens else None
    if streamer is not None:
        for token in tokens[:end]:
            streamer(torch.tensor([token]))
    return end


def _count(stats: SpeculativeStats | None, depths: int, kept: int) -> None:
    if stats is None:
        return
    stats.rounds += 1
    stats.drafted += depths
    stats.accepted += kept
    if depths:
        stats.first_drafted += 1
        stats.first_accepted += kept > 0

