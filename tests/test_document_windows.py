"""data.windows: documents — windows start at document starts, cover every token once an
epoch, resume exactly and split alike over any number of ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_run import TINY_YAML, tiny_overrides

from deepseek_mini import Config
from deepseek_mini.checkpoint import load_checkpoint
from deepseek_mini.config import ConfigError
from deepseek_mini.data.windows import DocumentSampler, document_windows
from deepseek_mini.train.loop import train

EOS = 0
SEQ = 8
LENGTHS = [5, 20, 3, 12, 9, 8, 30, 2, 17]  # documents, their end-of-text included


def corpus() -> tuple[np.ndarray, list[int]]:
    """Distinct ids (a window's first id names its start), an end-of-text closing each
    document; and the documents' starts."""
    tokens = np.arange(1, sum(LENGTHS) + 1, dtype=np.uint16)
    ends = np.cumsum(LENGTHS)
    tokens[ends - 1] = EOS
    return tokens, [0, *ends[:-1].tolist()]


def starts_of(batch: torch.Tensor, tokens: np.ndarray) -> list[int]:
    where = {int(t): i for i, t in enumerate(tokens) if t != EOS}
    return [where[int(row[0])] if row[0] != EOS else where[int(row[1])] - 1 for row in batch]


def test_windows_start_at_document_starts_and_every_seq_len_within_a_document():
    tokens, starts = corpus()
    windows = document_windows(tokens, SEQ, EOS).tolist()
    last = len(tokens) - (SEQ + 1)
    expected = sorted({min(s + k * SEQ, last) for s, n in zip(starts, LENGTHS, strict=True)
                       for k in range(-(-n // SEQ))})
    assert windows == expected
    assert {s for s in starts if s <= last} <= set(windows)
    covered = np.zeros(len(tokens), dtype=bool)
    for w in windows:
        covered[w:w + SEQ + 1] = True
    assert covered.all()


def test_one_epoch_draws_every_window_once_then_a_new_order():
    tokens, _ = corpus()
    windows = document_windows(tokens, SEQ, EOS).tolist()
    sampler = DocumentSampler(tokens, SEQ, 1, seed=3, eos_id=EOS)
    epoch = [s for _ in windows for s in starts_of(sampler.next_batch(), tokens)]
    assert sorted(epoch) == windows and sampler.epoch == 1 and sampler.position == 0
    again = [s for _ in windows for s in starts_of(sampler.next_batch(), tokens)]
    assert sorted(again) == windows and again != epoch
    batch = sampler.next_batch()
    assert torch.equal(batch[0], torch.from_numpy(tokens[starts_of(batch, tokens)[0]:][:SEQ + 1]
                                                  .astype(np.int64)))


def test_a_restored_sampler_continues_exactly_and_ranks_split_the_same_batch():
    tokens, _ = corpus()
    a = DocumentSampler(tokens, SEQ, 4, seed=5, eos_id=EOS)
    for _ in range(3):
        a.next_batch()
    b, rank0, rank1 = (DocumentSampler(tokens, SEQ, 4, seed=5, eos_id=EOS) for _ in range(3))
    for sampler in (b, rank0, rank1):
        sampler.load_state_dict(a.state_dict())
    for _ in range(5):  # across an epoch boundary
        whole = a.next_batch()
        assert torch.equal(b.next_batch(), whole)
        assert torch.equal(torch.cat([rank0.next_batch(0, 2), rank1.next_batch(1, 2)]), whole)


def test_training_with_document_windows_resumes_exactly(tmp_path_factory, tmp_path):
    overrides = [*tiny_overrides(tmp_path_factory.mktemp("windows-data")),
                 "data.windows=documents", "train.max_steps=8"]

    def config(out):
        return Config.from_yaml(TINY_YAML, [*overrides, f"train.out_dir={out}"])

    train(config(tmp_path / "straight"))
    train(config(tmp_path / "sliced"), stop_after=4)
    train(config(tmp_path / "sliced"), resume=True)
    a = load_checkpoint(tmp_path / "straight" / "latest.pt")
    b = load_checkpoint(tmp_path / "sliced" / "latest.pt")
    assert a["sampler"] == b["sampler"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_an_unknown_windows_kind_is_a_config_error():
    with pytest.raises(ConfigError, match="data.windows must be one of grid, documents"):
        Config.from_yaml(None, ["data.windows=sentences"])
