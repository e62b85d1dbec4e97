"""``deepseek-mini eval``: held-out loss of a checkpoint or of a transformers model
(``--hf-model``), as text or JSON."""

from __future__ import annotations

import argparse
import json
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from ..config import DEFAULT_CACHE_DIR, Config, DataConfig
from ..data.tokenizer import load_tokenizer
from ..data.tokens import held_out_documents
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
from ..files import atomic_write_text
from ..inference.loading import load_for_inference
from ..inference.sampling import CLI_NAMES, check_sampling
from ..instruct_eval import (
    DECODINGS,
    CheckpointBackend,
    Decoding,
    HFBackend,
    InstructReport,
    run_instruct_eval,
    tasks_from_documents,
)
from ..train.precision import resolve_device
from .threads import print_note, use_threads


def check_arguments(args: argparse.Namespace) -> None:
    for name in ("seq_len", "max_tokens", "batch_size", "threads", "max_stories", "top_k"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.hf_model and args.experts:
        raise UserError("--experts needs a deepseek-mini --checkpoint (a transformers model "
                        "reports no expert usage)")
    if args.hf_model and args.quantize:
        raise UserError("--quantize applies to a deepseek-mini --checkpoint, not --hf-model")
    instruct_only = [name for name in ("held_out", "config", "set")
                     if getattr(args, name) and not args.instruct]
    if instruct_only:
        raise UserError(f"--{instruct_only[0].replace('_', '-')} belongs to --instruct")
    if args.instruct and args.experts:
        raise UserError("--experts reports the expert usage of the loss eval, not --instruct")
    if args.held_out and args.data:
        raise UserError("--held-out reads the run's own data: drop --data")
    if not args.held_out and not args.data:
        raise UserError("--data FILE is required (or --instruct --held-out)")
    if args.held_out and args.hf_model and not args.config:
        raise UserError("--held-out with --hf-model needs --config: the training run's "
                        "data and seed say which stories it held out")
    if args.set and not args.config:
        raise UserError("--set changes the keys of --config: give --config too")
    if args.json not in (None, "-") and not Path(args.json).expanduser().parent.is_dir():
        raise UserError(f"--json {args.json}: its folder does not exist")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    check_sampling(args.temperature, args.top_k, None, CLI_NAMES)


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
    if args.instruct:
        _instruct_run(args, device, note)
        return
    docs = read_documents(args.data)
    score_with = _hf_run if args.hf_model else _checkpoint_run
    result = score_with(args, docs, device, note)
    report: dict[str, Any] = result.to_dict()
    if args.experts:
        report["experts"] = result.usage.to_dict()
    if _write_json(args.json, report):
        return
    print(f"scored {result.tokens:,} tokens ({result.bytes:,} bytes) of {args.data}")
    print(f"ce {result.ce:.4f} nats/token   ppl {result.ppl:.3f}   bpb {result.bpb:.4f}")
    if args.experts:
        print(result.usage.table())
        print(result.usage.summary())


def _write_json(target: str | None, report: dict[str, Any]) -> bool:
    """``--json``: the report on stdout (True: print nothing else), or into FILE."""
    if target is None:
        return False
    text = json.dumps(report, allow_nan=False)
    if target == "-":
        print(text)
        return True
    atomic_write_text(text + "\n", Path(target).expanduser())
    return False


def _held_out_stories(args: argparse.Namespace, trained: Config | None) -> list[str]:
    """--held-out: the documents the run's split kept for validation (the run: --config
    and --set when given, else the checkpoint's own config)."""
    cfg = Config.from_yaml(args.config, args.set) if args.config else trained
    if cfg is None:
        raise UserError("--held-out needs --config (the training run's data and seed)")
    docs = list(islice(held_out_documents(cfg.data, cfg.train.seed),
                       max(args.max_stories * 4, 64)))
    if not docs:
        raise UserError("--held-out: the run holds out no document (data.val_fraction)")
    return docs


def _instruct_run(args: argparse.Namespace, device: torch.device, note: str | None) -> None:
    # a missing or binary file fails before the (slow) model load
    given = read_documents(args.data) if args.data else None
    decoding = Decoding(args.max_new_tokens, args.temperature, args.top_k)
    trained: Config | None = None
    if args.hf_model:
        model, hf_tok = load_hf_model(args.hf_model)
        model.to(device)
        chat = args.prompt_style == "english" and bool(getattr(hf_tok, "chat_template", None))
        backend: Any = HFBackend(model, hf_tok, hf_separator(hf_tok, args.hf_model), decoding,
                                 chat)
    else:
        model, tok, trained = load_for_inference(args.checkpoint, device,
                                                 tokenizer=args.tokenizer,
                                                 quantize=args.quantize)
        backend = CheckpointBackend(model, tok, decoding)
    docs = given if given is not None else _held_out_stories(args, trained)
    tasks = tasks_from_documents(docs, args.seed, args.max_stories)
    decodings = DECODINGS if args.decoding == "both" else (args.decoding,)
    print_note(note)
    report = run_instruct_eval(tasks, backend, args.prompt_style, decodings, args.seed)
    if _write_json(args.json, report.to_dict()):
        return
    source = "the run's held-out stories" if args.held_out else args.data
    print(f"{len(tasks)} stories of {source}, {args.prompt_style} prompts, at most "
          f"{args.max_new_tokens} new tokens")
    print(instruct_table(report))


def instruct_table(report: InstructReport) -> str:
    """The figures per decoding, one row each."""
    def share(row: dict[str, Any], name: str) -> str:
        value = row[name]
        return "n/a" if value is None else f"{100 * value:.0f}% of {row[name + '_asked']}"

    lines = [f"{'decoding':<9} {'all words':>14} {'sentence':>14} {'dialogue':>14} "
             f"{'mean words':>10}"]
    for name, row in report.results.items():
        lines.append(f"{name:<9} {share(row, 'all_words'):>14} {share(row, 'sentence'):>14} "
                     f"{share(row, 'dialogue'):>14} {row['mean_words']:>10.1f}")
    ce = "n/a" if report.ce is None else f"{report.ce:.4f}"
    lines.append(f"true story given its prompt: ce {ce} nats/token over "
                 f"{report.ce_tokens:,} tokens")
    return "\n".join(lines)
