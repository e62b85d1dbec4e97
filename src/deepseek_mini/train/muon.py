"""Muon for the hidden weight matrices, fused AdamW for the rest, as one optimizer.

Muon (``torch.optim.Muon``, PyTorch's own update and Newton-Schulz) orthogonalises each
hidden matrix's momentum; it is meant for the matrices inside the blocks only. The
embedding and the (tied) output head, the routers (whose rows score experts, not a
hidden map), the norm gains and anything else stay on AdamW.

The stacked expert weights ``[E, in, out]`` are ``E`` matrices, orthogonalised one by
one: each expert is handed to Muon as a view ``weight[e].T`` (the ``[out, in]`` layout
of ``nn.Linear``, so Muon's shape-dependent lr scale treats it as it treats the dense
MLP) whose ``.grad`` is the same view of the stacked gradient, re-pointed by a hook
after every accumulation. Nothing is copied: Muon writes the expert rows in place.

To the rest of the code the pair is one ``torch.optim.Optimizer``: ``param_groups``
(AdamW's, then Muon's) is what the GradScaler unscales, the gradient norm is clipped
over and the LR schedule scales; ``state_dict`` holds both states. A step skipped for a
non-finite loss or gradient (``found_inf``, set by the trainer or the GradScaler) is
skipped by both without a host sync: the fused AdamW kernel reads the flag itself, and
Muon's update is made a no-op on the device (its gradient replaced by its momentum,
which the momentum update then leaves as it was, and its weights restored from a copy).

``torch.optim.Muon`` runs Newton-Schulz in bf16, whatever the CPU: on one without bf16
instructions (AVX2 only) that product is emulated, 20-40x slower than fp32, and was ~80%
of a CPU-hour step. ``train.muon_ns_precision`` (``auto``: bf16 where the device computes
it natively, else fp32) picks it; fp32 runs the same iteration (torch's coefficients,
order and normalisation) in fp32, the matrices of one shape (or its transpose) as one
batched product. That is a different rounding from torch's bf16, not a different update:
fp32 is the closer of the two to the exact iteration (tests/test_muon.py holds both to an
fp64 reference).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..model.moe import RoutedExperts
from ..model.router import SigmoidRouter, SoftmaxRouter

ROUTERS = (SoftmaxRouter, SigmoidRouter)
MUON_SETTINGS = ("momentum", "ns_steps", "adjust_lr_fn")  # train.muon_* in Muon's groups
NS_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def muon_split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter],
                                          list[nn.Parameter]]:
    """The trainable parameters as (hidden 2-D matrices, stacked 3-D expert weights, the
    rest for AdamW). Hidden means inside a decoder layer or an MTP module."""
    routers = {id(p) for m in model.modules() if isinstance(m, ROUTERS)
               for p in m.parameters()}
    stacked = {id(p) for m in model.modules() if isinstance(m, RoutedExperts)
               for p in m.parameters()}
    blocks = [model.layers, *([model.mtp] if hasattr(model, "mtp") else [])]
    hidden = {id(p) for block in blocks for p in block.parameters()}
    matrices, experts, rest = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in stacked:
            experts.append(p)
        elif id(p) in hidden and id(p) not in routers and p.dim() == 2:
            matrices.append(p)
        else:
            rest.append(p)
    return matrices, experts, rest


def expert_views(weight: torch.Tensor) -> list[torch.Tensor]:
    """Expert ``e``'s matrix of a stacked ``[E, in, out]`` weight as ``[out, in]`` views
    of its storage (leaves that Muon may own and update in place)."""
    return [weight.detach()[e].T for e in range(weight.shape[0])]


def newton_schulz(updates: torch.Tensor, coefficients: tuple[float, float, float],
                  steps: int, eps: float) -> torch.Tensor:
    """torch.optim.Muon's Newton-Schulz (``_zeropower_via_newtonschulz``) over a stack of
    same-shaped matrices ``[n, rows, cols]`` at once, in ``updates``' own dtype (the
    caller's fp32): each normalised by its own Frobenius norm, a tall one transposed. A
    wide matrix (``gram_pays``) takes the same iteration in Gram form."""
    a, b, c = coefficients
    x = updates.mT if updates.shape[-2] > updates.shape[-1] else updates
    x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps)
    if gram_pays(*x.shape[-2:], steps):
        x = _gram_newton_schulz(x, coefficients, steps)
    else:
        for _ in range(steps):
            gram = x @ x.mT
            gram_update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.baddbmm(x, gram_update, x, beta=a)
    return x.mT if updates.shape[-2] > updates.shape[-1] else x


GRAM_RESTART = 3  # Gram-form iterations between two products with the wide matrix


def _gram_newton_schulz(x: torch.Tensor, coefficients: tuple[float, float, float],
                        steps: int) -> torch.Tensor:
    """The same iteration on ``x`` [n, r, c] (r < c) carried by its ``r x r`` Gram matrix.

    Each step is ``x <- p(G) x`` with ``p(G) = aI + bG + cG^2`` and ``G = x x^T``; p(G) is a
    polynomial in the symmetric G, so it commutes with it and the next Gram matrix is
    ``p(G) G p(G)``, all ``r x r``: the wide ``r x c`` products are needed only to form G
    and to apply the product of the p(G) (Newton-Schulz "in Gram form"). Rounding in G
    grows with each step's p(G) along the small singular directions, so every
    ``GRAM_RESTART`` steps x itself is formed again and G recomputed from it: with that,
    fp32 lands about as close to an fp64 iteration as the plain fp32 iteration does
    (tests/test_muon.py)."""
    a, b, c = coefficients
    done = 0
    while done < steps:
        block = min(GRAM_RESTART, steps - done)
        gram = x @ x.mT
        product = None
        for k in range(block):
            poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            poly.diagonal(dim1=-2, dim2=-1).add_(a)
            product = poly if product is None else poly @ product
            if k < block - 1:
                gram = poly @ (gram @ poly)
        x = product @ x
        done += block
    return x


def gram_pays(rows: int, cols: int, steps: int) -> bool:
    """Whether the Gram form (``_gram_newton_schulz``) of an ``r x c`` (r <= c) iteration
    takes fewer FLOPs than the plain one: from about 2:1 (an MoE expert's ``hidden x 2
    hidden``, 0.88x the FLOPs, ran 1.1-1.3x faster on an AVX2 EPYC: its ``r x r``
    products run faster than the wide ones) to a dense MLP's 6:1 (0.58x), not a square
    matrix (1.2x)."""
    blocks = -(-steps // GRAM_RESTART)
    plain = steps * (2 * rows * rows * cols + rows ** 3)
    gram = 2 * blocks * rows * rows * cols + (4 * steps - 3 * blocks) * rows ** 3
    return gram < plain


def _adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's shape-dependent learning rate (its ``_adjust_lr``)."""
    from torch.optim._muon import _adjust_lr
    return _adjust_lr(lr, adjust_lr_fn, shape)


class Fp32NewtonSchulzMuon(torch.optim.Muon):
    """``torch.optim.Muon`` whose Newton-Schulz runs in fp32, batched per shape (a tall
    matrix as its transpose); the momentum, Nesterov, weight decay and lr adjustment are
    torch's own steps."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)
            if not params:
                continue
            momentum = group["momentum"]
            torch._foreach_lerp_(bufs, grads, 1 - momentum)
            updates = (torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"]
                       else bufs)
            lr, decay = group["lr"], group["weight_decay"]
            for members in _by_gram_shape(params).values():
                ortho = newton_schulz(
                    torch.stack([_wide(updates[i].float()) for i in members]),
                    group["ns_coefficients"], group["ns_steps"], group["eps"])
                by_shape: dict[torch.Size, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
                for i, update in zip(members, ortho.unbind(0), strict=True):
                    targets, results = by_shape.setdefault(params[i].shape, ([], []))
                    targets.append(params[i])
                    results.append(update.mT if _tall(params[i]) else update)
                for shape, (targets, results) in by_shape.items():
                    torch._foreach_mul_(targets, 1 - lr * decay)
                    torch._foreach_add_(targets, [r.to(targets[0].dtype) for r in results],
                                        alpha=-_adjusted_lr(lr, group["adjust_lr_fn"], shape))


def _tall(matrix: torch.Tensor) -> bool:
    """More rows than columns: Newton-Schulz iterates on its transpose."""
    return matrix.shape[-2] > matrix.shape[-1]


def _wide(matrix: torch.Tensor) -> torch.Tensor:
    """``matrix``, transposed if tall: the orientation Newton-Schulz iterates in."""
    return matrix.mT if _tall(matrix) else matrix


def _by_gram_shape(params: list[torch.Tensor]) -> dict[tuple[int, int], list[int]]:
    """The indices of ``params`` grouped by the shape Newton-Schulz iterates in (a tall
    matrix transposed): an MoE's up ``[inner, hidden]`` and down ``[hidden, inner]``
    experts become one batched product of twice the matrices (about 10% faster than two
    on an AVX2 EPYC; each matrix's result as when run alone, tests/test_muon.py)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((min(p.shape), max(p.shape)), []).append(i)
    return groups


class MuonWithAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` over ``matrices`` and per-expert views of ``experts``, fused
    ``torch.optim.AdamW`` over ``adamw_groups``; one optimizer to its callers."""

    _step_supports_amp_scaling = True  # the GradScaler passes found_inf to step()

    def __init__(self, matrices: list[nn.Parameter], experts: list[nn.Parameter],
                 adamw_groups: list[dict[str, Any]], *, lr: float, betas: tuple[float, float],
                 muon_lr: float, weight_decay: float, momentum: float,
                 adjust_lr_fn: str, ns_steps: int = 5, ns_precision: str = "bf16") -> None:
        # No Optimizer.__init__: the groups and state are the two optimizers' own.
        self.defaults: dict[str, Any] = {}
        self.adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, fused=True)
        self._experts = [(w, expert_views(w)) for w in experts]
        views = [v for _, vs in self._experts for v in vs]
        muon = Fp32NewtonSchulzMuon if ns_precision == "fp32" else torch.optim.Muon
        self.muon = muon(matrices + views, lr=muon_lr, weight_decay=weight_decay,
                         momentum=momentum, adjust_lr_fn=adjust_lr_fn, ns_steps=ns_steps)
        self._owners = matrices + experts  # the tensors Muon writes
        for p in matrices + views:  # as Muon would make them on its first step
            self.muon.state[p]["momentum_buffer"] = torch.zeros_like(p)
        self._hooks = [w.register_post_accumulate_grad_hook(self._point_grads(vs))
                       for w, vs in self._experts]

    @staticmethod
    def _point_grads(views: list[torch.Tensor]):
        def hook(weight: torch.Tensor) -> None:
            grads = weight.grad.transpose(1, 2)
            for e, view in enumerate(views):
                view.grad = grads[e]
        return hook

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.adamw.param_groups + self.muon.param_groups

    @property
    def state(self) -> dict[torch.Tensor, Any]:
        return {**self.adamw.state, **self.muon.state}

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        """Both updates; with ``found_inf`` set and non-zero, neither changes anything."""
        if closure is not None or getattr(self, "grad_scale", None) is not None:
            raise RuntimeError("MuonWithAdamW takes no closure and unscaled gradients "
                               "(GradScaler.unscale_ before the step)")
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None:
            self.adamw.found_inf = found_inf
        try:
            self.adamw.step()
        finally:
            self.adamw.__dict__.pop("found_inf", None)
        if found_inf is None:
            self.muon.step()
        else:
            self._muon_step_unless(found_inf != 0)

    def _muon_step_unless(self, skip: torch.Tensor) -> None:
        """Muon's step, or (``skip`` true, on the device) no change at all. Skipped, the
        gradient is replaced by the momentum (whose update ``lerp(buf, buf)`` is then
        exactly ``buf``) and the weights, moved by a finite update, are put back by a
        ``lerp`` of weight 1 (exact)."""
        params = [p for g in self.muon.param_groups for p in g["params"] if p.grad is not None]
        for p in params:
            torch.where(skip, self.muon.state[p]["momentum_buffer"], p.grad, out=p.grad)
        owners = [t for t in self._owners if t.grad is not None]
        kept = torch._foreach_mul(owners, 1.0)
        self.muon.step()
        torch._foreach_lerp_(owners, kept, skip.float())

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none)
        self.muon.zero_grad(set_to_none)
        for weight, _ in self._experts:
            if set_to_none:
                weight.grad = None
            elif weight.grad is not None:
                weight.grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Both states; Muon's groups keep this run's ``train.muon_*`` settings
        (momentum, Newton-Schulz steps, lr adjustment), which ``Optimizer.load_state_dict``
        would replace by the saved ones: one changed on resume takes effect, as the resume
        lists it. The learning rate is the schedule's to restore; weight decay is saved,
        as AdamW's is."""
        self.adamw.load_state_dict(state_dict["adamw"])
        settings = [{k: g[k] for k in MUON_SETTINGS} for g in self.muon.param_groups]
        self.muon.load_state_dict(state_dict["muon"])
        for group, own in zip(self.muon.param_groups, settings, strict=True):
            group.update(own)

    def base_lrs(self, lr: float, muon_lr: float) -> list[float]:
        """Each group's un-scheduled learning rate, in ``param_groups`` order."""
        return [lr] * len(self.adamw.param_groups) + [muon_lr] * len(self.muon.param_groups)

    def __repr__(self) -> str:
        return f"MuonWithAdamW({self.muon!r}, {self.adamw!r})"

