"""Where and in what number format training runs: device, autocast dtype, GradScaler.

``auto`` picks bf16 only where the hardware really has it (CUDA with bf16, or a CPU with
native bf16 instructions): emulated bf16 on an AVX2-only CPU is far slower than
fp32. Else fp16 on CUDA (with a GradScaler, since fp16 gradients underflow), else fp32.
Weights and optimizer state stay fp32 in every mode; autocast only lowers the matmuls.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..config import TrainConfig
from ..errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str, setting: str = "train.device") -> torch.device:
    """``auto`` is CUDA when present; asking for CUDA without one is the user's mistake,
    reported against ``setting`` (the config key or command-line flag that asked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{setting} is 'cuda' but no CUDA device is available "
                        f"(set {setting} to cpu or auto)")
    return torch.device(name)


def bf16_is_native(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    if bf16_is_native(device):
        return "bf16"
    return "fp16" if device.type == "cuda" else "fp32"


@dataclass
class Precision:
    """The resolved device and number format, with the two objects the step needs."""

    device: torch.device
    name: str
    scaler: torch.amp.GradScaler

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def describe(self) -> str:
        scaler = " + GradScaler" if self.scaler.is_enabled() else ""
        tf32 = ""
        if self.device.type == "cuda" and self.name == "fp32":
            tf32 = " (TF32 matmuls)" if torch.get_float32_matmul_precision() != "highest" else ""
        return f"{self.device.type} {self.name}{scaler}{tf32}"


def setup_precision(cfg: TrainConfig) -> Precision:
    device = resolve_device(cfg.device)
    name = resolve_precision(cfg.precision, device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if cfg.tf32 else "highest")
    scaler = torch.amp.GradScaler(device.type, enabled=name == "fp16")
    return Precision(device, name, scaler)
