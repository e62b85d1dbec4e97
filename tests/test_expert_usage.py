"""Expert-usage statistics and the collapse warning, on hand-made router counts."""

from __future__ import annotations

import json
import math

import pytest
import torch

from deepseek_mini.expert_usage import CollapseWatch, ExpertUsage

COUNTS = torch.tensor([[10.0, 30.0, 20.0, 40.0], [0.0, 50.0, 25.0, 25.0]])
ENTROPY = torch.tensor([1.2, 0.9])


def test_fractions_ratios_and_entropy_per_layer():
    usage = ExpertUsage.from_counts(COUNTS, ENTROPY)
    assert usage.fractions == [[0.1, 0.3, 0.2, 0.4], [0.0, 0.5, 0.25, 0.25]]
    assert all(sum(row) == pytest.approx(1.0) for row in usage.fractions)
    assert usage.max_min_ratio[0] == pytest.approx(4.0)
    assert math.isinf(usage.max_min_ratio[1])  # an expert that got nothing
    assert usage.entropy == pytest.approx([1.2, 0.9])
    assert usage.starved() == [(1, 0)]


def test_table_summary_and_json_form():
    usage = ExpertUsage.from_counts(COUNTS, ENTROPY)
    table = usage.table().splitlines()
    assert table[0].split()[:5] == ["layer", "e0", "e1", "e2", "e3"]
    assert table[1].split() == ["0", "10.0", "30.0", "20.0", "40.0", "1.200", "4.00"]
    assert table[2].split()[-1] == "inf"
    assert usage.summary() == ("experts: max/min load inf (mean 4.00), router entropy 1.050")
    as_json = json.loads(json.dumps(usage.to_dict(), allow_nan=False))  # inf is not JSON
    assert as_json["expert_max_min"] == [pytest.approx(4.0), None]
    assert as_json["expert_fractions"] == usage.fractions


def usage_with(starved_fraction: float) -> ExpertUsage:
    rest = (1.0 - starved_fraction) / 3
    return ExpertUsage.from_counts(torch.tensor([[starved_fraction, rest, rest, rest]]),
                                   torch.tensor([1.0]))


def test_collapse_warning_needs_several_evaluations_in_a_row():
    watch = CollapseWatch(patience=3)
    assert watch.update(usage_with(0.005)) == []
    assert watch.update(usage_with(0.005)) == []
    warnings = watch.update(usage_with(0.005))
    assert len(warnings) == 1
    assert "layer 0 expert 0" in warnings[0] and "3 evaluations in a row" in warnings[0]
    assert watch.update(usage_with(0.2)) == []  # recovered: the streak starts over
    assert watch.update(usage_with(0.005)) == []


def test_collapse_streaks_survive_a_checkpoint_round_trip():
    watch = CollapseWatch(patience=2)
    watch.update(usage_with(0.0))
    restored = CollapseWatch(patience=2)
    restored.load_state_dict(json.loads(json.dumps(watch.state_dict())))
    assert len(restored.update(usage_with(0.0))) == 1


def test_rows_are_named_by_their_layer_in_the_model():
    """With model.first_k_dense = 2 the first MoE layer is layer 2: the table, the
    collapse warning and the metrics row say so."""
    usage = ExpertUsage.from_counts(COUNTS, ENTROPY, first_layer=2)
    assert usage.layers == [2, 3] and usage.starved() == [(3, 0)]
    assert [row.split()[0] for row in usage.table().splitlines()[1:]] == ["2", "3"]
    assert usage.to_dict()["expert_layers"] == [2, 3]
    watch = CollapseWatch(patience=1)
    assert "layer 3 expert 0" in watch.update(usage)[0]
