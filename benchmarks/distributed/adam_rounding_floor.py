"""How far fp32 rounding alone moves AdamW's weights: the floor under any "equal to one
process within 1e-5" comparison of runs that sum in another order.

    python benchmarks/distributed/adam_rounding_floor.py [--steps 3] [--lrs 3e-3,1e-3,3e-4]

One process, the distributed tests' setup (tests/test_distributed.py: a 2-layer model,
hidden 64, 4 experts, a 512-token BPE fitted to the 300-story demo corpus, the EP tests'
1% validation split), fp32: two copies take the same batches of 4 x 32 tokens in micro
batches of 2 rows, one copy with the rows of each micro batch swapped. The loss is the
same function of the same rows (the balance loss sees the same micro batches), so every
difference is the order of floating-point sums, and AdamW, dividing by the root of its
second moment, turns a near-zero gradient's last bits into a share of the learning rate.
Prints the largest weight difference after each step, per learning rate.

Fills BENCHMARKS.md, section "The rounding floor".
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import tokenizers
import torch

from deepseek_mini import Config, DeepSeekMini
from deepseek_mini.data.demo_corpus import demo_stories
from deepseek_mini.data.tokens import BatchSampler, prepare_data
from deepseek_mini.train.optim import build_optimizer, build_scheduler
from deepseek_mini.train.precision import setup_precision
from deepseek_mini.train.step import train_step

VOCAB = 512
MODEL = [f"model.vocab_size={VOCAB}", "model.hidden_size=64", "model.num_heads=2",
         "model.kv_latent_dim=16", "model.num_experts=4", "model.expert_hidden=64",
         "model.max_position=64", "data.source=demo", "data.demo_stories=300",
         "data.val_fraction=0.01", "data.seq_len=32", "train.batch_size=4",
         "train.micro_batch_size=2", "train.device=cpu", "train.precision=fp32",
         "train.warmup_steps=2", "train.max_steps=8"]


def fit_tokenizer(folder: Path) -> Path:
    """A BPE of ``VOCAB`` tokens fitted to the demo corpus, as the tests' tiny_run does."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(demo_stories(300, 0), trainer)
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def drift(lr: float, steps: int, folder: Path) -> list[float]:
    cfg = Config.from_yaml("configs/tiny.yaml", [
        *MODEL, f"train.lr={lr}", f"data.tokenizer={fit_tokenizer(folder)}",
        f"data.cache_dir={folder / 'cache'}"])
    precision = setup_precision(cfg.train)
    torch.manual_seed(cfg.train.seed)
    a = DeepSeekMini(cfg.model)
    b = copy.deepcopy(a)
    opt_a, opt_b = build_optimizer(a, cfg.train), build_optimizer(b, cfg.train)
    sched_a, sched_b = build_scheduler(opt_a, cfg.train), build_scheduler(opt_b, cfg.train)
    data = prepare_data(cfg.data, cfg.train.seed, cfg.model.vocab_size,
                        cfg.model.max_position, progress=False)
    sampler = BatchSampler(data.train, cfg.data.seq_len, cfg.train.batch_size, cfg.train.seed)
    out = []
    for _ in range(steps):
        batch = sampler.next_batch()
        train_step(a, opt_a, batch, 2, 1.0, precision)
        train_step(b, opt_b, batch[[1, 0, 3, 2]], 2, 1.0, precision)
        sched_a.step()
        sched_b.step()
        out.append(max(float((pa - pb).abs().max().detach())
                       for pa, pb in zip(a.parameters(), b.parameters(), strict=True)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lrs", default="3e-3,1e-3,3e-4")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        print(json.dumps({lr: [f"{d:.1e}" for d in drift(float(lr), args.steps, Path(folder))]
                          for lr in args.lrs.split(",")}))


if __name__ == "__main__":
    main()
