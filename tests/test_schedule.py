"""train.schedule: wsd (warm-up, stable, 1 - sqrt decay over the last decay_fraction) at
known steps, through the LambdaLR the trainer steps."""

from __future__ import annotations

import math

import pytest
import torch

from deepseek_mini import Config
from deepseek_mini.config import ConfigError
from deepseek_mini.train.optim import build_scheduler, lr_at

WSD = ["train.schedule=wsd", "train.lr=1.0", "train.min_lr=0.1", "train.warmup_steps=10",
       "train.max_steps=110"]


def wsd(*extra: str):
    return Config.from_yaml(None, [*WSD, *extra]).train


def test_wsd_warms_up_holds_lr_then_decays_as_one_minus_sqrt_over_the_last_fifth():
    cfg = wsd()
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert [lr_at(s, cfg) for s in (10, 50, 87, 88)] == [1.0] * 4  # decays from 110 - 22
    assert lr_at(99, cfg) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.5)))
    assert lr_at(109, cfg) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(21 / 22)))
    assert lr_at(110, cfg) == lr_at(500, cfg) == pytest.approx(0.1)
    curve = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(curve, curve[1:], strict=False))


def test_wsd_reaches_min_lr_at_decay_steps_and_a_whole_fraction_decays_from_the_warm_up():
    cfg = wsd("train.decay_steps=60")  # 12 decaying steps, from 48 to 60
    assert lr_at(47, cfg) == 1.0 and lr_at(54, cfg) == pytest.approx(0.1 + 0.9 * (1 - 0.5**0.5))
    assert lr_at(60, cfg) == lr_at(100, cfg) == pytest.approx(0.1)
    cfg = wsd("train.decay_fraction=1.0")
    assert lr_at(10, cfg) == 1.0 and lr_at(60, cfg) == pytest.approx(0.1 + 0.9 * (1 - 0.5**0.5))


def test_the_trainer_s_scheduler_follows_wsd():
    cfg = wsd()
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([param], lr=cfg.lr)
    scheduler = build_scheduler(optimizer, cfg)
    for step in range(112):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(lr_at(step, cfg)), step
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize("item, message", [
    ("train.schedule=linear", "train.schedule must be one of cosine, wsd"),
    ("train.decay_fraction=0", r"train.decay_fraction must be in \(0, 1\]"),
])
def test_bad_schedule_keys_are_config_errors(item, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_yaml(None, [item])
