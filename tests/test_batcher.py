"""Continuous batching: rows joining and leaving the latent cache, and requests that give
the same greedy tokens alone as when they share steps with others, and as ``generate``.

The model's hidden projections are redrawn large (``tiny_run.position_sensitive``): at the
usual initialisation an untrained model ignores RoPE positions, and a batcher feeding
every token one position late gave the very tokens ``generate`` gives."""

from __future__ import annotations

import copy
import threading

import pytest
import tiny_run
import torch

from deepseek_mini import Config, DeepSeekMini, generate
from deepseek_mini.inference.batcher import Batcher, Finish, Request
from deepseek_mini.inference.generate import decode_one, prefill
from deepseek_mini.model.cache import LatentCache

EOS = 0


def v3_layout_config() -> Config:
    """A small config in DeepSeek-V3's layout: decoupled rope keys beside the latents,
    the sigmoid router."""
    return tiny_run.small_config(vocab_size=512, num_kv_heads=1, max_position=48,
                                 attention="latent_rope", router="sigmoid", qk_nope_head_dim=12,
                                 qk_rope_head_dim=8, v_head_dim=12, kv_latent_dim=20)


@pytest.fixture(scope="module")
def model() -> DeepSeekMini:
    torch.manual_seed(0)
    cfg = tiny_run.small_config(vocab_size=512, num_kv_heads=1, max_position=48)
    return tiny_run.position_sensitive(DeepSeekMini(cfg.model).eval())


def reference(model: DeepSeekMini, prompt: list[int], max_tokens: int) -> list[int]:
    """What ``generate`` gives the prompt alone, up to (not including) end of text."""
    max_tokens = min(max_tokens, model.config.max_position - len(prompt))
    out = generate(model, torch.tensor([prompt]), max_new_tokens=max_tokens, eos_id=EOS)
    new = out[0, len(prompt):].tolist()
    return new[:new.index(EOS)] if EOS in new else new


class Collect:
    """A request's deliveries; ``after(n)`` waits until n tokens have arrived."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.finish: Finish | None = None
        self.done = threading.Event()
        self.changed = threading.Condition()

    def __call__(self, event) -> None:
        with self.changed:
            if isinstance(event, Finish):
                self.finish = event
                self.done.set()
            else:
                self.tokens.append(event)
            self.changed.notify_all()

    def after(self, n: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.tokens) >= n or self.done.is_set(),
                                         timeout=60)


def prompts(n: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 512, (int(k),), generator=g).tolist()
            for k in torch.randint(2, 14, (n,), generator=g)]


def add_prompt(model: DeepSeekMini, cache, prompt: list[int]) -> None:
    alone = model.new_cache(1, len(prompt))
    prefill(model, torch.tensor([prompt]), alone, torch.arange(len(prompt))[None], None)
    cache.add_rows(alone)


@torch.inference_mode()
def test_rows_join_leave_and_compact_without_changing_anyones_logits(model):
    rows_join_leave_and_compact(model)


@torch.inference_mode()
def test_rows_join_leave_and_compact_in_the_deepseek_v3_layout():
    """The rope keys a latent_rope cache holds beside the latents move with their rows."""
    torch.manual_seed(0)
    cfg = v3_layout_config()
    model = DeepSeekMini(cfg.model).eval()
    assert model.new_cache(1, 4).rope_keys is not None
    rows_join_leave_and_compact(model)


def rows_join_leave_and_compact(model: DeepSeekMini) -> None:
    cache = model.new_cache(0, 32)
    add_prompt(model, cache, [5, 6, 7])
    add_prompt(model, cache, [8, 9, 10, 11, 12, 13])
    assert cache.length == 6 and cache.valid[0, :6].tolist() == [True] * 3 + [False] * 3
    decode_one(model, torch.tensor([[3], [4]]), cache, torch.tensor([[3], [6]]))
    add_prompt(model, cache, [14, 15])  # joins right-aligned at slots 5, 6 (row 0 has a gap)
    cache.keep_rows(torch.tensor([0, 2]))  # the middle row leaves
    kept = copy.deepcopy(cache)
    cache.compact()
    assert cache.length == 4 and cache.valid.sum(-1).tolist() == [4, 2]
    token, position = torch.tensor([[20], [21]]), torch.tensor([[4], [2]])
    compacted = decode_one(model, token, cache, position)
    torch.testing.assert_close(compacted, decode_one(model, token, kept, position))
    torch.testing.assert_close(compacted[1], model(torch.tensor([[14, 15, 21]])).logits[0, -1])


@torch.inference_mode()
def test_greedy_requests_get_the_same_tokens_alone_or_batched(model, monkeypatch):
    compactions = []
    compact = LatentCache.compact
    monkeypatch.setattr(LatentCache, "compact", lambda c: compactions.append(compact(c)))
    batcher = Batcher(model, EOS, max_batch=3).start()
    try:
        work = [(p, 40) for p in prompts(5)]
        collects = [Collect() for _ in work]
        # staggered: each request joins while the earlier ones are decoding, and the
        # fourth and fifth wait for a free row (max_batch 3)
        for (prompt, budget), collect in zip(work, collects, strict=True):
            batcher.submit(Request(prompt, budget, collect))
            collect.after(3)
        for collect in collects:
            assert collect.done.wait(60)
    finally:
        batcher.close()
    for (prompt, budget), collect in zip(work, collects, strict=True):
        assert collect.tokens == reference(model, prompt, budget)
        expected = "length" if len(collect.tokens) == min(budget, 48 - len(prompt)) else "stop"
        assert collect.finish == Finish(expected)
    assert compactions  # the shared cache ran out of slots on the way and was compacted
    # the model tells positions apart: one position off, some request would differ
    assert any(tiny_run.shifted_greedy(model, prompt, len(collect.tokens)) != collect.tokens
               for (prompt, _), collect in zip(work, collects, strict=True))


@torch.inference_mode()
def test_a_request_alone_gets_generates_tokens_in_the_deepseek_v3_layout():
    """The decoupled rope key is rotated at the positions the batcher feeds, too."""
    torch.manual_seed(0)
    cfg = v3_layout_config()
    model = tiny_run.position_sensitive(DeepSeekMini(cfg.model).eval())
    batcher = Batcher(model, EOS, max_batch=2).start()
    try:
        work = prompts(2, seed=11)
        collects = [Collect() for _ in work]
        for prompt, collect in zip(work, collects, strict=True):
            batcher.submit(Request(prompt, 30, collect))
        assert all(collect.done.wait(60) for collect in collects)
    finally:
        batcher.close()
    for prompt, collect in zip(work, collects, strict=True):
        assert collect.tokens == reference(model, prompt, 30)
    assert any(tiny_run.shifted_greedy(model, prompt, len(collect.tokens)) != collect.tokens
               for prompt, collect in zip(work, collects, strict=True))


@torch.inference_mode()
def test_a_cancelled_request_leaves_without_changing_the_others(model):
    batcher = Batcher(model, EOS, max_batch=4).start()
    try:
        (a, b) = prompts(2, seed=3)
        first, second = Collect(), Collect()
        leaving = Request(a, 40, first)
        batcher.submit(leaving)
        batcher.submit(Request(b, 30, second))
        first.after(2)
        leaving.cancel()
        assert first.done.wait(60) and second.done.wait(60)
    finally:
        batcher.close()
    assert first.finish == Finish("cancelled") and len(first.tokens) < 40
    assert second.tokens == reference(model, b, 30)
    assert batcher.running == 0


def test_sampled_requests_repeat_with_a_seed_whoever_shares_their_steps(model):
    batcher = Batcher(model, EOS, max_batch=4).start()
    try:
        p = prompts(1, seed=5)[0]
        runs = []
        for neighbours in (0, 2):
            others = [Collect() for _ in range(neighbours)]
            for other, q in zip(others, prompts(neighbours, seed=9), strict=True):
                batcher.submit(Request(q, 20, other, temperature=1.0))
            mine = Collect()
            batcher.submit(Request(p, 20, mine, temperature=0.9, top_k=50, seed=7))
            assert mine.done.wait(60) and all(o.done.wait(60) for o in others)
            runs.append(mine.tokens)
    finally:
        batcher.close()
    assert runs[0] == runs[1] and runs[0]


@pytest.mark.parametrize("options, message", [
    ({"max_tokens": -1}, "max_tokens must be >= 0"),
    ({"temperature": -0.5}, "temperature must be >= 0"),
    ({"top_p": 1.5}, "top_p must be in (0, 1]"),
    ({"prompt": list(range(1, 50))}, "the prompt is 49 tokens long"),
])
def test_bad_requests_are_refused_before_they_queue(model, options, message):
    batcher = Batcher(model, EOS)
    request = Request(**{"prompt": [1, 2], "max_tokens": 4, "deliver": print, **options})
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        batcher.submit(request)
    assert batcher.waiting == 0
