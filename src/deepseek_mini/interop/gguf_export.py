"""``deepseek-mini export --format gguf``: a checkpoint as one GGUF file, for llama.cpp and
what is built on it (Ollama, LM Studio, llamafile).

Written with the gguf package llama.cpp publishes: architecture ``deepseek2`` with its
tensor names and metadata keys (gguf_layout.py), the tokenizer as its ``gpt2`` BPE
vocabulary (gguf_vocab.py), weights in f32, f16, bf16 or q8_0 (the gguf package's own
quantizer; which tensors stay in another type, and why, is gguf_layout.storage_type). A
tied head is stored once, as ``token_embd`` with no ``output`` tensor: that is how
llama.cpp's loader recognises one (it loads a second copy for the head's product, which
its CPU backend places as it places ``output``). MTP modules are left out (llama.cpp's
deepseek2 decodes with the main model only). The file is written beside its target and
renamed into place, so it is whole or absent.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from ..config import ModelConfig
from ..errors import UserError
from ..files import atomic_write_named
from ..inference.loading import load_for_inference
from .exportable import check_exportable
from .gguf_layout import (
    AMX_TYPES,
    ARCH,
    FILE_TYPES,
    PER_HEAD,
    QTYPES,
    gguf_blocker,
    gguf_metadata,
    gguf_tensors,
    storage_type,
)
from .gguf_vocab import GgufVocab, gguf_vocab


@dataclass
class GgufExported:
    out: Path
    dtype: str
    tensors: int
    bytes: int
    kept_f16: list[str]  # q8_0 only: rows that are not whole 32-value blocks, or one block
    kept_f32: list[str]  # f16 and q8_0: the per-head attention weights (gguf_layout.PER_HEAD)
    left_out: str | None  # what of the model the file does not carry


def export_gguf(checkpoint: str | Path, out: str | Path, dtype: str = "f32") -> GgufExported:
    """Write ``checkpoint`` to the GGUF file ``out`` (which must not exist yet)."""
    out = Path(out)
    if dtype not in QTYPES:
        raise UserError(f"export: --dtype {dtype!r} is not one of {', '.join(QTYPES)}")
    if out.exists():
        raise UserError(f"export: {out} already exists")
    model, tok, _ = load_for_inference(checkpoint)
    cfg = model.config
    check_exportable(cfg, f"checkpoint {checkpoint}", "export --format gguf")
    blocker = gguf_blocker(cfg)
    if blocker is not None:
        raise UserError(f"export --format gguf: {blocker}")
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[ARCH])
    _add_metadata(writer, cfg, gguf_vocab(tok), dtype)
    kept_f16, kept_f32 = _add_tensors(writer, gguf_tensors(cfg, model.state_dict()), dtype)
    tensors = len(writer.tensors[0])
    atomic_write_named(out, lambda tmp: _write(writer, tmp))
    left_out = f"{cfg.mtp_depth} MTP module(s)" if cfg.mtp_depth else None
    return GgufExported(out, dtype, tensors, out.stat().st_size, kept_f16, kept_f32,
                        left_out)


def _add_metadata(writer: gguf.GGUFWriter, cfg: ModelConfig, vocab: GgufVocab,
                  dtype: str) -> None:
    writer.add_name("deepseek-mini")
    writer.add_file_type(FILE_TYPES[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for method, value in gguf_metadata(cfg).items():
        getattr(writer, method)(value)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_pad_token_id(vocab.eos_id)
    writer.add_add_bos_token(True)  # the end-of-text every prompt follows (gguf_vocab.py)
    writer.add_add_eos_token(False)


def _add_tensors(writer: gguf.GGUFWriter, tensors: dict[str, np.ndarray],
                 dtype: str) -> tuple[list[str], list[str]]:
    """Add every tensor in its storage type; returns the matrices kept in f16 (q8_0's
    fallbacks) and in f32 (the per-head weights) although ``dtype`` is another type."""
    kept_f16, kept_f32 = [], []
    for name, array in tensors.items():
        qtype = storage_type(name, array, dtype)
        if dtype == "q8_0" and qtype == gguf.GGMLQuantizationType.F16:
            kept_f16.append(name)
        if dtype in AMX_TYPES and name.endswith(PER_HEAD):
            kept_f32.append(name)
        data = gguf.quants.quantize(array, qtype)
        writer.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    return kept_f16, kept_f32


def _write(writer: gguf.GGUFWriter, path: Path) -> None:
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
