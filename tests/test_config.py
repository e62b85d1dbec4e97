"""Config loading: defaults, YAML, overrides, and one clear error per mistake."""

from __future__ import annotations

import json

import pytest
from child_process import run_ok, run_python

from deepseek_mini import Config
from deepseek_mini.cli.main import main
from deepseek_mini.config import ConfigError


def test_defaults_are_the_reference_model():
    cfg = Config.from_yaml()
    assert cfg.model == Config.from_yaml("configs/base.yaml").model
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.model.kv_latent_dim) == (576, 30, 72)
    assert cfg.train.betas == [0.9, 0.95]
    assert cfg.train.grad_accum_steps == 1


def test_overrides_are_read_as_yaml():
    cfg = Config.from_yaml("configs/base.yaml", overrides=[
        "train.max_steps=50", "model.num_layers=2", "data.files=[a.txt, b.txt]",
        "train.warm_start=null", "model.tie_embeddings=false", "train.lr=1e-3",
        "data.source=files"])
    assert cfg.train.max_steps == 50 and cfg.model.num_layers == 2
    assert cfg.data.files == ["a.txt", "b.txt"]
    assert cfg.train.warm_start is None and cfg.model.tie_embeddings is False
    assert cfg.train.lr == 1e-3


def test_round_trip_through_yaml(tmp_path):
    cfg = Config.from_yaml("configs/tiny.yaml", overrides=["train.seed=7"])
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    assert Config.from_yaml(path) == cfg


@pytest.mark.parametrize("override, message", [
    ("model.hidden_size=100", "model.hidden_size (100) must be divisible by model.num_heads (8)"),
    ("model.num_kv_heads=3", "model.num_heads (8) must be divisible by model.num_kv_heads (3)"),
    ("model.kv_latent_dim=0", "model.kv_latent_dim must be positive, got 0"),
    ("model.kv_compression=8", "'model.kv_compression' is no longer a key: write "
                               "model.kv_latent_dim"),
    ("model.top_k=9", "model.top_k (9) must not exceed model.num_experts (8)"),
    ("model.expert_activation=relu", "model.expert_activation must be one of gelu, swiglu"),
    ("model.bogus=1", "unknown key 'model.bogus'"),
    ("optim.lr=1", "unknown section 'optim'"),
    ("model.num_layers=two", "model.num_layers must be int, got 'two'"),
    ("model.tie_embeddings=3", "model.tie_embeddings must be bool, got 3"),
    ("train.batch_size=12", "train.batch_size (12) must be a multiple of train.micro_batch_size"),
    ("train.betas=[0.9]", "train.betas must be two numbers in [0, 1)"),
    ("train.precision=fp8", "train.precision must be one of auto, fp16, bf16, fp32"),
    ("data.val_fraction=1.5", "data.val_fraction must be in [0, 1)"),
    ("model.num_layers=0", "model.num_layers must be positive"),
    ("nodot=1", "expected section.key=value"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        Config.from_yaml("configs/base.yaml", overrides=[override])
    assert message in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        Config.from_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: invalid YAML"):
        Config.from_yaml(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        Config.from_yaml(listy)


def test_cli_reports_config_errors_in_one_line_with_exit_2():
    proc = run_python("-m", "deepseek_mini", "info", "--config", "configs/base.yaml",
                      "--set", "model.top_k=9")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: model.top_k (9) must not exceed model.num_experts (8)"]


def test_info_and_config_errors_do_not_wait_for_torch():
    """Reading a config needs no torch (seconds to import): the package loads the model and
    generate on first use."""
    code = ("import sys; from deepseek_mini.cli.main import main; "
            "main(['info', '--config', 'configs/base.yaml', '--json']); "
            "print('torch' in sys.modules)")
    proc = run_ok("-c", code)
    assert proc.stdout.splitlines()[-1] == "False"


def test_cli_argument_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["info", "--bogus"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")


def test_info_json_reports_sizes(capsys):
    assert main(["info", "--config", "configs/base.yaml", "--json"]) == 0
    sizes = json.loads(capsys.readouterr().out)
    assert sizes["total_params"] == 527_704_128
    assert sizes["active_params"] == 209_199_168
    assert sizes["kv_cache_bytes_per_token"] == 30 * 72 * 2
