"""benchmarks/training/train_step.py --quick: every figure it promises, tiny config, seconds."""

from __future__ import annotations

import json
import sys

from child_process import ROOT, run_benchmark


def test_train_step_benchmark_quick_reports_rates_peak_share_and_moe_ratio(tmp_path):
    out = tmp_path / "step.json"
    run_benchmark("training/train_step.py", "--quick", "--json", str(out))
    result = json.loads(out.read_text())
    assert result["peak_gflops"]["fp32"]["gflops"] > 0
    assert set(result["contenders"]) == {"ours-dense-fp32", "ours-moe-fp32"}
    for row in result["contenders"].values():
        assert row["tokens_per_s"] > 0 and row["tokens_per_cpu_s"] > 0
        assert row["share_of_peak"] > 0 and row["model_gflops_per_cpu_s"] > 0
    assert result["ratios"]["ours-moe-fp32 / dense"] > 0


def test_step_paths_benchmark_quick_times_every_variant_against_now(tmp_path):
    """benchmarks/training/step_paths.py --quick: each fast path swapped back, and every
    swap restored after its step (the module attributes are the fast ones again)."""
    out = tmp_path / "paths.json"
    variants = "now,before,row-major-head,two-embedding-grads,per-shape-ns"
    run_benchmark("training/step_paths.py", "--quick", "--variants", variants,
                  "--json", str(out))
    result = json.loads(out.read_text())
    assert set(result["tokens_per_cpu_s"]) == set(variants.split(","))
    assert all(rate > 0 for rate in result["tokens_per_cpu_s"].values())
    assert set(result["now_speedup_over"]) == set(variants.split(",")) - {"now"}


def test_step_paths_patches_are_restored():
    sys.path.insert(0, str(ROOT / "benchmarks" / "training"))
    try:
        import step_paths
    finally:
        sys.path.pop(0)
    from deepseek_mini.model import loss, transformer
    from deepseek_mini.train import muon

    originals = (loss._chunked, transformer.tied_lookup, muon._by_gram_shape, muon.gram_pays)
    with step_paths.patched("before"):
        assert loss._chunked is not originals[0]
        assert transformer.tied_lookup is not originals[1]
        assert muon._by_gram_shape is not originals[2]
        assert not muon.gram_pays(256, 1536, 5)
    assert (loss._chunked, transformer.tied_lookup, muon._by_gram_shape,
            muon.gram_pays) == originals
