"""``deepseek-mini export``: a checkpoint as a Hugging Face folder or a GGUF file."""

from __future__ import annotations

import argparse

from ..errors import UserError
from ..interop.hf_export import export


def run(args: argparse.Namespace) -> None:
    if args.format == "gguf":
        _gguf(args)
        return
    if args.dtype != "f32":
        raise UserError(f"--dtype {args.dtype} applies to --format gguf; the Hugging Face "
                        "folder is f32")
    result = export(args.checkpoint, args.out)
    if result.native:
        print(f"wrote {result.out}: transformers' deepseek_v3 ({result.tensors} tensors), "
              "loads with DeepseekV3ForCausalLM / AutoModelForCausalLM, no custom code")
    else:
        print(f"wrote {result.out}: deepseek-mini's layout with modeling_deepseek_mini.py "
              f"({result.tensors} tensors), loads with AutoModelForCausalLM and "
              f"trust_remote_code=True (not native: {result.why_not_native})")


def _gguf(args: argparse.Namespace) -> None:
    from ..interop.gguf_export import export_gguf

    result = export_gguf(args.checkpoint, args.out, args.dtype)
    print(f"wrote {result.out}: GGUF for llama.cpp, architecture deepseek2, {result.dtype} "
          f"({result.tensors} tensors, {result.bytes / 2**20:.1f} MiB)")
    if result.kept_f16:
        print(f"  {len(result.kept_f16)} tensors kept in f16: their rows are not whole "
              f"q8_0 blocks of 32, or just one ({_some(result.kept_f16)})")
    if result.kept_f32:
        print(f"  {len(result.kept_f32)} per-head attention tensors kept in f32, which "
              f"llama.cpp's AMX path cannot run in {result.dtype} ({_some(result.kept_f32)})")
    if result.left_out:
        print(f"  left out: {result.left_out} (llama.cpp decodes with the main model)")


def _some(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
