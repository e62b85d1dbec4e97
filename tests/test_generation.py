"""Generation: the latent cache against full recomputation, left-padded batches against
each prompt alone, sampling filters, seeds, end of text, and the ``generate`` command."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import tiny_run
import torch
from child_process import run_ok

from deepseek_mini import Config, DeepSeekMini, UserError, generate
from deepseek_mini.cli.main import main
from deepseek_mini.data.instruct import instruct_prompt
from deepseek_mini.files import atomic_save
from deepseek_mini.inference.generate import compiled_decode_one, decode_one, prefill
from deepseek_mini.inference.sampling import next_token, top_k_filter, top_p_filter
from deepseek_mini.inference.streaming import IncrementalDecoder

ROOT = Path(__file__).resolve().parents[1]
INF = float("inf")


def small_config(**model) -> Config:
    """A one-KV-head model with room for 128 positions."""
    return tiny_run.small_config(**{"vocab_size": 512, "num_kv_heads": 1, "expert_hidden": 96,
                                    "max_position": 128, **model})


@pytest.fixture(scope="module")
def model() -> DeepSeekMini:
    torch.manual_seed(0)
    return DeepSeekMini(small_config().model).eval()


@pytest.fixture(scope="module")
def device_model(device) -> DeepSeekMini:
    """The same model on the test device: the cache's paths against recomputation there."""
    torch.manual_seed(0)
    return DeepSeekMini(small_config().model).to(device).eval()


def left_pad(prompts: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long, device=prompts[0].device)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return ids, mask


def cached_logits(model: DeepSeekMini, ids: torch.Tensor, prompt_len: int,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """Last-position logits of a prefill of ``ids[:, :prompt_len]``, then of each later token
    fed alone through the cache: [B, T - prompt_len + 1, V]."""
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    if mask is not None:
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    out = [model(ids[:, :prompt_len], cache=cache, positions=positions[:, :prompt_len],
                 attention_mask=None if mask is None else mask[:, :prompt_len],
                 logits_to_keep=1).logits[:, -1]]
    for t in range(prompt_len, ids.shape[1]):
        out.append(model(ids[:, t:t + 1], cache=cache, positions=positions[:, t:t + 1],
                         logits_to_keep=1).logits[:, -1])
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("prompt_len", [1, 4, 13])
@torch.inference_mode()
def test_cached_logits_match_full_recomputation(device_model, prompt_len):
    model = device_model
    ids = torch.randint(0, 512, (2, prompt_len + 10), generator=torch.Generator().manual_seed(1))
    ids = ids.to(model.device)
    full = model(ids).logits[:, prompt_len - 1:]
    torch.testing.assert_close(cached_logits(model, ids, prompt_len), full, rtol=0, atol=1e-4)


@pytest.mark.parametrize("prompt_len", [1, 4, 13])
def test_greedy_tokens_with_cache_equal_those_without(device_model, prompt_len):
    model = device_model
    prompt = torch.randint(0, 512, (2, prompt_len), generator=torch.Generator().manual_seed(2))
    prompt = prompt.to(model.device)
    cached = generate(model, prompt, max_new_tokens=15)
    assert cached.shape == (2, prompt_len + 15)
    assert torch.equal(cached[:, :prompt_len], prompt)
    assert torch.equal(cached, generate(model, prompt, max_new_tokens=15, use_cache=False))


@torch.inference_mode()
def test_left_padded_batch_logits_match_each_prompt_alone(device_model):
    model = device_model
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 512, (n,), generator=g).to(model.device) for n in (3, 11, 7)]
    follow = 6  # tokens fed one by one after the prompts
    ids, mask = left_pad(seqs)
    tail = torch.randint(0, 512, (3, follow), generator=g).to(model.device)
    full_ids = torch.cat([ids, tail], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(tail)], dim=1)
    batched = cached_logits(model, full_ids, ids.shape[1], full_mask)
    positions = (full_mask.cumsum(-1) - 1).clamp_min(0)
    recomputed = model(full_ids, positions=positions, attention_mask=full_mask).logits
    for i, seq in enumerate(seqs):
        alone = model(torch.cat([seq, tail[i]])[None]).logits[0, len(seq) - 1:]
        torch.testing.assert_close(batched[i], alone, rtol=0, atol=1e-4)
        torch.testing.assert_close(recomputed[i, ids.shape[1] - 1:], alone, rtol=0, atol=1e-4)


def test_left_padded_batch_generates_what_each_prompt_generates_alone(device_model):
    model = device_model
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(0, 512, (n,), generator=g).to(model.device) for n in (2, 9, 5)]
    ids, mask = left_pad(seqs, pad=7)
    batched = generate(model, ids, max_new_tokens=12, attention_mask=mask)
    recomputed = generate(model, ids, max_new_tokens=12, attention_mask=mask, use_cache=False)
    assert torch.equal(batched, recomputed)
    for i, seq in enumerate(seqs):
        alone = generate(model, seq[None], max_new_tokens=12)
        assert torch.equal(batched[i, ids.shape[1]:], alone[0, len(seq):])



def static_decode(model, ids, mask, steps, step, static=True):
    """Greedy decoding by hand: prefill, then ``step`` (decode_one, compiled or not) token
    by token over a static (or a prefix) cache; the logits of every step."""
    batch, prompt_len = ids.shape
    cache = model.new_cache(batch, prompt_len + steps, static=static)
    positions = (mask.sum(-1, keepdim=True) + torch.arange(steps, device=ids.device))
    logits = [prefill(model, ids, cache, (mask.cumsum(-1) - 1).clamp_min(0), mask)]
    for i in range(steps - 1):
        token = logits[-1].argmax(-1, keepdim=True)
        logits.append(step(model, token, cache, positions[:, i:i + 1]))
    return torch.stack(logits, 1)


@torch.inference_mode()
def test_static_cache_decoding_matches_the_prefix_cache(device_model):
    """The static cache (whole buffer under a mask) gives the eager cache's logits at every
    step, with left padding."""
    model = device_model
    seqs = [torch.tensor([5, 6, 7, 8, 9]), torch.tensor([11, 12])]
    seqs = [s.to(model.device) for s in seqs]
    ids, mask = left_pad(seqs, pad=7)
    static = static_decode(model, ids, mask, 10, decode_one)
    tokens = generate(model, ids, max_new_tokens=10, attention_mask=mask)[:, ids.shape[1]:]
    assert torch.equal(static.argmax(-1), tokens)
    prefix = static_decode(model, ids, mask, 10, decode_one, static=False)
    torch.testing.assert_close(static, prefix)


@torch.inference_mode()
def test_compiled_decode_step_is_traced_once_for_a_whole_generation(model):
    """Every decode step has the same shapes and no Python value that changes, and the
    experts of a few slots are gathered rather than sorted, so dynamo traces the whole
    step as one graph, once, and reuses it for every later token."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()  # other tests' graphs
    seqs = [torch.tensor([5, 6, 7, 8, 9]), torch.tensor([11, 12])]
    ids, mask = left_pad(seqs, pad=7)
    compiled = compiled_decode_one("eager")
    graphs_after_step = []

    def step(*args):
        logits = compiled(*args)
        graphs_after_step.append(counters["stats"]["unique_graphs"])
        return logits

    logits = static_decode(model, ids, mask, 12, step)
    assert set(graphs_after_step) == {1}  # one graph, no break, never traced again
    torch.testing.assert_close(logits, static_decode(model, ids, mask, 12, decode_one))

def test_a_seed_makes_sampling_repeatable(model):
    prompt = torch.randint(0, 512, (3, 5), generator=torch.Generator().manual_seed(5))
    options = dict(max_new_tokens=20, temperature=1.5, top_k=100, top_p=0.95)
    a = generate(model, prompt, seed=11, **options)
    assert torch.equal(a, generate(model, prompt, seed=11, **options))
    assert torch.equal(a, generate(model, prompt, generator=torch.Generator().manual_seed(11),
                                   **options))
    assert torch.equal(a, generate(model, prompt, seed=11, use_cache=False, **options))
    assert not torch.equal(a, generate(model, prompt, seed=12, **options))


def test_top_k_keeps_the_k_largest_logits():
    logits = torch.tensor([[1.0, 5.0, 3.0, -2.0, 4.0], [0.0, 0.0, 9.0, 1.0, 2.0]])
    expected = torch.tensor([[-INF, 5.0, 3.0, -INF, 4.0], [-INF, -INF, 9.0, 1.0, 2.0]])
    assert torch.equal(top_k_filter(logits, 3), expected)
    assert torch.equal(top_k_filter(logits, 5), logits)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15], [0.97, 0.01, 0.01, 0.01]])
    logits = probs.log()
    kept = top_p_filter(logits, 0.75).isfinite()
    # row 0: 0.5 + 0.3 reaches 0.75; row 1: the top token alone does.
    assert kept.tolist() == [[True, False, True, False], [True, False, False, False]]
    assert top_p_filter(logits, 0.85).isfinite().tolist()[0] == [True, False, True, True]
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_sampling_draws_only_from_the_filtered_tokens():
    logits = torch.tensor([[2.0, 1.9, 0.0, 1.8, -1.0]]).expand(2000, 5)
    g = torch.Generator().manual_seed(0)
    drawn = next_token(logits, temperature=1.0, top_k=3, generator=g)
    assert set(drawn.tolist()) == {0, 1, 3}
    drawn = next_token(logits, temperature=1.0, top_p=0.5, generator=g)
    assert set(drawn.tolist()) == {0, 1}
    assert torch.equal(next_token(logits, temperature=0.0), torch.zeros(2000, dtype=torch.long))


def test_generation_stops_at_end_of_text(model):
    prompt = torch.randint(0, 512, (2, 4), generator=torch.Generator().manual_seed(6))
    free = generate(model, prompt, max_new_tokens=10)
    eos = int(free[0, 4])  # row 0 produces this token first: call it end-of-text
    out = generate(model, prompt, max_new_tokens=10, eos_id=eos)
    row1 = free[1, 4:].tolist()
    if eos in row1:  # both rows finish: the batch stops where the later one does
        assert out.shape[1] == 4 + row1.index(eos) + 1
    else:
        assert out.shape[1] == 14
    assert (out[0, 4:] == eos).all()
    assert torch.equal(out[1, 4:], free[1, 4:out.shape[1]])
    single = generate(model, prompt[:1], max_new_tokens=10, eos_id=eos)
    assert single.shape[1] == 5


def test_zero_new_tokens_returns_the_prompt(model):
    prompt = torch.tensor([[5, 6, 7]])
    assert torch.equal(generate(model, prompt, max_new_tokens=0), prompt)


def test_streamer_sees_every_new_token(model):
    prompt = torch.randint(0, 512, (2, 3), generator=torch.Generator().manual_seed(7))
    seen = []
    out = generate(model, prompt, max_new_tokens=6, streamer=lambda t: seen.append(t.clone()))
    assert torch.equal(torch.stack(seen, dim=1), out[:, 3:])


@pytest.mark.parametrize(("options", "message"), [
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(temperature=1.0, top_p=0.0), "top_p must be in (0, 1]"),
    (dict(temperature=1.0, top_p=1.5), "top_p must be in (0, 1]"),
    (dict(temperature=1.0, top_k=0), "top_k must be >= 1"),
    (dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
    (dict(max_new_tokens=200), "exceeds model.max_position 128"),
    (dict(seed=1, generator=torch.Generator()), "not both"),
    (dict(attention_mask=torch.tensor([[1, 1, 0]])), "padding only on the left"),
])
def test_bad_arguments_are_value_errors_and_user_errors(model, options, message):
    prompt = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        generate(model, prompt, **options)
    with pytest.raises(UserError):
        generate(model, prompt, **options)


def test_incremental_decoder_never_splits_a_character(smollm2_tokenizer):
    tok = smollm2_tokenizer
    text = "Lily saw a café 🙂 and said: «ça va?» 你好 — the end."
    ids = tok.encode(text)
    decoder = IncrementalDecoder(tok.decode)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert len([p for p in pieces if p]) > 5  # streamed, not all at the end


def test_instruct_prompt_follows_the_corpus_layout():
    assert instruct_prompt("A cat finds a ball.", "ball, red", "Dialogue") == (
        "Features: Dialogue\nWords: ball, red\nSummary: A cat finds a ball.\nStory:")
    assert instruct_prompt("A dog naps.", None, None) == "Summary: A dog naps.\nStory:"


# --- the command line, on a tiny checkpoint using the real SmolLM2 tokenizer -------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, smollm2_tokenizer):
    cfg = small_config(vocab_size=49152, max_position=64)
    cfg.data.tokenizer = str(smollm2_tokenizer.path)
    torch.manual_seed(0)
    model = DeepSeekMini(cfg.model)
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    atomic_save({"model": model.state_dict(), "config": cfg.to_dict()}, path)
    return path


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["generate", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_streams_the_prompt_and_its_continuation(checkpoint, capsys, smollm2_tokenizer):
    args = ["--checkpoint", str(checkpoint), "--max-new-tokens", "8", "--temperature", "0"]
    code, out, err = run(capsys, *args, "--prompt", "Once upon a time")
    assert code == 0, err
    assert out.startswith("Once upon a time") and out.endswith("\n")
    assert len(out) > len("Once upon a time\n")
    assert run(capsys, *args, "--prompt", "Once upon a time", "--no-cache")[1] == out
    tok = smollm2_tokenizer
    model = DeepSeekMini.from_checkpoint(checkpoint).eval()
    prompt = torch.tensor([[tok.eos_id, *tok.encode("Once upon a time")]])
    expected = generate(model, prompt, max_new_tokens=8, eos_id=tok.eos_id)
    new = expected[0, prompt.shape[1]:].tolist()
    if tok.eos_id in new:
        new = new[:new.index(tok.eos_id)]
    assert out == "Once upon a time" + tok.decode(new) + "\n"


def test_cli_batches_several_prompts(checkpoint, capsys, tmp_path):
    base = ["--checkpoint", str(checkpoint), "--max-new-tokens", "6", "--temperature", "0"]
    alone = [run(capsys, *base, "--prompt", p)[1] for p in ("Hi", "The big red dog ran")]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hi\n\nThe big red dog ran\n", encoding="utf-8")
    code, out, err = run(capsys, *base, "--prompt-file", str(prompts))
    assert code == 0, err
    assert out == f"--- sample 1 ---\n{alone[0]}--- sample 2 ---\n{alone[1]}"


def test_cli_builds_the_instruct_prompt_and_samples_with_a_seed(checkpoint, capsys):
    args = ["--checkpoint", str(checkpoint), "--summary", "A cat finds a ball.", "--words",
            "ball, red", "--features", "Dialogue", "--max-new-tokens", "6", "--seed", "3",
            "--temperature", "1.0", "--top-k", "50", "--top-p", "0.9"]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert out.startswith("Features: Dialogue\nWords: ball, red\nSummary: A cat finds a ball."
                          "\nStory:")
    assert run(capsys, *args)[1] == out


def test_cli_reads_the_prompt_from_stdin(checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("The sun was hot\n"))
    code, out, err = run(capsys, "--checkpoint", str(checkpoint), "--prompt", "-",
                         "--max-new-tokens", "3", "--temperature", "0")
    assert code == 0, err
    assert out.startswith("The sun was hot")


def test_cli_reads_stdin_bytes_as_utf8_and_refuses_anything_else(checkpoint, capsys,
                                                                 monkeypatch):
    def stdin(raw: bytes) -> io.TextIOWrapper:
        return io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8", errors="surrogateescape")

    monkeypatch.setattr(sys, "stdin", stdin("The café was warm\r\n".encode()))
    args = ["--checkpoint", str(checkpoint), "--prompt", "-", "--max-new-tokens", "2",
            "--temperature", "0"]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert out.startswith("The café was warm") and "\r" not in out
    monkeypatch.setattr(sys, "stdin", stdin(b"caf\xe9 time\n"))
    code, out, err = run(capsys, *args)
    assert code == 2 and out == ""
    assert err == ("error: the prompt on stdin is not UTF-8 text (invalid continuation byte "
                   "at byte 3)\n")


def test_cli_caps_new_tokens_at_max_position_with_a_notice(checkpoint, capsys):
    code, out, err = run(capsys, "--checkpoint", str(checkpoint), "--prompt", "word " * 50,
                         "--max-new-tokens", "40", "--temperature", "0")
    assert code == 0, err
    assert err.startswith("note: generating at most")


def test_the_generate_script_runs_as_a_subprocess(checkpoint):
    result = run_ok("generate.py", "--checkpoint", str(checkpoint), "--max-new-tokens", "4",
                    "--temperature", "0", stdin="Tom and Sam", timeout=120)
    assert result.stdout.startswith("Tom and Sam")


@pytest.mark.parametrize(("args", "message"), [
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.2"], "--top-p must be in (0, 1]"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--top-k", "0"], "--top-k must be >= 1"),
    (["--max-new-tokens", "-3"], "--max-new-tokens must be >= 0"),
    (["--prompt", ""], "prompt 1 is empty"),
    (["--prompt", "ok", "--prompt", "caf\udce9"], "prompt 2 is not UTF-8 text"),  # argv bytes
    (["--summary", "caf\udce9"], "prompt 1 is not UTF-8 text"),
    (["--prompt", "word " * 80], "tokens long but the model reads at most 64"),
    (["--prompt", "a", "--summary", "b"], "drop --prompt"),
    (["--compile", "--no-cache"], "--compile compiles the cached decode step"),
])
def test_cli_rejects_bad_arguments(checkpoint, capsys, args, message):
    code, out, err = run(capsys, "--checkpoint", str(checkpoint), *args)
    assert code == 2
    assert err.startswith("error: ") and message in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_cli_rejects_missing_and_corrupt_checkpoints(tmp_path, capsys):
    code, _, err = run(capsys, "--checkpoint", str(tmp_path / "none.pt"), "--prompt", "x")
    assert code == 2 and err.startswith("error: checkpoint not found")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    code, _, err = run(capsys, "--checkpoint", str(corrupt), "--prompt", "x")
    assert code == 2 and err.startswith("error: cannot load checkpoint")
