"""What a new user meets: thread counts, defaults in every --help, progress on long work,
and training samples whose prompt suits the data."""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import io
import os
import subprocess
import sys
import threading

import pytest
import torch
from tiny_run import ROOT, TINY_YAML, tiny_overrides

from deepseek_mini import Config, UserError
from deepseek_mini.cli.main import build_parser, main
from deepseek_mini.data.instruct import has_instruct_layout, instruct_text, sample_prompt
from deepseek_mini.progress import Progress
from deepseek_mini.threads import busy_note, choose_threads, default_threads
from deepseek_mini.train import eta as eta_module
from deepseek_mini.train.eta import Eta, format_duration
from deepseek_mini.train.loop import train


def test_decoding_takes_one_thread_and_steps_every_core_unless_the_machine_is_busy():
    assert default_threads("decode", cores=8, load=0.0) == 1
    assert default_threads("train", cores=8, load=0.5) == 8
    assert default_threads("eval", cores=8, load=8.0) == 8
    assert default_threads("train", cores=2, load=5.0) == 1
    assert default_threads("eval", cores=2, load=2.5) == 1


def test_a_requested_thread_count_wins(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert choose_threads(3, "decode") == 3
    assert choose_threads(None, "decode") == 1
    with pytest.raises(ValueError):
        choose_threads(0, "train")


def test_more_threads_than_cpus_is_refused_naming_the_bound(monkeypatch):
    """--threads 99999 segfaulted in OpenMP and 20000 ended in a libgomp message; a count
    above the machine's CPUs is now one error line, before torch is asked."""
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert choose_threads(4, "train") == 4
    with pytest.raises(ValueError, match="--threads 5 is more threads than this machine's 4 "
                                         "CPUs: use at most 4"):
        choose_threads(5, "decode")
    with pytest.raises(UserError, match="train.threads"):
        choose_threads(99999, "train", "train.threads (--threads)")


ETA_INTERVALS = {"eval": 10, "sample": 50, "save": 20}


def test_the_eta_waits_for_the_warm_up_then_counts_the_periodic_work_to_come(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(eta_module.time, "perf_counter", lambda: clock[0])
    eta = Eta(0, 40, 40, ETA_INTERVALS, tokens_per_step=1000)
    for step in range(1, 4):  # warm-up: slow, and nothing promised
        clock[0] += 5.0
        assert eta.seconds_left(step) is None and eta.tokens_per_s(step) is None
        eta.step_done(step)
    for step in range(4, 11):
        clock[0] += 1.0
        eta.step_done(step) if step < 10 else None
    assert eta.tokens_per_s(10) == pytest.approx(1000.0)
    assert eta.seconds_left(10) == pytest.approx(30.0)  # 30 steps at 1 s; nothing timed yet
    eta.periodic("eval", 4.0)  # step 10's validation, timed: steps 10..40 hold 4 of them
    clock[0] += 4.0
    eta.step_done(10)
    clock[0] += 1.0
    assert eta.seconds_left(11) == pytest.approx(29.0 + 3 * 4.0)
    assert eta.remaining("save", 11) == 2 and eta.remaining("sample", 11) == 1


def test_the_eta_of_a_session_that_stops_early_counts_its_final_save_only():
    eta = Eta(100, 125, 1000, ETA_INTERVALS, tokens_per_step=1)
    assert eta.remaining("save", 101) == 2  # step 120, and the session's last step 125
    assert eta.remaining("eval", 101) == 2  # steps 110 and 120; none at 125
    assert format_duration(42.4) == "42s" and format_duration(185) == "3m05s"
    assert format_duration(7620) == "2h07m"


def test_training_log_lines_give_an_eta_after_the_warm_up(tmp_path):
    overrides = tiny_overrides(tmp_path)
    cfg = Config.from_yaml(TINY_YAML, [*overrides, "train.max_steps=6", "train.log_interval=1",
                                       f"train.out_dir={tmp_path}/run"])
    train(cfg)
    lines = [line for line in (tmp_path / "run" / "train.log").read_text().splitlines()
             if line.startswith("step") and "/6 |" in line]
    assert len(lines) == 6
    assert all("eta" not in line for line in lines[:3])
    assert all(" tok/s | eta " in line for line in lines[3:]), lines


def _fake_command(folder, name: str, script: str) -> None:
    path = folder / name
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)


@pytest.mark.skipif(sys.platform != "linux", reason="the CPU index is chosen on Linux only")
@pytest.mark.parametrize("case", ["unreachable", "reachable", "gpu"])
def test_the_quick_start_installs_the_cpu_build_of_torch_unless_there_is_a_gpu(tmp_path,
                                                                               case):
    """The Quick start pinned torch==2.13.0 from the default index: on a Linux machine
    without a GPU that is the multi-GB CUDA build. It now takes PyTorch's CPU index where
    that answers, the default index where it does not, and says which."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    calls = tmp_path / "pip-calls"
    _fake_command(stubs, "pip", f'echo "$@" >> {calls}')
    _fake_command(stubs, "nvidia-smi", "echo 'GPU 0: NVIDIA H200 (UUID: x)'" if case == "gpu"
                  else "exit 9")
    with contextlib.ExitStack() as stack:
        if case == "reachable":
            (tmp_path / "index" / "torch").mkdir(parents=True)
            (tmp_path / "index" / "torch" / "index.html").write_text("<html></html>")
            handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                                        directory=str(tmp_path / "index"))
            server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            stack.callback(server.shutdown)
            index = f"http://127.0.0.1:{server.server_address[1]}/"
        else:
            index = "http://127.0.0.1:9/"  # the discard port: refused at once
        env = {**os.environ, "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}",
               "TORCH_CPU_INDEX": index}
        done = subprocess.run(["bash", str(ROOT / "scripts" / "install_torch.sh")], env=env,
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    pip = calls.read_text().split()
    assert pip[:3] == ["install", "-q", "torch==2.13.0"]
    said = done.stdout
    if case == "reachable":
        assert pip[3:] == ["--index-url", index] and "installing the CPU build" in said
    elif case == "unreachable":
        assert pip[3:] == [] and "cannot be reached: installing from the default" in said
    else:
        assert pip[3:] == [] and "an NVIDIA GPU is present" in said
    for script in (ROOT / "scripts" / "quickstart.sh", ROOT / ".ci" / "run"):
        text = script.read_text()
        assert "scripts/install_torch.sh" in text and "pip install -q torch" not in text


def test_the_busy_note_names_the_load_and_the_option():
    assert busy_note("--threads N", load=1.5, cores=2) is None
    note = busy_note("--threads N", load=6.2, cores=2)
    assert "6.2" in note and "2 CPU cores" in note and "--threads N" in note
    assert "\n" not in note


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_help_shows_every_default():
    for name, parser in _subparsers(build_parser()).items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if (action.option_strings and not action.required
                    and action.default is not argparse.SUPPRESS):
                assert action.help, (name, action.dest)
                shown = formatter._get_help_string(action)  # appended, or said in words
                assert "%(default)" in shown or "default" in shown or "None:" in shown, (
                    name, action.dest)
    text = " ".join(_subparsers(build_parser())["generate"].format_help().split())
    assert "given (default: 0.8)" in text and "tokens to add (default: 200)" in text


def test_generate_threads_option_is_honoured(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        assert main(["generate", "--checkpoint", str(tmp_path / "none.pt"),
                     "--threads", "2"]) == 2  # the count is set before the checkpoint fails
        assert torch.get_num_threads() == 2
        assert main(["generate", "--checkpoint", "x.pt", "--threads", "0"]) == 2
        assert "--threads must be positive" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


def test_sample_prompt_keeps_the_instruct_layout_only_where_the_data_has_it():
    record = instruct_text(features="Dialogue", words="ball, park", summary="Tom finds a ball.",
                           story="Once upon a time, Tom went out.")
    assert has_instruct_layout(record)
    assert sample_prompt(record) == instruct_text(features="Dialogue", words="ball, park",
                                                  summary="Tom finds a ball.")
    plain = "Lily and her dog went to the park. They played all day.\nThe end."
    assert not has_instruct_layout(plain)
    assert sample_prompt(plain) == "Lily and her dog went to the park."
    # "Story:" inside plain prose is not the layout.
    assert not has_instruct_layout("The old man told a Story: it was long.")


def test_training_samples_continue_the_opening_of_a_plain_validation_document(tmp_path):
    stories = tmp_path / "stories.txt"
    stories.write_text("<|endoftext|>".join(
        f"Anna saw a red bird number {i}. It sang a song for her." for i in range(60)))
    overrides = [o for o in tiny_overrides(tmp_path) if not o.startswith("data.source")]
    cfg = Config.from_yaml(TINY_YAML, [*overrides, "data.source=files",
                                       f"data.files=[{stories}]", "train.max_steps=2",
                                       "train.sample_interval=2", f"train.out_dir={tmp_path}/run"])
    train(cfg)
    log = (tmp_path / "run" / "train.log").read_text()
    sample = log.split("sample at step 2", 1)[1].splitlines()[1]
    assert sample.startswith("Anna saw a red bird number")
    assert "Summary:" not in log and "Story:" not in log


def test_progress_off_a_terminal_is_a_plain_line_every_ten_percent():
    out = io.StringIO()
    with Progress(200, "eval", unit="tokens", stream=out) as bar:
        for _ in range(40):
            bar.update(5)
    lines = out.getvalue().splitlines()
    assert lines[0] == "eval: 10% (20 of 200 tokens)" and lines[-1].startswith("eval: 100%")
    assert len(lines) == 10 and "\r" not in out.getvalue()
    quiet = io.StringIO()
    with Progress(10, "eval", stream=quiet, enabled=False) as bar:
        bar.update(10)
    assert quiet.getvalue() == ""
