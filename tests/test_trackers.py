"""Run tracking: a tiny run with TensorBoard writes events that tensorboard's own reader
reads back with the values of metrics.jsonl; W&B, offline, keeps its run on disk; a
tracker that is not installed is a one-line error naming it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_run import TINY_YAML, tiny_overrides

from deepseek_mini import Config, UserError
from deepseek_mini.train import trackers
from deepseek_mini.train.loop import train


@pytest.fixture(scope="module")
def data_overrides(tmp_path_factory) -> list[str]:
    return tiny_overrides(tmp_path_factory.mktemp("trackers-data"))


def run(data_overrides, out: Path, names: str) -> list[dict]:
    cfg = Config.from_yaml(TINY_YAML, [*data_overrides, f"train.out_dir={out}",
                                       "train.max_steps=4", "train.sample_interval=4",
                                       f"train.trackers={names}"])
    train(cfg)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_events_hold_the_logged_values(data_overrides, tmp_path):
    rows = run(data_overrides, tmp_path / "run", "[tensorboard]")
    events = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"tensors": 0})
    events.Reload()
    tags = events.Tags()
    logged = {}
    for tag in tags["scalars"]:
        logged[tag] = {e.step: e.value for e in events.Scalars(tag)}
    train_rows = [r for r in rows if "loss" in r]
    for key in ("loss", "ce", "aux", "lr", "tokens_per_s", "grad_norm"):
        assert logged[key] == {r["step"]: pytest.approx(r[key], rel=1e-6) for r in train_rows}
    val = next(r for r in rows if "val_ce" in r)
    assert logged["val_ce"][val["step"]] == pytest.approx(val["val_ce"], rel=1e-6)
    fractions = val["expert_fractions"]
    assert logged["experts/layer1/expert0"][val["step"]] == pytest.approx(fractions[1][0],
                                                                          rel=1e-6)
    assert "sample/text_summary" in tags["tensors"]
    sample = events.Tensors("sample/text_summary")[0]
    assert sample.step == 4 and sample.tensor_proto.string_val[0].decode()


def test_wandb_offline_keeps_the_run_on_disk(data_overrides, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    run(data_overrides, out, "[wandb]")
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # the run's records (protobuf, for ``wandb sync``) hold every logged name
    path = next(runs[0].glob("run-*.wandb"))
    deadline = time.monotonic() + 30  # W&B's service process may still be writing it
    while b"kv_latent_dim" not in path.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.2)
    records = path.read_bytes()
    for key in (b"loss", b"val_ce", b"tokens_per_s", b"grad_norm", b"experts/layer1/expert0",
                b"deepseek-mini", b"kv_latent_dim"):
        assert key in records, key
    sample = next((runs[0] / "files" / "media" / "html").glob("sample_4_*.html"))
    assert "<pre>" in sample.read_text()


def test_a_tracker_that_is_not_installed_is_named(monkeypatch):
    monkeypatch.setitem(trackers.TRACKERS, "wandb", "wandb_not_installed_here")
    with pytest.raises(UserError, match=r"train.trackers lists wandb, which is not installed: "
                                        r"pip install 'deepseek-mini\[wandb\]'"):
        trackers.check_trackers(["wandb"])
