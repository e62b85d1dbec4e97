"""Expert-usage statistics: how evenly each MoE layer spreads its routed slots.

Fed from the model's detached ``expert_counts`` [MoE layers, experts] and
``router_entropy`` [MoE layers], summed or averaged over the batches of an evaluation, so
collecting them adds no host sync to the training step. Only MoE layers have rows: with
``model.first_k_dense`` k the first row is layer k, and every row is named by its layer
index in the model (``layers``), so a table, a warning or a plot never calls layer k
"layer 0".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

COLLAPSE_FRACTION = 0.01


@dataclass
class ExpertUsage:
    """Per MoE layer: fraction of routed slots per expert, mean router entropy (nats),
    the ratio of the busiest expert's load to the idlest's (inf when one got nothing),
    and the layer's index in the model."""

    fractions: list[list[float]]
    entropy: list[float]
    max_min_ratio: list[float]
    layers: list[int]

    @classmethod
    def from_counts(cls, counts: torch.Tensor, entropy: torch.Tensor,
                    first_layer: int = 0) -> ExpertUsage:
        """``counts`` [MoE layers, experts] and ``entropy`` [MoE layers] of the model's
        MoE layers, the first of which is layer ``first_layer`` (``model.first_k_dense``)."""
        counts = counts.double().cpu()
        fractions = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
        lo, hi = fractions.min(dim=1).values, fractions.max(dim=1).values
        ratio = [h / low if low > 0 else math.inf
                 for h, low in zip(hi.tolist(), lo.tolist(), strict=True)]
        return cls(fractions.tolist(), entropy.double().cpu().tolist(), ratio,
                   list(range(first_layer, first_layer + len(counts))))

    def starved(self, threshold: float = COLLAPSE_FRACTION) -> list[tuple[int, int]]:
        """(layer, expert) pairs that received under ``threshold`` of the layer's slots."""
        return [(layer, e) for layer, row in zip(self.layers, self.fractions, strict=True)
                for e, f in enumerate(row) if f < threshold]

    def summary(self) -> str:
        """One compact line: worst load ratio and mean entropy over layers."""
        finite = [r for r in self.max_min_ratio if math.isfinite(r)]
        worst = max(self.max_min_ratio) if self.max_min_ratio else 0.0
        worst_text = "inf" if math.isinf(worst) else f"{worst:.2f}"
        mean_ratio = sum(finite) / len(finite) if finite else math.inf
        mean_entropy = sum(self.entropy) / max(len(self.entropy), 1)
        return (f"experts: max/min load {worst_text} (mean {mean_ratio:.2f}), "
                f"router entropy {mean_entropy:.3f}")

    def table(self) -> str:
        """A compact per-layer table of slot fractions (in %), entropy and load ratio."""
        experts = len(self.fractions[0]) if self.fractions else 0
        head = "layer " + " ".join(f"e{e:<4d}" for e in range(experts)) + "  entropy  max/min"
        rows = [head]
        for layer, row, entropy, ratio in zip(self.layers, self.fractions, self.entropy,
                                              self.max_min_ratio, strict=True):
            cells = " ".join(f"{100 * f:5.1f}" for f in row)
            ratio_text = "inf" if math.isinf(ratio) else f"{ratio:.2f}"
            rows.append(f"{layer:<5d} {cells}  {entropy:7.3f}  {ratio_text:>7}")
        return "\n".join(rows)

    def to_dict(self) -> dict[str, list]:
        """The metrics row's expert keys; ``expert_layers`` names each row's layer."""
        return {"expert_fractions": self.fractions, "router_entropy": self.entropy,
                "expert_max_min": [r if math.isfinite(r) else None for r in self.max_min_ratio],
                "expert_layers": self.layers}


@dataclass
class CollapseWatch:
    """Warns when an expert stays under 1% of its layer's slots for ``patience``
    evaluations in a row."""

    patience: int = 3
    streaks: dict[tuple[int, int], int] = field(default_factory=dict)

    def update(self, usage: ExpertUsage) -> list[str]:
        starved = set(usage.starved())
        self.streaks = {key: self.streaks.get(key, 0) + 1 for key in starved}
        return [f"warning: layer {layer} expert {e} has received under "
                f"{100 * COLLAPSE_FRACTION:.0f}% of routed slots for {n} evaluations in a row "
                "(collapse?)"
                for (layer, e), n in sorted(self.streaks.items()) if n >= self.patience]

    def state_dict(self) -> dict[str, list[list[int]]]:
        return {"streaks": [[layer, e, n] for (layer, e), n in self.streaks.items()]}

    def load_state_dict(self, state: dict[str, list[list[int]]]) -> None:
        self.streaks = {(layer, e): n for layer, e, n in state.get("streaks", [])}
