"""Data: sources and their bad inputs, the demo corpus, the token cache, and batches."""

from __future__ import annotations

import gzip
import json
import os
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from deepseek_mini import Config
from deepseek_mini.cli.main import main
from deepseek_mini.data import sources
from deepseek_mini.data import tokens as data_module
from deepseek_mini.data.demo_corpus import demo_stories
from deepseek_mini.data.sources import read_file, reassemble_records, resolve_files
from deepseek_mini.data.tokens import BatchSampler, prepare_data, val_batches
from deepseek_mini.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
STORY_A = "Once upon a time, there was a cat.\nThe cat was happy."
STORY_B = "Tom had a ball.\n\nHe kicked it far."
INSTRUCT = ("Features: Dialogue\nWords: ball, kick, happy\nSummary: Tom kicks a ball.\n"
            "Story: \n\nTom said, \"Look!\" He kicked the ball.")


def config(tmp_path: Path, tok_path: Path, *overrides: str) -> Config:
    return Config.from_yaml(ROOT / "configs" / "tiny.yaml", [
        f"data.cache_dir={tmp_path / 'cache'}", f"data.tokenizer={tok_path}",
        "data.seq_len=32", "data.num_workers=1", *overrides])


def prepare(cfg: Config):
    return prepare_data(cfg.data, cfg.train.seed, cfg.model.vocab_size, cfg.model.max_position,
                        progress=False)


def write(path: Path, text: str | bytes) -> Path:
    raw = text.encode() if isinstance(text, str) else text
    if path.suffix == ".gz":
        raw = gzip.compress(raw)
    path.write_bytes(raw)
    return path


# --- sources -------------------------------------------------------------------------------

def test_reassembles_instruct_records_from_line_rows():
    rows = ["Features: Dialogue", "Words: ball, kick, happy", "Summary: Tom kicks a ball.",
            "Story: ", "", "Tom said, \"Look!\" He kicked the ball.", "<|endoftext|>",
            "", "Summary: Two.", "Story: Short.<|endoftext|>Tail without end"]
    records = list(reassemble_records(rows))
    assert records == [INSTRUCT, "Summary: Two.\nStory: Short.", "Tail without end"]


@pytest.mark.parametrize("name", ["stories.txt", "stories.txt.gz"])
def test_text_files_split_on_endoftext_lines(tmp_path, name):
    path = write(tmp_path / name, f"{STORY_A}\n<|endoftext|>\n{STORY_B}\n<|endoftext|>\n"
                                  f"{INSTRUCT}\n<|endoftext|>\n")
    assert list(read_file(path)) == [STORY_A, STORY_B, INSTRUCT]


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.jsonl.gz"])
def test_jsonl_files_read_the_text_field(tmp_path, name):
    lines = [json.dumps({"text": STORY_A, "id": 1}), "", json.dumps({"text": INSTRUCT})]
    assert list(read_file(write(tmp_path / name, "\n".join(lines)))) == [STORY_A, INSTRUCT]


def test_file_without_separator_is_one_document(tmp_path):
    assert list(read_file(write(tmp_path / "one.txt", STORY_A + "\n" + STORY_B))) == [
        STORY_A + "\n" + STORY_B]


def test_globs_are_sorted_and_deduplicated(tmp_path):
    for name in ("b.txt", "a.txt", "c.md"):
        write(tmp_path / name, STORY_A)
    found = resolve_files([str(tmp_path / "*.txt"), str(tmp_path / "a.txt")])
    assert [p.name for p in found] == ["a.txt", "b.txt"]


def test_missing_files_and_empty_globs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match=r"data.files: file not found: .*nope.txt"):
        resolve_files([str(tmp_path / "nope.txt")])
    with pytest.raises(UserError, match=r"data.files: no file matches .*\*.jsonl"):
        resolve_files([str(tmp_path / "*.jsonl")])
    with pytest.raises(UserError, match=r"is a directory"):
        resolve_files([str(tmp_path)])


def test_invalid_utf8_is_replaced_and_counted(tmp_path, capsys):
    path = write(tmp_path / "bad.txt", b"caf\xe9 \xff ok \xef\xbf\xbd\n<|endoftext|>\nfine\n")
    assert list(read_file(path)) == ["caf\ufffd \ufffd ok \ufffd", "fine"]
    assert f"warning: {path}: 2 invalid UTF-8 sequence(s) replaced" in capsys.readouterr().err


def test_bad_jsonl_lines_name_the_line(tmp_path):
    path = write(tmp_path / "rows.jsonl", json.dumps({"text": "ok"}) + "\n" +
                 json.dumps({"story": "no text"}) + "\n")
    with pytest.raises(UserError, match=r"rows.jsonl line 2: expected an object with a string "
                                        r"'text' field"):
        list(read_file(path))
    write(path, "{broken\n")
    with pytest.raises(UserError, match=r"rows.jsonl line 1: invalid JSON"):
        list(read_file(path))


def test_corrupt_gzip_is_a_user_error(tmp_path):
    path = tmp_path / "x.txt.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match=r"cannot read .*x.txt.gz"):
        list(read_file(path))


def test_hub_source_offline_says_how_to_use_local_files(smollm2_tokenizer, tmp_path,
                                                        monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = config(tmp_path, smollm2_tokenizer.path, "data.source=tinystories-instruct")
    with pytest.raises(UserError, match=r"not reachable.*data.source: files.*data.files"):
        prepare(cfg)


def test_prepare_offline_is_one_error_line_without_a_progress_bar(smollm2_tokenizer, tmp_path,
                                                                   monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["prepare", "--config", str(ROOT / "configs" / "base.yaml"), "--set",
                 f"data.cache_dir={tmp_path}", "--set",
                 f"data.tokenizer={smollm2_tokenizer.path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data.source 'tinystories-instruct' needs the Hugging Face Hub")
    assert err.count("\n") == 1 and "tokenizing" not in err


def test_hub_source_streams_train_rows_into_records(smollm2_tokenizer, tmp_path, monkeypatch):
    calls = []

    def load_dataset(name, split, streaming):
        calls.append((name, split, streaming))
        rows = INSTRUCT.split("\n") + ["<|endoftext|>", "Story: Two.", "<|endoftext|>"]
        return [{"text": line} for line in rows]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setattr(sources, "hub_reachable", lambda: True)
    cfg = config(tmp_path, smollm2_tokenizer.path, "data.source=tinystories-instruct",
                 "data.val_fraction=0", "data.seq_len=8")
    prepared = prepare(cfg)
    assert calls == [("roneneldan/TinyStoriesInstruct", "train", True)]
    assert smollm2_tokenizer.decode(prepared.train.tolist()) == (
        f"{INSTRUCT}<|endoftext|>Story: Two.<|endoftext|>")


# --- demo corpus ---------------------------------------------------------------------------

def test_demo_corpus_is_deterministic_and_varied():
    stories = demo_stories(2000, seed=7)
    assert stories == demo_stories(2000, seed=7)
    assert stories[:10] == demo_stories(10, seed=7)
    assert stories != demo_stories(2000, seed=8)
    assert len(set(stories)) >= 0.95 * len(stories)


def test_demo_records_keep_their_promises():
    for record in demo_stories(300, seed=1):
        header, story = record.split("\nStory: ")
        fields = dict(line.split(": ", 1) for line in header.splitlines())
        assert list(fields)[:3] == ["Features", "Words", "Summary"]
        features = fields["Features"].split(", ")
        for word in fields["Words"].split(", "):
            assert re.search(rf"\b{word}\b", story), (word, record)
        assert ('"' in story) == ("Dialogue" in features)
        assert story.count("\n") == 2  # beginning, problem, ending
        if "Random sentence" in fields:
            assert fields["Random sentence"] in story


# --- preparation and the cache -------------------------------------------------------------

def test_prepare_demo_splits_documents_and_ends_each_with_eos(smollm2_tokenizer, tmp_path):
    cfg = config(tmp_path, smollm2_tokenizer.path, "data.demo_stories=120",
                 "data.val_fraction=0.1")
    prepared = prepare(cfg)
    meta, eos = prepared.meta, smollm2_tokenizer.eos_id
    assert meta["documents"]["train"] + meta["documents"]["val"] == 120
    assert meta["documents"]["val"] >= 1
    for split in ("train", "val"):
        tokens = getattr(prepared, split)
        assert tokens.dtype == np.uint16 and len(tokens) == meta["tokens"][split]
        assert int((tokens == eos).sum()) == meta["documents"][split] and tokens[-1] == eos
    docs = smollm2_tokenizer.decode(prepared.train.tolist() + prepared.val.tolist())
    assert sorted(docs.split("<|endoftext|>")[:-1]) == sorted(demo_stories(120, cfg.train.seed))
    assert meta["tokenizer"]["sha256"] == smollm2_tokenizer.digest


def test_worker_processes_give_the_same_tokens(smollm2_tokenizer, tmp_path):
    one = prepare(config(tmp_path / "a", smollm2_tokenizer.path, "data.demo_stories=300"))
    two = prepare(config(tmp_path / "b", smollm2_tokenizer.path, "data.demo_stories=300",
                              "data.num_workers=2"))
    assert np.array_equal(one.train, two.train) and np.array_equal(one.val, two.val)


def test_cache_is_reused_then_rebuilt_when_a_file_changes(smollm2_tokenizer, tmp_path,
                                                          monkeypatch, capsys):
    path = write(tmp_path / "stories.txt", f"{STORY_A}\n<|endoftext|>\n" * 40)
    cfg = config(tmp_path, smollm2_tokenizer.path, "data.source=files",
                 f"data.files=[{path}]", "data.seq_len=8", "data.val_fraction=0.2")
    first = prepare(cfg)
    builds = []
    real_build = data_module._build
    monkeypatch.setattr(data_module, "_build", lambda *a: builds.append(1) or real_build(*a))
    again = prepare(cfg)
    assert builds == [] and again.path == first.path and again.meta == first.meta

    write(path, f"{STORY_B}\n<|endoftext|>\n" * 50)
    os.utime(path, ns=(1, 1))
    rebuilt = prepare(cfg)
    assert builds == [1] and rebuilt.path == first.path
    assert rebuilt.meta["documents"]["train"] + rebuilt.meta["documents"]["val"] == 50
    assert "rebuilding the token cache" in capsys.readouterr().err


def test_another_tokenizer_gets_its_own_cache(smollm2_tokenizer, tmp_path):
    other = tmp_path / "other" / "tokenizer.json"
    other.parent.mkdir()
    other.write_text(smollm2_tokenizer.path.read_text(encoding="utf-8") + "\n", encoding="utf-8")
    a = prepare(config(tmp_path, smollm2_tokenizer.path, "data.demo_stories=40"))
    b = prepare(config(tmp_path, other, "data.demo_stories=40"))
    assert a.path != b.path
    assert b.meta["tokenizer"]["sha256"] != a.meta["tokenizer"]["sha256"]


def test_a_damaged_cache_is_rebuilt_not_trusted(smollm2_tokenizer, tmp_path):
    cfg = config(tmp_path, smollm2_tokenizer.path, "data.demo_stories=40")
    first = prepare(cfg)
    expected = np.array(first.train)
    with open(first.path / "train.bin", "r+b") as f:
        f.truncate(10)
    assert np.array_equal(prepare(cfg).train, expected)


def test_single_document_is_split_by_tokens(smollm2_tokenizer, tmp_path, capsys):
    path = write(tmp_path / "one.txt", " ".join([STORY_A] * 40))
    cfg = config(tmp_path, smollm2_tokenizer.path, "data.source=files", f"data.files=[{path}]",
                 "data.val_fraction=0.25")
    prepared = prepare(cfg)
    total = len(smollm2_tokenizer.encode(" ".join([STORY_A] * 40))) + 1
    assert len(prepared.train) + len(prepared.val) == total
    assert len(prepared.val) == pytest.approx(0.25 * total, abs=1)
    assert "only one document" in capsys.readouterr().err


def test_validation_split_is_never_empty(smollm2_tokenizer, tmp_path):
    cfg = config(tmp_path, smollm2_tokenizer.path, "data.demo_stories=3",
                 "data.val_fraction=0.001", "data.seq_len=8")
    assert prepare(cfg).meta["documents"] == {"train": 2, "val": 1}


def test_short_validation_split_and_empty_input_are_user_errors(smollm2_tokenizer, tmp_path,
                                                               capsys):
    cfg = config(tmp_path, smollm2_tokenizer.path, "data.demo_stories=3",
                 "data.val_fraction=0.001", "data.seq_len=512")
    with pytest.raises(UserError, match=r"validation split has \d+ tokens, fewer than "
                                        r"data.seq_len \+ 1 = 513"):
        prepare(cfg)
    with pytest.raises(UserError, match=r"data.seq_len \(600\) exceeds model.max_position "
                                        r"\(512\)"):
        prepare(config(tmp_path, smollm2_tokenizer.path, "data.seq_len=600"))
    empty = write(tmp_path / "empty.txt", "\n\n")
    cfg = config(tmp_path, smollm2_tokenizer.path, "data.source=files", f"data.files=[{empty}]")
    with pytest.raises(UserError, match=r"data.source 'files' yielded no documents"):
        prepare(cfg)
    assert "empty.txt holds no text; skipped" in capsys.readouterr().err


def test_prepare_command_prints_counts_and_errors_cleanly(smollm2_tokenizer, tmp_path, capsys):
    base = ["prepare", "--config", str(ROOT / "configs" / "tiny.yaml"),
            "--set", f"data.cache_dir={tmp_path}", "--set",
            f"data.tokenizer={smollm2_tokenizer.path}", "--set", "data.num_workers=1",
            "--set", "data.seq_len=16"]
    assert main([*base, "--set", "data.demo_stories=50"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"documents: \d+ train / \d+ val", out) and "cache: " in out
    assert main([*base, "--set", "data.source=files", "--set",
                 f"data.files=[{tmp_path / 'missing.txt'}]"]) == 2
    assert capsys.readouterr().err.startswith("error: data.files: file not found")


# --- batches -------------------------------------------------------------------------------

TOKENS = np.arange(10_000, dtype=np.uint16)


def test_batches_are_contiguous_windows_of_seq_len_plus_one():
    batch = BatchSampler(TOKENS, seq_len=16, batch_size=8, seed=0).next_batch()
    assert batch.shape == (8, 17) and batch.dtype == torch.long
    assert torch.equal(batch[:, 1:] - batch[:, :-1], torch.ones(8, 16, dtype=torch.long))


def test_sampler_state_round_trip_gives_identical_batches():
    a = BatchSampler(TOKENS, seq_len=64, batch_size=16, seed=3)
    for _ in range(20):  # past an epoch boundary (about 156 windows per epoch)
        a.next_batch()
    state = a.state_dict()
    assert all(isinstance(v, int) for v in state.values())
    b = BatchSampler(TOKENS, seq_len=64, batch_size=16, seed=99)
    b.load_state_dict(json.loads(json.dumps(state)))
    for _ in range(15):
        assert torch.equal(a.next_batch(), b.next_batch())


def test_global_batch_does_not_depend_on_world_size():
    whole = BatchSampler(TOKENS, seq_len=32, batch_size=8, seed=1)
    split = [BatchSampler(TOKENS, seq_len=32, batch_size=8, seed=1) for _ in range(4)]
    for _ in range(50):
        parts = [s.next_batch(rank=r, world_size=4) for r, s in enumerate(split)]
        assert all(p.shape == (2, 33) for p in parts)
        assert torch.equal(whole.next_batch(), torch.cat(parts))


def test_an_epoch_visits_every_window_once_and_epochs_differ():
    sampler = BatchSampler(TOKENS, seq_len=100, batch_size=1, seed=5)
    epoch0 = [int(sampler.next_batch()[0, 0]) for _ in range(99)]  # 99 windows fit
    assert (sampler.state_dict()["epoch"], sampler.state_dict()["position"]) == (1, 0)
    assert len(set(epoch0)) == 99
    assert len({s % 100 for s in epoch0}) == 1  # one grid offset per epoch
    epoch1 = [int(sampler.next_batch()[0, 0]) for _ in range(99)]
    assert epoch1 != epoch0


def test_too_few_tokens_is_a_user_error():
    with pytest.raises(UserError, match=r"training split has 10 tokens, fewer than "
                                        r"data.seq_len \+ 1 = 33"):
        BatchSampler(TOKENS[:10], seq_len=32, batch_size=2, seed=0)


def test_validation_batches_are_fixed_and_spread_out():
    batches = val_batches(TOKENS, seq_len=50, batch_size=4, num_batches=3)
    again = val_batches(TOKENS, seq_len=50, batch_size=4, num_batches=3)
    assert len(batches) == 3 and all(torch.equal(x, y) for x, y in zip(batches, again, strict=True))
    starts = torch.cat(batches)[:, 0]
    assert (starts % 50 == 0).all() and len(set(starts.tolist())) == 12
    assert starts.max() > 9000  # spread over the whole split, not its head
    short = val_batches(TOKENS[:201], seq_len=50, batch_size=3, num_batches=5)
    assert [len(b) for b in short] == [3, 1]
    with pytest.raises(UserError, match=r"validation split has 20 tokens"):
        val_batches(TOKENS[:20], seq_len=50, batch_size=4, num_batches=3)
