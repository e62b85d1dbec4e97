"""``model.dropout``: off by default and then no op at all; in training mode it drops the
embeddings, the attention probabilities (both MLA layouts) and each residual branch; in
eval mode, in generation and in exports the model is the dropout-free one; a resumed
run with dropout reproduces the uninterrupted run bit for bit."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import transformers
from tiny_run import SMALL_MODEL, TINY_YAML, VOCAB, small_config, tiny_overrides
from torch.nn import functional as F
from training_steps import random_batch

from deepseek_mini import Config, DeepSeekMini, UserError
from deepseek_mini.checkpoint import load_checkpoint, weights_checkpoint
from deepseek_mini.config import ConfigError, model_config_from_dict
from deepseek_mini.files import atomic_save
from deepseek_mini.interop.hf_export import export
from deepseek_mini.model.attention import MultiHeadLatentAttention
from deepseek_mini.model.latent_rope_attention import LatentRopeAttention
from deepseek_mini.model.rope import rope_tables
from deepseek_mini.train.loop import train
from deepseek_mini.train.optim import build_optimizer
from deepseek_mini.train.precision import setup_precision
from deepseek_mini.train.step import train_step

V3 = {"attention": "latent_rope", "router": "sigmoid", "expert_activation": "swiglu",
      "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8, "first_k_dense": 1}
LAYOUTS = {"seed": {}, "v3": V3}


def model_pair(p: float, **model) -> tuple[DeepSeekMini, DeepSeekMini]:
    """A model with dropout ``p`` and the dropout-free model with the same weights."""
    torch.manual_seed(0)
    dropped = DeepSeekMini(small_config(dropout=p, **model).model)
    plain = DeepSeekMini(small_config(**model).model)
    plain.load_state_dict(dropped.state_dict())
    return dropped, plain


def one_step(cfg: Config) -> tuple[float, dict[str, torch.Tensor], torch.Tensor]:
    """Loss, weights and the global RNG's state after one seeded training step."""
    torch.manual_seed(0)
    model = DeepSeekMini(cfg.model)
    optimizer = build_optimizer(model, cfg.train)
    stats, _ = train_step(model, optimizer, random_batch(4, 16, 256), 4, 1.0,
                          setup_precision(cfg.train))
    return stats[0].item(), model.state_dict(), torch.get_rng_state()


def test_no_dropout_is_the_default_and_runs_no_dropout_op(monkeypatch):
    implicit, explicit = small_config(), small_config(dropout=0.0)
    assert implicit == explicit and implicit.model.dropout == 0.0
    # A stored model section from before the key (a checkpoint's) means no dropout.
    stored = {k: v for k, v in dataclasses.asdict(implicit.model).items() if k != "dropout"}
    assert model_config_from_dict(stored) == implicit.model
    with_p = DeepSeekMini(small_config(dropout=0.3).model)
    assert list(with_p.state_dict()) == list(DeepSeekMini(implicit.model).state_dict())

    def no_dropout(*args, **kwargs):
        raise AssertionError("a dropout op ran with model.dropout 0")

    sdpa = F.scaled_dot_product_attention

    def sdpa_without_dropout(*args, **kwargs):
        assert kwargs.get("dropout_p", 0.0) == 0.0
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "dropout", no_dropout)
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa_without_dropout)
    rng_before = torch.get_rng_state()
    loss, weights, rng_after = one_step(implicit)
    loss_0, weights_0, _ = one_step(explicit)
    assert loss == loss_0
    assert all(torch.equal(w, weights_0[name]) for name, w in weights.items())
    # The step drew no random number (the seeded init's draws aside): same as no option.
    torch.manual_seed(0)
    DeepSeekMini(implicit.model)
    assert torch.equal(rng_after, torch.get_rng_state())
    torch.set_rng_state(rng_before)


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_training_drops_and_eval_is_the_dropout_free_model(layout, monkeypatch):
    dropped, plain = model_pair(0.2, mtp_depth=1, **layout)
    ids = torch.randint(0, 256, (2, 12))
    calls, dropout = [], F.dropout

    def counted(*args, **kwargs):
        calls.append(1)
        return dropout(*args, **kwargs)

    monkeypatch.setattr(F, "dropout", counted)
    assert not torch.equal(dropped(ids).logits, dropped(ids).logits)
    # the embeddings, then each layer's two branches; with targets, the MTP layer's too
    assert len(calls) == 2 * (1 + 2 * len(dropped.layers))
    calls.clear()
    dropped(ids[:, :-1], ids[:, 1:]).loss.backward()
    assert len(calls) == 1 + 2 * (len(dropped.layers) + len(dropped.mtp))
    dropped.eval(), plain.eval()
    calls.clear()
    with torch.no_grad():
        assert torch.equal(dropped(ids).logits, plain(ids).logits)
        cache_a, cache_b = dropped.new_cache(2, 16), plain.new_cache(2, 16)
        for step in (ids[:, :8], ids[:, 8:9], ids[:, 9:12]):  # prefill, decode, a chunk
            assert torch.equal(dropped(step, cache=cache_a).logits,
                               plain(step, cache=cache_b).logits)
    assert not calls


@pytest.mark.parametrize("attention, model", [(MultiHeadLatentAttention, {}),
                                              (LatentRopeAttention, V3)], ids=LAYOUTS.keys())
def test_attention_drops_its_probabilities_in_training_only(attention, model):
    cfg = small_config(dropout=0.5, **model).model
    attn = attention(cfg, 0)
    x = torch.randn(2, 6, cfg.hidden_size)
    cos, sin = rope_tables(cfg.rope_dim, 16, cfg.rope_theta)
    rope = (cos[:6][None, None], sin[:6][None, None])
    assert not torch.equal(attn(x, rope, rope), attn(x, rope, rope))
    attn.eval()
    plain = attention(dataclasses.replace(cfg, dropout=0.0), 0).eval()
    plain.load_state_dict(attn.state_dict())
    assert torch.equal(attn(x, rope, rope), plain(x, rope, rope))


def test_a_stored_dropout_model_loads_for_use_without_dropout(tmp_path):
    dropped, plain = model_pair(0.2)
    cfg = small_config(dropout=0.2)
    atomic_save(weights_checkpoint(dropped.state_dict(), cfg.to_dict()), tmp_path / "m.pt")
    loaded = DeepSeekMini.from_checkpoint(tmp_path / "m.pt")
    assert not loaded.training and loaded.config.dropout == 0.2
    prompt = torch.randint(0, 256, (2, 5))
    with torch.no_grad():
        assert torch.equal(loaded(prompt).logits, plain.eval()(prompt).logits)


@pytest.mark.parametrize("value", [1.0, -0.1, 1.5])
def test_an_out_of_range_dropout_is_one_error_line_naming_the_key(value):
    with pytest.raises(ConfigError, match=rf"^model\.dropout must be in \[0, 1\), got {value}$"):
        Config.from_yaml(None, [f"model.dropout={value}"])


@pytest.fixture(scope="module")
def data_overrides(tmp_path_factory) -> list[str]:
    return tiny_overrides(tmp_path_factory.mktemp("dropout-data"))


def run_config(data_overrides: list[str], out, *extra: str) -> Config:
    return Config.from_yaml(TINY_YAML, [*data_overrides, f"train.out_dir={out}", *extra])


def test_resume_with_dropout_reproduces_the_uninterrupted_run_exactly(data_overrides,
                                                                      tmp_path, device):
    """The masks come from the RNG state the checkpoint saved (the device's too): no draw
    may happen between restoring it and the next step that the straight run lacks."""
    steps = ["model.dropout=0.2", "train.max_steps=10", "train.save_interval=5",
             f"train.device={device.type}"]
    train(run_config(data_overrides, tmp_path / "straight", *steps))
    train(run_config(data_overrides, tmp_path / "sliced", *steps), stop_after=5)
    train(run_config(data_overrides, tmp_path / "sliced", *steps), resume=True)
    a = load_checkpoint(tmp_path / "straight" / "latest.pt")
    b = load_checkpoint(tmp_path / "sliced" / "latest.pt")
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert a["best_val"] == b["best_val"]
    losses = [[json.loads(line).get("loss") for line in
               (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("straight", "sliced")]
    assert losses[0] == losses[1]


def test_dropout_may_change_on_warm_start_and_on_resume_only_when_allowed(data_overrides,
                                                                          tmp_path):
    out = tmp_path / "run"
    train(run_config(data_overrides, out, "train.max_steps=1"))
    with pytest.raises(UserError, match=r"would change what the run is: model\.dropout: "
                                        r"0\.0 -> 0\.1"):
        train(run_config(data_overrides, out, "model.dropout=0.1", "train.max_steps=2"),
              resume=True)
    resumed = train(run_config(data_overrides, out, "model.dropout=0.1", "train.max_steps=2"),
                    resume=True, allow_changes=True)
    assert resumed.step == 2
    warm = train(run_config(data_overrides, tmp_path / "warm", "model.dropout=0.3",
                            "train.max_steps=1", f"train.warm_start={out / 'latest.pt'}"))
    assert warm.step == 1
    assert load_checkpoint(tmp_path / "warm" / "latest.pt")["config"]["model"]["dropout"] == 0.3


@pytest.mark.parametrize("layout", [V3, {}], ids=["native", "remote-code"])
def test_an_export_of_a_dropout_model_loads_and_is_the_eval_model(layout, data_overrides,
                                                                  tmp_path):
    cfg = Config.from_yaml(TINY_YAML, [
        *(f"model.{k}={v}" for k, v in {**SMALL_MODEL, "vocab_size": VOCAB, **layout}.items()),
        "model.dropout=0.1",
        *(o for o in data_overrides if o.startswith(("data.tokenizer", "data.cache_dir")))])
    torch.manual_seed(0)
    net = DeepSeekMini(cfg.model).eval()
    atomic_save(weights_checkpoint(net.state_dict(), cfg.to_dict()), tmp_path / "model.pt")
    result = export(tmp_path / "model.pt", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", trust_remote_code=not result.native).eval()
    if result.native:  # transformers' own DeepseekV3 drops attention at the same rate
        assert hf.config.attention_dropout == 0.1
    ids = random_batch(2, 8, VOCAB)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, net(ids).logits, atol=1e-4, rtol=0)
