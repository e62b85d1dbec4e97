"""Expert parallelism (``train.expert_parallel: N``): each rank of an expert-parallel group
holds ``num_experts / N`` of every MoE layer's routed experts, and tokens travel to the
experts they chose and back.

The ranks form a mesh of ``world / N`` data-parallel replicas by ``N`` expert-parallel
ranks (``torch.distributed.device_mesh``, dims ``dp`` x ``ep``; an EP group is ``N``
consecutive ranks, one machine's GPUs when ``N`` fits in it). Rank ``j`` of a group holds
experts ``j·E/N … (j+1)·E/N − 1`` of every MoE layer; attention, embeddings, norms, routers
and shared experts stay whole on every rank, data-parallel as ``train.parallel`` says.

One MoE layer's tokens, from router output to combined output (moe.py does steps 1 and 6
for any experts module; ``ExpertParallelExperts`` below, which replaces ``RoutedExperts``,
does the rest):

1. moe.py sorts the (token, slot) pairs by chosen expert, ``counts[e]`` of them for expert
   e. Experts are numbered in rank order, so the sorted rows are already grouped by the
   rank that holds their expert.
2. The counts are exchanged: an all-gather of every rank's ``counts`` gives [N, E]. Each
   rank reads from it the rows it sends to each rank and receives from each (the split
   sizes) and copies them to the host: an uneven all-to-all needs its sizes on the host to
   size its buffers, so this is the one host sync per MoE layer, inherent to dropless
   expert parallelism. The group's summed counts are the load the balance loss weighs.
3. Dispatch: ``all_to_all_single`` with those splits, through the autograd-aware
   functional collective (its backward is the reverse all-to-all).
4. Received rows arrive by source rank, then expert; a stable sort by local expert makes
   them expert-major, and the local experts run as one grouped GEMM
   (``RoutedExperts.forward``).
5. The outputs go back into arrival order and a second all-to-all, splits swapped,
   returns every row to the rank its token lives on, in the order it was sent.
6. moe.py puts the rows back in (token, slot) order and sums the k slots, weighted.

An EP group is one data-parallel replica whose micro batch is its ranks' micro batches
together: ``rows_for_rank`` gives rank j of a group the j-th part of each of the group's
micro batches, the balance loss weighs the group's counts, and gradients are averaged
over all ranks, so a run of ``N`` ranks with micro batches of m rows trains exactly as one
process with micro batches of ``N·m`` (tested within 1e-5). Expert gradients are summed
over the replicas holding the same experts (the ``dp`` dimension) and divided by the world
size, as data-parallel gradients are averaged. Checkpoints stay in the single-process
layout: saving gathers each expert tensor over its group, loading slices it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.tensor import DTensor

from ..model.moe import MoE, RoutedExperts


@dataclass(frozen=True)
class ExpertMesh:
    """This rank's place in the dp x ep mesh."""

    size: int  # N: ranks per expert-parallel group
    index: int  # this rank's place in its group
    group: dist.ProcessGroup  # the EP group: the all-to-alls
    replica: int  # which data-parallel replica (EP group) this rank is in
    replicas: int  # world / N
    replica_group: dist.ProcessGroup  # the ranks holding the same experts
    replica_mesh: Any  # the same ranks as a DeviceMesh, for FSDP

    @property
    def world_size(self) -> int:
        return self.size * self.replicas


def build_mesh(device_type: str, world_size: int, size: int) -> ExpertMesh:
    """The dp x ep mesh over all ranks (every rank calls it: it creates process groups)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device_type, (world_size // size, size), mesh_dim_names=("dp", "ep"))
    return ExpertMesh(size, mesh.get_local_rank("ep"), mesh["ep"].get_group(),
                      mesh.get_local_rank("dp"), world_size // size, mesh["dp"].get_group(),
                      mesh["dp"])


def rows_for_rank(share: torch.Tensor, micro_batch_size: int, mesh: ExpertMesh) -> torch.Tensor:
    """This rank's rows of its EP group's ``share`` of the global batch: the group takes
    micro batches of ``N · micro_batch_size`` rows and rank j the j-th part of each, so the
    rows dispatched together are one contiguous micro batch of the one-process run."""
    width = share.shape[-1]
    return share.view(-1, mesh.size, micro_batch_size, width)[:, mesh.index].reshape(-1, width)


def _all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int],
                group: dist.ProcessGroup) -> torch.Tensor:
    return funcol.all_to_all_single_autograd(x.contiguous(), output_splits, input_splits, group)


class ExpertParallelExperts(RoutedExperts):
    """``RoutedExperts`` holding this rank's ``E/N`` experts of a layer (the same parameter
    names, sliced along the expert dimension) and serving its whole EP group's tokens.
    ``forward`` takes and returns what ``RoutedExperts.forward`` does: this rank's rows
    sorted by (global) expert with ``counts`` [E], and their outputs in that order."""

    def __init__(self, full: RoutedExperts, mesh: ExpertMesh) -> None:
        num_experts, hidden, inner = full.w_up.shape
        local = num_experts // mesh.size
        super().__init__(local, hidden, inner, "gelu" if full.w_gate is None else "swiglu")
        self.to(full.w_up.device)
        self.first, self.mesh = mesh.index * local, mesh
        with torch.no_grad():
            for name, param in self.named_parameters():
                source = getattr(full, name)
                param.copy_(source[self.first:self.first + local])
                param.requires_grad_(source.requires_grad)
        self._group_counts: torch.Tensor | None = None
        self.last_splits: tuple[list[int], list[int]] = ([], [])  # (sent, received) rows

    one_token = None  # this rank holds only some experts: every token goes through forward

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        mesh, local = self.mesh, self.w_up.shape[0]
        if torch.is_autocast_enabled(x.device.type):  # travel in the compute dtype
            x = x.to(torch.get_autocast_dtype(x.device.type))
        # 2. counts exchanged: [source rank, expert]; mine: the columns of my experts
        every = funcol.all_gather_single(counts, 0, mesh.group).view(mesh.size, -1)
        mine = every[:, self.first:self.first + local]
        sent, received = torch.stack([counts.view(mesh.size, -1).sum(1), mine.sum(1)]).tolist()
        self._group_counts, self.last_splits = every.sum(0), (sent, received)
        # 3. dispatch
        arrived = _all_to_all(x, received, sent, mesh.group)
        # 4. arrival order (source, expert) -> expert-major, one grouped GEMM
        expert_of_row = torch.arange(local, device=x.device).repeat(mesh.size)
        expert_of_row = expert_of_row.repeat_interleave(mine.flatten(),
                                                        output_size=sum(received))
        order = expert_of_row.argsort(stable=True)
        out = super().forward(arrived[order], mine.sum(0))
        # 5. back into arrival order, then home
        return _all_to_all(out.index_select(0, order.argsort()), sent, received, mesh.group)

    def served_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """Tokens per expert over the whole EP group in the last forward: the load the
        group's experts carried, which the balance loss weighs."""
        return counts if self._group_counts is None else self._group_counts


class ExpertShards:
    """The model's routed-expert parameters split over the mesh: replaces every MoE
    layer's ``RoutedExperts`` (the MTP modules' too) and knows how to reduce their
    gradients and move their state between the sharded and the single-process layout."""

    def __init__(self, model: nn.Module, mesh: ExpertMesh) -> None:
        self.mesh = mesh
        self.modules: dict[str, ExpertParallelExperts] = {}  # by name in the model
        for name, module in model.named_modules():
            if isinstance(module, MoE):
                module.experts = ExpertParallelExperts(module.experts, mesh)
                self.modules[f"{name}.experts"] = module.experts

    @property
    def params(self) -> dict[str, nn.Parameter]:
        """The expert parameters by name, as they are now (FSDP replaces them)."""
        return {f"{name}.{key}": p for name, module in self.modules.items()
                for key, p in module.named_parameters()}

    def holds(self, param: torch.Tensor) -> bool:
        return any(param is p for p in self.params.values())

    def numel(self, param: torch.Tensor) -> int:
        """The parameter's size in the single-process model."""
        return param.numel() * (self.mesh.size if self.holds(param) else 1)

    def reduce_gradients(self) -> None:
        """After a step's last backward (under DDP; FSDP does the same with its divide
        factor): each rank's expert gradients already sum the contributions of its EP
        group's tokens; summed over the replicas holding the same experts and divided by
        the world size, they are the mean over all ranks, as the dense gradients are."""
        grads = []
        for p in self.params.values():
            if p.requires_grad:
                if p.grad is None:  # a frozen path; never a skipped collective
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
        if self.mesh.replicas > 1:
            for grad in grads:
                dist.all_reduce(grad, group=self.mesh.replica_group)
        torch._foreach_div_(grads, self.mesh.world_size)

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float,
                       full: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``clip_grad_norm_`` over the whole model: the dense gradients' norm (the same on
        every rank; ``full`` makes FSDP's a plain tensor) with the expert gradients' summed
        over the EP group, so every rank clips by the one-process norm."""
        ids = {id(p) for p in self.params.values()}
        experts = [p for p in params if p.grad is not None and id(p) in ids]
        dense = [p for p in params if p.grad is not None and id(p) not in ids]
        square = full(nn.utils.get_total_norm([p.grad for p in experts], foreach=True)).square()
        dist.all_reduce(square, group=self.mesh.group)
        dense_norm = full(nn.utils.get_total_norm([p.grad for p in dense], foreach=True))
        total = (dense_norm.square() + square).sqrt()
        for part in (dense, experts):  # apart: FSDP's DTensors and plain tensors do not mix
            nn.utils.clip_grads_with_norm_(part, max_norm, total, foreach=True)
        return total

    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """The whole expert dimension, on the CPU, on every rank of the group (FSDP's
        shards over the replicas gathered first)."""
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        whole = tensor.new_empty(tensor.shape[0] * self.mesh.size, *tensor.shape[1:])
        dist.all_gather_into_tensor(whole, tensor.contiguous(), group=self.mesh.group)
        return whole.cpu()

    def _slice(self, tensor: torch.Tensor) -> torch.Tensor:
        local = tensor.shape[0] // self.mesh.size
        return tensor[self.mesh.index * local:(self.mesh.index + 1) * local].clone()

    def full_model_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """``state`` with every expert tensor gathered whole (a collective: every rank)."""
        return {**state, **{name: self._gather(p.detach()) for name, p in self.params.items()}}

    def local_model_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """A single-process ``state`` with this rank's slice of every expert tensor."""
        return {k: self._slice(v) if k in self.params else v for k, v in state.items()}

    def full_optim_state(self, state: dict[str, Any], names: list[str],
                         optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """``optimizer.state_dict()``-shaped ``state`` (its parameters' ``names`` in index
        order; empty on a rank that gets none) with the expert parameters' moments
        gathered whole from the live optimizer (a collective: every rank)."""
        whole = {name: {k: self._gather(v) for k, v in optimizer.state[p].items()
                        if _is_shaped(v, p.shape)}
                 for name, p in self.params.items()}
        if not state:
            return state
        per_param = dict(state["state"])
        for index, name in enumerate(names):
            if name in whole and index in per_param:
                per_param[index] = {**per_param[index], **whole[name]}
        return {**state, "state": per_param}

    def local_optim_state(self, state: dict[str, Any], names: list[str]) -> dict[str, Any]:
        """The inverse of ``full_optim_state``: this rank's slices of the moments (AdamW's
        step count is a scalar, the same on every rank)."""
        per_param = dict(state["state"])
        for index, name in enumerate(names):
            if name in self.params and index in per_param:
                p = self.params[name]
                whole = (p.shape[0] * self.mesh.size, *p.shape[1:])
                per_param[index] = {k: self._slice(v) if _is_shaped(v, whole) else v
                                    for k, v in per_param[index].items()}
        return {**state, "state": per_param}


def _is_shaped(value: Any, shape: Iterable[int]) -> bool:
    return isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(shape)
