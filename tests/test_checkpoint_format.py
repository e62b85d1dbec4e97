"""The checkpoint format is a promise: a checkpoint written before the package was split
into layers (tests/data/pre_layers: a tiny run stopped at step 2 by the code of that
time, with the logits its model gave) still loads, computes the same and resumes; the
state-dict keys and the training checkpoint's fields are pinned."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_run import TINY_YAML, tiny_overrides

from deepseek_mini import Config, DeepSeekMini
from deepseek_mini.checkpoint import TRAINING_STATE, load_checkpoint
from deepseek_mini.files import LATEST
from deepseek_mini.train.loop import train

PRE_LAYERS = Path(__file__).resolve().parent / "data" / "pre_layers"
LAYER_KEYS = {  # layer 0 of configs/tiny.yaml: name -> shape
    "attn_norm.weight": (128,), "attn.q_proj.weight": (128, 128),
    "attn.kv_down.weight": (32, 128), "attn.k_up.weight": (32, 32),
    "attn.v_up.weight": (32, 32), "attn.o_proj.weight": (128, 128),
    "moe_norm.weight": (128,), "moe.router.weight": (4, 128),
    "moe.experts.w_up": (4, 128, 256), "moe.experts.w_down": (4, 256, 128),
    "moe.shared.up.weight": (256, 128), "moe.shared.down.weight": (128, 256),
}


def test_state_dict_keys_of_the_tiny_model_are_pinned():
    model = DeepSeekMini(Config.from_yaml(TINY_YAML).model)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {"embed.weight": (49152, 128), "norm.weight": (128,),
                "lm_head.weight": (49152, 128)}
    for layer in (0, 1):
        expected |= {f"layers.{layer}.{k}": shape for k, shape in LAYER_KEYS.items()}
    assert shapes == expected


def test_a_checkpoint_from_before_the_layers_loads_and_computes_the_same():
    ckpt = load_checkpoint(PRE_LAYERS / LATEST)
    assert "kv_compression" not in ckpt["config"]["model"]  # converted on read
    assert ckpt["config"]["model"]["kv_latent_dim"] == 16
    assert set(ckpt) == {"model", "config", *TRAINING_STATE}
    model = DeepSeekMini.from_checkpoint(PRE_LAYERS / LATEST).eval()
    reference = torch.load(PRE_LAYERS / "logits.pt", weights_only=True)
    torch.testing.assert_close(model(reference["input_ids"]).logits, reference["logits"],
                               rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def data_overrides(tmp_path_factory) -> list[str]:
    return tiny_overrides(tmp_path_factory.mktemp("format-data"))


def run_config(data_overrides: list[str], out: Path) -> Config:
    return Config.from_yaml(TINY_YAML, [*data_overrides, f"train.out_dir={out}",
                                        "train.max_steps=8", "train.save_interval=2",
                                        "train.eval_interval=2", "train.log_interval=2"])


# The pre-layers checkpoint was written on another machine. Its steps 1-2 ran through that
# CPU's oneDNN kernels (AMX, AVX-512 and AVX2 ones sum in other orders), so today's run of
# steps 1-2 here matches it to rounding, not bit for bit; AdamW divides each gradient by
# its running RMS, so an element whose gradient is tiny can move its weight by a good part
# of an update whatever the rounding. Measured after steps 3-4: weights 8e-7 apart on an
# Intel AMX machine, 1.6e-5 (one element of 8,192) on an AMD EPYC Zen 3 (AVX2). The bound
# is 1/30 of train.lr (3e-3), far below what a change of training would move. Bit-exactness
# is checked where it holds: on what one machine writes and reads back.
CROSS_MACHINE_ATOL = 1e-4


def test_a_run_from_before_the_layers_resumes_exactly(data_overrides, tmp_path):
    """Steps 3-4 resumed from the old code's step-2 checkpoint equal an uninterrupted run
    of today's code: same format, same training (to the rounding of another machine's
    kernels); and a step-2 checkpoint written here resumes to that run bit for bit."""
    straight = tmp_path / "straight"
    train(run_config(data_overrides, straight), stop_after=4)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / LATEST).write_bytes((PRE_LAYERS / LATEST).read_bytes())
    # the same tokenizer, fitted again in this test's folder: another path
    train(run_config(data_overrides, resumed), resume=True, stop_after=2, allow_changes=True)
    here = tmp_path / "here"
    train(run_config(data_overrides, here), stop_after=2)
    train(run_config(data_overrides, here), resume=True, stop_after=2)
    a, b, c = (load_checkpoint(run / LATEST) for run in (straight, resumed, here))
    assert a["step"] == b["step"] == c["step"] == 4
    assert set(a) == set(b) == set(c) == {"model", "config", "val_windows", *TRAINING_STATE}
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=0, atol=CROSS_MACHINE_ATOL)
        torch.testing.assert_close(c["model"][name], tensor, rtol=0, atol=0)
