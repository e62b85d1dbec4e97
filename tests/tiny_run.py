"""Small configs the tests share: ``small_config`` for model-level tests, and the tiny
training setup of the training and distributed tests (a 2-layer model of the tiny
config's shape on the demo corpus, with a 512-token BPE fitted to that corpus: SmolLM2's
49,152-token LM head would make each step ~50x dearer and is not what these tests are
about)."""

from __future__ import annotations

from pathlib import Path

import tokenizers
import torch

from deepseek_mini import Config
from deepseek_mini.data.demo_corpus import demo_stories

ROOT = Path(__file__).resolve().parents[1]
TINY_YAML = ROOT / "configs" / "tiny.yaml"
VOCAB = 512
TIMING_KEYS = {"elapsed_s", "tokens_per_s", "mfu", "cpu_s", "peak_flops"}
TINY = [
    "model.hidden_size=32", "model.num_heads=2", "model.kv_latent_dim=16",
    "model.expert_hidden=64", "model.max_position=64",
    "data.source=demo", "data.demo_stories=300", "data.seq_len=32", "data.val_fraction=0.05",
    "data.num_workers=1",
    "train.device=cpu", "train.precision=fp32", "train.batch_size=4", "train.micro_batch_size=2",
    "train.max_steps=8", "train.warmup_steps=2", "train.lr=3e-3", "train.log_interval=2",
    "train.eval_interval=4", "train.eval_batches=2", "train.save_interval=4",
    "train.sample_interval=1000",
]


SMALL_MODEL = {"vocab_size": 256, "hidden_size": 64, "num_layers": 2, "num_heads": 4,
               "num_kv_heads": 2, "kv_latent_dim": 16, "num_experts": 4, "top_k": 2,
               "expert_hidden": 48, "max_position": 64}


def small_config(**model) -> Config:
    """The tiny config with a 2-layer, 64-wide model; ``model`` overrides its keys."""
    keys = {**SMALL_MODEL, **model}
    return Config.from_yaml(TINY_YAML, overrides=[f"model.{k}={v}" for k, v in keys.items()])


def tiny_overrides(root: Path) -> list[str]:
    """``TINY`` plus a BPE of ``VOCAB`` tokens fitted to the demo corpus and a data cache,
    both under ``root``."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(demo_stories(300, 0), trainer)
    assert tok.get_vocab_size() == VOCAB
    tok.save(str(root / "tokenizer.json"))
    return [*TINY, f"model.vocab_size={VOCAB}", f"data.tokenizer={root / 'tokenizer.json'}",
            f"data.cache_dir={root / 'cache'}"]


def position_sensitive(model: torch.nn.Module, gain: float = 2.0) -> torch.nn.Module:
    """``model`` with its hidden projections redrawn at ``gain / sqrt(fan_in)``: at the
    usual 0.02 an untrained model's attention is nearly uniform, so a token fed one RoPE
    position off changes no logit by more than ~1e-6 and no greedy token; redrawn, its
    greedy continuations change when positions do (``shifted_greedy`` checks that)."""
    vocab = model.config.vocab_size
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.weight.shape[0] != vocab:
                torch.nn.init.normal_(module.weight, std=gain / module.in_features ** 0.5)
    return model


@torch.inference_mode()
def shifted_greedy(model: torch.nn.Module, prompt: list[int], new_tokens: int,
                   shift: int = 1) -> list[int]:
    """The greedy continuation of ``prompt`` with every new token fed ``shift`` RoPE
    positions late: what a server off by one would write, to show that a model and
    prompt can tell it from ``generate``'s."""
    ids, positions = list(prompt), list(range(len(prompt)))
    for _ in range(new_tokens):
        logits = model(torch.tensor([ids]), positions=torch.tensor([positions])).logits
        ids.append(int(logits[0, -1].argmax()))
        positions.append(len(ids) - 1 + shift)
    return ids[len(prompt):]
