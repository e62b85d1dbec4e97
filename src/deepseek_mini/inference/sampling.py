"""Choosing the next token from logits: greedy, or sampled after temperature, top-k, top-p.

The order is Hugging Face's: divide by the temperature, keep the ``top_k`` largest logits,
then keep the smallest set of tokens whose probabilities add up to ``top_p`` (nucleus).
Filters set the dropped logits to ``-inf`` and never drop the most likely token, so a row
always has something to sample. Everything is batched over rows and stays on the device.
"""

from __future__ import annotations

import torch

from ..errors import UserError


class SamplingError(UserError, ValueError):
    """A sampling or generation argument out of range: a UserError for the command line,
    a ValueError for Python callers."""


PYTHON_NAMES = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
                "seed": "seed"}
CLI_NAMES = {"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p",
             "seed": "--seed"}
# The smallest temperature above 0 and top_p sampled with: logits are divided by the
# temperature in fp32, so 1e-320 (0 in fp32) or 1e-40 makes them inf and the draw NaN; a
# top_p that is 0 in fp32 (1e-300) drops every token. Below these bounds every draw is the
# most likely token anyway (for any vocabulary under a million ids): use 0 / top_k 1.
MIN_TEMPERATURE = 1e-4
MIN_TOP_P = 1e-6
# What torch.Generator.manual_seed takes: a signed or an unsigned 64-bit integer.
SEED_RANGE = (-(2**63), 2**64 - 1)


class NonFiniteLogits(SamplingError):
    """The model's next-token scores hold inf or NaN: nothing can be sampled from them."""


def check_sampling(temperature: float, top_k: int | None, top_p: float | None,
                   names: dict[str, str] = PYTHON_NAMES) -> None:
    """Reject out-of-range values, naming them as ``names`` spells them."""
    if not temperature >= 0.0:  # also rejects NaN
        raise SamplingError(f"{names['temperature']} must be >= 0 (0 = greedy), "
                            f"got {temperature}")
    if 0.0 < temperature < MIN_TEMPERATURE:
        raise SamplingError(f"{names['temperature']} must be 0 (greedy) or at least "
                            f"{MIN_TEMPERATURE:g}, got {temperature:g}: below it the scores "
                            "overflow and nothing can be sampled")
    if top_k is not None and top_k < 1:
        raise SamplingError(f"{names['top_k']} must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise SamplingError(f"{names['top_p']} must be in (0, 1], got {top_p}")
    if top_p is not None and top_p < MIN_TOP_P:
        raise SamplingError(f"{names['top_p']} must be at least {MIN_TOP_P:g}, got "
                            f"{top_p:g}: below it no token is kept (use top_k 1 for the most "
                            "likely token)")


def check_seed(seed: int | None, names: dict[str, str] = PYTHON_NAMES) -> None:
    """A seed torch's generators take (64 bits), checked before any work is done."""
    low, high = SEED_RANGE
    if seed is not None and not low <= seed <= high:
        raise SamplingError(f"{names['seed']} must be a 64-bit integer, from -2**63 to "
                            f"2**64 - 1, got {seed}")


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row (ties with the k-th are kept too)."""
    if k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep, per row, the most likely tokens until their probability reaches ``p``."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # A token is dropped when the tokens ranked above it already hold p of the mass.
    drop_sorted = (probs.cumsum(dim=-1) - probs) >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def probabilities(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """The distribution sampling draws from (``temperature`` > 0), over the last dim of
    ``logits`` [..., V], in fp32: what speculative decoding compares drafts against."""
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return logits.softmax(dim=-1)


def next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``logits`` [B, V] as a LongTensor [B]; temperature 0 is argmax."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    return draw(probabilities(logits, temperature, top_k, top_p), generator)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of ``probs`` [B, V] (weights need not sum to one). Scores that
    overflowed are an error saying so: one read per step, where decoding reads each
    step's tokens anyway, since multinomial's own refusal is a bare RuntimeError on the
    CPU and a device-side assert on CUDA."""
    if not bool(probs.isfinite().all()):
        raise NonFiniteLogits("the model's next-token scores hold inf or NaN (its weights or "
                              "activations overflow; in 16-bit, try --dtype fp32): nothing "
                              "can be sampled")
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
