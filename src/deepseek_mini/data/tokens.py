"""Tokens for training: prepared once into a cache, then served as seeded batches.

``prepare_data`` tokenises the configured source with worker processes, puts
``<|endoftext|>`` after each document, splits train / validation by document and writes
two uint16 token files plus a JSON of what they were made from. The cache directory's
name is derived from everything that decides the split (source, file names, tokenizer,
seed, fractions); its meta also records file sizes, modification times and whole-file
digests, so a changed input is rebuilt in place and an unchanged one is memory-mapped in
well under a second. Cached ids beyond the vocabulary (a corrupt file) rebuild it too, and
so does a token file whose sampled digest is not the one recorded when it was written (a
file overwritten at the same size: zeros are valid ids, and would be trained on).

``BatchSampler`` draws ``seq_len + 1`` token windows from epoch-wise permutations. Its
state is two integers, so a resumed run continues with exactly the batches an
uninterrupted run would have seen, and the global batch is the same whatever the number
of processes that split it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from itertools import chain, islice
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from ..errors import UserError
from ..files import DiskFullError, atomic_write_text, ensure_dir, free_bytes, is_disk_full
from ..progress import Progress
from .sources import documents, files_fingerprint, sample_digest, warn
from .tokenizer import Tokenizer, load_tokenizer

CACHE_VERSION = 1
_CHUNK_DOCS = 256  # documents per worker task: large enough to amortise the pickling
_worker_tokenizer: Tokenizer | None = None


@dataclass
class PreparedData:
    train: np.ndarray  # uint16 tokens, memory-mapped
    val: np.ndarray
    meta: dict
    tokenizer: Tokenizer
    path: Path  # the cache directory holding train.bin, val.bin and meta.json


def prepare_data(data: DataConfig, seed: int, vocab_size: int | None = None,
                 max_position: int | None = None, progress: bool = True) -> PreparedData:
    """The tokenised train / validation split of ``data`` (``seed`` draws the split and the
    demo corpus; the model's ``vocab_size`` bounds the tokenizer and its ``max_position``
    the windows), from the cache when it is current, otherwise rebuilt (under a lock, so
    parallel ranks build it once)."""
    if max_position is not None and data.seq_len > max_position:
        raise UserError(f"data.seq_len ({data.seq_len}) exceeds model.max_position "
                        f"({max_position}): lower one or raise the other")
    ensure_dir(data.cache_dir, "data.cache_dir")
    tok = load_tokenizer(data.tokenizer, data.cache_dir, vocab_size)
    if tok.vocab_size > 65536:
        raise UserError(f"tokenizer {tok.path} has {tok.vocab_size} tokens; the uint16 token "
                        "cache holds at most 65536")
    identity = _identity(data, seed, tok)
    key = hashlib.sha256(json.dumps({k: identity[k] for k in _KEY_FIELDS if k in identity},
                                    sort_keys=True).encode()).hexdigest()[:16]
    directory = Path(data.cache_dir) / "data" / f"{data.source}-{key}"
    ensure_dir(directory, "data.cache_dir")
    with _lock(directory / ".lock"):
        meta = _current_meta(directory, identity)
        problem = _cache_problem(directory, meta, tok.vocab_size) if meta else None
        if problem:
            warn(f"rebuilding the token cache {directory}: {problem}")
            meta = None
        if meta is None:
            meta = _build(data, seed, tok, identity, directory, progress)
        elif "digests" not in meta:  # a cache written before digests were recorded
            meta["digests"] = _token_digests(directory)
            atomic_write_text(json.dumps(meta, indent=2), directory / "meta.json")
    train, val = _open(directory / "train.bin"), _open(directory / "val.bin")
    _check_val_length(val, data)
    return PreparedData(train=train, val=val, meta=meta, tokenizer=tok, path=directory)


class BatchSampler:
    """Seeded ``[batch, seq_len + 1]`` windows of a token array, resumable exactly.

    Each epoch shifts the window grid by a seeded offset below ``seq_len`` and visits
    every window once in a seeded order; the state is the epoch and the position in it.
    ``next_batch(rank, world_size)`` returns the rank's contiguous rows of the global
    batch, so the union over ranks is the same batch for any world size.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int) -> None:
        if len(tokens) < seq_len + 1:
            raise UserError(f"the training split has {len(tokens)} tokens, fewer than "
                            f"data.seq_len + 1 = {seq_len + 1}: add data or lower data.seq_len")
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self._span = np.arange(seq_len + 1, dtype=np.int64)
        self.epoch, self.position = 0, 0
        self._order_epoch = -1
        self._starts = np.zeros(0, dtype=np.int64)

    def next_batch(self, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        if self.batch_size % world_size or not 0 <= rank < world_size:
            raise ValueError(f"batch_size {self.batch_size} cannot be split as rank {rank} "
                             f"of {world_size}")
        share = self.batch_size // world_size
        starts = self._global_starts()[rank * share:(rank + 1) * share]
        window = self.tokens[starts[:, None] + self._span]
        return torch.from_numpy(window.astype(np.int64))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "seq_len": self.seq_len, "num_tokens": int(len(self.tokens))}

    def load_state_dict(self, state: dict) -> None:
        if (state.get("seq_len"), state.get("num_tokens")) != (self.seq_len, len(self.tokens)):
            warn("the training data or data.seq_len changed since this sampler state was "
                 "saved, so the batches will not match an uninterrupted run")
        self.seed = int(state.get("seed", self.seed))
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def _global_starts(self) -> np.ndarray:
        """The next ``batch_size`` window starts, crossing into the next epoch as needed."""
        parts, need = [], self.batch_size
        while need:
            order = self._epoch_starts()
            take = order[self.position:self.position + need]
            parts.append(take)
            need -= len(take)
            self.position += len(take)
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return np.concatenate(parts)

    def _epoch_starts(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            room = len(self.tokens) - (self.seq_len + 1)
            offset = int(rng.integers(0, min(self.seq_len - 1, room) + 1))
            count = (room - offset) // self.seq_len + 1
            grid = offset + self.seq_len * np.arange(count, dtype=np.int64)
            self._starts, self._order_epoch = grid[rng.permutation(count)], self.epoch
        return self._starts


def val_batches(tokens: np.ndarray, seq_len: int, batch_size: int,
                num_batches: int) -> list[torch.Tensor]:
    """Fixed validation batches: non-overlapping windows spread evenly over the split, so
    every evaluation scores the same tokens. Fewer windows than asked gives fewer (or a
    shorter last) batch rather than repeats."""
    count = (len(tokens) - 1) // seq_len
    if count < 1:
        raise UserError(f"the validation split has {len(tokens)} tokens, fewer than "
                        f"data.seq_len + 1 = {seq_len + 1}: raise data.val_fraction")
    wanted = min(count, batch_size * num_batches)
    starts = seq_len * np.unique(np.linspace(0, count - 1, wanted).round().astype(np.int64))
    windows = np.asarray(tokens)[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64)
    return [torch.from_numpy(windows[i:i + batch_size])
            for i in range(0, len(windows), batch_size)]


# What names the cache directory; the rest of the identity (file sizes and times) only
# decides whether its contents are current. The derivation keys are in the identity only
# when derivation is on, so the caches of runs without it keep their names.
_KEY_FIELDS = ("version", "source", "files", "tokenizer", "seed", "val_fraction",
               "demo_stories", "max_documents", "instruct", "instruct_fraction")


def split_rng(seed: int) -> np.random.Generator:
    """The generator whose draws, one per document in order, put each document in the
    validation split (a draw below ``data.val_fraction``) or in training."""
    return np.random.default_rng([seed, 0x5EED])


def held_out_documents(data: DataConfig, seed: int) -> Iterator[str]:
    """The documents a run with ``data`` and ``seed`` holds out for validation, as plain
    text (derivation off): the same draws as ``prepare_data``'s split, so a story scored
    here was never trained on. (A split left empty by the draws, which training fills by
    moving one document across, yields nothing here.)"""
    rng = split_rng(seed)
    for doc in documents(replace(data, instruct="none"), seed):
        if rng.random() < data.val_fraction:
            yield doc


def _identity(data: DataConfig, seed: int, tok: Tokenizer) -> dict:
    fingerprint = files_fingerprint(data.files) if data.source == "files" else []
    return {
        "version": CACHE_VERSION,
        "source": data.source,
        "files": [f["path"] for f in fingerprint],
        "file_stats": fingerprint,
        "tokenizer": tok.digest,
        "seed": seed,
        "val_fraction": data.val_fraction,
        "demo_stories": data.demo_stories if data.source == "demo" else None,
        "max_documents": data.max_documents,
        **({"instruct": data.instruct, "instruct_fraction": data.instruct_fraction}
           if data.instruct != "none" else {}),
    }


def _current_meta(directory: Path, identity: dict) -> dict | None:
    """The cached meta when it describes ``identity`` and both token files are whole."""
    try:
        meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
        if meta["identity"] != identity:
            why = _what_changed(meta["identity"], identity)
            warn(f"rebuilding the token cache {directory}: {why}")
            return None
        sizes = [(directory / f"{s}.bin").stat().st_size == 2 * meta["tokens"][s]
                 for s in ("train", "val")]
    except (OSError, ValueError, KeyError, TypeError):  # missing, partial or hand-edited
        return None
    return meta if all(sizes) else None


def _cache_problem(directory: Path, meta: dict, vocab_size: int) -> str | None:
    """Why a cache whose meta is current cannot be used as it is (None: it can)."""
    if not _ids_fit(directory, vocab_size):
        return (f"it holds token ids beyond the tokenizer's {vocab_size} (a corrupt or "
                "foreign train.bin / val.bin)")
    if "digests" in meta and meta["digests"] != _token_digests(directory):
        return ("its train.bin / val.bin changed since they were written (overwritten or "
                "corrupted at the same size)")
    return None


def _token_digests(directory: Path) -> dict[str, str]:
    """Sampled digests of the token files (``sample_digest``: milliseconds for any size)."""
    return {s: sample_digest(directory / f"{s}.bin", (directory / f"{s}.bin").stat().st_size)
            for s in ("train", "val")}


def _what_changed(old: dict | None, new: dict) -> str:
    if not isinstance(old, dict):
        return "its metadata is unreadable"
    changed = [k for k in new if old.get(k) != new[k]]
    return ("the input files changed" if changed == ["file_stats"]
            else f"{', '.join(changed)} changed")


def _build(data: DataConfig, seed: int, tok: Tokenizer, identity: dict, directory: Path,
           progress: bool) -> dict:
    """Tokenise, split and write; meta.json goes last, so it only ever describes whole
    token files."""
    (directory / "meta.json").unlink(missing_ok=True)
    started = time.perf_counter()
    docs = documents(data, seed)  # before the progress bar: an unreachable source fails here
    split = _SplitWriter(directory, data.val_fraction, seed)
    total = data.demo_stories if data.source == "demo" else None
    if total is not None and data.max_documents is not None:
        total = min(total, data.max_documents)
    bar = Progress(total, f"tokenizing {data.source}", unit="documents", enabled=progress)
    with split, bar, contextlib.closing(_tokenize(docs, tok, data.num_workers)) as chunks:
        for tokens, lengths in chunks:
            split.add(tokens, lengths)
            bar.update(len(lengths))
            bar.set_postfix(f"tokens={split.total_tokens:,}")
        if split.documents == 0:
            raise UserError(f"data.source {data.source!r} yielded no documents")
        split.ensure_both_splits()
    meta = {
        "identity": identity,
        "source": data.source,
        "files": identity["file_stats"],
        "tokenizer": {"spec": data.tokenizer, "path": str(tok.path), "sha256": tok.digest,
                      "vocab_size": tok.vocab_size},
        "documents": dict(split.doc_counts),
        "tokens": dict(split.token_counts),
        "digests": _token_digests(directory),
        "seconds": round(time.perf_counter() - started, 2),
    }
    atomic_write_text(json.dumps(meta, indent=2), directory / "meta.json")
    return meta


def _tokenize(docs: Iterator[str], tok: Tokenizer,
              workers: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(tokens, per-document lengths) per chunk of documents, in document order."""
    global _worker_tokenizer
    chunks = iter(lambda: list(islice(docs, _CHUNK_DOCS)), [])
    if workers == 1:
        _worker_tokenizer = tok
        yield from map(_encode_chunk, chunks)
        return
    # Worker processes do the encoding; tokenizers' own thread pool would only compete.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tok.path,)) as pool:
        yield from pool.imap(_encode_chunk, chunks, chunksize=1)


def _init_worker(path: Path) -> None:
    global _worker_tokenizer
    # The parent decides how an interrupt ends (it stops the pool, which terminates the
    # workers): a forked worker must not act on Ctrl-C itself, nor run the CLI's
    # SIGTERM-as-interrupt handler and print a traceback as the pool goes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if _worker_tokenizer is None or _worker_tokenizer.path != path:
        _worker_tokenizer = load_tokenizer(str(path))


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    tok = _worker_tokenizer
    ids = tok.encode_batch(texts)
    for doc in ids:
        doc.append(tok.eos_id)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(chain.from_iterable(ids), dtype=np.uint16, count=int(lengths.sum()))
    return flat, lengths


class _SplitWriter:
    """Appends each document to train.bin or val.bin (a seeded draw per document) via
    temporary files renamed into place only when complete."""

    def __init__(self, directory: Path, val_fraction: float, seed: int) -> None:
        self.directory, self.val_fraction = directory, val_fraction
        self.rng = split_rng(seed)
        self.tmp = {s: directory / f".{s}.bin.tmp" for s in ("train", "val")}
        self.doc_counts = {"train": 0, "val": 0}
        self.token_counts = {"train": 0, "val": 0}
        self.last_len = {"train": 0, "val": 0}

    def __enter__(self) -> _SplitWriter:
        self.files = {s: open(p, "wb") for s, p in self.tmp.items()}  # noqa: SIM115
        return self

    def __exit__(self, kind, exc, tb) -> None:
        """Whole files renamed into place; after any failure (a full disk, an interrupt)
        the temporaries removed, a full disk reported as one (exit 28)."""
        try:
            if kind is None:
                for f in self.files.values():
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as failure:
            exc = failure
        for f in self.files.values():
            with contextlib.suppress(OSError):  # what a full disk left unflushed is dropped
                f.close()
        if exc is None:
            try:
                for split, p in self.tmp.items():
                    os.replace(p, self.directory / f"{split}.bin")
                return
            except OSError as failure:  # a folder in the way: the metadata is not written
                exc = failure
        for p in self.tmp.values():
            p.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise DiskFullError(f"the disk is full: cannot write the token cache in "
                                f"{self.directory} ({free_bytes(self.directory)} bytes free); "
                                "its partial files were removed") from None
        if kind is None:
            raise exc

    @property
    def documents(self) -> int:
        return self.doc_counts["train"] + self.doc_counts["val"]

    @property
    def total_tokens(self) -> int:
        return self.token_counts["train"] + self.token_counts["val"]

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        is_val = self.rng.random(len(lengths)) < self.val_fraction
        token_is_val = np.repeat(is_val, lengths)
        for split, docs, toks in (("train", ~is_val, ~token_is_val),
                                  ("val", is_val, token_is_val)):
            n = int(docs.sum())
            if n:
                self.files[split].write(tokens[toks])  # not tofile: its errors have no errno
                self.doc_counts[split] += n
                self.token_counts[split] += int(lengths[docs].sum())
                self.last_len[split] = int(lengths[docs][-1])

    def ensure_both_splits(self) -> None:
        """With a validation fraction, neither split may be empty: move a whole document
        across, or, when there is only one document, cut it at the fraction."""
        if self.val_fraction == 0:
            return
        if self.documents == 1:
            warn("only one document: splitting its tokens, not documents, into train and "
                 "validation")
            self._cut_single_document()
        elif self.doc_counts["val"] == 0:
            self._move_last("train", "val")
        elif self.doc_counts["train"] == 0:
            self._move_last("val", "train")

    def _move_last(self, src: str, dst: str) -> None:
        n = self.last_len[src]
        tail = self._pop_tail(src, n)
        self.files[dst].write(tail)
        self.doc_counts[src] -= 1
        self.doc_counts[dst] += 1
        self.token_counts[dst] += n

    def _cut_single_document(self) -> None:
        split = "train" if self.doc_counts["train"] else "val"
        n = self.token_counts[split]
        tokens = self._pop_tail(split, n)
        cut = max(1, min(n - 1, round(n * (1 - self.val_fraction))))
        self.files["train"].write(tokens[:cut])
        self.files["val"].write(tokens[cut:])
        self.token_counts = {"train": cut, "val": n - cut}
        self.doc_counts = {"train": 1, "val": 1}

    def _pop_tail(self, split: str, n: int) -> np.ndarray:
        """Remove the last ``n`` tokens of a split's file and return them."""
        f = self.files[split]
        f.flush()
        keep = self.token_counts[split] - n
        tail = np.fromfile(self.tmp[split], dtype=np.uint16, offset=2 * keep)
        f.truncate(2 * keep)
        f.seek(2 * keep)
        self.token_counts[split] = keep
        return tail


def _open(path: Path) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype=np.uint16, mode="r")


def _ids_fit(directory: Path, vocab_size: int) -> bool:
    """Every cached id is a token of the vocabulary: a max over the memory-mapped files,
    about a second per gigabyte, read once per start, where a bad id would be an
    IndexError deep in the embedding."""
    return all(len(ids) == 0 or int(ids.max()) < vocab_size
               for ids in (_open(directory / f"{s}.bin") for s in ("train", "val")))


def _check_val_length(val: np.ndarray, data: DataConfig) -> None:
    if data.val_fraction > 0 and len(val) < data.seq_len + 1:
        raise UserError(f"the validation split has {len(val)} tokens, fewer than data.seq_len "
                        f"+ 1 = {data.seq_len + 1}: raise data.val_fraction or add data")


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` where the platform has one (POSIX flock)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
