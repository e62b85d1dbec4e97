"""The trimmed LM head (``model.head_vocab``): a distribution over the whole vocabulary,
the full head's when every id is kept, a chunked loss equal to the plain one in value and
gradients, kept ids from the training split's counts that survive save / resume / load,
exact cached generation, the export refusal and the config check."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_run import TIMING_KEYS, TINY_YAML, VOCAB, small_config, tiny_overrides

from deepseek_mini import Config, DeepSeekMini, UserError, generate
from deepseek_mini.checkpoint import load_checkpoint
from deepseek_mini.cli.main import main
from deepseek_mini.config import ConfigError
from deepseek_mini.data import frequent_ids
from deepseek_mini.data.frequent_ids import most_frequent_ids
from deepseek_mini.data.tokens import prepare_data
from deepseek_mini.files import atomic_save
from deepseek_mini.interop.hf_export import export
from deepseek_mini.model.sizes import flops_per_token, total_params
from deepseek_mini.train.loop import train

V = 256  # small_config's vocabulary


def seeded(**model) -> DeepSeekMini:
    torch.manual_seed(0)
    return DeepSeekMini(small_config(**model).model)


def lively(model: DeepSeekMini) -> DeepSeekMini:
    """Weights far enough from the init that the kept and "other" logits differ."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def random_ids(shape: tuple[int, ...], seed: int = 2) -> torch.Tensor:
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tie", [True, False])
def test_probabilities_sum_to_one_over_the_full_vocabulary(tie):
    model = lively(seeded(head_vocab=40, tie_embeddings=tie))
    model.head.set_ids(torch.randperm(V, generator=torch.Generator().manual_seed(3))[:40])
    with torch.no_grad():
        logits = model(random_ids((2, 9))).logits
    assert logits.shape == (2, 9, V)
    probs = logits.double().softmax(-1)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 9, dtype=torch.double))
    # The rest share the "other" class evenly: one logit, the class's own less log(V - N).
    other = torch.ones(V, dtype=torch.bool)
    other[model.head.ids] = False
    rest = logits[..., other]
    assert torch.equal(rest, rest[..., :1].expand_as(rest))
    hidden = model.norm(model.embed(random_ids((2, 9))))  # any states: the head's formula
    weight = model.head.weight(model.lm_head.weight)
    scores, full = hidden @ weight.T, model.head.logits(hidden, weight)
    torch.testing.assert_close(full[..., other][..., 0], scores[..., -1] - math.log(V - 40))
    torch.testing.assert_close(full[..., model.head.ids], scores[..., :-1])
    # Z over all V ids is Z over the N + 1 classes: the "other" class's mass is shared.
    torch.testing.assert_close(full.logsumexp(-1), scores.logsumexp(-1))


@pytest.mark.parametrize("tie", [True, False])
def test_keeping_every_id_is_the_full_head(tie):
    full, kept = seeded(tie_embeddings=tie, mtp_depth=1), seeded(
        tie_embeddings=tie, mtp_depth=1, head_vocab=V)
    assert kept.head.other is None and torch.equal(kept.head.ids, torch.arange(V))
    assert {k for k in kept.state_dict()} - set(full.state_dict()) == {"head.ids"}
    for a, b in zip(full.parameters(), kept.parameters(), strict=True):
        assert torch.equal(a, b)  # the same init: no parameter was added or drawn
    ids, targets = random_ids((2, 12)), random_ids((2, 12), seed=4)
    targets[0, :3] = -100
    outs = [m(ids, targets) for m in (full, kept)]
    assert torch.equal(outs[0].logits, outs[1].logits)
    torch.testing.assert_close(outs[0].ce, outs[1].ce, rtol=0, atol=0)
    torch.testing.assert_close(outs[0].mtp_ce, outs[1].mtp_ce, rtol=0, atol=0)
    for out in outs:
        (out.ce + out.mtp_ce).backward()
    for (name, a), b in zip(full.named_parameters(), kept.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("tie", [True, False])
def test_chunked_trimmed_loss_equals_the_plain_full_vocabulary_ce(tie):
    model = lively(seeded(head_vocab=50, tie_embeddings=tie))
    head = model.head
    rows = 600  # three chunks of the chunked loss
    hidden = torch.randn(rows, 64, generator=torch.Generator().manual_seed(5),
                         requires_grad=True)
    targets = random_ids((rows,), seed=6)
    targets[::7] = -100
    targets[1::5] = head.ids[(torch.arange(rows) % 50)[1::5]]  # plenty of kept targets too
    assert (head.classes[targets[targets >= 0]] == 50).any()

    def grads(loss):
        params = [hidden, model.lm_head.weight, head.other]
        return loss, torch.autograd.grad(loss, params)

    loss, got = grads(head.cross_entropy(hidden, head.weight(model.lm_head.weight), targets))
    logits = head.logits(hidden, head.weight(model.lm_head.weight))
    plain = F.log_softmax(logits, -1)
    valid = targets != -100
    ref_loss, want = grads(-plain[valid].gather(1, targets[valid, None]).mean())
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    ids = random_ids((2, 10))
    out = model(ids, random_ids((2, 10), seed=7))  # the model's CE is the same function
    torch.testing.assert_close(out.ce, F.cross_entropy(out.logits.flatten(0, 1),
                                                       random_ids((2, 10), seed=7).flatten()))


def test_kept_ids_are_the_most_frequent_with_ties_broken_by_id(monkeypatch):
    tokens = np.array([5, 5, 5, 3, 7, 7, 3, 1, 9, 9], dtype=np.uint16)  # 5:3, 3 7 9:2, 1:1
    assert most_frequent_ids(tokens, 3, 12).tolist() == [3, 5, 7]
    assert most_frequent_ids(tokens, 6, 12).tolist() == [0, 1, 3, 5, 7, 9]  # 0: unseen, lowest
    monkeypatch.setattr(frequent_ids, "COUNT_CHUNK", 3)  # counted a chunk at a time
    assert frequent_ids.token_counts(tokens, 12).tolist() == [0, 1, 0, 2, 0, 3, 0, 2, 0, 2, 0, 0]


def test_set_ids_stores_them_sorted_and_rejects_what_is_not_n_distinct_ids():
    model = seeded(head_vocab=4)
    model.head.set_ids(torch.tensor([9, 2, 200, 7]))
    assert model.head.ids.tolist() == [2, 7, 9, 200]
    assert model.head.classes[[2, 7, 9, 200, 0, 255]].tolist() == [0, 1, 2, 3, 4, 4]
    for bad in ([1, 1, 2, 3], [1, 2, 3], [1, 2, 3, V]):
        with pytest.raises(ValueError, match="distinct ids"):
            model.head.set_ids(torch.tensor(bad))


def test_default_models_keep_their_state_dict_keys():
    assert not [k for k in seeded().state_dict() if k.startswith("head.")]
    cfg = small_config().model
    assert cfg.head_vocab == 0


@pytest.fixture(scope="module")
def data_overrides(tmp_path_factory) -> list[str]:
    return tiny_overrides(tmp_path_factory.mktemp("head-data"))


def run_config(data_overrides, out_dir, *extra: str) -> Config:
    return Config.from_yaml(TINY_YAML, [*data_overrides, f"train.out_dir={out_dir}",
                                        "model.head_vocab=100", *extra])


def rows_of(out_dir) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
            for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_kept_ids_come_from_the_training_split_and_survive_resume(data_overrides, tmp_path):
    steps = ["train.max_steps=6", "train.save_interval=3"]
    cfg = run_config(data_overrides, tmp_path / "straight", *steps)
    train(cfg)
    train(run_config(data_overrides, tmp_path / "sliced", *steps), stop_after=3)
    train(run_config(data_overrides, tmp_path / "sliced", *steps), resume=True)
    assert rows_of(tmp_path / "straight") == rows_of(tmp_path / "sliced")
    a, b = (load_checkpoint(tmp_path / d / "latest.pt")["model"] for d in ("straight", "sliced"))
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name
    data = prepare_data(cfg.data, cfg.train.seed, VOCAB, progress=False)
    assert torch.equal(a["head.ids"], most_frequent_ids(data.train, 100, VOCAB))
    loaded = DeepSeekMini.from_checkpoint(tmp_path / "straight" / "best.pt")
    assert torch.equal(loaded.head.ids, a["head.ids"])
    assert torch.equal(loaded.head.classes[a["head.ids"]], torch.arange(100))
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        probs = loaded(ids).logits.double().softmax(-1)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 8, dtype=torch.double))


def test_a_warm_start_keeps_a_trimmed_checkpoint_s_ids_and_trims_a_full_one(data_overrides,
                                                                            tmp_path):
    full = tmp_path / "full"
    train(run_config(data_overrides, full, "train.max_steps=1", "model.head_vocab=0"))
    ckpt = load_checkpoint(full / "latest.pt")
    trimmed = run_config(data_overrides, tmp_path / "from-full", "train.max_steps=1",
                         f"train.warm_start={full / 'latest.pt'}")
    train(trimmed)
    data = prepare_data(trimmed.data, trimmed.train.seed, VOCAB, progress=False)
    after = load_checkpoint(tmp_path / "from-full" / "latest.pt")["model"]
    assert torch.equal(after["head.ids"], most_frequent_ids(data.train, 100, VOCAB))
    # A trimmed checkpoint's own ids (here: not the data's) carry over to the same head.
    chosen = torch.arange(0, 200, 2)
    ckpt = load_checkpoint(tmp_path / "from-full" / "latest.pt")
    ckpt["model"]["head.ids"] = chosen
    atomic_save(ckpt, tmp_path / "chosen.pt")
    train(run_config(data_overrides, tmp_path / "from-chosen", "train.max_steps=1",
                     f"train.warm_start={tmp_path / 'chosen.pt'}"))
    after = load_checkpoint(tmp_path / "from-chosen" / "latest.pt")["model"]
    assert torch.equal(after["head.ids"], chosen)
    # And back to the full head: the trunk and embedding, without the head's entries.
    train(run_config(data_overrides, tmp_path / "back", "train.max_steps=1",
                     "model.head_vocab=0", f"train.warm_start={tmp_path / 'chosen.pt'}"))
    assert "head.ids" not in load_checkpoint(tmp_path / "back" / "latest.pt")["model"]


def test_a_deepseek_v3_folder_warm_starts_a_trimmed_head(data_overrides, tmp_path):
    v3 = ["model.attention=latent_rope", "model.router=sigmoid", "model.expert_activation=swiglu",
          "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=8", "model.v_head_dim=8"]
    train(run_config(data_overrides, tmp_path / "full", "train.max_steps=1",
                     "model.head_vocab=0", *v3))
    export(tmp_path / "full" / "best.pt", tmp_path / "hf")
    cfg = run_config(data_overrides, tmp_path / "trimmed", "train.max_steps=1", *v3,
                     f"train.warm_start=hf:{tmp_path / 'hf'}")
    train(cfg)
    data = prepare_data(cfg.data, cfg.train.seed, VOCAB, progress=False)
    after = load_checkpoint(tmp_path / "trimmed" / "latest.pt")["model"]
    assert torch.equal(after["head.ids"], most_frequent_ids(data.train, 100, VOCAB))


@torch.inference_mode()
def test_generation_with_a_trimmed_head_is_the_same_with_and_without_the_cache():
    model = lively(seeded(head_vocab=30, max_position=64)).eval()
    model.head.set_ids(torch.arange(3, 93, 3))
    prompt = random_ids((2, 5))
    ids = random_ids((2, 12), seed=8)
    cache = model.new_cache(2, 12)
    stepped = [model(ids[:, :5], cache=cache).logits[:, -1]]
    stepped += [model(ids[:, t:t + 1], cache=cache).logits[:, -1] for t in range(5, 12)]
    assert cache.head_rows is not None  # gathered once, reused at every step
    torch.testing.assert_close(torch.stack(stepped, 1), model(ids).logits[:, 4:], rtol=0,
                               atol=1e-5)
    cached = generate(model, prompt, max_new_tokens=12)
    assert torch.equal(cached, generate(model, prompt, max_new_tokens=12, use_cache=False))
    sampled = [generate(model, prompt, max_new_tokens=12, temperature=1.0, seed=5,
                        use_cache=use) for use in (True, False)]
    assert torch.equal(*sampled)


@torch.inference_mode()
def test_speculative_decoding_with_a_trimmed_head_is_greedy_decoding():
    model = lively(seeded(head_vocab=30, mtp_depth=2, max_position=64)).eval()
    prompt = random_ids((1, 5))
    plain = generate(model, prompt, max_new_tokens=20)
    assert torch.equal(generate(model, prompt, max_new_tokens=20, speculative=True), plain)


def test_export_refuses_a_trimmed_head_in_one_line_before_writing(data_overrides, tmp_path,
                                                                  capsys):
    train(run_config(data_overrides, tmp_path / "run", "train.max_steps=1"))
    capsys.readouterr()  # the run's own progress lines
    out = tmp_path / "hf"
    with pytest.raises(UserError, match=r"model\.head_vocab: 100.*model\.head_vocab: 0"):
        export(tmp_path / "run" / "best.pt", out)
    assert main(["export", "--checkpoint", str(tmp_path / "run" / "best.pt"),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: export:") and "head_vocab" in err[0]
    assert not out.exists() and not list(tmp_path.glob(".hf.*"))
    gguf = tmp_path / "model.gguf"
    assert main(["export", "--format", "gguf", "--checkpoint", str(tmp_path / "run" / "best.pt"),
                 "--out", str(gguf)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: export --format gguf:")
    assert "model.head_vocab: 0" in err[0] and not list(tmp_path.glob("*gguf*"))


@pytest.mark.parametrize("value, message", [
    (-1, r"model\.head_vocab must be >= 0"),
    (V + 1, rf"model\.head_vocab \({V + 1}\) must not exceed model\.vocab_size \({V}\)"),
])
def test_head_vocab_outside_0_to_vocab_size_is_refused(value, message):
    with pytest.raises(ConfigError, match=message):
        small_config(head_vocab=value)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("kept", [40, V])
def test_sizes_count_the_trimmed_head(tie, kept):
    cfg = small_config(head_vocab=kept, tie_embeddings=tie).model
    full = small_config(tie_embeddings=tie).model
    assert sum(p.numel() for p in DeepSeekMini(cfg).parameters()) == total_params(cfg)
    rows = kept + (kept < V)
    assert flops_per_token(full, 32) - flops_per_token(cfg, 32) == 6 * (V - rows) * 64


def test_a_trimmed_heads_fp32_loss_takes_larger_chunks_with_the_same_loss_and_gradients():
    """fp32 chunks hold up to CHUNK_LOGITS logits: 1,280 rows for 8,193 classes, 256 for
    the full 49,152 ids (as always); the loss and both gradients match 256-row chunks."""
    from deepseek_mini.model import loss

    rows = [loss.fp32_chunk_rows(torch.zeros(1, 8), torch.zeros(v, 8)) for v in (8193, 49152)]
    assert rows == [1280, 256]
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3000, 16, generator=generator)
    weight = torch.randn(8193, 16, generator=generator) * 0.1
    targets = torch.randint(0, 8193, (3000,), generator=generator)
    targets[::7] = -100
    results = []
    for chunk in (None, 256):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        ce = loss.linear_cross_entropy(h, w, targets, chunk_rows=chunk)
        ce.backward()
        results.append((ce.detach(), h.grad, w.grad))
    for larger, plain in zip(*results, strict=True):
        torch.testing.assert_close(larger, plain, rtol=1e-5, atol=1e-6)
