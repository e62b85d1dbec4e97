"""Distributed training on the CPU (gloo, 2 processes): DDP and FSDP2 match a single process
taking the same global batch in the same micro batches, and checkpoints move between
world sizes."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from child_process import as_rank, run_forked, torchrun
from tiny_run import TIMING_KEYS, TINY_YAML, tiny_overrides

from deepseek_mini.checkpoint import load_checkpoint
from deepseek_mini.cli.main import main

ATOL = 1e-5
# Global batch 4 in micro batches of 1: one process takes rows 0, 1, 2, 3 in turn; with two,
# rank 0 takes rows 0, 1 and rank 1 rows 2, 3. The router's load-balance loss sees the
# same rows either way, so the runs agree up to the order of floating-point sums.
DISTRIBUTED = [
    "model.hidden_size=64", "train.micro_batch_size=1", "train.eval_batches=3",
    "train.sample_interval=8",
]
needs_fork = pytest.mark.skipif(sys.platform == "win32", reason="fork")


@pytest.fixture(scope="module")
def overrides(tmp_path_factory) -> list[str]:
    """The tiny training setup with the overrides above, and one data cache for the module."""
    return [*tiny_overrides(tmp_path_factory.mktemp("dist-data")), *DISTRIBUTED]


def train_args(overrides: list[str], out: Path, *extra: str) -> list[str]:
    args = ["train", "--config", str(TINY_YAML)]
    for item in [*overrides, f"train.out_dir={out}"]:
        args += ["--set", item]
    return args + list(extra)


def one_process(args: list[str]) -> None:
    assert main(args) == 0


@pytest.fixture(scope="module")
def reference(overrides, tmp_path_factory) -> Path:
    """The single-process run every distributed run must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    one_process(train_args(overrides, out))
    return out


def _rank(rank: int, world: int, port: int, args: list[str]) -> None:
    as_rank(rank, world, port)
    raise SystemExit(main(args))


def two_processes(args: list[str]) -> None:
    """What torchrun does, in forked children."""
    run_forked(_rank, 2, (args,), timeout=300)


def rows(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_close(a, b, where: str = "", atol: float = ATOL) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_close(a[key], b[key], f"{where}.{key}", atol)
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close(x, y, f"{where}[{i}]", atol)
    elif isinstance(a, float) and math.isfinite(a):
        assert b == pytest.approx(a, rel=0, abs=atol), where
    else:
        assert a == b, where


def assert_same_run(out: Path, reference: Path) -> None:
    """The same metrics rows and, at the end, the same weights (within 1e-5)."""
    got, want = rows(out), rows(reference)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for row, expected in zip(got, want, strict=True):
        assert_close(row, expected, f"step {row['step']}")
    a, b = load_checkpoint(out / "latest.pt"), load_checkpoint(reference / "latest.pt")
    assert a["step"] == b["step"] and a["sampler"] == b["sampler"]
    for name, tensor in b["model"].items():
        torch.testing.assert_close(a["model"][name], tensor, rtol=0, atol=ATOL, msg=name)
    # AdamW's state dict, or Muon-with-AdamW's {"adamw": ..., "muon": ...}.
    parts = {"": b["optimizer"]} if "state" in b["optimizer"] else b["optimizer"]
    for part, optim in parts.items():
        got = a["optimizer"][part] if part else a["optimizer"]
        for index, state in optim["state"].items():
            for key, value in state.items():
                torch.testing.assert_close(got["state"][index][key], value, rtol=0,
                                           atol=ATOL, msg=f"optimizer {part} {index} {key}")


@needs_fork
def test_ddp_on_two_processes_matches_one_process(overrides, reference, tmp_path):
    two_processes(train_args(overrides, tmp_path, "--set", "train.parallel=ddp"))
    assert_same_run(tmp_path, reference)
    log = (tmp_path / "train.log").read_text()
    assert "2 ddp processes x 2 micro batches of 1" in log and "sample at step 8" in log


def test_fsdp_under_torchrun_matches_one_process(overrides, reference, tmp_path):
    """The user-facing launch: torchrun starts the ranks and picks the port."""
    torchrun(*train_args(overrides, tmp_path, "--set", "train.parallel=fsdp"))
    assert_same_run(tmp_path, reference)
    assert "2 fsdp processes" in (tmp_path / "train.log").read_text()


@needs_fork
def test_a_two_process_checkpoint_resumes_in_one_process(overrides, reference, tmp_path):
    args = train_args(overrides, tmp_path, "--set", "train.parallel=fsdp")
    two_processes([*args, "--stop-after", "4"])
    assert load_checkpoint(tmp_path / "latest.pt")["step"] == 4
    one_process([*train_args(overrides, tmp_path), "--resume"])
    assert_same_run(tmp_path, reference)


@needs_fork
def test_a_one_process_checkpoint_resumes_in_two_processes(overrides, reference, tmp_path):
    one_process([*train_args(overrides, tmp_path), "--stop-after", "4"])
    two_processes([*train_args(overrides, tmp_path, "--set", "train.parallel=fsdp"),
                   "--resume"])
    assert_same_run(tmp_path, reference)


@pytest.mark.parametrize("env, extra, message", [
    ({}, ["train.parallel=ddp"], "train.parallel=ddp needs a torchrun launch"),
    ({"WORLD_SIZE": "2"}, [], "launched as 2 processes but train.parallel is 'none'"),
    ({"WORLD_SIZE": "2"}, ["train.parallel=ddp", "train.micro_batch_size=4"],
     r"train.batch_size \(4\) must be a multiple of train.micro_batch_size x processes"),
    ({"WORLD_SIZE": "2"}, ["train.parallel=fsdp", "train.precision=fp16"],
     "fp16 .* not supported with train.parallel=fsdp"),
])
def test_launches_that_cannot_work_are_one_error_line(overrides, tmp_path, monkeypatch, capsys,
                                                      env, extra, message):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    if env:
        env = {**env, "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": "1"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = train_args(overrides, tmp_path)
    for item in extra:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert re.search(message, err[0]), err[0]


@needs_fork
def test_muon_under_ddp_matches_one_process(overrides, tmp_path):
    """Muon orthogonalises in bf16 and maps every singular value of the momentum to about
    1, so the all-reduce's last-bit differences in the gradient can round apart and come
    out at full size in the weakest directions: after one step a few elements differ by
    up to ~5e-5 (Muon's step there is ~1e-3 an element), and the losses stay within 1e-4
    over 8 steps; AdamW's runs stay within 1e-5."""
    muon = [*overrides, "train.optimizer=muon", "train.muon_lr=0.01"]
    for steps in (1, 8):
        run = [*muon, f"train.max_steps={steps}"]
        one_process(train_args(run, tmp_path / f"one-{steps}"))
        two_processes(train_args(run, tmp_path / f"two-{steps}", "--set", "train.parallel=ddp"))
    a, b = (load_checkpoint(tmp_path / name / "latest.pt") for name in ("two-1", "one-1"))
    for name, tensor in b["model"].items():
        torch.testing.assert_close(a["model"][name], tensor, rtol=0, atol=1e-4, msg=name)
    for part in ("adamw", "muon"):
        for index, state in b["optimizer"][part]["state"].items():
            for key, value in state.items():
                torch.testing.assert_close(a["optimizer"][part]["state"][index][key], value,
                                           rtol=0, atol=1e-4, msg=f"{part} {index} {key}")
    got, want = rows(tmp_path / "two-8"), rows(tmp_path / "one-8")
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for row, expected in zip(got, want, strict=True):
        assert_close(row, expected, f"step {row['step']}", atol=5e-4)


@needs_fork
def test_sigmoid_router_biases_under_ddp_follow_the_global_load(overrides, tmp_path):
    """Each rank moves its biases by the loads summed over ranks: two DDP processes end
    with the biases of one process that saw the whole batch."""
    v3 = [*overrides, "model.router=sigmoid", "model.bias_update_rate=0.01"]
    one_process(train_args(v3, tmp_path / "one"))
    two_processes(train_args(v3, tmp_path / "two", "--set", "train.parallel=ddp"))
    one = load_checkpoint(tmp_path / "one" / "latest.pt")["model"]
    two = load_checkpoint(tmp_path / "two" / "latest.pt")["model"]
    biases = [k for k in one if k.endswith("expert_bias")]
    assert len(biases) == 2 and all(one[k].abs().sum() > 0 for k in biases)
    for key in biases:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-6, msg=key)
