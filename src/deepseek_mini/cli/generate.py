"""``deepseek-mini generate``: prompts from the command line, stdin or a file (or the
TinyStoriesInstruct fields), the text streamed as it is decoded."""

from __future__ import annotations

import argparse
import select
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..data.instruct import instruct_prompt
from ..data.tokenizer import Tokenizer
from ..errors import UserError
from ..inference.generate import Streamer, check_speculative, generate
from ..inference.loading import load_for_inference
from ..inference.prompts import completion_text, encode_prompts
from ..inference.sampling import CLI_NAMES, check_sampling, check_seed
from ..inference.speculative import SpeculativeStats
from ..inference.streaming import IncrementalDecoder
from ..train.precision import DTYPES, resolve_device
from .threads import print_note, use_threads

DEFAULT_PROMPT = "Once upon a time"
STDIN_WAIT_S = 0.5  # how long a non-interactive stdin may stay silent before it counts as empty


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts the command line asks for: ``--prompt`` (``-`` = stdin),
    ``--prompt-file`` (one per non-empty line), the TinyStoriesInstruct fields, a piped
    stdin, or the default."""
    instruct = any(v is not None for v in (args.summary, args.words, args.features))
    given = args.prompt is not None or args.prompt_file is not None
    if instruct and given:
        raise UserError("--summary / --words / --features build the prompt themselves: drop "
                        "--prompt / --prompt-file")
    if instruct:
        prompts = [instruct_prompt(args.summary, args.words, args.features)]
    else:
        prompts = [_read_stdin(wait=True) if p == "-" else p for p in args.prompt or []]
    if args.prompt_file is not None:
        prompts += _read_prompt_file(Path(args.prompt_file))
    if not given and not instruct:
        piped = _read_stdin(wait=False)
        prompts = [piped if piped else DEFAULT_PROMPT]
    for i, prompt in enumerate(prompts):
        if not prompt.strip():
            raise UserError(f"prompt {i + 1} is empty")
        try:  # arguments in another encoding arrive as surrogate escapes
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise UserError(f"prompt {i + 1} is not UTF-8 text") from None
    return prompts


def _read_stdin(wait: bool) -> str:
    """All of stdin, less one trailing newline. Unless ``wait``, an interactive or silent
    stdin counts as empty, so running the command with nothing piped never hangs."""
    if not wait:
        if sys.stdin is None or sys.stdin.isatty():
            return ""
        try:
            ready, _, _ = select.select([sys.stdin], [], [], STDIN_WAIT_S)
        except (OSError, ValueError):  # not a selectable file (e.g. replaced in tests)
            return ""
        if not ready:
            return ""
    raw = getattr(sys.stdin, "buffer", None)
    if raw is None:  # a text stream without bytes underneath (replaced in tests)
        return sys.stdin.read().removesuffix("\n")
    try:  # strictly: the locale's surrogate escapes would reach the tokenizer as a TypeError
        text = raw.read().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"the prompt on stdin is not UTF-8 text ({exc.reason} at byte "
                        f"{exc.start})") from None
    return text.replace("\r\n", "\n").removesuffix("\n")


def _read_prompt_file(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"prompt file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read prompt file {path}: {exc}") from None
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompt file {path} holds no prompt")
    return prompts


def check_arguments(args: argparse.Namespace) -> None:
    """Argument values, checked before the (slow) checkpoint load."""
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be positive, got {args.threads}")
    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    check_sampling(args.temperature, args.top_k, args.top_p, CLI_NAMES)
    check_seed(args.seed, CLI_NAMES)
    if args.compile and args.no_cache:
        raise UserError("--compile compiles the cached decode step: drop --no-cache")
    if args.speculative and (args.compile or args.no_cache):
        raise UserError("--speculative verifies drafts over the eager cache: drop "
                        + ("--compile" if args.compile else "--no-cache"))


def stdout_streamer(tok: Tokenizer) -> tuple[Streamer, Callable[[], None]]:
    """A streamer printing row 0's text as it completes (nothing after end-of-text), and
    the function that prints what is left at the end."""
    decoder = IncrementalDecoder(tok.decode)
    done = False

    def stream(tokens: torch.Tensor) -> None:
        nonlocal done
        token = int(tokens[0])
        done = done or token == tok.eos_id
        if not done:
            sys.stdout.write(decoder.push(token))
            sys.stdout.flush()

    def finish() -> None:
        sys.stdout.write(decoder.flush() + "\n")
        sys.stdout.flush()

    return stream, finish


def run(args: argparse.Namespace) -> None:
    check_arguments(args)
    device = resolve_device(args.device, "--device")
    note = use_threads(args.threads, "decode", device)
    prompts = read_prompts(args)
    model, tok, _ = load_for_inference(args.checkpoint, device, DTYPES[args.dtype],
                                       args.tokenizer, quantize=args.quantize)
    ids, mask, max_new = encode_prompts(tok, prompts, model.config.max_position,
                                        args.max_new_tokens)
    if max_new < args.max_new_tokens:
        print(f"note: generating at most {max_new} new tokens: the prompt ({ids.shape[1]} "
              f"tokens) and --max-new-tokens {args.max_new_tokens} exceed model.max_position "
              f"{model.config.max_position}", file=sys.stderr)
    if args.speculative:  # before the prompt is printed
        check_speculative(model, ids, not bool(mask.all()), not args.no_cache, args.compile)
    print_note(note)
    stats = SpeculativeStats()
    options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   seed=args.seed, use_cache=not args.no_cache, eos_id=tok.eos_id,
                   compile=args.compile, attention_mask=mask, speculative=args.speculative,
                   stats=stats)
    started = time.perf_counter()
    if len(prompts) == 1:
        stream, finish = stdout_streamer(tok)
        sys.stdout.write(prompts[0])
        sys.stdout.flush()
        try:
            out = generate(model, ids, max_new, streamer=stream, **options)
        except UserError:  # the error line must not continue the story's
            sys.stdout.write("\n")
            sys.stdout.flush()
            raise
        finish()
    else:
        out = generate(model, ids, max_new, **options)
        for i, (prompt, new_ids) in enumerate(zip(prompts, out[:, ids.shape[1]:].tolist(),
                                                  strict=True)):
            print(f"--- sample {i + 1} ---")
            print(prompt + completion_text(tok, new_ids))
    if args.stats:
        print_stats(out.shape[0] * (out.shape[1] - ids.shape[1]),
                    time.perf_counter() - started, stats)


def print_stats(new_tokens: int, seconds: float, stats: SpeculativeStats) -> None:
    """Decoding speed on stderr (so the text on stdout stays clean), with the speculative
    rounds' acceptance when there were any."""
    line = (f"stats: {new_tokens} new tokens in {seconds:.2f}s, "
            f"{new_tokens / max(seconds, 1e-9):.1f} tokens/s (prompt included)")
    if stats.rounds:
        line += (f"; speculative: {stats.rounds} verification steps, "
                 f"{stats.accepted_per_round:.2f} drafts accepted per step "
                 f"({stats.accepted}/{stats.drafted}), first draft accepted "
                 f"{100 * stats.first_acceptance:.0f}% of the time")
    else:
        line += "; plain decoding"
    print(line, file=sys.stderr)
