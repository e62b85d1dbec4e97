"""Where training text comes from: documents as plain strings, one source at a time.

Three sources (``data.source``): ``tinystories-instruct`` streams the Hub dataset, whose
rows are single lines, and glues each record back together with its newlines;
``files`` reads local .txt (documents separated by ``<|endoftext|>``) and .jsonl (a
``text`` field per line), gzipped or not; ``demo`` generates the synthetic corpus. Every
reader streams, so a multi-gigabyte file never has to fit in memory, and every problem a
user can cause is a UserError naming the path (and line) at fault.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import IO, AnyStr

from ..config import DataConfig
from ..errors import UserError
from .demo_corpus import demo_stories
from .derive import derive_documents
from .hub import hub_reachable
from .tokenizer import EOS_TOKEN

INSTRUCT_DATASET = "roneneldan/TinyStoriesInstruct"
_EOS_BYTES = EOS_TOKEN.encode()
_REPLACEMENT_BYTES = "\ufffd".encode()
MAX_INVALID_FRACTION = 0.2  # of a file's characters; above it the file is not text (random
# bytes decode to over half U+FFFD, Latin-1 prose to a few per cent)
WARN_INVALID_FRACTION = 0.02  # above it a file is trained on with a warning naming the share
DIGEST_WHOLE_BYTES = 4 << 20
DIGEST_BLOCKS = 64
DIGEST_BLOCK_BYTES = 64 << 10


def warn(message: str) -> None:
    """A problem worth knowing that does not stop the command."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def documents(data: DataConfig, seed: int) -> Iterator[str]:
    """The configured source's documents in a fixed order, at most ``data.max_documents``
    (``seed`` draws the demo corpus and, with ``data.instruct: derive``, the records made
    of plain stories: one document each, so the train / validation split is the same
    with derivation on or off)."""
    if data.source == "demo":
        count = min(data.demo_stories, data.max_documents or data.demo_stories)
        docs: Iterable[str] = demo_stories(count, seed)
    elif data.source == "files":
        docs = (doc for path in resolve_files(data.files) for doc in read_file(path))
    else:
        docs = instruct_records_from_hub()
    docs = islice(docs, data.max_documents)
    if data.instruct == "derive":
        return derive_documents(docs, seed, data.instruct_fraction)
    return docs


def resolve_files(patterns: list[str]) -> list[Path]:
    """Paths and globs to existing files, in the order given (glob matches sorted)."""
    paths: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True)
                             if Path(p).is_file())
            if not matches:
                raise UserError(f"data.files: no file matches {pattern!r}")
        else:
            path = Path(pattern).expanduser()
            if path.is_dir():
                raise UserError(f"data.files: {path} is a directory; give files or a glob "
                                f"such as '{path}/*.txt'")
            if not path.is_file():
                raise UserError(f"data.files: file not found: {path}")
            matches = [path]
        paths += [p for p in matches if p not in paths]
    return paths


def files_fingerprint(patterns: list[str]) -> list[dict]:
    """Name, size, modification time and the SHA-256 of the whole of every input file:
    what invalidates a cache. The digest notices any edit that kept the size and restored
    the time (a checkout, ``touch -r``, a copy with ``cp -p``), wherever in the file it is.
    Hashing all of it costs about 0.75 s per GB (SHA-256 at 1.4 GB/s with the CPU's SHA
    instructions), once per start: a sample of blocks would miss an edit between them."""
    out = []
    for path in resolve_files(patterns):
        st = path.stat()
        out.append({"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                    "sha256": file_digest(path)})
    return out


def file_digest(path: Path) -> str:
    """SHA-256 of the whole file (``hashlib.file_digest``: chunked, no copy in Python)."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None


def sample_digest(path: Path, size: int) -> str:
    """SHA-256 of a file up to ``DIGEST_WHOLE_BYTES``, else of ``DIGEST_BLOCKS`` evenly
    spaced blocks (first and last included): milliseconds for any size. Only the cache's
    own token files are sampled, as a guard against their being overwritten or zeroed;
    the input files are hashed whole (``file_digest``)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            if size <= DIGEST_WHOLE_BYTES:
                digest.update(f.read())
            else:
                last = size - DIGEST_BLOCK_BYTES
                for i in range(DIGEST_BLOCKS):
                    f.seek(last * i // (DIGEST_BLOCKS - 1))
                    digest.update(f.read(DIGEST_BLOCK_BYTES))
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    return digest.hexdigest()


def read_file(path: Path) -> Iterator[str]:
    """The documents of one file; the format follows the suffix (.jsonl, else text),
    under an optional .gz."""
    is_gzip = path.suffix == ".gz"
    fmt = Path(path.stem).suffix if is_gzip else path.suffix
    reader = _jsonl_documents if fmt == ".jsonl" else _text_documents
    replaced, count, chars, nuls = [0], 0, 0, 0
    try:
        with (gzip.open(path, "rb") if is_gzip else open(path, "rb")) as f:
            for doc in reader(f, path, replaced):
                count += 1
                chars += len(doc)
                nuls += doc.count("\x00")
                yield doc
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    _refuse_binary(path, nuls, replaced[0], chars)
    if replaced[0]:
        warn(f"{path}: {replaced[0]} invalid UTF-8 sequence(s) replaced with U+FFFD")
    if nuls + replaced[0] > WARN_INVALID_FRACTION * chars:
        warn(f"{path}: {100 * (nuls + replaced[0]) / chars:.0f}% of its characters are NUL "
             f"bytes ({nuls}) or invalid UTF-8 ({replaced[0]}): read as text all the same, "
             f"but is it text? (above {100 * MAX_INVALID_FRACTION:.0f}% a file is refused)")
    if count == 0:
        warn(f"{path} holds no text; skipped")


def _refuse_binary(path: Path, nuls: int, invalid: int, chars: int) -> None:
    """The one rule for training and eval alike: a file whose characters are more than
    ``MAX_INVALID_FRACTION`` NUL bytes or invalid UTF-8 is not text, and is refused; a
    few bad bytes (a Latin-1 letter) are replaced with a warning, and a share above
    ``WARN_INVALID_FRACTION`` is named in it."""
    bad = nuls + invalid
    if not chars or bad <= MAX_INVALID_FRACTION * chars:
        return
    fraction = f"{100 * bad / chars:.0f}% of its characters"
    if nuls:
        raise UserError(f"data file {path} is binary, not text: {fraction} are NUL bytes or "
                        "invalid UTF-8")
    raise UserError(f"data file {path} is not UTF-8 text: {fraction} are invalid bytes")


def reassemble_records(lines: Iterable[str]) -> Iterator[str]:
    """Records from a stream of single lines, each record ending at ``<|endoftext|>``.

    The Hub's TinyStoriesInstruct rows are the lines of its .txt files; joining them
    without their newlines would glue ``Features:``, ``Words:`` and the story into one
    run-on line, so the newlines are put back here.
    """
    return _split_at(lines, EOS_TOKEN, lambda pieces: "\n".join(pieces).strip())


def _split_at(lines: Iterable[AnyStr], separator: AnyStr,
             record: Callable[[list[AnyStr]], str]) -> Iterator[str]:
    """The non-empty records of a stream of lines that each end at ``separator``, wherever
    it stands in a line; ``record`` turns a record's pieces into its stripped text (how
    they join, and how bytes decode, is the caller's)."""
    current: list[AnyStr] = []
    for line in lines:
        if separator not in line:
            current.append(line)
            continue
        *ends, rest = line.split(separator)
        for part in ends:
            current.append(part)
            text = record(current)
            if text:
                yield text
            current = []
        current = [rest]
    text = record(current)
    if text:
        yield text


def instruct_records_from_hub() -> Iterator[str]:
    """TinyStoriesInstruct's train split, streamed; checked for reachability up front."""
    hint = ("download TinyStoriesInstruct-train.txt and set data.source: files and "
            "data.files: [path/to/TinyStoriesInstruct-train.txt], or use data.source: demo")
    if not hub_reachable():
        raise UserError(f"data.source 'tinystories-instruct' needs the Hugging Face Hub, which "
                        f"is not reachable (or HF_HUB_OFFLINE is set): {hint}")
    try:
        import datasets
    except ImportError:
        raise UserError("data.source 'tinystories-instruct' needs the datasets package "
                        f"(pip install 'deepseek-mini[hf]'), or {hint}") from None
    try:
        rows = datasets.load_dataset(INSTRUCT_DATASET, split="train", streaming=True)
    except Exception as exc:  # datasets raises many unrelated types for "could not get it"
        raise UserError(f"cannot stream {INSTRUCT_DATASET}: {exc}; {hint}") from None
    return reassemble_records(row["text"] for row in rows)


def _text_documents(f: IO[bytes], path: Path, replaced: list[int]) -> Iterator[str]:
    """Split on ``<|endoftext|>`` wherever it stands (TinyStories puts it on its own line);
    a file with no separator is one document."""
    return _split_at(f, _EOS_BYTES, lambda pieces: _decode(b"".join(pieces), replaced).strip())


def _jsonl_documents(f: IO[bytes], path: Path, replaced: list[int]) -> Iterator[str]:
    for number, raw in enumerate(f, 1):
        line = _decode(raw, replaced).strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} line {number}: invalid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise UserError(f"{path} line {number}: expected an object with a string 'text' "
                            "field")
        if row["text"].strip():
            yield row["text"]


def _decode(raw: bytes, replaced: list[int]) -> str:
    """UTF-8, with each invalid sequence replaced and counted into ``replaced[0]``."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        replaced[0] += text.count("\ufffd") - raw.count(_REPLACEMENT_BYTES)
        return text
