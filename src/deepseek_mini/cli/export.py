"""``deepseek-mini export``: a checkpoint as a Hugging Face folder."""

from __future__ import annotations

import argparse

from ..interop.hf_export import export


def run(args: argparse.Namespace) -> None:
    result = export(args.checkpoint, args.out)
    if result.native:
        print(f"wrote {result.out}: transformers' deepseek_v3 ({result.tensors} tensors), "
              "loads with DeepseekV3ForCausalLM / AutoModelForCausalLM, no custom code")
    else:
        print(f"wrote {result.out}: deepseek-mini's layout with modeling_deepseek_mini.py "
              f"({result.tensors} tensors), loads with AutoModelForCausalLM and "
              f"trust_remote_code=True (not native: {result.why_not_native})")
