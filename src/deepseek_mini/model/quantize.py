"""Weight-only quantization for decoding: int8 (per output channel, symmetric) or bf16.

At batch 1 a decoding step reads every active weight once, so its speed is set by how
many bytes the weights take. ``quantize(model, "int8")`` swaps every matrix the model
reads for an int8 copy with one scale per output channel (``w ≈ q · s``, ``|q| <= 127``):
each ``nn.Linear`` (attention projections, shared experts, dense MLPs, MTP projections),
the stacked routed experts, and the embedding with the LM head (tied: one int8 table
serves both, a row's scale being the head's output-channel scale). A trimmed head
(``model.head_vocab``, head.py) scores its N kept rows of that table and its "other"
vector as one quantized [N + 1, h] layer, gathered once (the weights no longer change),
through the head's own logits and cross-entropy. A SwiGLU MLP or expert's gate and up
projections, which read the same rows, become one matrix (one product; per-row scales
keep every output channel as it would be alone). The router (a few thousand weights,
whose top-k choice is discontinuous) and the norms stay as they are.

Products run one of three int8 kernels (``KERNEL``; measured by
benchmarks/decoding/int8_kernels.py and int8_matvec_compiled.py, figures in BENCHMARKS.md,
"int8 and bf16 weights"):

* ``"int8pack"``, the default: PyTorch's weight-only kernel ``torch._weight_int8pack_mm``
  with bf16 activations, 4.5-10x fp32 ``F.linear`` for a few rows on a CPU with native
  bf16 (AVX-512-BF16), 1.4-3.7x on an AVX2-only Zen 3. Past ``DEQUANTIZE_ROWS`` rows (a
  prompt's prefill) a cast of the int8 matrix to bf16 and one bf16 GEMM is faster; widths
  that are not a multiple of 16 (``KERNEL_WIDTH``: the kernel returns wrong values or
  crashes) multiply an fp32 copy. Costs 0.0065 nats on the SmolLM2 warm start.
* ``"inductor"``, the default on a CPU whose best vector unit is AVX2 (no AVX-512): a
  decoding step's one-row products run a kernel that inductor (``torch.compile``'s C++
  backend) makes once per matrix shape, with fp32 activations: the int8 matrix is read in
  place as 32-bit words (inductor's AVX2 code loads int8 vectors through a stack buffer,
  a store-forwarding stall per load, but fp32 words directly), each byte sign-extended by
  two shifts and multiplied by its activation (``int8_matvec``). Only the int8 bytes are
  read, and the product is the dequantized weight's within fp32 rounding: 1.3-2.3x
  int8pack on the Zen 3 from 576 x 576 up to the 49,152-row head. It is called without
  dynamo (``compiled_matvec``); a matrix under ``MATVEC_MIN_WEIGHTS`` (the 96-row kv
  down-projection: 0.6x), several rows, widths not a multiple of 4, a compiled step, or
  a machine where the compile fails take int8pack's paths.
* ``"fbgemm"``, opt-in (``DEEPSEEK_MINI_INT8_KERNEL=fbgemm``): FBGEMM's packed int8 GEMM,
  ``torch.ops.quantized.linear_dynamic``, which also rounds the activations to 7 bits on
  the fly (one asymmetric range per call; several rows are brought to one range first,
  so each is rounded on its own). 1.4-4x fp32 at one row on the Zen 3 (0.8x on the
  96-row kv down-projection) and 2x fp32 in prefill, but +0.14 nats on the SmolLM2
  warm start: outside the 0.01 that a default must keep, so never chosen by itself.

A routed expert is quantized inside the stacked ``[experts, out, in]`` tensor: the
sorted (grouped) path runs the kernel once per chosen expert, and the gathered path (a
compiled step's few slots) indexes only the chosen experts' int8 weights. Nothing ever
dequantizes every expert. Activations between the products stay in the model's dtype.

``"bf16"`` keeps the same structure with bf16 weights and bf16 products (half the bytes
of fp32, the CPU's native bf16 GEMM). Checkpoints stay full precision: quantization
happens on load, in place, in seconds. CPU only: on other devices ``check_device``
refuses, since the int8 kernel was measured on the CPU alone.
"""

from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import UserError
from .head import TrimmedHead
from .moe import FeedForward, RoutedExperts, activate

MODES = ("int8", "bf16")
DEQUANTIZE_ROWS = 16  # rows above which a cast + bf16 GEMM beats the int8 kernel
KERNEL_WIDTH = 16  # _weight_int8pack_mm needs input widths that are multiples of this
COMPUTE = torch.bfloat16  # activations of the int8pack products
KERNELS = ("fbgemm", "inductor", "int8pack")


def best_kernel() -> str:
    """The default int8 kernel: the compiled one-row kernel on an AVX2-only CPU, where it
    was measured faster than int8pack (module docstring), int8pack elsewhere. FBGEMM is
    faster still on an AVX2-only CPU but its 7-bit activations cost 0.14 nats on a real
    model."""
    return "inductor" if torch.backends.cpu.get_cpu_capability() == "AVX2" else "int8pack"


# DEEPSEEK_MINI_INT8_KERNEL names another kernel (checked when a model is quantized).
KERNEL = os.environ.get("DEEPSEEK_MINI_INT8_KERNEL") or best_kernel()


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise UserError(f"unknown quantization {mode!r}: choose one of {', '.join(MODES)}")


def check_device(device: torch.device | str, mode: str) -> None:
    """Quantized decoding is measured and supported on the CPU only."""
    device = torch.device(device)
    if device.type != "cpu":
        raise UserError(f"--quantize {mode} runs on the CPU only (its kernels were measured "
                        f"there); got device {device.type}: drop --quantize or use --device cpu")


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of ``weight`` [..., out, in]: ``(q, s)`` with ``q`` int8
    [..., out, in] and ``s`` bf16 [..., out], so ``q * s ≈ weight``. The scale is rounded
    to bf16 (the kernel's dtype) *before* ``q`` is computed, so ``q * s`` is exactly the
    weight the kernel multiplies by."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=-1) / 127).clamp_min(1e-12).to(COMPUTE)
    q = (w / scale.float().unsqueeze(-1)).round_().clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale


# FBGEMM's packed weights by the address of the int8 matrix they were made from, for the
# compiled step: torch.compile cannot trace the packed object, so a compiled step calls
# an opaque op on ``q`` (``fbgemm_linear_op``) that finds them here. An entry lives as long
# as the tensor object it was registered with (``owner``), which keeps the address taken.
_PACKED: dict[int, torch.ScriptObject] = {}


def fbgemm_pack(q: torch.Tensor, scale: torch.Tensor,
                owner: torch.Tensor | None = None) -> torch.ScriptObject:
    """FBGEMM's packed form of int8 ``q`` [out, in] with per-row ``scale`` [out] (the same
    numbers: ``q * scale`` is unchanged), for ``torch.ops.quantized.linear_dynamic``;
    registered for the compiled step while ``owner`` (default ``q``) lives."""
    with warnings.catch_warnings():  # PyTorch flags quantized tensors as deprecated
        warnings.simplefilter("ignore")
        weight = torch._make_per_channel_quantized_tensor(
            q.contiguous(), scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
    packed = torch.ops.quantized.linear_prepack(weight, None)
    key = q.data_ptr()
    _PACKED[key] = packed
    weakref.finalize(q if owner is None else owner, _PACKED.pop, key, None)
    return packed


def _registered(q: torch.Tensor, scale: torch.Tensor) -> torch.ScriptObject:
    """The packed weights of ``q``; a copy never registered (a deep-copied model) is
    packed now and kept with a reference to ``q``, so its address is never reused."""
    packed = _PACKED.get(q.data_ptr())
    if packed is None:
        packed = fbgemm_pack(q, scale)
        _PACKED[q.data_ptr()] = packed
        _KEPT.append(q)
    return packed


_KEPT: list[torch.Tensor] = []


def fbgemm_linear(x: torch.Tensor, packed: torch.ScriptObject) -> torch.Tensor:
    """``x @ (q * scale).T`` in fp32 through FBGEMM, as [rows, out]. The kernel quantizes
    its whole input with one scale, so several rows are each divided by their largest
    magnitude first and their outputs multiplied back: each row is rounded on its own
    range, whatever else shares the batch (a lone row, a decoding step's case, skips the
    two ops)."""
    rows = x.reshape(-1, x.shape[-1]).float()
    if rows.shape[0] == 1:
        return torch.ops.quantized.linear_dynamic(rows, packed, True)
    peak = rows.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    return torch.ops.quantized.linear_dynamic(rows / peak, packed, True) * peak


# Two opaque ops a compiled step calls instead of the untraceable packed object (defining
# them costs milliseconds and imports no compiler): ``fbgemm_linear(x, q, scale)`` and
# ``fbgemm_gathered(x, experts, q, scale)``, row i through expert ``experts[i]``'s slice
# of the [E, out, in] ``q`` (reading the ids is a host sync inside the op).
@torch.library.custom_op("deepseek_mini::fbgemm_linear", mutates_args=())
def fbgemm_linear_op(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return fbgemm_linear(x, _registered(q, scale)).view(*x.shape[:-1], q.shape[0])


@fbgemm_linear_op.register_fake
def _(x, q, scale):
    return x.new_empty(*x.shape[:-1], q.shape[0], dtype=torch.float32)


@torch.library.custom_op("deepseek_mini::fbgemm_gathered", mutates_args=())
def fbgemm_gathered_op(x: torch.Tensor, experts: torch.Tensor, q: torch.Tensor,
                       scale: torch.Tensor) -> torch.Tensor:
    rows = [fbgemm_linear(x[i:i + 1], _registered(q[e], scale[e]))
            for i, e in enumerate(experts.tolist())]
    return torch.cat(rows) if rows else x.new_empty(0, q.shape[1])


@fbgemm_gathered_op.register_fake
def _(x, experts, q, scale):
    return x.new_empty(x.shape[0], q.shape[1], dtype=torch.float32)


MATVEC_MIN_WEIGHTS = 1 << 17  # smaller matrices: int8pack (the kernel's call costs more)


def int8_matvec(x: torch.Tensor, words: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ (q * scale).T`` in fp32 for one row, from ``x`` [1, 4, in / 4] (``x[0, j, i]``
    the activation of column ``4i + j``) and int8 ``q`` [out, in] viewed in place as
    [out, in / 4] fp32 ``words`` (which inductor loads directly): word i of a row holds
    columns 4i..4i+3, byte j sign-extended by a left then an arithmetic right shift.
    Written for inductor, which makes of it one vectorised reduction per output channel
    (module docstring)."""
    w = words.view(torch.int32)
    acc = None
    for j in range(4):
        term = x[:, None, j, :] * ((w << (24 - 8 * j)) >> 24).to(torch.float32)
        acc = term if acc is None else acc + term
    return acc.sum(-1) * scale.float()


# The compiled int8_matvec per (out, in), made on first use; None once a compile failed.
_MATVEC: dict[tuple[int, int], Callable] | None = {}


def compiled_matvec(out: int, width: int) -> Callable | None:
    """``int8_matvec`` for an [out, width] matrix, compiled by inductor from its traced
    graph (once per shape and process; inductor's on-disk cache shortens later
    processes' compiles) and called without dynamo, whose per-call frame and guards cost
    more than the product of a small matrix. None, with a warning, where it cannot be
    compiled (no C++ compiler, say)."""
    global _MATVEC
    if _MATVEC is None:
        return None
    if (out, width) not in _MATVEC:
        args = (torch.zeros(1, 4, width // 4), torch.zeros(out, width // 4),
                torch.zeros(out, dtype=COMPUTE))
        try:
            from torch._inductor import compile as inductor_compile
            from torch.fx.experimental.proxy_tensor import make_fx
            _MATVEC[out, width] = inductor_compile(make_fx(int8_matvec)(*args), list(args))
        except Exception as error:  # noqa: BLE001 - any failure falls back to int8pack
            warnings.warn(f"the compiled int8 kernel is unavailable ({type(error).__name__}:"
                          f" {error}); one-row products run int8pack", stacklevel=2)
            _MATVEC = None
            return None
    return _MATVEC[out, width]


def matvec_applies(x: torch.Tensor, q: torch.Tensor) -> bool:
    """Whether the compiled kernel takes this product: one row, a width of whole words, a
    matrix large enough to pay for the call, outside a compiled step (whose own graph
    runs int8pack's paths)."""
    out, width = q.shape
    return (x.numel() == width and width % 4 == 0 and out * width >= MATVEC_MIN_WEIGHTS
            and not torch.compiler.is_compiling()
            and compiled_matvec(out, width) is not None)


def matvec(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """One row ``x`` [..., in] through the compiled kernel: fp32 [1, out]."""
    out, width = q.shape
    columns = x.reshape(1, width // 4, 4).transpose(1, 2).float().contiguous()
    return compiled_matvec(out, width)(columns, q.view(torch.float32), scale)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                packed: torch.ScriptObject | None = None,
                kernel: str = "int8pack") -> torch.Tensor:
    """``x @ (q * scale).T`` for ``x`` [..., in], ``q`` int8 [out, in], ``scale`` bf16
    [out]: through FBGEMM's ``packed`` copy when given (fp32 out); with the ``inductor``
    kernel, one row through the compiled kernel (fp32 out); else the int8pack kernel
    (bf16 in, bf16 out) for a few rows and a cast + bf16 GEMM for many. A width the
    int8pack kernel gets wrong casts to fp32, since a bf16 GEMM of that size costs 3x
    fp32's in per-call overhead."""
    if packed is not None:
        if torch.compiler.is_compiling():
            return fbgemm_linear_op(x.float(), q, scale)
        return fbgemm_linear(x, packed).view(*x.shape[:-1], q.shape[0])
    if kernel == "inductor" and matvec_applies(x, q):
        return matvec(x, q, scale).view(*x.shape[:-1], q.shape[0])
    rows = x.reshape(-1, x.shape[-1])
    if q.shape[-1] % KERNEL_WIDTH:
        out = F.linear(rows.float(), q.float()) * scale.float()
    elif rows.shape[0] > DEQUANTIZE_ROWS:
        out = F.linear(rows.to(COMPUTE), q.to(COMPUTE)) * scale
    else:
        out = torch._weight_int8pack_mm(rows.to(COMPUTE).contiguous(), q, scale)
    return out.view(*x.shape[:-1], q.shape[0])


def check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise UserError(f"unknown int8 kernel {kernel!r}: choose one of {', '.join(KERNELS)}")
    if kernel == "fbgemm" and "fbgemm" not in torch.backends.quantized.supported_engines:
        raise UserError("the fbgemm int8 kernel is not built into this PyTorch: use int8pack")


class Int8Linear(nn.Module):
    """A bias-free ``nn.Linear`` with int8 weights [out, in] and bf16 scales [out], run by
    ``kernel`` (module docstring; FBGEMM's packed copy is made once, here)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, kernel: str = KERNEL) -> None:
        super().__init__()
        check_kernel(kernel)
        self.kernel = kernel
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)
        self.packed = fbgemm_pack(q, scale) if kernel == "fbgemm" else None
        # A width the int8pack kernel cannot take (one of the latent's small
        # up-projections) multiplies in fp32 anyway: its dequantized weight is made once
        # here, not cast from ``q`` at every call.
        self.register_buffer("weight32", q.float() * scale.float()[:, None]
                             if kernel != "fbgemm" and q.shape[-1] % KERNEL_WIDTH else None)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, kernel: str = KERNEL) -> Int8Linear:
        return cls(*quantize_rows(weight), kernel)

    @property
    def in_features(self) -> int:
        return self.q.shape[1]

    @property
    def out_features(self) -> int:
        return self.q.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight32 is not None:
            return F.linear(x.float(), self.weight32).to(x.dtype)
        return int8_linear(x, self.q, self.scale, self.packed, self.kernel).to(x.dtype)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight [out, in] it multiplies by, as ``dtype``: for products that are not
        a plain linear (latent_rope's absorbed decoding), on a small matrix."""
        if self.weight32 is not None:
            return self.weight32.to(dtype)
        return self.q.to(dtype) * self.scale.to(dtype).unsqueeze(-1)


class Bf16Linear(nn.Module):
    """A bias-free ``nn.Linear`` with bf16 weights, computed in bf16."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().to(COMPUTE).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(COMPUTE), self.weight).to(x.dtype)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.to(dtype)


class QuantizedEmbedding(nn.Module):
    """Embedding rows from an int8 table with a scale per row (or from a bf16 table,
    ``scale`` None), returned in the model's activation ``dtype``."""

    def __init__(self, table: torch.Tensor, scale: torch.Tensor | None,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("table", table)
        self.register_buffer("scale", scale)
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.table).to(self.dtype)
        if self.scale is None:
            return rows
        return rows * F.embedding(ids, self.scale.unsqueeze(-1)).to(self.dtype)


class Int8Experts(nn.Module):
    """``RoutedExperts`` with each projection as int8 [experts, out, in] and bf16 scales
    [experts, out]; the same two entry points (sorted rows with counts, or gathered).

    SwiGLU's gate and up projections read the same rows, so they are one int8 matrix
    ``w_gate_up`` [experts, 2 * inner, in], the gate's rows first: one product per expert
    instead of two (per-row scales, so each row is quantized as it would be alone, and
    each output channel is the same dot product). GELU experts have ``w_up`` alone."""

    def __init__(self, experts: RoutedExperts, kernel: str = KERNEL) -> None:
        super().__init__()
        check_kernel(kernel)
        self.has_gate = experts.w_gate is not None
        self.kernel = kernel
        self.compute = COMPUTE if kernel == "int8pack" else torch.float32
        self.first = "w_gate_up" if self.has_gate else "w_up"
        self.packed: dict[str, list[torch.ScriptObject | None]] = {}
        first = (torch.cat([experts.w_gate, experts.w_up], dim=2) if self.has_gate
                 else experts.w_up)
        for name, weight in ((self.first, first), ("w_down", experts.w_down)):
            q, scale = quantize_rows(weight.detach().transpose(1, 2))  # [experts, out, in]
            self.packed[name] = [fbgemm_pack(*pair, owner=q) if kernel == "fbgemm"
                                 else None for pair in zip(q, scale, strict=True)]
            self.register_buffer(f"{name}_q", q)
            self.register_buffer(f"{name}_scale", scale)

    served_counts = RoutedExperts.served_counts  # one process's own tokens

    def one_token(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """One token ``x`` [1, in] through each of its chosen ``experts`` [k]: [k, out],
        k int8 products with no sort, count or split over all experts (a batch-1 decode
        step's MoE; reading the k ids is its one host sync, as the counts are the
        grouped path's)."""
        rows = x.to(self.compute)
        return torch.cat([self._expert(rows, e) for e in experts.tolist()]).to(x.dtype)

    def _product(self, rows: torch.Tensor, name: str, e: int) -> torch.Tensor:
        # in the compute dtype: the inductor kernel's int8pack fallback returns bf16
        return int8_linear(rows, getattr(self, f"{name}_q")[e], getattr(self, f"{name}_scale")[e],
                           self.packed[name][e], self.kernel).to(self.compute)

    def _activate(self, h: torch.Tensor) -> torch.Tensor:
        """The first product's output (gate and up side by side, or up) activated."""
        if not self.has_gate:
            return activate(h, None)
        gate, up = h.chunk(2, dim=-1)
        return activate(up, gate)

    def _expert(self, rows: torch.Tensor, e: int) -> torch.Tensor:
        return self._product(self._activate(self._product(rows, self.first, e)), "w_down", e)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Rows of ``x`` sorted by expert, ``counts[e]`` rows for expert e: one pass per
        expert that has rows (reading the counts is this path's one host sync)."""
        chunks = x.to(self.compute).split(counts.tolist())
        outs = [self._expert(rows, e) for e, rows in enumerate(chunks) if rows.shape[0]]
        return torch.cat(outs).to(x.dtype) if outs else x.new_empty(x.shape)

    def gathered(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Row ``i`` of ``x`` through expert ``experts[i]`` (a compiled step's few slots):
        with FBGEMM, one opaque op per projection running each slot's packed expert;
        otherwise batched products over the chosen experts' int8 weights, gathered by index
        (never all experts') and cast to the compute dtype, the scale applied to the
        products."""
        def product(rows: torch.Tensor, name: str) -> torch.Tensor:
            if self.kernel == "fbgemm":  # the chosen experts' packed weights
                return fbgemm_gathered_op(rows, experts, getattr(self, f"{name}_q"),
                                          getattr(self, f"{name}_scale"))
            q = getattr(self, f"{name}_q")[experts]           # [S, out, in] int8
            out = torch.bmm(q.to(self.compute), rows.unsqueeze(-1)).squeeze(-1)
            return out * getattr(self, f"{name}_scale")[experts]

        rows = x.to(self.compute)
        return product(self._activate(product(rows, self.first)), "w_down").to(x.dtype)


class Bf16Experts(nn.Module):
    """``RoutedExperts`` in bf16 (the grouped product of moe.py, in bf16), fed and
    returning the model's activation dtype."""

    def __init__(self, experts: RoutedExperts) -> None:
        super().__init__()
        for name in ("w_up", "w_gate", "w_down"):
            weight = getattr(experts, name)
            self.register_buffer(name, None if weight is None else weight.detach().to(COMPUTE))

    served_counts = RoutedExperts.served_counts

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return RoutedExperts.forward(self, x.to(COMPUTE), counts).to(x.dtype)

    def one_token(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        return RoutedExperts.one_token(self, x.to(COMPUTE), experts).to(x.dtype)

    def gathered(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        return RoutedExperts.gathered(self, x.to(COMPUTE), experts).to(x.dtype)


class QuantizedFeedForward(nn.Module):
    """A SwiGLU ``FeedForward`` (the shared experts, a dense MLP) quantized with its gate
    and up projections as one layer ``gate_up`` [2 * inner, in], the gate's rows first:
    one product instead of two on the same rows, each output channel as it was."""

    def __init__(self, ff: FeedForward, mode: str, kernel: str) -> None:
        super().__init__()
        self.gate_up = _linear(torch.cat([ff.gate.weight, ff.up.weight]), mode, kernel)
        self.down = _linear(ff.down.weight, mode, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(activate(up, gate))


class QuantizedTrimmedHead(nn.Module):
    """A ``TrimmedHead`` whose scored rows are one quantized layer ``rows`` (``Int8Linear``
    or ``Bf16Linear`` of [N (+ 1), h]): the kept ids' rows of the quantized head table and
    the "other" vector. Its logits and CE are the trimmed head's own, on those rows."""

    def __init__(self, head: TrimmedHead, rows: nn.Module) -> None:
        super().__init__()
        self.vocab_size = head.vocab_size
        self.register_buffer("ids", head.ids)
        self.register_buffer("classes", head.classes, persistent=False)
        self.register_buffer("offsets", head.offsets, persistent=False)
        self.rows = rows

    def weight(self, full: None = None) -> nn.Module:
        """What ``TrimmedHead.weight`` gives: the scored rows (here a module)."""
        return self.rows

    logits = TrimmedHead.logits
    cross_entropy = TrimmedHead.cross_entropy


def _trimmed_head(model: nn.Module, mode: str, kernel: str) -> QuantizedTrimmedHead:
    """The trimmed head's rows from the already quantized LM head (so a tied table is
    quantized once) and its "other" vector quantized on its own, as one layer."""
    head, lm_head = model.head, model.lm_head
    other = head.other.detach()[None] if head.other is not None else None
    if mode == "int8":
        parts = [(lm_head.q[head.ids], lm_head.scale[head.ids])]
        if other is not None:
            parts.append(quantize_rows(other))
        rows = Int8Linear(torch.cat([q for q, _ in parts]).contiguous(),
                          torch.cat([s for _, s in parts]), kernel)
    else:
        kept = lm_head.weight[head.ids]
        rows = Bf16Linear(kept if other is None else torch.cat([kept, other.to(COMPUTE)]))
    return QuantizedTrimmedHead(head, rows)


def _linear(weight: torch.Tensor, mode: str, kernel: str) -> nn.Module:
    return Int8Linear.from_weight(weight, kernel) if mode == "int8" else Bf16Linear(weight)


def _embedding_and_head(model: nn.Module, mode: str, kernel: str) -> None:
    """The embedding and LM head; tied, they share one quantized table."""
    weight = model.embed.weight
    dtype = weight.dtype
    tied = model.lm_head.weight is weight
    if mode == "int8":
        q, scale = quantize_rows(weight)
        model.embed = QuantizedEmbedding(q, scale, dtype)
        model.lm_head = (Int8Linear(q, scale, kernel) if tied
                         else _linear(model.lm_head.weight, mode, kernel))
    else:
        table = weight.detach().to(COMPUTE).contiguous()
        model.embed = QuantizedEmbedding(table, None, dtype)
        head = Bf16Linear(model.lm_head.weight)
        if tied:
            head.weight = table
        model.lm_head = head


@torch.no_grad()
def quantize(model: nn.Module, mode: str, kernel: str | None = None) -> nn.Module:
    """Quantize a ``DeepSeekMini`` for decoding, in place, and return it: ``"int8"``
    (per output channel, run by ``kernel``, default this CPU's ``KERNEL``) or ``"bf16"``
    weights, as the module docstring says. The model can then generate, serve and be
    evaluated, but not trained."""
    check_mode(mode)
    kernel = KERNEL if kernel is None else kernel
    check_kernel(kernel)
    check_device(model.device, mode)
    if getattr(model, "quantization", None) is not None:
        raise UserError(f"the model is already quantized ({model.quantization})")
    _embedding_and_head(model, mode, kernel)
    if model.head is not None:
        model.head = _trimmed_head(model, mode, kernel)
    for parent in list(model.modules()):
        if isinstance(parent, FeedForward) and parent.gate is not None:
            continue  # replaced whole, by its parent's turn
        for name, child in list(parent.named_children()):
            if isinstance(child, FeedForward) and child.gate is not None:
                setattr(parent, name, QuantizedFeedForward(child, mode, kernel))
            elif isinstance(child, nn.Linear) and child.bias is None:
                setattr(parent, name, _linear(child.weight, mode, kernel))
            elif isinstance(child, RoutedExperts):
                setattr(parent, name, Int8Experts(child, kernel) if mode == "int8"
                        else Bf16Experts(child))
    model.quantization = mode
    return model


