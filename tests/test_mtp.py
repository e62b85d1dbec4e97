"""Multi-token prediction and self-speculative decoding: the MTP loss by hand, shared
weights, frozen-model training, cache rollback, greedy equality, the sampling rule's
distribution, exact resume, and the refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_run import TIMING_KEYS, TINY_YAML, small_config, tiny_overrides
from torch.nn import functional as F

from deepseek_mini import Config, DeepSeekMini
from deepseek_mini.checkpoint import load_checkpoint
from deepseek_mini.cli.main import main
from deepseek_mini.config import ConfigError
from deepseek_mini.inference.generate import generate
from deepseek_mini.inference.sampling import SamplingError
from deepseek_mini.inference.speculative import Sampler, SpeculativeStats, accept_drafts
from deepseek_mini.model.sizes import mtp_params
from deepseek_mini.train.loop import train


def mtp_model(seed: int = 0, **model) -> DeepSeekMini:
    torch.manual_seed(seed)
    return DeepSeekMini(small_config(**{"mtp_depth": 2, **model}).model)


def test_mtp_loss_matches_a_hand_computation_depth_by_depth():
    model = mtp_model().eval()
    ids = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(1))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    out = model(inputs, targets=targets)
    hidden, ces, aux = out.trunk, [], []
    for k, module in enumerate(model.mtp, start=1):
        steps = inputs.shape[1] - k
        joined = torch.cat([module.hidden_norm(hidden[:, :steps]),
                            module.embed_norm(model.embed.weight[inputs[:, k:]])], dim=-1)
        rope = model._rope(torch.arange(steps).expand(2, steps))
        hidden, stats = module.layer(module.proj(joined), rope, rope, None, None)
        logits = model.norm(hidden) @ model.embed.weight.T
        ces.append(F.cross_entropy(logits.flatten(0, 1), targets[:, k:].flatten()))
        aux.append(stats.balance_loss + stats.z_loss)
    assert out.mtp_ce.item() == pytest.approx(torch.stack(ces).mean().item(), rel=1e-5)
    plain = model(inputs, targets=targets, mtp=False)
    assert plain.mtp_ce is None and torch.equal(plain.ce, out.ce)
    assert out.aux.item() == pytest.approx((plain.aux + sum(aux)).item(), rel=1e-5)


def test_mtp_gradients_reach_the_shared_embedding_and_head_and_nothing_is_copied():
    model = mtp_model(tie_embeddings=False)
    ids = torch.randint(0, 256, (2, 9))
    model(ids[:, :-1], targets=ids[:, 1:]).mtp_ce.backward()
    assert model.embed.weight.grad.abs().sum() > 0
    assert model.lm_head.weight.grad.abs().sum() > 0
    assert all(256 not in p.shape for p in model.mtp.parameters())
    main_only = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    assert sum(p.numel() for p in model.mtp.parameters()) == mtp_params(model.config)
    untied = small_config(tie_embeddings=False).model
    assert main_only == sum(p.numel() for p in DeepSeekMini(untied).parameters())


def test_a_model_without_mtp_is_unchanged_by_the_option():
    torch.manual_seed(0)
    plain = DeepSeekMini(small_config().model)
    with_mtp = mtp_model(mtp_ffn="dense")
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, with_mtp.state_dict()[name]), name


def test_cache_rollback_equals_a_cache_built_without_the_rejected_tokens():
    model = mtp_model().eval()
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        rolled = model.new_cache(1, 12)
        model(ids[:, :6], cache=rolled)
        model(torch.randint(0, 256, (1, 4)), cache=rolled)  # four guesses, all refused
        rolled.truncate(6)
        a = model(ids[:, 6:9], cache=rolled).logits
        straight = model.new_cache(1, 12)
        model(ids[:, :6], cache=straight)
        b = model(ids[:, 6:9], cache=straight).logits
    assert rolled.length == straight.length == 9
    assert torch.equal(rolled.latents[:, :, :9], straight.latents[:, :, :9])
    assert torch.equal(rolled.positions[:, :9], straight.positions[:, :9])
    assert torch.equal(rolled.valid[:, :9], straight.valid[:, :9])
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="cannot truncate"):
        rolled.truncate(10)


def oracle_drafts(model: DeepSeekMini, reference: torch.Tensor, monkeypatch) -> None:
    """Make the MTP modules' guesses right where ``(position + depth) % 3 != 0`` (the
    reference's own next tokens) and wrong elsewhere, while they still run and fill their
    cache: acceptance of 0, 1 and 2 guesses all happen."""
    real = model.mtp_step

    def step(depth, hidden, tokens, cache, positions):
        hidden, logits = real(depth, hidden, tokens, cache, positions)
        target = int(positions[0, -1]) + depth + 2
        right = int(reference[0, target]) if target < reference.shape[1] else 0
        choice = right if (target + depth) % 3 else (right + 1) % logits.shape[-1]
        choice = torch.tensor([choice], device=logits.device)
        return hidden, F.one_hot(choice, logits.shape[-1]).float()

    monkeypatch.setattr(model, "mtp_step", step)


V3_LAYOUT = {"attention": "latent_rope", "router": "sigmoid", "qk_nope_head_dim": 12,
             "qk_rope_head_dim": 8, "v_head_dim": 12, "kv_latent_dim": 20}


@pytest.mark.parametrize("depth, layout", [(1, {}), (2, {}), (3, {}), (2, V3_LAYOUT)])
def test_greedy_speculative_decoding_is_token_for_token_greedy_decoding(depth, layout,
                                                                         monkeypatch, device):
    """Also in DeepSeek-V3's layout, whose absorbed decoding verifies the drafts and whose
    cache rolls back its rope keys with the latents."""
    model = mtp_model(mtp_depth=depth, **layout).to(device).eval()
    prompt = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(3))
    prompt = prompt.to(device)
    plain = generate(model, prompt, 40)
    stats = SpeculativeStats()
    assert torch.equal(generate(model, prompt, 40, speculative=True, stats=stats), plain)
    assert stats.rounds == 39 and stats.accepted == 0  # random drafters: nothing accepted
    oracle_drafts(model, plain, monkeypatch)
    stats = SpeculativeStats()
    assert torch.equal(generate(model, prompt, 40, speculative=True, stats=stats), plain)
    assert stats.accepted > 0 and stats.rounds < 39
    eos = int(plain[0, 20])
    first = (plain[0, 5:] == eos).nonzero()[0, 0] + 5
    assert torch.equal(generate(model, prompt, 40, speculative=True, eos_id=eos),
                       plain[:, :first + 1])


def chi_square_passes(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    """Pearson's test at p = 0.001, cells expecting fewer than 5 pooled into one; the
    quantile by Wilson and Hilferty's approximation (no scipy here)."""
    expected = probs.double() * counts.sum()
    small = expected < 5
    counts = torch.cat([counts.double()[~small], counts.double()[small].sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = expected > 0
    counts, expected = counts[keep], expected[keep]
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    df = len(counts) - 1
    z = 3.0902  # the standard normal's 0.999 quantile
    return chi2 < df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_accept_rule_gives_the_target_distribution():
    """Leviathan et al.'s rule, 40k rows at once: the first kept token is distributed as
    p whatever the draft distribution q."""
    rows, vocab = 40000, 5
    gen = torch.Generator().manual_seed(4)
    p_logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5], [0.0, 1.0, 2.0, 0.0, 0.0]])
    q = torch.tensor([0.05, 0.1, 0.5, 0.3, 0.05])
    drafts = torch.multinomial(q, rows, replacement=True, generator=gen)[:, None]
    sampler = Sampler(1.0, None, None, gen)
    accepted, following = accept_drafts(p_logits.expand(rows, 2, vocab), drafts,
                                        q.expand(rows, 1, vocab), sampler)
    first = torch.where(accepted > 0, drafts[:, 0], following)
    assert chi_square_passes(torch.bincount(first, minlength=vocab), p_logits[0].softmax(-1))
    assert not chi_square_passes(torch.bincount(drafts[:, 0], minlength=vocab),
                                 p_logits[0].softmax(-1))  # the test can tell q from p
    assert 0 < accepted.float().mean() < 1


def test_speculative_sampling_matches_the_model_distribution():
    """The first two of three sampled tokens after a prompt (the second one drafted by a
    random, so mostly wrong, MTP module), over 400 seeded draws on a 6-token vocabulary:
    their joint distribution is the model's p(a) p(b | a). Embeddings scaled up make the
    distributions sharp enough that keeping every draft fails the test (checked by
    patching the rule)."""
    model = mtp_model(vocab_size=6, mtp_depth=1, num_layers=1, hidden_size=32, num_heads=2,
                      num_kv_heads=1).eval()
    with torch.no_grad():
        model.embed.weight.mul_(4.0)
    prompt = torch.tensor([[1, 4, 2]])
    with torch.inference_mode():
        first = model(prompt).logits[0, -1].softmax(-1)
        seconds = model(torch.cat([prompt.expand(6, 3), torch.arange(6)[:, None]], 1)
                        ).logits[:, -1].softmax(-1)
    gen, stats = torch.Generator().manual_seed(5), SpeculativeStats()
    pairs = torch.zeros(36, dtype=torch.long)
    for _ in range(400):
        out = generate(model, prompt, 3, temperature=1.0, generator=gen, speculative=True,
                       stats=stats)
        pairs[out[0, 3] * 6 + out[0, 4]] += 1
    assert chi_square_passes(pairs, (first[:, None] * seconds).flatten())
    assert 0 < stats.accepted < stats.drafted == 400  # both branches of the rule ran


def test_speculative_refusals_name_the_problem():
    model = DeepSeekMini(small_config().model).eval()
    prompt = torch.randint(0, 256, (1, 4))
    with pytest.raises(SamplingError, match="model.mtp_depth is 0"):
        generate(model, prompt, 3, speculative=True)
    drafter = mtp_model().eval()
    with pytest.raises(SamplingError, match="one unpadded prompt at a time; got 2 rows"):
        generate(drafter, prompt.expand(2, 4), 3, speculative=True)
    with pytest.raises(SamplingError, match="drop use_cache=False"):
        generate(drafter, prompt, 3, speculative=True, use_cache=False)
    with pytest.raises(ConfigError, match="train.trainable is 'mtp' but model.mtp_depth is 0"):
        Config.from_yaml(TINY_YAML, ["train.trainable=mtp"])
    with pytest.raises(ConfigError, match="model.mtp_ffn must be one of moe, dense"):
        Config.from_yaml(TINY_YAML, ["model.mtp_ffn=wide"])


@pytest.fixture(scope="module")
def data_overrides(tmp_path_factory) -> list[str]:
    return tiny_overrides(tmp_path_factory.mktemp("mtp-data"))


def run_config(data_overrides, out_dir, *extra: str) -> Config:
    return Config.from_yaml(TINY_YAML, [*data_overrides, f"train.out_dir={out_dir}",
                                        "model.mtp_depth=2", *extra])


def rows_of(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_with_mtp_logs_it_and_resumes_exactly(data_overrides, tmp_path):
    steps = ["train.max_steps=8", "train.save_interval=3"]
    train(run_config(data_overrides, tmp_path / "straight", *steps))
    train(run_config(data_overrides, tmp_path / "sliced", *steps), stop_after=5)
    train(run_config(data_overrides, tmp_path / "sliced", *steps), resume=True)
    timing = TIMING_KEYS
    straight, sliced = ([{k: v for k, v in r.items() if k not in timing} for r in rows_of(d)]
                        for d in (tmp_path / "straight", tmp_path / "sliced"))
    assert straight == sliced
    for row in (r for r in straight if "loss" in r):
        assert row["loss"] == pytest.approx(row["ce"] + row["aux"] + 0.3 * row["mtp_ce"],
                                            rel=1e-5)
    assert all(math.isfinite(r["val_mtp_ce"]) for r in straight if "val_ce" in r)
    a, b = (load_checkpoint(tmp_path / d / "latest.pt")["model"] for d in ("straight", "sliced"))
    assert any(name.startswith("mtp.") for name in a)
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name


def test_trainable_mtp_trains_only_the_modules_on_a_frozen_model(data_overrides, tmp_path):
    base = tmp_path / "base"
    train(run_config(data_overrides, base, "train.max_steps=2"))
    out = tmp_path / "mtp-only"
    train(run_config(data_overrides, out, "train.max_steps=3", "train.trainable=mtp",
                     f"train.warm_start={base / 'latest.pt'}"))
    before = load_checkpoint(base / "latest.pt")["model"]
    after = load_checkpoint(out / "latest.pt")["model"]
    for name, tensor in after.items():
        assert torch.equal(tensor, before[name]) != name.startswith("mtp."), name
    log = (out / "train.log").read_text()
    assert "trained" in log and "mtp ce" in log


def test_generate_command_speculates_and_reports_its_stats(data_overrides, tmp_path, capsys):
    out = tmp_path / "run"
    train(run_config(data_overrides, out, "train.max_steps=1"))
    capsys.readouterr()
    base = ["generate", "--checkpoint", str(out / "latest.pt"), "--prompt", "Once upon",
            "--temperature", "0", "--max-new-tokens", "6", "--stats"]
    assert main(base) == 0
    plain = capsys.readouterr()
    assert main([*base, "--speculative"]) == 0
    spec = capsys.readouterr()
    assert spec.out == plain.out
    assert "plain decoding" in plain.err and "drafts accepted per step" in spec.err
    assert main([*base, "--speculative", "--no-cache"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --speculative verifies drafts over the "
                                               "eager cache: drop --no-cache")


def test_a_fresh_mtp_sigmoid_router_starts_with_zero_biases():
    """The MTP modules are built on the meta device and moved with ``to_empty``, which
    leaves buffers as whatever memory held: the expert biases must be set, not inherited
    (they were, up to 1e30, routing the module's tokens at random)."""
    for _ in range(3):
        junk = torch.full((4096,), float("nan"))  # memory the next allocations may reuse
        del junk
        model = mtp_model(router="sigmoid")
        biases = [module.moe.router.expert_bias for module in model.modules()
                  if hasattr(module, "moe") and module in list(model.mtp.modules())]
        assert len(biases) == 2
        assert all(torch.equal(b, torch.zeros_like(b)) for b in biases)
