"""plot: valid PNG files from a run's metrics.jsonl, and the errors a user sees."""

from __future__ import annotations

import json
import sys

import pytest

from deepseek_mini.cli.main import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LAYERS, EXPERTS = 3, 4


def write_run(run_dir, extra_lines: tuple[str, ...] = ()) -> None:
    rows = []
    for step in range(10, 110, 10):
        rows.append({"step": step, "loss": 5.0 - step / 50, "ce": 4.9 - step / 50,
                     "aux": 0.02 + step / 1e4, "lr": 3e-4 * step / 100,
                     "tokens_per_s": 1000.0 + step, "elapsed_s": step / 10,
                     "balance_loss": 0.01, "z_loss": None if step == 50 else 0.001})
        if step % 50 == 0:
            fractions = [[(e + 1 + layer) / sum(range(1 + layer, EXPERTS + 1 + layer))
                          for e in range(EXPERTS)] for layer in range(LAYERS)]
            rows.append({"step": step, "val_ce": 5.0 - step / 60, "expert_fractions": fractions,
                         "router_entropy": [1.2] * LAYERS, "expert_max_min": [4.0] * LAYERS})
    lines = [json.dumps(r) for r in rows] + list(extra_lines)
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_plot_writes_valid_pngs(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="plot is an optional extra")
    from matplotlib.image import imread

    write_run(tmp_path, extra_lines=('{"step": 110, "loss": 1.', ))  # a run still writing
    assert main(["plot", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    paths = captured.out.split()
    names = sorted(p.rsplit("/", 1)[-1] for p in paths)
    assert names == ["experts.png", "loss.png", "lr.png", "throughput.png"]
    assert "skipped 1 unreadable line" in captured.err
    for path in paths:
        with open(path, "rb") as f:
            assert f.read(8) == PNG_SIGNATURE
        image = imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert not list(tmp_path.glob(".*.tmp"))


def test_plot_draws_what_the_metrics_have(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="plot is an optional extra")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "lr": 0.001}\n{"step": 2, "lr": 0.002}\n',
                                            encoding="utf-8")
    assert main(["plot", str(tmp_path)]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "lr.png")]


@pytest.mark.parametrize("setup,message", [
    ("missing", "run directory not found"),
    ("no-metrics", "no metrics.jsonl in"),
    ("empty", "holds no metrics rows yet"),
    ("nothing-to-draw", "has none of the metrics plot draws"),
])
def test_plot_errors(tmp_path, capsys, setup, message):
    run_dir = tmp_path / "run"
    if setup != "missing":
        run_dir.mkdir()
    if setup == "empty":
        (run_dir / "metrics.jsonl").write_text("\n", encoding="utf-8")
    if setup == "nothing-to-draw":
        (run_dir / "metrics.jsonl").write_text('{"step": 1, "other": 2}\n', encoding="utf-8")
    assert main(["plot", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and str(run_dir) in err
    assert err.count("\n") == 1


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    write_run(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert main(["plot", str(tmp_path)]) == 2
    assert capsys.readouterr().err == ("error: plot needs matplotlib: "
                                       "pip install 'deepseek-mini[plot]'\n")
