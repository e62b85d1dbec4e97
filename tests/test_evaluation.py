"""Held-out evaluation: CE and bits per byte against a hand computation, every token scored
once, expert usage, the transformers route, and the errors a user sees."""

from __future__ import annotations

import gzip
import json
import math

import pytest
import torch
from torch.nn import functional as F

from deepseek_mini import Config, DeepSeekMini, UserError
from deepseek_mini.cli.main import main
from deepseek_mini.evaluation import (
    Segment,
    count_bytes,
    hf_separator,
    read_documents,
    select_segments,
    token_stream,
    window_batches,
)
from deepseek_mini.files import atomic_save

STORIES = [
    "Once upon a time, there was a little cat named Tom. Tom liked to play in the sun.",
    "Lily found a big red ball. \"Look, Mom!\" she said. Mom smiled — the ball was new.",
    "The dog ran fast. It saw a bird and barked. The bird flew away, and the dog sat down.",
    "Ben had a toy car. He gave it to Sue. Sue was happy, and they played all day. ✨",
]
SEQ_LEN = 16


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "stories.txt"
    path.write_text("".join(f"{s}\n<|endoftext|>\n" for s in STORIES), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, smollm2_tokenizer):
    cfg = Config.from_yaml("configs/tiny.yaml", overrides=[
        "model.hidden_size=32", "model.num_heads=2", "model.kv_latent_dim=16",
        "model.expert_hidden=32", "model.max_position=64", f"data.seq_len={SEQ_LEN}",
        f"data.tokenizer={smollm2_tokenizer.path}"])
    torch.manual_seed(0)
    model = DeepSeekMini(cfg.model).eval()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    atomic_save({"model": model.state_dict(), "config": cfg.to_dict()}, path)
    return path, model


def run_json(capsys, *argv: str) -> dict:
    assert main(["eval", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def hand_nll(model, stream: list[int], seq_len: int) -> float:
    """Token i >= 1 is predicted from tokens start..i-1 of its window, start = the largest
    multiple of seq_len below i: one forward pass per window, summed by hand."""
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(stream) - 1, seq_len):
            context = stream[start:start + seq_len]
            logp = model(torch.tensor([context])).logits[0].log_softmax(-1)
            for pos, target in enumerate(stream[start + 1:start + seq_len + 1]):
                total -= logp[pos, target].item()
    return total


def test_ce_and_bpb_match_a_hand_computation(capsys, data_file, tiny_checkpoint,
                                             smollm2_tokenizer):
    path, model = tiny_checkpoint
    tok = smollm2_tokenizer
    stream = [tok.eos_id]
    for story in STORIES:
        stream += tok.encode(story) + [tok.eos_id]
    nll = hand_nll(model, stream, SEQ_LEN)
    n_bytes = sum(len(s.encode("utf-8")) + 1 for s in STORIES)

    got = run_json(capsys, "--checkpoint", str(path), "--data", str(data_file),
                   "--batch-size", "3")
    assert got["tokens"] == len(stream) - 1
    assert got["bytes"] == n_bytes
    assert got["ce"] == pytest.approx(nll / (len(stream) - 1), rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(got["ce"]), rel=1e-9)
    assert got["bpb"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)


def test_result_does_not_depend_on_batch_size(capsys, data_file, tiny_checkpoint):
    path, _ = tiny_checkpoint
    one = run_json(capsys, "--checkpoint", str(path), "--data", str(data_file),
                   "--batch-size", "1")
    many = run_json(capsys, "--checkpoint", str(path), "--data", str(data_file),
                    "--batch-size", "64")
    assert one["tokens"] == many["tokens"]
    assert one["ce"] == pytest.approx(many["ce"], rel=1e-6)


@pytest.mark.parametrize("length,seq_len,batch", [(2, 1, 1), (17, 16, 4), (18, 16, 4),
                                                   (100, 7, 3), (100, 200, 2)])
def test_every_token_after_the_first_is_a_target_exactly_once(length, seq_len, batch):
    stream = torch.arange(length)
    targets, contexts = [], []
    for window in window_batches(stream, seq_len, batch):
        assert window.shape[0] <= batch and window.shape[1] <= seq_len + 1
        targets += window[:, 1:].flatten().tolist()
        contexts += window[:, 0].tolist()
    assert targets == list(range(1, length))
    assert contexts == list(range(0, length - 1, seq_len))  # each window continues the last


def test_max_tokens_scores_exactly_that_many_and_their_bytes(capsys, data_file,
                                                             tiny_checkpoint, smollm2_tokenizer):
    path, _ = tiny_checkpoint
    tok = smollm2_tokenizer
    first = len(tok.encode(STORIES[0])) + 1
    got = run_json(capsys, "--checkpoint", str(path), "--data", str(data_file),
                   "--max-tokens", str(first + 7))
    assert got["tokens"] == first + 7
    assert got["bytes"] == count_bytes(select_segments(STORIES, tok, first + 7))
    for budget in (1, 5, first - 1, first, first + 1, first + 7):
        segments = select_segments(STORIES, tok, budget)
        stream = token_stream(segments, tok.encode_batch, tok.eos_id)
        assert len(stream) - 1 == budget
        assert all(STORIES[i].startswith(s.text) for i, s in enumerate(segments))
    assert select_segments(STORIES, tok, first) == [Segment(STORIES[0], True)]


def test_cut_never_splits_a_character(smollm2_tokenizer):
    tok = smollm2_tokenizer
    story = "ab ✨✨✨ cd"
    for budget in range(1, len(tok.encode(story)) + 1):
        segments = select_segments([story], tok, budget)
        text = segments[0].text if segments else ""
        assert story.startswith(text) and "\ufffd" not in text
        assert len(token_stream(segments, tok.encode_batch, tok.eos_id)) - 1 <= budget


def test_expert_fractions_sum_to_one_per_layer(capsys, data_file, tiny_checkpoint):
    path, model = tiny_checkpoint
    got = run_json(capsys, "--checkpoint", str(path), "--data", str(data_file), "--experts")
    fractions = got["experts"]["expert_fractions"]
    assert len(fractions) == model.config.num_layers
    for row in fractions:
        assert len(row) == model.config.num_experts
        assert sum(row) == pytest.approx(1.0, abs=1e-9)
    assert all(0.0 <= h <= math.log(model.config.num_experts) + 1e-6
               for h in got["experts"]["router_entropy"])

    assert main(["eval", "--checkpoint", str(path), "--data", str(data_file), "--experts"]) == 0
    out = capsys.readouterr().out
    assert "bpb" in out and "entropy" in out and "router entropy" in out


def test_documents_are_read_as_training_reads_them(tmp_path):
    path = tmp_path / "mixed.txt"
    path.write_text("first\nstory\n<|endoftext|>\n\n<|endoftext|>\nsecond\n", encoding="utf-8")
    assert read_documents(path) == ["first\nstory", "second"]
    jsonl = tmp_path / "docs.jsonl.gz"
    with gzip.open(jsonl, "wt", encoding="utf-8") as f:
        f.write('{"text": "one"}\n{"text": "two"}\n')
    assert read_documents(jsonl) == ["one", "two"]
    plain = tmp_path / "plain.txt"
    plain.write_text("just some text\nover two lines\n", encoding="utf-8")
    assert read_documents(plain) == ["just some text\nover two lines"]


@pytest.fixture(scope="module")
def tiny_hf_model(tmp_path_factory, smollm2_tokenizer):
    """A random 2-layer Llama with the SmolLM2 tokenizer, saved as a transformers folder."""
    transformers = pytest.importorskip("transformers", reason="the --hf-model route needs it")
    folder = tmp_path_factory.mktemp("hf")
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    transformers.PreTrainedTokenizerFast(tokenizer_file=str(smollm2_tokenizer.path),
                                         eos_token="<|endoftext|>").save_pretrained(folder)
    return folder, model


def test_hf_separator_is_endoftext_even_when_it_is_also_the_unknown_token(smollm2_tokenizer):
    """SmolLM2's GGUF tokenizer: <|endoftext|> (id 0) is also unk, <|im_end|> (2) is eos."""
    transformers = pytest.importorskip("transformers", reason="the --hf-model route needs it")
    gguf_like = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(smollm2_tokenizer.path), unk_token="<|endoftext|>",
        eos_token="<|im_end|>")
    assert gguf_like.unk_token_id == 0 and gguf_like.eos_token_id == 2
    assert hf_separator(gguf_like, "smollm2") == smollm2_tokenizer.eos_id == 0


def test_hf_separator_falls_back_to_the_eos_token():
    class NoEndOfText:
        eos_token_id = 7

        def get_vocab(self) -> dict[str, int]:
            return {"</s>": 7, "a": 8}

    assert hf_separator(NoEndOfText(), "x") == 7
    NoEndOfText.eos_token_id = None
    with pytest.raises(UserError, match="nor an end-of-sequence token"):
        hf_separator(NoEndOfText(), "x")


def test_hf_model_scores_the_same_windows(capsys, data_file, tiny_checkpoint, tiny_hf_model,
                                          smollm2_tokenizer):
    folder, model = tiny_hf_model
    tok = smollm2_tokenizer
    segments = select_segments(STORIES, tok, 40)
    stream = token_stream(segments, tok.encode_batch, tok.eos_id)
    nll = 0.0
    with torch.no_grad():
        for window in window_batches(stream, SEQ_LEN, 1):
            logits = model(input_ids=window[:, :-1]).logits
            nll += F.cross_entropy(logits[0], window[0, 1:], reduction="sum").item()

    got = run_json(capsys, "--hf-model", str(folder), "--data", str(data_file),
                   "--seq-len", str(SEQ_LEN), "--max-tokens", "40",
                   "--tokenizer", str(tok.path))
    ours = run_json(capsys, "--checkpoint", str(tiny_checkpoint[0]), "--data", str(data_file),
                    "--max-tokens", "40")
    assert got["tokens"] == ours["tokens"] == 40
    assert got["bytes"] == ours["bytes"] == count_bytes(segments)
    assert got["ce"] == pytest.approx(nll / 40, rel=1e-5)


@pytest.mark.parametrize("content,message", [
    (b"", "is empty"),
    (b"\n<|endoftext|>\n  \n", "holds no text to score"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is binary"),
    (b"\xff\xfe\xfd junk \xc0\xc1", "is not UTF-8 text"),
])
def test_bad_data_files(capsys, tmp_path, tiny_checkpoint, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    assert main(["eval", "--checkpoint", str(tiny_checkpoint[0]), "--data", str(path)]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("error: ") and message in last and str(path) in last


def test_a_few_invalid_bytes_are_replaced_with_a_warning_as_in_training(capsys, tmp_path,
                                                                         tiny_checkpoint):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"The caf\xe9 was warm. " + b"The cat slept by the door all day long. " * 4)
    assert main(["eval", "--checkpoint", str(tiny_checkpoint[0]), "--data", str(path)]) == 0
    captured = capsys.readouterr()
    assert "1 invalid UTF-8 sequence(s) replaced" in captured.err and "bpb" in captured.out


@pytest.mark.parametrize("extra,message", [
    (["--seq-len", "65"], "--seq-len 65 exceeds the model's max_position 64"),
    (["--seq-len", "0"], "--seq-len must be positive, got 0"),
    (["--max-tokens", "-3"], "--max-tokens must be positive, got -3"),
    (["--data", "nowhere.txt"], "data file not found: nowhere.txt"),
])
def test_bad_arguments(capsys, data_file, tiny_checkpoint, extra, message):
    argv = ["eval", "--checkpoint", str(tiny_checkpoint[0]), "--data", str(data_file), *extra]
    assert main(argv) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_missing_checkpoint_and_experts_of_a_transformers_model(capsys, tmp_path, data_file):
    assert main(["eval", "--checkpoint", str(tmp_path / "none.pt"), "--data",
                 str(data_file)]) == 2
    assert capsys.readouterr().err == f"error: checkpoint not found: {tmp_path / 'none.pt'}\n"
    assert main(["eval", "--hf-model", "x", "--data", str(data_file), "--experts"]) == 2
    assert "--experts needs a deepseek-mini --checkpoint" in capsys.readouterr().err


def test_unknown_hf_model_fails_fast(capsys, monkeypatch, tmp_path, data_file):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"x")
    assert main(["eval", "--hf-model", str(not_gguf), "--data", str(data_file)]) == 2
    assert "a file must be a .gguf model" in capsys.readouterr().err
    assert main(["eval", "--hf-model", "nobody/no-such-model", "--data", str(data_file)]) == 2
    assert capsys.readouterr().err.startswith("error: cannot load --hf-model nobody/no-such-model")
