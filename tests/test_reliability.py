"""Reliability: one writer per run folder, never a non-finite checkpoint, no leftover
temporaries, and the failures a hostile user can cause as one ``error:`` line."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import socket
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tiny_run import TINY_YAML, VOCAB, tiny_overrides

from deepseek_mini import Config, UserError
from deepseek_mini.checkpoint import all_finite, load_checkpoint
from deepseek_mini.cli.main import main
from deepseek_mini.data.tokens import prepare_data
from deepseek_mini.evaluation import EvalResult
from deepseek_mini.files import (
    DIVERGED,
    EXIT_DISK_FULL,
    LATEST,
    LOCK_FILE,
    METRICS_FILE,
    atomic_save,
    atomic_write_text,
)
from deepseek_mini.model.transformer import DeepSeekMini
from deepseek_mini.train import loop, run_folder
from deepseek_mini.train.distributed import Parallel, Ranks
from deepseek_mini.train.runlog import RunLog

HOLD_LOCK = """
import fcntl, os, socket, sys, time
f = open(sys.argv[1], "a+")
fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
f.seek(0); f.truncate(); f.write(f"{os.getpid()} {socket.gethostname()}\\n"); f.flush()
print("held", flush=True)
time.sleep(60)
"""


@pytest.fixture(scope="module")
def data_overrides(tmp_path_factory) -> list[str]:
    return tiny_overrides(tmp_path_factory.mktemp("reliability-data"))


def train_args(data_overrides: list[str], out_dir: Path, *extra: str) -> list[str]:
    args = ["train", "--config", str(TINY_YAML)]
    for item in [*data_overrides, f"train.out_dir={out_dir}", *extra]:
        args += ["--set", item]
    return args


def one_error_line(capsys) -> str:
    return one_error_line_of(capsys.readouterr().err)


def one_error_line_of(err: str) -> str:
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in err, lines
    return lines[-1]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the run-folder lock -------------------------------------------------------------

def test_a_second_claim_of_a_held_folder_names_the_holder(tmp_path):
    held = run_folder.claim(tmp_path, resume=False)
    with pytest.raises(UserError, match=rf"in use by another training run \(pid {os.getpid()} "
                                        rf"on {socket.gethostname()}"):
        run_folder.claim(tmp_path, resume=False)
    held.release()
    run_folder.claim(tmp_path, resume=False).release()


def test_a_second_training_into_a_held_folder_is_one_error_line(data_overrides, tmp_path,
                                                                 capsys):
    held = run_folder.claim(tmp_path, resume=False)
    try:
        assert main(train_args(data_overrides, tmp_path)) == 2
    finally:
        held.release()
    assert f"pid {os.getpid()}" in one_error_line(capsys)
    assert not (tmp_path / METRICS_FILE).exists()


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / LOCK_FILE)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(UserError, match=f"pid {holder.pid} "):
            run_folder.claim(tmp_path, resume=False)
    finally:
        holder.kill()  # SIGKILL: no chance to clean up
        holder.wait()
    run_folder.claim(tmp_path, resume=False).release()


def test_without_flock_an_exclusive_lock_file_with_a_stale_pid_check(tmp_path, monkeypatch):
    monkeypatch.setattr(run_folder, "fcntl", None)
    held = run_folder.claim(tmp_path, resume=False)
    with pytest.raises(UserError, match=f"pid {os.getpid()} "):
        run_folder.claim(tmp_path, resume=False)
    held.release()
    assert not (tmp_path / LOCK_FILE).exists()
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    dead = int(ended.stdout)
    (tmp_path / LOCK_FILE).write_text(f"{dead} {socket.gethostname()}\n")
    taken = run_folder.claim(tmp_path, resume=False)
    assert any(f"left by pid {dead}, which has ended" in n for n in taken.notes)
    taken.release()
    (tmp_path / LOCK_FILE).write_text(f"{dead} some-other-host\n")  # cannot tell: held
    with pytest.raises(UserError, match=f"pid {dead} on some-other-host"):
        run_folder.claim(tmp_path, resume=False)


def test_under_torchrun_only_rank_0_locks(tmp_path):
    held = run_folder.claim(tmp_path, resume=False)
    try:
        other_rank = Parallel("none", Ranks(rank=1, world_size=2, local_rank=1))
        assert run_folder.claim_for_ranks(tmp_path, False, other_rank) is None
        with pytest.raises(UserError, match="in use"):
            run_folder.claim_for_ranks(tmp_path, False, Parallel())
    finally:
        held.release()


@pytest.mark.parametrize("kind", ["symlink", "hard link", "foreign file", "folder", "fifo"])
def test_a_lock_that_is_not_ours_is_refused_and_left_untouched(tmp_path, kind):
    """Fixed bug: a .lock linked to a user's file had it truncated to "PID HOST"."""
    victim = tmp_path / "precious.txt"
    victim.write_text("my own notes\n")
    run = tmp_path / "run"
    run.mkdir()
    lock = run / LOCK_FILE
    {"symlink": lambda: lock.symlink_to(victim), "hard link": lambda: os.link(victim, lock),
     "foreign file": lambda: lock.write_text("my own notes\n"), "folder": lock.mkdir,
     "fifo": lambda: os.mkfifo(lock)}[kind]()
    with pytest.raises(UserError, match=rf"lock {lock} .*is left untouched: remove or rename"):
        run_folder.claim(run, resume=False)
    assert victim.read_text() == "my own notes\n"
    assert kind in ("folder", "fifo") or lock.read_text() == "my own notes\n"


def test_training_into_a_folder_whose_lock_is_a_symlink_is_one_error_line(
        data_overrides, tmp_path, capsys):
    victim = tmp_path / "precious.txt"
    victim.write_text("my own notes\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_FILE).symlink_to(victim)
    assert main(train_args(data_overrides, tmp_path / "run")) == 2
    assert "is a symbolic link" in one_error_line(capsys)
    assert victim.read_text() == "my own notes\n"


# --- what a run does once it holds its folder -------------------------------------

def test_stale_temporaries_are_removed_and_the_bytes_reported(tmp_path):
    (tmp_path / ".latest.pt.a1b2c3d4.tmp").write_bytes(b"x" * 1000)
    (tmp_path / ".best.pt.zz_9yy8x.tmp").write_bytes(b"x" * 234)
    (tmp_path / "notes.tmp").write_bytes(b"mine")  # not ours: kept
    folder = run_folder.claim(tmp_path, resume=True)
    folder.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE, "notes.tmp"]
    assert folder.notes == [f"removed 2 temporary file(s) left by an interrupted save in "
                            f"{tmp_path}, reclaiming 1,234 bytes"]


def test_a_fresh_run_moves_an_older_run_aside_and_a_resume_does_not(tmp_path):
    for name in (LATEST, "best.pt", METRICS_FILE):
        (tmp_path / name).write_text(name)
    run_folder.claim(tmp_path, resume=True).release()
    assert (tmp_path / "best.pt").exists()
    folder = run_folder.claim(tmp_path, resume=False)
    folder.release()
    (moved,) = (tmp_path / run_folder.PREVIOUS_RUNS).iterdir()
    assert sorted(p.name for p in moved.iterdir()) == sorted([LATEST, "best.pt", METRICS_FILE])
    assert (moved / "best.pt").read_text() == "best.pt"
    assert not any((tmp_path / n).exists() for n in (LATEST, "best.pt", METRICS_FILE))
    assert f"moved to {moved}" in folder.notes[0]


def test_a_users_own_config_yaml_is_not_called_an_older_runs(tmp_path):
    """Fixed bug: a config.yaml alone in out_dir was moved aside as "the older run's"."""
    (tmp_path / "config.yaml").write_text("train:\n  lr: 1.0e-3\n")
    folder = run_folder.claim(tmp_path, resume=False)
    folder.release()
    (moved,) = (tmp_path / run_folder.PREVIOUS_RUNS).iterdir()
    assert (moved / "config.yaml").read_text() == "train:\n  lr: 1.0e-3\n"
    assert "older run" not in folder.notes[0] and "written by no run" in folder.notes[0]


# --- never a non-finite model -------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_finite_matches_a_plain_check(dtype):
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(7, 5, generator=generator).to(dtype) * 1e3 for _ in range(6)]
    tensors += [torch.zeros(0), torch.arange(4), torch.tensor(3.0e38)]
    assert all_finite(tensors)
    for bad in (math.nan, math.inf, -math.inf):
        for i in (0, 5, 8):
            broken = [t.clone() for t in tensors]
            broken[i].view(-1)[-1] = bad
            assert all_finite(broken) == all(torch.isfinite(t).all() for t in broken) is False


@pytest.mark.parametrize("item", ["train.lr=.nan", "train.lr=.inf", "train.min_lr=nan",
                                  "model.rope_theta=.inf", "train.betas=[0.9, .nan]"])
def test_non_finite_float_keys_are_config_errors(capsys, item):
    assert main(["info", "--config", str(TINY_YAML), "--set", item]) == 2
    assert "must be a finite number" in one_error_line(capsys)


def test_a_non_finite_model_is_never_saved_over_a_good_checkpoint(data_overrides, tmp_path,
                                                                   capsys, monkeypatch):
    args = train_args(data_overrides, tmp_path)
    assert main([*args, "--stop-after", "4"]) == 0
    good = digest(tmp_path / LATEST)
    real_step = loop.train_step

    def poisoning_step(model, *rest, **kwargs):
        out = real_step(model, *rest, **kwargs)
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] = math.nan
        return out

    monkeypatch.setattr(loop, "train_step", poisoning_step)
    assert main([*args, "--resume"]) == 2
    line = one_error_line(capsys)
    assert "refusing to save step 8" in line and "inf or NaN" in line
    assert digest(tmp_path / LATEST) == good
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_run_whose_steps_were_all_skipped_exits_non_zero(data_overrides, tmp_path, capsys,
                                                            monkeypatch):
    real_step = loop.train_step

    def skipped_step(*args, **kwargs):
        stats, finite = real_step(*args, **kwargs)
        return stats * math.nan, torch.zeros_like(finite)

    monkeypatch.setattr(loop, "train_step", skipped_step)
    assert main(train_args(data_overrides, tmp_path)) == 2
    assert "all 4 steps since the start of the run were skipped" in one_error_line(capsys)
    assert not (tmp_path / LATEST).exists()  # the first save refused to write it
    for line in (tmp_path / METRICS_FILE).read_text().splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics"))


def test_a_diverged_but_finite_run_keeps_the_good_checkpoints(data_overrides, tmp_path,
                                                              capsys):
    """Fixed bug: at lr 1e30 one step blows the weights up to ~1e29 (still finite), the
    next ones are skipped as non-finite, and latest.pt was overwritten with exit 0."""
    args = train_args(data_overrides, tmp_path)
    assert main([*args, "--stop-after", "4"]) == 0
    good = {name: digest(tmp_path / name) for name in (LATEST, "best.pt")}
    assert main(["train", "--resume", str(tmp_path), "--set", "train.lr=1e30",
                 "--set", "train.min_lr=1e29"]) == 2
    line = one_error_line(capsys)
    assert line.startswith("error: the run diverged: ")
    assert "since the last save (step 4) were skipped" in line and "train.lr 1e+30" in line
    assert f"{tmp_path / LATEST} and {tmp_path / 'best.pt'} kept" in line
    assert {name: digest(tmp_path / name) for name in good} == good
    diverged = load_checkpoint(tmp_path / DIVERGED)  # beside them, whole, for a look
    assert diverged["step"] == 8 and all_finite(diverged["model"].values())
    assert max(float(t.abs().max()) for t in diverged["model"].values()) > 1e20


def test_a_fresh_run_that_diverges_writes_no_latest(data_overrides, tmp_path, capsys):
    assert main(train_args(data_overrides, tmp_path, "train.lr=1e30", "train.min_lr=1e29",
                           "train.warmup_steps=0")) == 2
    line = one_error_line(capsys)
    assert "since the start of the run were skipped" in line and "no earlier checkpoint" in line
    assert not (tmp_path / LATEST).exists() and (tmp_path / DIVERGED).is_file()


def test_resuming_from_non_finite_weights_is_refused_before_a_step(data_overrides, tmp_path,
                                                                   capsys):
    """Fixed bug: such a resume trained NaN steps, then blamed train.lr."""
    args = train_args(data_overrides, tmp_path)
    assert main([*args, "--stop-after", "4"]) == 0
    ckpt = torch.load(tmp_path / LATEST, weights_only=True)
    next(iter(ckpt["model"].values())).view(-1)[0] = math.nan
    atomic_save(ckpt, tmp_path / LATEST)
    rows = (tmp_path / METRICS_FILE).read_text()
    assert main([*args, "--resume"]) == 2
    line = one_error_line(capsys)
    assert f"checkpoint {tmp_path / LATEST} holds non-finite weights" in line
    assert "train.lr" not in line and (tmp_path / METRICS_FILE).read_text() == rows


def test_metrics_rows_are_json_even_with_nested_non_finite_values(tmp_path):
    log = RunLog(tmp_path, enabled=True, resume=False, total_steps=1, start_step=0)
    log.metrics({"step": 1, "loss": math.nan, "per_layer": [[1.0, math.inf], {"x": -math.inf}]})
    log.close()
    row = json.loads((tmp_path / METRICS_FILE).read_text(),
                     parse_constant=lambda name: pytest.fail(name))
    assert row == {"step": 1, "loss": None, "per_layer": [[1.0, None], {"x": None}]}


def test_eval_json_writes_null_for_non_finite_figures():
    figures = EvalResult(nll=math.inf, tokens=10, bytes=40).to_dict()
    assert figures == {"ce": None, "ppl": None, "bpb": None, "tokens": 10, "bytes": 40}
    assert EvalResult(nll=8000.0, tokens=1, bytes=4).to_dict()["ppl"] is None  # exp overflows
    json.dumps(figures, allow_nan=False)


def test_a_checkpoint_with_non_finite_weights_is_refused_by_generate(tmp_path, capsys):
    cfg = Config.from_yaml(TINY_YAML, ["model.hidden_size=32", "model.num_heads=2",
                                       "model.kv_latent_dim=16", "model.expert_hidden=32"])
    model = DeepSeekMini(cfg.model)
    state = model.state_dict()
    next(t for t in state.values() if t.is_floating_point()).view(-1)[0] = math.inf
    atomic_save({"model": state, "config": cfg.to_dict()}, tmp_path / "nan.pt")
    assert main(["generate", "--checkpoint", str(tmp_path / "nan.pt"), "--prompt", "a"]) == 2
    assert "holds non-finite weights" in one_error_line(capsys)


# --- disk, permissions, files in the way ---------------------------------------------

def test_a_full_disk_at_a_save_keeps_the_previous_checkpoint(data_overrides, tmp_path,
                                                              capsys, monkeypatch):
    args = train_args(data_overrides, tmp_path)
    assert main([*args, "--stop-after", "4"]) == 0
    good = digest(tmp_path / LATEST)
    real_fsync = os.fsync

    def full_for_checkpoints(fd):
        if f".{LATEST}." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_for_checkpoints)
    assert main([*args, "--resume"]) == EXIT_DISK_FULL
    line = one_error_line(capsys)
    assert line.startswith(f"error: the disk is full: cannot write {tmp_path / LATEST}")
    assert digest(tmp_path / LATEST) == good
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_full_disk_at_a_new_file_does_not_speak_of_a_previous_one(tmp_path, monkeypatch):
    """Fixed bug: "the previous file is kept" was said when there was none."""
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError, match="nothing is left half-written$"):
        atomic_write_text("x", tmp_path / "new.yaml")
    (tmp_path / "old.yaml").write_text("kept")
    with pytest.raises(UserError, match="the previous file is kept$"):
        atomic_write_text("x", tmp_path / "old.yaml")
    assert (tmp_path / "old.yaml").read_text() == "kept" and not (tmp_path / "new.yaml").exists()


def test_a_full_disk_mid_line_leaves_whole_metrics_lines_and_exits_28(data_overrides,
                                                                      tmp_path, capsys,
                                                                      monkeypatch):
    """The disk fills inside a metrics row: the part written is cut back off, so every
    line of metrics.jsonl is whole JSON, and the run exits 28 naming the file."""
    real_write = os.write
    rows = []

    def filling(fd, data):
        if not os.readlink(f"/proc/self/fd/{fd}").endswith(METRICS_FILE):
            return real_write(fd, data)
        rows.append(bytes(data))
        if len(rows) == 3:  # the disk takes half of the third row...
            return real_write(fd, data[:len(data) // 2])
        if len(rows) > 3:  # ...and then nothing
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", filling)
    assert main(train_args(data_overrides, tmp_path)) == EXIT_DISK_FULL
    line = one_error_line(capsys)
    assert f"cannot append to {tmp_path / METRICS_FILE}" in line
    text = (tmp_path / METRICS_FILE).read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 2
    assert all(isinstance(json.loads(row), dict) for row in text.splitlines())


@pytest.mark.parametrize("message", ["Not enough free space to write 25165824 bytes after "
                                     "offset 1771328", "16384 requested and 12672 written"])
def test_numpys_full_disk_reports_end_a_gguf_export_with_28(tmp_path, capsys, monkeypatch,
                                                           message):
    """numpy's tofile says a disk is full without an errno, in two ways (the first for
    arrays of 16 MiB and more, whose room it reserves first)."""
    layout = {"num_layers": 1, "vocab_size": VOCAB, "attention": "latent_rope",
              "expert_activation": "swiglu", "qk_nope_head_dim": 12, "qk_rope_head_dim": 8,
              "v_head_dim": 12, "kv_latent_dim": 20}
    cfg = Config.from_yaml(TINY_YAML, [f"model.{k}={v}" for k, v in layout.items()])
    cfg.data.tokenizer = tiny_overrides(tmp_path)[-2].split("=", 1)[1]
    atomic_save({"model": DeepSeekMini(cfg.model).state_dict(), "config": cfg.to_dict()},
                tmp_path / "best.pt")

    def full(self):
        raise OSError(message)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)
    out = tmp_path / "model.gguf"
    assert main(["export", "--checkpoint", str(tmp_path / "best.pt"), "--out", str(out),
                 "--format", "gguf"]) == EXIT_DISK_FULL
    assert one_error_line(capsys).startswith(f"error: the disk is full: cannot write {out}")
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


def test_replaced_files_keep_their_mode_and_new_ones_follow_the_umask(tmp_path):
    fresh = tmp_path / "fresh.yaml"
    atomic_write_text("a", fresh)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask
    fresh.chmod(0o640)
    atomic_write_text("b", fresh)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o640 and fresh.read_text() == "b"


@pytest.mark.parametrize("key", ["train.out_dir", "data.cache_dir"])
def test_an_existing_file_as_a_folder_is_one_error_line(data_overrides, tmp_path, capsys, key):
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("x")
    args = train_args(data_overrides, tmp_path / "run", f"{key}={in_the_way}")
    assert main(args) == 2
    line = one_error_line(capsys)
    assert key in line and str(in_the_way) in line and "is (or lies under) a file" in line


@pytest.mark.parametrize("key", ["train.out_dir", "data.cache_dir"])
def test_an_unwritable_folder_is_one_error_line(data_overrides, tmp_path, capsys, key):
    # /sys refuses even root, which the tests run as
    args = train_args(data_overrides, tmp_path, f"{key}=/sys/deepseek-mini-test/x")
    assert main(args) == 2
    assert f"cannot create {key} /sys/deepseek-mini-test/x" in one_error_line(capsys)


def test_resume_in_a_read_only_run_folder_is_one_error_line(data_overrides, tmp_path, capsys,
                                                            monkeypatch):
    def read_only(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(run_folder, "_open_lock", read_only)
    assert main([*train_args(data_overrides, tmp_path), "--resume"]) == 2
    assert one_error_line(capsys) == (f"error: cannot write in the run folder {tmp_path}: "
                                      "permission denied")


def test_plot_into_a_read_only_folder_is_one_error_line(tmp_path, capsys, monkeypatch):
    (tmp_path / METRICS_FILE).write_text(json.dumps({"step": 1, "loss": 2.0, "ce": 2.0,
                                                     "lr": 1e-3}) + "\n")

    def read_only(*args, dir=None, **kwargs):  # noqa: A002 - mkstemp's own keyword
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))

    monkeypatch.setattr("tempfile.mkstemp", read_only)
    assert main(["plot", str(tmp_path)]) == 2
    assert one_error_line(capsys) == f"error: permission denied: {tmp_path}"


# --- files that are not what they claim ---------------------------------------------

def test_a_token_cache_of_random_bytes_is_rebuilt_with_a_warning(data_overrides, tmp_path,
                                                                 capsys):
    cfg = Config.from_yaml(TINY_YAML, [*data_overrides, f"data.cache_dir={tmp_path}"])
    first = prepare_data(cfg.data, cfg.train.seed, VOCAB, progress=False)
    train_bin = first.path / "train.bin"
    kept = train_bin.stat()
    good = np.array(first.train)
    train_bin.write_bytes(np.random.default_rng(0).bytes(kept.st_size))
    os.utime(train_bin, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    capsys.readouterr()
    again = prepare_data(cfg.data, cfg.train.seed, VOCAB, progress=False)
    assert "rebuilding the token cache" in capsys.readouterr().err
    assert np.array_equal(np.array(again.train), good)


def test_a_same_size_edit_with_its_time_restored_rebuilds_the_cache(data_overrides, tmp_path,
                                                                     capsys):
    text = tmp_path / "stories.txt"
    text.write_text("Tom had a red ball. He liked it.\n<|endoftext|>\n" * 40)
    cfg = Config.from_yaml(TINY_YAML, [*data_overrides, f"data.cache_dir={tmp_path / 'c'}",
                                       "data.source=files", f"data.files=[{text}]",
                                       "data.val_fraction=0.1", "data.seq_len=8"])
    prepare_data(cfg.data, cfg.train.seed, VOCAB, progress=False)
    before = text.stat()
    text.write_text(text.read_text().replace("red", "big"))
    os.utime(text, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert text.stat().st_size == before.st_size
    capsys.readouterr()
    prepare_data(cfg.data, cfg.train.seed, VOCAB, progress=False)
    assert "rebuilding the token cache" in capsys.readouterr().err


def test_an_edit_between_the_sampled_blocks_of_a_large_file_changes_its_digest(tmp_path):
    """Above 4 MiB only 64 blocks of 64 KiB were hashed, so a same-size edit between them
    with the time restored left a stale cache; the whole file is hashed now."""
    from deepseek_mini.data.sources import files_fingerprint

    text = tmp_path / "big.txt"
    text.write_bytes(b"Tom had a red ball. " * 300_000)  # 6 MB
    before = files_fingerprint([str(text)])
    stat = text.stat()
    with open(text, "r+b") as f:  # 70 KB in: after the first sampled block, before the next
        f.seek(70_000)
        f.write(b"BIG")
    os.utime(text, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = files_fingerprint([str(text)])
    assert [r["size"] for r in after] == [r["size"] for r in before]
    assert after != before


def test_training_refuses_a_binary_file_as_eval_does(data_overrides, tmp_path, capsys):
    blob = tmp_path / "blob.txt"
    blob.write_bytes(np.random.default_rng(0).bytes(4096))
    args = train_args(data_overrides, tmp_path / "run", "data.source=files",
                      f"data.files=[{blob}]", f"data.cache_dir={tmp_path / 'c'}")
    assert main(args) == 2
    line = one_error_line(capsys)
    assert f"data file {blob} is binary, not text: " in line and "% of its characters" in line


def test_a_token_cache_overwritten_with_zeros_is_rebuilt(data_overrides, tmp_path, capsys):
    """Fixed bug: zeros are valid ids (<|endoftext|>), so an all-zero train.bin of the
    right size was trained on; the digest recorded at writing notices it."""
    cfg = Config.from_yaml(TINY_YAML, [*data_overrides, f"data.cache_dir={tmp_path}"])
    first = prepare_data(cfg.data, cfg.train.seed, VOCAB, progress=False)
    train_bin = first.path / "train.bin"
    kept, good = train_bin.stat(), np.array(first.train)
    train_bin.write_bytes(bytes(kept.st_size))
    os.utime(train_bin, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    capsys.readouterr()
    again = prepare_data(cfg.data, cfg.train.seed, VOCAB, progress=False)
    assert "changed since they were written" in capsys.readouterr().err
    assert np.array_equal(np.array(again.train), good)


def test_a_file_with_many_nul_bytes_is_read_with_a_warning_by_train_and_eval(
        data_overrides, tmp_path, capsys):
    """Fixed bug: a file 18% NUL bytes passed train and eval without a word (above 20% it
    is refused)."""
    doc = "Tom had a red ball." + "\x00" * 9 + " He liked it very much."  # 9 of 51
    blob = tmp_path / "mostly.txt"
    blob.write_text(f"{doc}\n<|endoftext|>\n" * 40)
    nuls = 9 * 40
    args = train_args(data_overrides, tmp_path / "run", "data.source=files",
                      f"data.files=[{blob}]", f"data.cache_dir={tmp_path / 'c'}",
                      "data.val_fraction=0.2", "train.max_steps=1")
    assert main(args) == 0
    warning = f"warning: {blob}: 18% of its characters are NUL bytes ({nuls})"
    assert warning in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "run" / LATEST), "--data",
                 str(blob)]) == 0
    assert warning in capsys.readouterr().err


def test_integer_tensors_in_a_checkpoint_are_refused(tmp_path, capsys):
    """Fixed bug: int64 weights were cast into the float parameters without a word."""
    cfg = Config.from_yaml(TINY_YAML, ["model.num_layers=1", "model.hidden_size=32",
                                       "model.num_heads=2", "model.kv_latent_dim=16",
                                       "model.expert_hidden=32", "model.vocab_size=64"])
    state = DeepSeekMini(cfg.model).state_dict()
    state["norm.weight"] = torch.ones(32, dtype=torch.int64)
    atomic_save({"model": state, "config": cfg.to_dict()}, tmp_path / "int.pt")
    assert main(["generate", "--checkpoint", str(tmp_path / "int.pt"), "--prompt", "a"]) == 2
    assert one_error_line(capsys).endswith("its tensor norm.weight is int64, where it is "
                                           "floating point")


def test_a_checkpoint_whose_model_is_not_a_state_dict(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"model": [1, 2, 3], "config": {}}, path)
    with pytest.raises(UserError, match="'model' entry is not a state dict"):
        load_checkpoint(path)


class Payload:
    def __reduce__(self):
        return (print, ("PAYLOAD RAN",))


def test_a_pickle_checkpoint_is_refused_without_torch_advice_or_warnings(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"model": Payload(), "config": {}}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["generate", "--checkpoint", str(path), "--prompt", "a"]) == 2
    captured = capsys.readouterr()
    assert "PAYLOAD RAN" not in captured.out + captured.err
    assert captured.err.count("\n") == 1 and "weights_only" not in captured.err
    assert "is not a deepseek-mini checkpoint, or is corrupt" in captured.err


def test_a_pickle_pytorch_model_bin_of_hf_model_is_one_error_line(tmp_path, capsys,
                                                                   smollm2_tokenizer):
    transformers = pytest.importorskip("transformers", reason="the --hf-model route needs it")
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=64)
    cfg.save_pretrained(tmp_path)
    transformers.PreTrainedTokenizerFast(tokenizer_file=str(smollm2_tokenizer.path),
                                         eos_token="<|endoftext|>").save_pretrained(tmp_path)
    torch.save({"model.embed_tokens.weight": Payload()}, tmp_path / "pytorch_model.bin")
    data = tmp_path / "data.txt"
    data.write_text("Once upon a time there was a cat.\n")
    assert main(["eval", "--hf-model", str(tmp_path), "--data", str(data)]) == 2
    captured = capsys.readouterr()
    assert "PAYLOAD RAN" not in captured.out + captured.err
    line = one_error_line_of(captured.err)
    assert "holds Python objects besides tensors" in line and "weights_only" not in line


# --- config files -----------------------------------------------------------------

def test_a_duplicate_yaml_key_names_the_key_and_both_lines(tmp_path, capsys):
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  lr: 1.0e-3\n  seed: 1\n  lr: 2.0e-3\n")
    assert main(["info", "--config", str(path)]) == 2
    assert one_error_line(capsys) == f"error: {path}: duplicate key 'lr' at lines 2 and 4"


def test_a_config_that_is_a_directory_says_so(tmp_path, capsys):
    assert main(["info", "--config", str(tmp_path)]) == 2
    assert one_error_line(capsys) == f"error: config {tmp_path} is a directory, not a YAML file"


def test_fp16_on_a_cpu_is_one_error_line(data_overrides, tmp_path, capsys):
    assert main(train_args(data_overrides, tmp_path, "train.precision=fp16")) == 2
    assert "train.precision fp16 needs a CUDA device" in one_error_line(capsys)
