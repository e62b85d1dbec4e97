"""Expert parallelism on the CPU (gloo, 2 and 4 processes): routed experts split over ranks
with all-to-all dispatch train exactly as one process whose micro batches are an EP
group's micro batches together, for both routers, both expert activations, DDP and FSDP,
EP 2 and EP 2 x DP 2; checkpoints move between EP and one process."""

from __future__ import annotations

import copy
import multiprocessing
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
from test_distributed import free_port
from tiny_run import SMALL_MODEL, TINY_YAML

from deepseek_mini import Config
from deepseek_mini.model.transformer import DeepSeekMini
from deepseek_mini.train.distributed import Parallel, Ranks
from deepseek_mini.train.expert_parallel import ExpertParallelExperts
from deepseek_mini.train.optim import build_optimizer
from deepseek_mini.train.precision import setup_precision
from deepseek_mini.train.step import accumulate_gradients, train_step

ATOL = 1e-5
STEPS = 3
needs_fork = pytest.mark.skipif(sys.platform == "win32", reason="fork")


def _worker(fn: Callable, rank: int, world: int, port: int, args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    code = 0
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        fn(rank, world, *args)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    os._exit(code)


def spawn(fn: Callable, world: int, *args) -> None:
    """``fn(rank, world, *args)`` in ``world`` forked processes sharing a gloo group; each
    asserts on its own, and the test fails if any rank does."""
    ctx = multiprocessing.get_context("fork")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, rank, world, port, args))
             for rank in range(world)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=240)
        if proc.is_alive():
            proc.kill()
    assert [proc.exitcode for proc in procs] == [0] * world


@dataclass
class Case:
    """A model and its batch: ``rows`` sequences of ``seq_len + 1`` tokens per step."""

    model: dict
    micro: int = 1  # rows per micro batch on each rank
    rows: int = 8
    seq_len: int = 12
    force: list[int] | None = None  # sigmoid biases that force every token's experts

    def config(self) -> Config:
        model = {**SMALL_MODEL, "hidden_size": 32, "num_heads": 2, "kv_latent_dim": 16,
                 "expert_hidden": 16, **self.model}
        return Config.from_yaml(TINY_YAML, overrides=[
            *(f"model.{k}={v}" for k, v in model.items()), "train.device=cpu",
            "train.precision=fp32"])


def _batches(case: Case, vocab: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab, (case.rows, case.seq_len + 1), generator=gen)
            for _ in range(STEPS + 1)]


class _Sampler:
    def __init__(self, batch: torch.Tensor) -> None:
        self.batch = batch

    def next_batch(self, rank: int, world: int) -> torch.Tensor:
        share = len(self.batch) // world
        return self.batch[rank * share:(rank + 1) * share]


def _force(model: DeepSeekMini, experts: list[int] | None) -> None:
    if experts is None:
        return
    for module in model.modules():
        if hasattr(module, "expert_bias"):
            module.expert_bias[experts] = 100.0


def _full_grads(model: torch.nn.Module, parallel: Parallel) -> dict[str, torch.Tensor]:
    """Every parameter's gradient, whole: FSDP's gathered, the experts' over their group."""
    grads = {}
    for name, p in model.named_parameters():
        grad = parallel.full(p.grad)
        if parallel.experts.holds(p):
            grad = torch.cat(_gather(grad, parallel.experts.mesh.group))
        grads[name] = grad
    return grads


def _gather(tensor: torch.Tensor, group) -> list[torch.Tensor]:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return parts


def check_cases(rank: int, world: int, kinds: list[str], cases: list[Case]) -> None:
    """Each case, under each kind, against one process on the same global batch."""
    for kind in kinds:
        parallel = Parallel(kind, Ranks(rank, world, rank), None, expert_parallel=2)
        for case in cases:
            _check(case, parallel, world)


def _check(case: Case, parallel: Parallel, world: int) -> None:
    cfg = case.config()
    precision = setup_precision(cfg.train)
    torch.manual_seed(0)
    reference = DeepSeekMini(cfg.model)
    _force(reference, case.force)
    model = copy.deepcopy(reference)
    group_micro = case.micro * parallel.expert_parallel
    ref_opt = build_optimizer(reference, cfg.train)
    train_model = parallel.wrap(model, precision)
    optimizer = build_optimizer(model, cfg.train)
    batches = _batches(case, cfg.model.vocab_size)
    where = f"{parallel.kind} x{world} {case}"

    # Gradients of every parameter after one step's micro batches
    ref_losses, _ = accumulate_gradients(reference, batches[0], group_micro, precision)
    mine = parallel.batch(_Sampler(batches[0]), case.micro)
    losses, _ = accumulate_gradients(train_model, mine, case.micro, precision, parallel)
    torch.testing.assert_close(parallel.mean(losses), ref_losses, rtol=0, atol=ATOL, msg=where)
    grads = _full_grads(model, parallel)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=0, atol=ATOL,
                                   msg=f"{where}: grad {name}")
    reference.zero_grad(set_to_none=True)
    optimizer.zero_grad(set_to_none=True)

    # Three optimizer steps: losses, norms, weights and AdamW state
    for batch in batches[1:]:
        ref_stats, _ = train_step(reference, ref_opt, batch, group_micro, 1.0, precision)
        stats, _ = train_step(train_model, optimizer, parallel.batch(_Sampler(batch), case.micro),
                              case.micro, 1.0, precision, parallel)
        torch.testing.assert_close(stats, ref_stats, rtol=0, atol=ATOL, msg=where)
    model_state, optim_state = parallel.full_state(model, optimizer)
    if parallel.ranks.is_main:
        for name, tensor in reference.state_dict().items():
            torch.testing.assert_close(model_state[name], tensor, rtol=0, atol=ATOL,
                                       msg=f"{where}: {name}")
        for index, state in ref_opt.state_dict()["state"].items():
            for key, value in state.items():
                torch.testing.assert_close(optim_state["state"][index][key], value, rtol=0,
                                           atol=ATOL, msg=f"{where}: optimizer {index} {key}")
    experts = [m for m in model.modules() if isinstance(m, ExpertParallelExperts)]
    assert experts and all(m.w_up.shape[0] == cfg.model.num_experts // 2 for m in experts)


CASES = [
    Case({"router": "softmax", "expert_activation": "gelu"}),
    Case({"router": "sigmoid", "expert_activation": "swiglu", "bias_update_rate": 0.01,
          "seq_aux_loss_coef": 0.01}),
]


@needs_fork
def test_ep2_matches_one_process():
    spawn(check_cases, 2, ["ddp", "fsdp"], CASES)
