"""``deepseek-mini eval``: held-out loss of a checkpoint or of a transformers model
(``--hf-model``), as text or JSON."""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from ..config import DEFAULT_CACHE_DIR, DataConfig
from ..data.tokenizer import load_tokenizer
from ..errors import UserError
from ..evaluation import (
    EvalResult,
    count_bytes,
    deepseek_forward,
    evaluate,
    hf_forward,
    hf_separator,
    load_hf_model,
    read_documents,
    select_segments,
    token_stream,
)
from ..inference.loading import load_for_inference
from ..train.precision import resolve_device
from .threads import print_note, use_threads


def check_arguments(args: argparse.Namespace) -> None:
    for name in ("seq_len", "max_tokens", "batch_size", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.hf_model and args.experts:
        raise UserError("--experts needs a deepseek-mini --checkpoint (a transformers model "
                        "reports no expert usage)")
    if args.hf_model and args.quantize:
        raise UserError("--quantize applies to a deepseek-mini --checkpoint, not --hf-model")


def check_seq_len(seq_len: int, max_position: int | None) -> None:
    if max_position is not None and seq_len > max_position:
        raise UserError(f"--seq-len {seq_len} exceeds the model's max_position {max_position}")


def _checkpoint_run(args: argparse.Namespace, docs: list[str], device: torch.device,
                    note: str | None) -> EvalResult:
    model, tok, config = load_for_inference(args.checkpoint, device, tokenizer=args.tokenizer,
                                            quantize=args.quantize)
    seq_len = args.seq_len or config.data.seq_len
    if args.experts and model.config.first_k_dense >= model.config.num_layers:
        raise UserError(f"--experts: {args.checkpoint} is a dense model (model.first_k_dense "
                        f"= num_layers = {model.config.num_layers}), it has no experts")
    check_seq_len(seq_len, model.config.max_position)
    segments = select_segments(docs, tok, args.max_tokens)
    stream = token_stream(segments, tok.encode_batch, tok.eos_id)
    print_note(note)
    return evaluate(deepseek_forward(model), stream, seq_len, args.batch_size, device,
                    count_bytes(segments), first_moe_layer=model.config.first_k_dense)


def _hf_run(args: argparse.Namespace, docs: list[str], device: torch.device,
            note: str | None) -> EvalResult:
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
    print_note(note)
    return evaluate(hf_forward(model), stream, seq_len, args.batch_size, device,
                    count_bytes(segments))


def run(args: argparse.Namespace) -> None:
    check_arguments(args)
    device = resolve_device(args.device, "--device")
    note = use_threads(args.threads, "eval", device)
    docs = read_documents(args.data)
    score_with = _hf_run if args.hf_model else _checkpoint_run
    result = score_with(args, docs, device, note)
    if args.json:
        report: dict[str, Any] = result.to_dict()
        if args.experts:
            report["experts"] = result.usage.to_dict()
        print(json.dumps(report, allow_nan=False))
        return
    print(f"scored {result.tokens:,} tokens ({result.bytes:,} bytes) of {args.data}")
    print(f"ce {result.ce:.4f} nats/token   ppl {result.ppl:.3f}   bpb {result.bpb:.4f}")
    if args.experts:
        print(result.usage.table())
        print(result.usage.summary())
