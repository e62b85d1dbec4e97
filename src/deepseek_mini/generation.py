"""Sampling from the model, and the ``generate`` command.

The prompt is run through the model once (prefill), filling a preallocated MLA latent
cache; then each step feeds only the newest token. Prompts of different lengths share a
batch by left padding: ``attention_mask`` marks the real tokens, no token attends to
padding, and each token's RoPE position is its index among its row's real tokens, so every
row gets exactly the tokens it would get alone. ``use_cache=False`` recomputes the whole
sequence at every step instead, the reference the cache is checked against.

The command prepends ``<|endoftext|>`` to each prompt, since every training document
followed one, and stops a row at the next ``<|endoftext|>``.
"""

from __future__ import annotations

import argparse
import select
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from .checkpoint import load_checkpoint, model_from_checkpoint
from .config import DataConfig
from .errors import UserError
from .model import DeepSeekMini
from .precision import resolve_device
from .sampling import CLI_NAMES, SamplingError, check_sampling, next_token
from .streaming import IncrementalDecoder
from .tokenizer import DEFAULT_CACHE_DIR, Tokenizer, load_tokenizer

Streamer = Callable[[torch.Tensor], None]
DEFAULT_PROMPT = "Once upon a time"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STDIN_WAIT_S = 0.5  # how long a non-interactive stdin may stay silent before it counts as empty


@torch.inference_mode()
def generate(model: DeepSeekMini, prompt_ids: torch.Tensor, max_new_tokens: int = 50,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             *, seed: int | None = None, generator: torch.Generator | None = None,
             use_cache: bool = True, eos_id: int | None = None,
             attention_mask: torch.Tensor | None = None,
             streamer: Streamer | None = None) -> torch.Tensor:
    """Continue ``prompt_ids`` [B, T]; returns ``[B, T + n]`` ids, ``n <= max_new_tokens``.

    ``temperature`` 0 is greedy; otherwise logits are divided by it and filtered by
    ``top_k`` / ``top_p`` before sampling from ``generator`` (or a new one seeded with
    ``seed``, or torch's global one). ``attention_mask`` [B, T] (1 = real token) allows
    left padding. A row that produces ``eos_id`` is finished and continues with
    ``eos_id``; generation stops once every row is. ``streamer`` receives each step's
    tokens [B]. Bad arguments raise ``SamplingError`` (a ValueError and a UserError).
    """
    check_sampling(temperature, top_k, top_p)
    if seed is not None and generator is not None:
        raise SamplingError("give a seed or a generator, not both")
    device = model.device
    prompt_ids = prompt_ids.to(device)
    mask, padded = _check_prompt(model, prompt_ids, attention_mask, max_new_tokens)
    if seed is not None:
        generator = torch.Generator(device).manual_seed(seed)
    batch, prompt_len = prompt_ids.shape
    total = prompt_len + max_new_tokens
    ids = torch.empty(batch, total, dtype=torch.long, device=device)
    ids[:, :prompt_len] = prompt_ids
    positions = torch.empty_like(ids)
    positions[:, :prompt_len] = (mask.cumsum(-1) - 1).clamp_min(0)
    positions[:, prompt_len:] = (mask.sum(-1, keepdim=True)
                                 + torch.arange(max_new_tokens, device=device))
    full_mask = None
    if padded:
        full_mask = torch.ones_like(ids)
        full_mask[:, :prompt_len] = mask
    cache = model.new_cache(batch, total) if use_cache else None
    finished = torch.zeros(batch, dtype=torch.bool, device=device)

    start = 0  # first token to feed: all of them without a cache, the newest with one
    for end in range(prompt_len, total):
        window = slice(start, end)
        logits = model(ids[:, window], cache=cache, positions=positions[:, window],
                       attention_mask=None if full_mask is None else full_mask[:, window],
                       logits_to_keep=1).logits[:, -1]
        token = next_token(logits, temperature, top_k, top_p, generator)
        if eos_id is not None:
            token = token.masked_fill(finished, eos_id)
            finished |= token == eos_id
        ids[:, end] = token
        if streamer is not None:
            streamer(token)
        if eos_id is not None and bool(finished.all()):
            return ids[:, :end + 1]
        if cache is not None:
            start = end
    return ids


def _check_prompt(model: DeepSeekMini, prompt_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None,
                  max_new_tokens: int) -> tuple[torch.Tensor, bool]:
    """The prompt's mask [B, T] (ones without padding) and whether it pads anything, after
    checking shapes, ids and lengths; one host sync, before the first step."""
    if prompt_ids.dim() != 2 or 0 in prompt_ids.shape:
        raise SamplingError(f"prompt_ids must be a non-empty [batch, tokens] tensor, got shape "
                            f"{tuple(prompt_ids.shape)}")
    if max_new_tokens < 0:
        raise SamplingError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if attention_mask is None:
        mask = torch.ones_like(prompt_ids)
    elif attention_mask.shape != prompt_ids.shape:
        raise SamplingError(f"attention_mask has shape {tuple(attention_mask.shape)} but "
                            f"prompt_ids has {tuple(prompt_ids.shape)}")
    else:
        mask = attention_mask.to(device=prompt_ids.device, dtype=torch.long)
    lengths = mask.sum(-1)
    not_binary = ((mask != 0) & (mask != 1)).any()
    right_padded = (mask.diff(dim=-1) < 0).any()
    lo, hi, shortest, longest, bad_mask = torch.stack([
        prompt_ids.min(), prompt_ids.max(), lengths.min(), lengths.max(),
        (not_binary | right_padded).long()]).tolist()
    vocab, max_position = model.config.vocab_size, model.config.max_position
    if lo < 0 or hi >= vocab:
        raise SamplingError(f"prompt token ids must be in [0, {vocab}), got {lo}..{hi}")
    if bad_mask:
        raise SamplingError("attention_mask must hold 1 for tokens and 0 for padding, and "
                            "padding only on the left")
    if shortest == 0:
        raise SamplingError("a prompt has no tokens: every row needs at least one")
    if longest + max_new_tokens > max_position:
        raise SamplingError(f"a prompt of {longest} tokens plus max_new_tokens "
                            f"{max_new_tokens} exceeds model.max_position {max_position}")
    return mask, shortest < prompt_ids.shape[1]


def instruct_prompt(summary: str | None, words: str | None, features: str | None) -> str:
    """The TinyStoriesInstruct prompt, fields in the corpus's order (as demo_corpus writes
    it), ending where the story begins."""
    lines = [f"{name}: {value.strip()}" for name, value in
             (("Features", features), ("Words", words), ("Summary", summary))
             if value is not None]
    return "\n".join([*lines, "Story:"])


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
    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    check_sampling(args.temperature, args.top_k, args.top_p, CLI_NAMES)


def load_for_generation(path: str, device: torch.device, dtype: torch.dtype,
                        tokenizer: str | None) -> tuple[DeepSeekMini, Tokenizer]:
    """The checkpoint's model (eval mode, on ``device`` in ``dtype``) and its tokenizer."""
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, path).to(device=device, dtype=dtype).eval()
    data = ckpt["config"].get("data") or {}
    tok = load_tokenizer(tokenizer or data.get("tokenizer", DataConfig.tokenizer),
                         data.get("cache_dir", DEFAULT_CACHE_DIR), model.config.vocab_size)
    return model, tok


def encode_prompts(tok: Tokenizer, prompts: list[str], max_position: int,
                   max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Left-padded ids and mask for ``prompts`` (each after an end-of-text), and the
    number of new tokens that fits in ``max_position`` (a notice on stderr if fewer)."""
    rows = [[tok.eos_id, *ids] for ids in tok.encode_batch(prompts)]
    longest = max(len(r) for r in rows)
    if longest > max_position:
        raise UserError(f"the prompt is {longest} tokens long but the model reads at most "
                        f"{max_position} (model.max_position): shorten it")
    room = max_position - longest
    if max_new_tokens > room:
        print(f"note: generating at most {room} new tokens: the prompt ({longest} tokens) and "
              f"--max-new-tokens {max_new_tokens} exceed model.max_position {max_position}",
              file=sys.stderr)
        max_new_tokens = room
    ids = torch.full((len(rows), longest), tok.eos_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, longest - len(row):] = torch.tensor(row)
        mask[i, longest - len(row):] = 1
    return ids, mask, max_new_tokens


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


def completion_text(tok: Tokenizer, new_ids: list[int]) -> str:
    """The generated text of one row, up to its end-of-text."""
    if tok.eos_id in new_ids:
        new_ids = new_ids[:new_ids.index(tok.eos_id)]
    return tok.decode(new_ids)


def run_cli(args: argparse.Namespace) -> None:
    check_arguments(args)
    device = resolve_device(args.device, "--device")
    prompts = read_prompts(args)
    model, tok = load_for_generation(args.checkpoint, device, DTYPES[args.dtype],
                                     args.tokenizer)
    ids, mask, max_new = encode_prompts(tok, prompts, model.config.max_position,
                                        args.max_new_tokens)
    options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   seed=args.seed, use_cache=not args.no_cache, eos_id=tok.eos_id,
                   attention_mask=mask)
    if len(prompts) == 1:
        stream, finish = stdout_streamer(tok)
        sys.stdout.write(prompts[0])
        sys.stdout.flush()
        generate(model, ids, max_new, streamer=stream, **options)
        finish()
        return
    out = generate(model, ids, max_new, **options)[:, ids.shape[1]:].tolist()
    for i, (prompt, new_ids) in enumerate(zip(prompts, out, strict=True)):
        print(f"--- sample {i + 1} ---")
        print(prompt + completion_text(tok, new_ids))
