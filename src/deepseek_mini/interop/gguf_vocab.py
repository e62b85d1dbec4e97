"""The model's tokenizer as llama.cpp's ``gpt2`` BPE vocabulary, with the prompt rule.

llama.cpp does not read ``tokenizer.json``: a GGUF carries the token strings (byte-level,
as ``tokenizer.json`` writes them), the merges, a type per token and the name of a
pre-tokenizer whose split llama.cpp hard-codes. The name is read off the tokenizer's own
pre-tokenizer, so llama.cpp splits text exactly as ours does: byte-level alone is
``gpt-2``; individual digits then byte-level is SmolLM2's ``smollm``. Anything else has no
llama.cpp twin we could vouch for, and is refused.

Every prompt here follows an end-of-text token (inference/prompts.py), so the GGUF names
``<|endoftext|>`` its BOS and asks for it (``add_bos_token``): llama.cpp then tokenises a
prompt as ``generate`` does. It is the EOS too, so decoding stops where ours does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..data.tokenizer import Tokenizer
from ..errors import UserError

# token types (gguf.TokenType; kept as ints so this module needs no gguf import)
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
_DIGITS = {"type": "Digits", "individual_digits": True}


@dataclass
class GgufVocab:
    """What the GGUF's ``tokenizer.ggml.*`` keys hold."""

    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    bos_id: int
    eos_id: int


def gguf_vocab(tok: Tokenizer) -> GgufVocab:
    """``tok`` in llama.cpp's terms; a tokenizer llama.cpp would split differently is a
    UserError naming what differs."""
    spec = json.loads(tok.backend.to_str())
    model = spec.get("model") or {}
    where = f"tokenizer {tok.path}"
    if model.get("type") != "BPE" or model.get("byte_fallback") or spec.get("normalizer"):
        raise UserError(f"{where}: llama.cpp's gpt2 vocabulary needs a byte-level BPE "
                        "without a normalizer or byte fallback")
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"), where)
    vocab: dict[str, int] = model["vocab"]
    tokens = [""] * tok.vocab_size
    for text, index in vocab.items():
        tokens[index] = text
    types = [NORMAL] * tok.vocab_size
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    if "" in tokens:
        raise UserError(f"{where}: token id {tokens.index('')} has no text")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return GgufVocab(pre, tokens, types, merges, bos_id=tok.eos_id, eos_id=tok.eos_id)


def _pre_tokenizer_name(pre: dict[str, Any] | None, where: str) -> str:
    """llama.cpp's name for this pre-tokenizer: ``gpt-2`` or ``smollm``."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and _is(steps[0], _BYTE_LEVEL):
        return "gpt-2"
    if len(steps) == 2 and _is(steps[0], _DIGITS) and _is(steps[1], _BYTE_LEVEL):
        return "smollm"
    raise UserError(f"{where}: its pre-tokenizer ({json.dumps(pre)}) has no llama.cpp "
                    "equivalent known here (byte-level, optionally after individual digits)")


def _is(step: dict[str, Any] | None, reference: dict[str, Any]) -> bool:
    return bool(step) and all(step.get(k) == v for k, v in reference.items())
