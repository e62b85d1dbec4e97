"""Data-parallel training over several processes: ``torchrun … -m deepseek_mini train``.

torchrun starts one process per device and tells each its place through the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). Every rank
builds the same model from the same seed, draws its contiguous share of the global batch
from the shared sampler and computes; rank 0 alone writes. ``train.parallel`` picks how
the model is spread:

- ``ddp``: every rank holds the whole model; gradients are averaged by all-reduce after
  the last micro batch of a step (the others run under ``no_sync``).
- ``fsdp``: FSDP2's ``fully_shard`` on each decoder layer and on the root (embedding,
  final norm, tied LM head), so parameters, gradients and optimizer state are split
  across ranks and a layer's weights are gathered only while it runs.

Both average gradients over ranks, and each rank divides its loss by its own number of
micro batches, so the update is the mean over all micro batches of the global batch: the
same as one process taking those micro batches in turn. Checkpoints stay one full-state
file in the single-process layout, so any number of processes can resume them.

``train.expert_parallel: N`` splits every MoE layer's routed experts over groups of N
ranks (expert_parallel.py); the dense rest stays data-parallel as above, the experts are
left out of DDP and FSDP, and their gradients, norm and checkpoint state are that
module's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.fsdp
from torch import nn

from ..config import TrainConfig
from ..errors import UserError
from .expert_parallel import ExpertShards, build_mesh, rows_for_rank
from .precision import Precision

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class Ranks:
    """This process's place in the run; a single process is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class Parallel:
    """What the training loop needs from the process group, as no-ops for one process."""

    def __init__(self, kind: str = "none", ranks: Ranks | None = None,
                 control: Any = None, expert_parallel: int = 1) -> None:
        self.kind = kind
        self.ranks = ranks or Ranks()
        self._control = control  # a CPU (gloo) group for flags: no device sync to read
        self.expert_parallel = expert_parallel
        self.experts: ExpertShards | None = None  # set by wrap under expert parallelism
        self._mesh = None

    @property
    def distributed(self) -> bool:
        return self.kind != "none"

    def describe(self) -> str:
        """``2 fsdp processes``, with the expert split when there is one."""
        split = (f" (routed experts split over groups of {self.expert_parallel})"
                 if self.expert_parallel > 1 else "")
        return f"{self.ranks.world_size} {self.kind} processes{split}"

    def wrap(self, model: nn.Module, precision: Precision) -> nn.Module:
        """The module the training step calls. FSDP shards ``model`` in place (so build the
        optimizer afterwards, over the sharded parameters); DDP wraps it. Under expert
        parallelism the routed experts are first replaced by this rank's share, which
        neither DDP nor FSDP touches."""
        if self.expert_parallel > 1:
            if self._mesh is None:
                self._mesh = build_mesh(precision.device.type, self.ranks.world_size,
                                        self.expert_parallel)
            self.experts = ExpertShards(model, self._mesh)
        if self.kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            device = precision.device
            if self.experts is not None:  # each rank's are its own: never averaged, nor
                # broadcast from rank 0 (the one API for it, used by torchrec too)
                DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                    model, list(self.experts.params))
            # The only buffers are the constant RoPE tables: nothing to broadcast each step
            # (the keyword was renamed in PyTorch 2.13).
            keyword = ("forward_sync_buffers" if "forward_sync_buffers"
                       in inspect.signature(DistributedDataParallel).parameters
                       else "broadcast_buffers")
            return DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None,
                **{keyword: False})
        if self.kind == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mesh = init_device_mesh(precision.device.type, (self.ranks.world_size,))
            # Gathered weights in the compute dtype; gradients reduced in fp32.
            policy = MixedPrecisionPolicy(
                param_dtype=None if precision.name == "fp32" else precision.dtype,
                reduce_dtype=torch.float32)
            if self.experts is not None:
                # Experts first, sharded over the ranks holding the same ones (perhaps
                # one): the layers' fully_shard then leaves them alone. Each rank's expert
                # gradient already sums its group's tokens, so the sum over replicas is
                # divided by the world size, as the dense mean over all ranks is.
                for experts in self.experts.modules.values():
                    fully_shard(experts, mesh=self.experts.mesh.replica_mesh, mp_policy=policy)
                    experts.set_gradient_divide_factor(float(self.ranks.world_size))
                    # gloo has no pre-multiplied sum: a sum, then the division (not on a
                    # mesh of one, where FSDP would divide twice, PyTorch 2.13)
                    if precision.device.type == "cpu" and self.experts.mesh.replicas > 1:
                        experts.set_force_sum_reduction_for_comms(True)
            for layer in model.layers:
                fully_shard(layer, mesh=mesh, mp_policy=policy)
            fully_shard(model, mesh=mesh, mp_policy=policy)
        return model

    @contextlib.contextmanager
    def gradient_sync(self, model: nn.Module, last: bool) -> Iterator[None]:
        """Around one micro batch's forward and backward: gradients are reduced across
        ranks only after the last micro batch of a step (the experts' when it is done)."""
        if self.kind == "fsdp":
            model.set_requires_gradient_sync(last)
        with model.no_sync() if self.kind == "ddp" and not last else contextlib.nullcontext():
            yield
        if last and self.experts is not None and self.kind == "ddp":
            self.experts.reduce_gradients()

    def batch(self, sampler: Any, micro_batch_size: int) -> torch.Tensor:
        """This rank's rows of the sampler's next global batch: its contiguous share, or
        under expert parallelism its part of each of its group's micro batches."""
        if self.experts is None:
            return sampler.next_batch(self.ranks.rank, self.ranks.world_size)
        mesh = self.experts.mesh
        return rows_for_rank(sampler.next_batch(mesh.replica, mesh.replicas), micro_batch_size,
                             mesh)

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """``clip_grad_norm_`` of the whole model's gradients, the same on every rank; the
        total norm as a plain tensor."""
        if self.experts is not None:
            return self.experts.clip_grad_norm(params, max_norm, self.full)
        return self.full(nn.utils.clip_grad_norm_(params, max_norm, foreach=True))

    def numel(self, param: torch.Tensor) -> int:
        """A parameter's size in the single-process model (FSDP's DTensors are whole)."""
        return self.experts.numel(param) if self.experts is not None else param.numel()

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean over ranks (gloo has no AVG reduction, hence SUM and a division)."""
        return self.sum(tensor) / self.ranks.world_size

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.distributed:
            return tensor
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    def full(self, tensor: torch.Tensor) -> torch.Tensor:
        """A plain tensor from FSDP's DTensors (the gradient norm is one); others as they are."""
        from torch.distributed.tensor import DTensor

        return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor

    def any(self, flag: bool) -> bool:
        """Whether any rank says yes: a signal reaches each rank at its own moment, and all
        must stop at the same step."""
        if not self.distributed:
            return flag
        value = torch.tensor([int(flag)])
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self._control)
        return bool(value)

    def full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Model and optimizer state in the single-process layout (parameter indices, as
        ``optimizer.state_dict()``). Under FSDP or expert parallelism every rank must call
        it (it gathers) and only rank 0 is sure to get the tensors."""
        model_state, optim_state = self._own_full_state(model, optimizer)
        if self.experts is None:
            return model_state, optim_state
        return (self.experts.full_model_state(model_state),
                self.experts.full_optim_state(optim_state, _param_names(model, optimizer),
                                              optimizer))

    def load_full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                        model_state: dict[str, Any], optim_state: dict[str, Any]) -> None:
        """The inverse of ``full_state``; every rank passes the whole checkpoint's state."""
        if self.experts is not None:
            model_state = self.experts.local_model_state(model_state)
            optim_state = self.experts.local_optim_state(optim_state,
                                                         _param_names(model, optimizer))
        self._load_own_full_state(model, optimizer, model_state, optim_state)

    def _own_full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer
                        ) -> tuple[dict[str, Any], dict[str, Any]]:
        if self.kind != "fsdp":
            return model.state_dict(), optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(model, options=options)
        optim_state = get_optimizer_state_dict(model, optimizer, options=options)
        return model_state, _by_index(optim_state) if self.ranks.is_main else {}

    def _load_own_full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                             model_state: dict[str, Any], optim_state: dict[str, Any]) -> None:
        if self.kind != "fsdp":
            model.load_state_dict(model_state)
            optimizer.load_state_dict(optim_state)
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, model_state, options=options)
        names = {id(p): name for name, p in model.named_parameters()}
        group_names = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
        set_optimizer_state_dict(model, optimizer, _by_name(optim_state, group_names),
                                 options=options)

    def finish(self) -> None:
        """Wait for every rank at the end of a run, so none tears the process group down
        while another is still writing or talking to it."""
        if self.distributed:
            dist.barrier(group=self._control)

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The optimizer's parameters' names in ``optimizer.state_dict()``'s index order."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _by_index(state: dict[str, Any]) -> dict[str, Any]:
    """``get_optimizer_state_dict``'s parameter names → ``optimizer.state_dict()``'s
    indices, numbered through the groups in order as the optimizer numbers them."""
    index: dict[str, int] = {}
    groups = [{**group, "params": [index.setdefault(name, len(index))
                                   for name in group["params"]]}
              for group in state["param_groups"]]
    return {"state": {index[name]: value for name, value in state["state"].items()},
            "param_groups": groups}


def _by_name(state: dict[str, Any], group_names: list[list[str]]) -> dict[str, Any]:
    """The inverse of ``_by_index``, for this optimizer's groups of named parameters."""
    flat = [name for names in group_names for name in names]
    groups = [{**group, "params": names}
              for group, names in zip(state["param_groups"], group_names, strict=True)]
    return {"state": {flat[i]: value for i, value in state["state"].items()},
            "param_groups": groups}


def setup(cfg: TrainConfig, precision: Precision) -> tuple[Parallel, Precision]:
    """The process group torchrun's environment describes, for ``train.parallel``, and
    ``precision`` on this rank's device. Refuses launches that cannot work."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.parallel == "none":
        if world_size > 1:
            raise UserError(f"launched as {world_size} processes but train.parallel is 'none': "
                            "set train.parallel=ddp or fsdp")
        return Parallel(), precision
    missing = [name for name in TORCHRUN_ENV if name not in os.environ]
    if missing:
        raise UserError(f"train.parallel={cfg.parallel} needs a torchrun launch "
                        f"({', '.join(missing)} not set): torchrun --nproc_per_node N "
                        "-m deepseek_mini train ...")
    ranks = Ranks(int(os.environ["RANK"]), world_size, int(os.environ["LOCAL_RANK"]))
    _check_combination(cfg, precision, ranks)
    if precision.device.type == "cuda":
        torch.cuda.set_device(ranks.local_rank)
        precision = dataclasses.replace(precision,
                                        device=torch.device("cuda", ranks.local_rank))
        dist.init_process_group("nccl", device_id=precision.device)
        control = dist.new_group(backend="gloo")
    else:
        dist.init_process_group("gloo")
        control = None
    return Parallel(cfg.parallel, ranks, control, cfg.expert_parallel), precision


def _check_combination(cfg: TrainConfig, precision: Precision, ranks: Ranks) -> None:
    per_step = cfg.micro_batch_size * ranks.world_size
    if cfg.batch_size % per_step:
        raise UserError(f"train.batch_size ({cfg.batch_size}) must be a multiple of "
                        f"train.micro_batch_size x processes ({cfg.micro_batch_size} x "
                        f"{ranks.world_size} = {per_step})")
    if cfg.compile:
        raise UserError(f"train.compile is not supported with train.parallel={cfg.parallel} "
                        "(set train.compile=false)")
    if cfg.parallel == "fsdp" and not hasattr(torch.distributed.fsdp, "fully_shard"):
        raise UserError(f"train.parallel=fsdp needs PyTorch 2.6 or newer (this is "
                        f"{torch.__version__}): use train.parallel=ddp")
    if ranks.world_size % cfg.expert_parallel:
        raise UserError(f"train.expert_parallel ({cfg.expert_parallel}) must divide the "
                        f"{ranks.world_size} processes into expert-parallel groups")
    if cfg.expert_parallel > 1 and precision.name == "fp16":
        raise UserError("train.precision fp16 (GradScaler) is not supported with "
                        "train.expert_parallel: use bf16 or fp32")
    if cfg.parallel == "fsdp" and precision.name == "fp16":
        raise UserError("train.precision fp16 (GradScaler) is not supported with "
                        "train.parallel=fsdp: use bf16 or fp32")
    if precision.device.type == "cuda" and ranks.local_rank >= torch.cuda.device_count():
        raise UserError(f"LOCAL_RANK {ranks.local_rank} has no GPU ({torch.cuda.device_count()} "
                        "visible): lower --nproc_per_node")
