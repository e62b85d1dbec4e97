"""Training: schedule, accumulation, exact resume, crash safety, signals, non-finite steps,
metrics schema, overfitting, and the refusals a user can run into."""

from __future__ import annotations

import copy
import json
import math
import multiprocessing
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_run import TIMING_KEYS, TINY_YAML, VOCAB, tiny_overrides
from training_steps import random_batch, skipped_non_finite_step

from deepseek_mini import Config, DeepSeekMini, UserError
from deepseek_mini.checkpoint import load_checkpoint
from deepseek_mini.cli.main import main
from deepseek_mini.files import atomic_save
from deepseek_mini.inference.loading import load_for_inference
from deepseek_mini.train.loop import train
from deepseek_mini.train.optim import build_optimizer, lr_at
from deepseek_mini.train.precision import setup_precision
from deepseek_mini.train.runlog import RunLog
from deepseek_mini.train.signals import StopRequest
from deepseek_mini.train.step import accumulate_gradients, train_step


@pytest.fixture(scope="module")
def data_overrides(tmp_path_factory) -> list[str]:
    """The tiny setup and one data cache for the whole module."""
    return tiny_overrides(tmp_path_factory.mktemp("train-data"))


def tiny_config(data_overrides: list[str], out_dir: Path, *extra: str) -> Config:
    return Config.from_yaml(TINY_YAML,
                            [*data_overrides, f"train.out_dir={out_dir}", *extra])


def read_rows(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def test_lr_schedule_warms_up_linearly_then_follows_a_cosine_to_min_lr():
    cfg = Config.from_yaml(None, ["train.lr=1.0", "train.min_lr=0.1", "train.warmup_steps=10",
                                  "train.max_steps=110"]).train
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(4, cfg) == pytest.approx(0.5)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # halfway down the cosine
    assert lr_at(35, cfg) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, cfg) == pytest.approx(0.1)
    assert lr_at(500, cfg) == pytest.approx(0.1)
    decay = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))


def test_weight_decay_applies_to_matrices_only():
    cfg = Config.from_yaml(None, ["model.hidden_size=32", "model.num_heads=2",
                                  "model.num_layers=1", "model.vocab_size=64",
                                  "model.expert_hidden=16", "train.weight_decay=0.1"])
    model = DeepSeekMini(cfg.model)
    decayed, plain = build_optimizer(model, cfg.train).param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"])
    norm_gains = {id(p) for name, p in model.named_parameters() if "norm" in name}
    assert norm_gains and norm_gains == {id(p) for p in plain["params"]}


def test_two_micro_batches_of_four_give_the_gradient_of_one_batch_of_eight():
    # The load-balance loss is a statistic of the batch the router sees, so it is off here;
    # the z-loss and CE are token means and must match exactly.
    cfg = Config.from_yaml(None, ["model.hidden_size=32", "model.num_heads=2",
                                  "model.num_layers=2", "model.vocab_size=128",
                                  "model.expert_hidden=32", "model.aux_loss_coef=0"])
    torch.manual_seed(0)
    model = DeepSeekMini(cfg.model)
    twin = copy.deepcopy(model)
    precision = setup_precision(Config.from_yaml(None, ["train.device=cpu",
                                                        "train.precision=fp32"]).train)
    batch = random_batch(8, 16, 128)
    whole = accumulate_gradients(model, batch, 8, precision)
    parts = accumulate_gradients(twin, batch, 4, precision)
    torch.testing.assert_close(parts, whole, rtol=0, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-5, msg=name)


PRECISIONS = ["fp32", "bf16", "fp16"]


def skip_fp16_on_a_cpu(precision: str, device: torch.device) -> None:
    """fp16 with a GradScaler is CUDA's recipe: ``train`` refuses it on a CPU
    (test_reliability's fp16 test), so there is nothing of the product's to test there."""
    if precision == "fp16" and device.type != "cuda":
        pytest.skip("train.precision fp16 runs on CUDA only")


@pytest.mark.parametrize("name", PRECISIONS)
def test_a_non_finite_step_is_skipped_without_touching_weights_or_optimizer(name, device):
    """In every precision: under fp16 the GradScaler skips the step (and lowers its scale),
    elsewhere the trainer's own check does."""
    skip_fp16_on_a_cpu(name, device)
    cfg = Config.from_yaml(None, ["model.hidden_size=32", "model.num_heads=2",
                                  "model.num_layers=1", "model.vocab_size=128",
                                  "model.expert_hidden=32", f"train.device={device.type}",
                                  f"train.precision={name}"])
    model = DeepSeekMini(cfg.model).to(device)
    optimizer = build_optimizer(model, cfg.train)
    precision = setup_precision(cfg.train)
    batch = random_batch(4, 16, 128).to(device)
    _, state_before = skipped_non_finite_step(model, optimizer, batch, precision)
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            assert torch.equal(value, state_before["state"][index][key]), (index, key)
    _, finite = train_step(model, optimizer, batch, 4, 1.0, precision)
    assert bool(finite)


def test_non_finite_losses_are_counted_and_ten_in_a_row_stop_the_run(data_overrides, tmp_path,
                                                                      monkeypatch):
    real_forward = DeepSeekMini.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        if out.loss is not None and self.training:
            calls["n"] += 1
            if 3 <= calls["n"] <= 6:  # micro batches of steps 2 and 3 (two per step)
                out.loss = out.loss * math.nan
        return out

    monkeypatch.setattr(DeepSeekMini, "forward", poisoned)
    # skipped steps since the last save: the run has diverged, its state is kept apart
    with pytest.raises(UserError, match="the run diverged: 2 of the 4 steps since the start"):
        train(tiny_config(data_overrides, tmp_path / "some", "train.max_steps=4"))
    assert not (tmp_path / "some" / "latest.pt").exists()
    rows = {r["step"]: r for r in read_rows(tmp_path / "some") if "loss" in r}
    assert rows[2]["loss"] is None and rows[2]["skipped_steps"] == 1  # nothing finite to average
    assert math.isfinite(rows[4]["loss"]) and rows[4]["skipped_steps"] == 2

    def always_nan(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        if out.loss is not None:
            out.loss = out.loss * math.nan
        return out

    monkeypatch.setattr(DeepSeekMini, "forward", always_nan)
    with pytest.raises(UserError, match="not finite for 10 steps in a row"):
        train(tiny_config(data_overrides, tmp_path / "all", "train.max_steps=30",
                          "train.log_interval=5", "train.save_interval=30",
                          "train.eval_interval=30"))


def test_resume_reproduces_the_uninterrupted_run_exactly(data_overrides, tmp_path, device):
    """Bit for bit, on the test device too: on CUDA a kernel whose sums depend on thread
    timing (atomic adds) would show here as two runs that differ."""
    straight = tmp_path / "straight"
    sliced = tmp_path / "sliced"
    steps = ["train.max_steps=20", "train.log_interval=3", "train.save_interval=7",
             f"train.device={device.type}"]
    train(tiny_config(data_overrides, straight, *steps))
    first = train(tiny_config(data_overrides, sliced, *steps), stop_after=10)
    assert first.step == 10 and not first.interrupted
    # A crash mid-write leaves a cut line; rows past the checkpoint would be written twice.
    with open(sliced / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "loss": 1.0}\n{"step": 12, "lo')
    second = train(tiny_config(data_overrides, sliced, *steps), resume=True)
    assert second.step == 20
    assert without_timing(read_rows(sliced)) == without_timing(read_rows(straight))
    a = load_checkpoint(straight / "latest.pt")
    b = load_checkpoint(sliced / "latest.pt")
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert a["best_val"] == b["best_val"] and a["tokens_seen"] == b["tokens_seen"]


def test_run_writes_config_logs_metrics_and_loadable_checkpoints(data_overrides, tmp_path):
    out = tmp_path / "run"
    result = train(tiny_config(data_overrides, out, "train.sample_interval=8"))
    assert (result.step, result.interrupted) == (8, False)
    rows = read_rows(out)
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "val_ce" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 4, 6, 8]
    assert [r["step"] for r in eval_rows] == [4, 8]
    for row in train_rows:
        for key in ("step", "loss", "ce", "aux", "lr", "tokens_per_s", "elapsed_s",
                    "grad_norm", "mfu", "balance_loss", "z_loss"):
            assert isinstance(row[key], int if key == "step" else float), key
        assert row["loss"] == pytest.approx(row["ce"] + row["aux"], rel=1e-5)
    for row in eval_rows:
        assert isinstance(row["val_ce"], float)
        assert len(row["expert_fractions"]) == 2 and len(row["router_entropy"]) == 2
    assert abs(train_rows[0]["ce"] - math.log(VOCAB)) < 0.5  # a uniform guess at the start
    assert Config.from_yaml(out / "config.yaml").to_dict() == result_config(out)
    log = (out / "train.log").read_text()
    assert "step      8/8" in log and "sample at step 8" in log and "val ce" in log
    latest = torch.load(out / "latest.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "sampler", "rng", "config",
            "step", "tokens_seen", "best_val"} <= set(latest)
    best = torch.load(out / "best.pt", weights_only=True)  # for using the model only
    assert set(best) == {"model", "config", "step", "best_val"}
    assert best["config"] == latest["config"]
    assert best["best_val"] == min(r["val_ce"] for r in eval_rows)
    for name in ("latest.pt", "best.pt"):
        model = DeepSeekMini.from_checkpoint(out / name)
        assert model.config.hidden_size == 32
        model, tok, config = load_for_inference(out / name)
        assert config.to_dict() == latest["config"] and tok.vocab_size == VOCAB


def result_config(out: Path) -> dict:
    return load_checkpoint(out / "latest.pt")["config"]


@pytest.mark.parametrize("name", PRECISIONS)
def test_overfitting_one_batch_drives_the_loss_below_half_a_nat(name, device):
    """The trainer's step learns in every precision: bf16 autocast, and fp16 autocast with
    the GradScaler (CUDA only)."""
    skip_fp16_on_a_cpu(name, device)
    cfg = Config.from_yaml(None, ["model.hidden_size=64", "model.num_heads=2",
                                  "model.num_layers=2", "model.vocab_size=256",
                                  "model.expert_hidden=64", "model.num_experts=4",
                                  f"train.device={device.type}", f"train.precision={name}",
                                  "train.lr=1e-2", "train.weight_decay=0"])
    torch.manual_seed(0)
    model = DeepSeekMini(cfg.model).to(device)
    optimizer = build_optimizer(model, cfg.train)
    precision = setup_precision(cfg.train)
    batch = random_batch(4, 32, 256).to(device)  # random tokens: only the batch to learn
    for _ in range(100):
        stats, finite = train_step(model, optimizer, batch, 4, 1.0, precision)
        if stats[1].item() < 0.5:
            break
    assert stats[1].item() < 0.5 and bool(finite)


def test_resume_refuses_a_different_model_and_a_missing_checkpoint(data_overrides, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UserError, match="no checkpoint to resume from"):
        train(tiny_config(data_overrides, out), resume=True)
    train(tiny_config(data_overrides, out, "train.max_steps=1"))
    with pytest.raises(UserError, match=r"model\.num_layers: 2 -> 3.*model\.top_k: 2 -> 1"):
        train(tiny_config(data_overrides, out, "model.num_layers=3", "model.top_k=1"),
              resume=True)
    weights_only = tmp_path / "weights" / "latest.pt"
    atomic_save({"model": load_checkpoint(out / "latest.pt")["model"],
                 "config": result_config(out)}, weights_only)
    with pytest.raises(UserError, match="holds no training state"):
        train(tiny_config(data_overrides, weights_only.parent), resume=True)
    with pytest.raises(UserError, match=r"model\.hidden_size: 32 -> 64"):
        train(tiny_config(data_overrides, tmp_path / "warm", "model.hidden_size=64",
                          f"train.warm_start={out / 'latest.pt'}"))


def test_warm_start_loads_the_weights_only(data_overrides, tmp_path):
    source = tmp_path / "source"
    train(tiny_config(data_overrides, source, "train.max_steps=2"))
    warm = tmp_path / "warm"
    result = train(tiny_config(data_overrides, warm, "train.max_steps=1", "train.lr=0",
                               "train.min_lr=0", f"train.warm_start={source / 'latest.pt'}"))
    assert result.step == 1  # a fresh run: step, optimizer and schedule start over
    a = load_checkpoint(source / "latest.pt")["model"]
    b = load_checkpoint(warm / "latest.pt")["model"]
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name


def test_cli_resume_without_checkpoint_is_one_error_line(data_overrides, tmp_path, capsys):
    args = ["train", "--config", str(TINY_YAML), "--resume"]
    for item in [*data_overrides, f"train.out_dir={tmp_path}"]:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --resume: no checkpoint")


def _cli_child(args: list[str]) -> None:
    torch.set_num_threads(1)
    raise SystemExit(main(args))


def _train_process(data_overrides: list[str], out: Path, *extra: str):
    """``deepseek-mini train`` in a forked child: the real command with its signal handling,
    without a fresh interpreter's seconds of imports."""
    args = ["train", "--config", str(TINY_YAML)]
    for item in [*data_overrides, f"train.out_dir={out}", "train.max_steps=100000", *extra]:
        args += ["--set", item]
    proc = multiprocessing.get_context("fork").Process(target=_cli_child, args=(args,))
    proc.start()
    return proc


def _wait_for(condition, proc, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if not proc.is_alive():
            raise AssertionError(f"training exited early with status {proc.exitcode}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the training process")
        time.sleep(0.002)


needs_fork = pytest.mark.skipif(sys.platform == "win32", reason="fork and POSIX signals")


@needs_fork
def test_sigkill_while_saving_leaves_a_loadable_latest(data_overrides, tmp_path):
    out = tmp_path / "run"
    proc = _train_process(data_overrides, out, "train.save_interval=1", "train.eval_interval=1000")
    latest = out / "latest.pt"
    _wait_for(latest.exists, proc)
    _wait_for(lambda: any(out.glob(".latest.pt.*.tmp")), proc)  # a save is under way
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert proc.exitcode == -signal.SIGKILL
    ckpt = load_checkpoint(latest)
    assert ckpt["step"] >= 1
    DeepSeekMini.from_checkpoint(latest)


@needs_fork
def test_sigterm_finishes_the_step_saves_and_exits_130(data_overrides, tmp_path):
    out = tmp_path / "run"
    proc = _train_process(data_overrides, out, "train.save_interval=100000",
                          "train.log_interval=1", "train.eval_interval=100000")
    _wait_for(lambda: (out / "metrics.jsonl").exists()
              and (out / "metrics.jsonl").stat().st_size > 0, proc)
    proc.terminate()
    proc.join(timeout=120)
    assert proc.exitcode == 130
    assert "stopped by SIGTERM" in (out / "train.log").read_text()
    step = load_checkpoint(out / "latest.pt")["step"]
    assert step >= 1
    assert max(r["step"] for r in read_rows(out)) == step  # log_interval 1: every step


def test_a_signal_echoed_within_a_second_is_one_request_and_a_later_one_interrupts(tmp_path):
    """Under torchrun a worker gets Ctrl-C twice at once (terminal + torchrun's copy): that
    must still save; a second press later means stop now."""
    stop = StopRequest(RunLog(tmp_path, enabled=False, resume=False, total_steps=1,
                              start_step=0).info)
    stop._handle(signal.SIGINT, None)
    stop._handle(signal.SIGTERM, None)
    assert stop.requested == "SIGINT"
    stop.requested_at -= StopRequest.ECHO_WINDOW_S
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)


@pytest.mark.parametrize("content", [b"junk\n", b"", b"PK\x03\x04" + bytes(range(256)) * 4,
                                     bytes(random.Random(0).randrange(256) for _ in range(4096))])
def test_a_corrupt_checkpoint_is_a_user_error_whatever_its_bytes(tmp_path, content):
    path = tmp_path / "latest.pt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=f"cannot load checkpoint {path}"):
        load_checkpoint(path)


def _cli_train(data_overrides: list[str], *args: str) -> list[str]:
    argv = ["train"]
    for item in data_overrides:
        argv += ["--set", item]
    return [*argv, *args]


def test_resume_run_dir_continues_with_the_saved_config_and_lists_changes(
        data_overrides, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_cli_train(data_overrides, "--config", str(TINY_YAML), "--set",
                           f"train.out_dir={out}", "--set", "data.val_fraction=0.1",
                           "--stop-after", "2")) == 0
    # No --config: the run's own config, so data.val_fraction stays 0.1 unrepeated.
    assert main(["train", "--resume", str(out), "--stop-after", "2",
                 "--set", "train.log_interval=1"]) == 0
    log = capsys.readouterr().out
    assert "changed settings: train.log_interval: 2 -> 1" in log
    assert result_config(out)["data"]["val_fraction"] == 0.1
    assert load_checkpoint(out / "latest.pt")["step"] == 4
    # A setting that changes what the run is: refused, then allowed.
    assert main(["train", "--resume", str(out), "--set", "train.seed=7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.seed: 1337 -> 7" in err[0] and "--allow-changes" in err[0]
    assert main(["train", "--resume", str(out), "--set", "data.val_fraction=0.2",
                 "--stop-after", "1", "--allow-changes"]) == 0
    assert "data.val_fraction: 0.1 -> 0.2" in capsys.readouterr().out
    assert main(["train", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "no config.yaml in" in capsys.readouterr().err


def test_resume_with_a_config_refuses_a_different_data_source(data_overrides, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(data_overrides, out, "train.max_steps=1"))
    with pytest.raises(UserError, match=r"data\.demo_stories: 300 -> 200.*--allow-changes"):
        train(tiny_config(data_overrides, out, "data.demo_stories=200"), resume=True)


def test_raising_max_steps_on_resume_keeps_the_decay_and_extends_at_min_lr(data_overrides,
                                                                          tmp_path):
    out = tmp_path / "run"
    steps = ["train.log_interval=1", "train.eval_interval=100", "train.save_interval=100"]
    train(tiny_config(data_overrides, out, *steps))  # 8 steps: the cosine ends at step 8
    result = train(tiny_config(data_overrides, out, *steps, "train.max_steps=12"),
                   resume=True)
    assert result.step == 12
    lrs = {r["step"]: r["lr"] for r in read_rows(out) if "lr" in r}
    cfg = tiny_config(data_overrides, out).train
    assert lrs[8] == pytest.approx(lr_at(7, cfg))
    assert [lrs[s] for s in range(9, 13)] == pytest.approx([cfg.min_lr] * 4)
    assert result_config(out)["train"]["decay_steps"] == 8
    assert "stays at" in (out / "train.log").read_text()


def test_train_threads_sets_torch_threads_and_is_logged(data_overrides, tmp_path):
    before = torch.get_num_threads()
    try:
        train(tiny_config(data_overrides, tmp_path, "train.max_steps=1", "train.threads=2"))
        assert torch.get_num_threads() == 2
        assert "linear on 2 CPU threads" in (tmp_path / "train.log").read_text()
    finally:
        torch.set_num_threads(before)


def val_ces(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["val_ce"] for r in read_rows(out_dir) if "val_ce" in r}


def test_validation_scores_one_set_of_windows_whatever_the_micro_batch(data_overrides,
                                                                       tmp_path):
    """eval_batches x batch_size windows (4 here), scored 1, 2 or 4 at a time: the same
    CE up to summation order (it was over 1, 2 or 4 windows). At lr 0 the weights stay
    the initial ones, which accumulation's rounding would otherwise move apart."""
    steps = ["train.max_steps=2", "train.eval_interval=2", "train.eval_batches=1",
             "train.log_interval=1", "train.lr=0", "train.min_lr=0"]
    runs = {micro: tmp_path / f"micro{micro}" for micro in (1, 2, 4)}
    for micro, out in runs.items():
        train(tiny_config(data_overrides, out, *steps, f"train.micro_batch_size={micro}"))
    ces = [val_ces(out)[2] for out in runs.values()]
    assert ces == pytest.approx([ces[0]] * 3, rel=1e-6)
    assert load_checkpoint(runs[1] / "latest.pt")["val_windows"] == 4


def test_a_resume_keeps_the_runs_validation_windows(data_overrides, tmp_path):
    """Another micro batch on resume scores the same windows; an eval_batches that asks
    for others, or a checkpoint from before the count was saved (micro_batch_size x
    eval_batches windows then), keeps the run's own, with a note."""
    steps = ["train.max_steps=4", "train.eval_interval=2", "train.eval_batches=1"]
    straight, sliced = tmp_path / "straight", tmp_path / "sliced"
    train(tiny_config(data_overrides, straight, *steps))
    train(tiny_config(data_overrides, sliced, *steps), stop_after=2)
    train(tiny_config(data_overrides, sliced, *steps, "train.micro_batch_size=4"), resume=True)
    assert val_ces(sliced) == pytest.approx(val_ces(straight), rel=1e-5)

    old = tmp_path / "old"
    train(tiny_config(data_overrides, old, *steps), stop_after=2)
    ckpt = load_checkpoint(old / "latest.pt")
    del ckpt["val_windows"]  # as a checkpoint written before the count was kept
    atomic_save(ckpt, old / "latest.pt")
    train(tiny_config(data_overrides, old, *steps, "train.eval_batches=3"), resume=True)
    assert ("validation keeps this run's 2 windows (train.eval_batches x train.batch_size "
            "now gives 12)") in (old / "train.log").read_text()
