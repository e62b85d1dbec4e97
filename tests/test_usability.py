"""What a new user meets: thread counts, defaults in every --help, progress on long work,
and training samples whose prompt suits the data."""

from __future__ import annotations

import argparse
import io

import pytest
import torch
from tiny_run import TINY_YAML, tiny_overrides

from deepseek_mini import Config
from deepseek_mini.cli.main import build_parser, main
from deepseek_mini.data.instruct import has_instruct_layout, instruct_text, sample_prompt
from deepseek_mini.progress import Progress
from deepseek_mini.threads import busy_note, choose_threads, default_threads
from deepseek_mini.train.loop import train


def test_decoding_takes_one_thread_and_steps_every_core_unless_the_machine_is_busy():
    assert default_threads("decode", cores=8, load=0.0) == 1
    assert default_threads("train", cores=8, load=0.5) == 8
    assert default_threads("eval", cores=8, load=8.0) == 8
    assert default_threads("train", cores=2, load=5.0) == 1
    assert default_threads("eval", cores=2, load=2.5) == 1


def test_a_requested_thread_count_wins(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert choose_threads(3, "decode") == 3
    assert choose_threads(None, "decode") == 1
    with pytest.raises(ValueError):
        choose_threads(0, "train")


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
