"""The ``deepseek-mini`` command line: every command's arguments here, the work in each
command's own module. User mistakes end as one ``error: ...`` line and exit status 2
(a full disk: status 28); so do folders the user may not write, whichever command meets
them."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import signal
import sys
import threading
from collections.abc import Iterator, Sequence

from ..console import silence_stdout, stdout_reader_gone
from ..errors import UserError
from ..files import EXIT_DISK_FULL, is_disk_full

# command -> its module in this package, holding ``run(args) -> int | None``; imported only
# when used, so ``info`` or a config error never waits for torch.
HANDLERS = {
    "train": "train",
    "generate": "generate",
    "eval": "eval",
    "info": "info",
    "prepare": "prepare",
    "plot": "plot",
    "warm-start": "warm_start",
    "export": "export",
    "fetch-assets": "fetch_assets",
    "serve": "serve",
}

QUANTIZE_MODES = ("int8", "bf16")  # model/quantize.py's MODES, without importing torch


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default, once: not appended where the help already says what None
    means ("(None: the checkpoint's)") or names the default itself, nor to a required
    option, which has none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (action.required or "default" in text
                or (action.default is None and "None:" in text)):
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Every ``--help`` shows each option's default; errors are one line."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # one line, exit 2, as for every user error
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (defaults for every missing key; "
                                     "none: every key at its default)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key; the value is read as YAML (repeatable)")


def _add_gguf_export(p: argparse.ArgumentParser) -> None:
    """export's GGUF options (llama.cpp's format)."""
    p.add_argument("--format", default="hf", choices=["hf", "gguf"],
                   help="hf: a Hugging Face folder; gguf: one file for llama.cpp")
    p.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16", "q8_0"],
                   help="GGUF weight type (the hf folder is always f32)")


def _add_decoding(p: argparse.ArgumentParser) -> None:
    """Where and how a checkpoint is loaded to decode (generate, serve)."""
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to decode")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="weight dtype for decoding")
    p.add_argument("--tokenizer", default=None, help="tokenizer (None: the checkpoint's)")
    _add_quantize(p)
    _add_threads(p, "1 thread")


def _add_quantize(p: argparse.ArgumentParser) -> None:
    """Weight-only quantization on load (generate, serve, eval; model/quantize.py)."""
    p.add_argument("--quantize", default=None, choices=QUANTIZE_MODES,
                   help="quantize the weights as they load, CPU only: int8 (per output "
                        "channel) or bf16; the checkpoint file stays full precision")


def _add_threads(p: argparse.ArgumentParser, default_is: str) -> None:
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help=f"CPU threads for torch (None: {default_is}, as measured fastest; "
                        "OMP_NUM_THREADS is kept when set)")


def _add_instruct_eval(p: argparse.ArgumentParser) -> None:
    """eval --instruct: does the model write the story a record asks for."""
    g = p.add_argument_group("instruction following (--instruct)")
    g.add_argument("--instruct", action="store_true",
                   help="write a story for each held-out story's record (its derived "
                        "Words / Random sentence / Features, or a real record's fields) "
                        "and count what was asked and done")
    g.add_argument("--held-out", action="store_true",
                   help="the stories a training run held out (its data and seed: --config "
                        "with any --set, else the checkpoint's config), in place of --data")
    _add_config(g)
    g.add_argument("--max-stories", type=int, default=20, help="stories to write for")
    g.add_argument("--max-new-tokens", type=int, default=256, help="tokens per story at most")
    g.add_argument("--decoding", default="both", choices=["greedy", "sampled", "both"],
                   help="greedy, sampled (--temperature, --top-k, seed --seed + story "
                        "index) or both")
    g.add_argument("--temperature", type=float, default=0.8, help="for the sampled stories")
    g.add_argument("--top-k", type=int, default=None,
                   help="for the sampled stories (None: no cut)")
    g.add_argument("--seed", type=int, default=0,
                   help="draws the prompts' words and sentences, and the samples")
    g.add_argument("--prompt-style", default="record", choices=["record", "english"],
                   help="record: the TinyStoriesInstruct fields then 'Story:'; english: "
                        "'Write a short story for children that uses the words ...' (in "
                        "the chat template of an --hf-model that has one)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="deepseek-mini",
                     description="Build, train, evaluate and sample a DeepSeek-style "
                                 "MoE + MLA language model.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train a model")
    _add_config(p)
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR with its saved config (--set changes "
                        "only what it names); without RUN_DIR: train.out_dir's run, with "
                        "--config's settings if given")
    p.add_argument("--allow-changes", action="store_true",
                   help="let --resume change what the run is (data, tokenizer, seq_len, "
                        "seed); the model can never change")
    _add_threads(p, "every physical core, or 1 when the load average exceeds the "
                    "cores; overrides train.threads")
    p.add_argument("--stop-after", type=int, default=None, metavar="STEPS",
                   help="stop after this many steps of this session, saving latest.pt "
                        "(the schedule still runs to train.max_steps; continue with --resume)")

    p = sub.add_parser("generate", help="sample text from a checkpoint")
    p.add_argument("--checkpoint", required=True,
                   help="the checkpoint to sample from (best.pt, latest.pt or a warm-start file)")
    p.add_argument("--prompt", action="append", default=None,
                   help="prompt text (repeat for a batch); '-' reads stdin")
    p.add_argument("--prompt-file", help="read prompts from a file, one per line")
    p.add_argument("--summary", help="TinyStoriesInstruct prompt: the story's summary")
    p.add_argument("--words", help="TinyStoriesInstruct prompt: words the story must use")
    p.add_argument("--features", help="TinyStoriesInstruct prompt: e.g. Dialogue, BadEnding")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to add")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="0 = greedy; above 0 every run differs unless --seed is given")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample within this much probability mass")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence "
                                                           "each step (for checking)")
    p.add_argument("--compile", action="store_true",
                   help="run the decode step through torch.compile (a static cache; see "
                        "BENCHMARKS.md for where it pays)")
    p.add_argument("--speculative", action=argparse.BooleanOptionalAction, default=False,
                   help="draft with the model's MTP modules and verify (one prompt); off "
                        "by default until a model measures faster with it (BENCHMARKS.md)")
    p.add_argument("--stats", action="store_true",
                   help="print tokens/s and, when speculating, accepted drafts per step")
    _add_decoding(p)

    p = sub.add_parser("eval", help="held-out loss of a checkpoint or a transformers model")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a deepseek-mini checkpoint (best.pt, latest.pt)")
    source.add_argument("--hf-model", help="a transformers causal LM: folder, Hub id or GGUF")
    p.add_argument("--data", default=None,
                   help="text file to score (required unless --instruct --held-out)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="window length (None: the checkpoint's data.seq_len, or 128)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="score only the leading documents worth this many tokens "
                        "(None: the whole file)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help="print one JSON object instead of the table; with FILE, write it "
                        "there and print the table too")
    p.add_argument("--experts", action="store_true", help="print per-layer expert usage")
    _add_instruct_eval(p)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to compute")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer (None: the checkpoint's; SmolLM2's to count --max-tokens "
                        "for --hf-model)")
    _add_quantize(p)
    _add_threads(p, "every physical core, or 1 when the load average exceeds the cores")

    p = sub.add_parser("info", help="parameter counts, FLOPs and cache size of a config")
    _add_config(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("prepare", help="tokenize the data into the cache")
    _add_config(p)

    p = sub.add_parser("plot", help="draw a run's metrics as PNG files")
    p.add_argument("run_dir", help="a run folder (train.out_dir)")

    p = sub.add_parser("warm-start", help="build the model from SmolLM2-135M's weights")
    _add_config(p)
    p.add_argument("--out", required=True, help="checkpoint file to write")
    p.add_argument("--source", default=None,
                   help="SmolLM2 weights: HF folder, Hub id or GGUF file (default: search); "
                        "or a transformers DeepseekV3 folder, imported exactly")

    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face folder or a "
                                      "GGUF file (llama.cpp, Ollama)")
    p.add_argument("--checkpoint", required=True,
                   help="the checkpoint to export (best.pt, latest.pt or a warm-start file)")
    p.add_argument("--out", required=True, help="folder to create (absent or empty); with "
                                                "--format gguf, the file to create")
    _add_gguf_export(p)

    p = sub.add_parser("serve", help="serve a checkpoint over an OpenAI-style HTTP API, with "
                                     "a story page")
    p.add_argument("--checkpoint", required=True,
                   help="the checkpoint to serve (best.pt, latest.pt or a warm-start file)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="0 = any free port")
    p.add_argument("--max-batch", type=int, default=8,
                   help="requests decoded together; more wait for a free row")
    p.add_argument("--model-name", default="deepseek-mini",
                   help="the model's id in the API")
    p.add_argument("--max-request-bytes", type=int, default=1 << 20, metavar="N",
                   help="larger request bodies are refused (413)")
    p.add_argument("--max-prompts", type=int, default=64, metavar="N",
                   help="most prompts in one completion request")
    _add_decoding(p)

    sub.add_parser("fetch-assets", help="install the SmolLM2 tokenizer and weights for "
                                        "offline use")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        module = _import_handler(args.command)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    try:
        with _sigterm_interrupts():
            status = module.run(args) or 0
            sys.stdout.flush()  # a reader that left is met here, not at interpreter exit
            return status
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except BrokenPipeError:  # before OSError, which it is
        if not stdout_reader_gone():
            raise
        silence_stdout()  # `deepseek-mini ... | head`: the reader has what it wanted
        return 0
    except PermissionError as exc:  # a folder or file the user may not write or read
        print(f"error: permission denied: {exc.filename or exc}", file=sys.stderr)
        return 2
    except (IsADirectoryError, NotADirectoryError) as exc:  # a folder where a file goes
        print(f"error: {_path_in_the_way(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        print(f"error: the disk is full: {exc.filename or exc}", file=sys.stderr)
        return EXIT_DISK_FULL
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _import_handler(command: str) -> object:
    """The command's module, imported with Ctrl-C noted: ``import torch`` takes seconds,
    and a library that swallows KeyboardInterrupt there (a bare ``except``) would lose
    it, so the command would run on and end with status 0. An interrupt noted during the
    import raises once it is done."""
    if threading.current_thread() is not threading.main_thread():
        return importlib.import_module(f".{HANDLERS[command]}", __package__)
    noted: list[int] = []

    def note(signum: int, frame: object) -> None:
        noted.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, note)
    try:
        module = importlib.import_module(f".{HANDLERS[command]}", __package__)
    finally:
        signal.signal(signal.SIGINT, previous)
    if noted:
        raise KeyboardInterrupt
    return module


def _version() -> str:
    try:
        return importlib.metadata.version("deepseek-mini")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def _path_in_the_way(exc: OSError) -> str:
    """What an IsADirectoryError / NotADirectoryError means, naming the path: for a
    rename, the target (``filename2``) is the one in the way."""
    path = exc.filename2 or exc.filename
    if isinstance(exc, IsADirectoryError):
        return f"{path} is a folder, where a file is to be read or written: move it aside"
    return f"{path}: part of this path is a file, not a folder"


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM ends a command as Ctrl-C does: the ``with`` blocks unwind (temporary
    files removed, worker pools stopped) and it exits 130 with "interrupted", rather than
    dying at once and leaving half-written files and orphaned workers' tracebacks.
    Training installs its own handler (finish the step, save) on top of this one."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    raise SystemExit(main())
