"""What the tests of the trainer's step share: a fixed random batch, and a step made
non-finite by one NaN weight, which the trainer must skip whatever the optimizer."""

from __future__ import annotations

import copy
import math

import torch

from deepseek_mini.train.precision import Precision
from deepseek_mini.train.step import train_step


def random_batch(rows: int, seq_len: int, vocab: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (rows, seq_len + 1), generator=generator)


def skipped_non_finite_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                            batch: torch.Tensor, precision: Precision) -> tuple[dict, dict]:
    """One finite step (so the optimizer has state), then one with a NaN in the final
    norm's weight: asserts the trainer reports that step non-finite and, the NaN put
    back, that no weight moved. Returns the weights and the optimizer's ``state_dict``
    from before it, for the caller's checks of its own optimizer's state."""
    train_step(model, optimizer, batch, 4, 1.0, precision)
    before = copy.deepcopy(model.state_dict())
    state_before = copy.deepcopy(optimizer.state_dict())
    with torch.no_grad():
        model.norm.weight[0] = math.nan
    stats, finite = train_step(model, optimizer, batch, 4, 1.0, precision)
    assert not bool(finite) and not math.isfinite(stats[0].item())
    with torch.no_grad():
        model.norm.weight[0] = before["norm.weight"][0]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    return before, state_before
