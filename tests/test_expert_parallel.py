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
from deepseek_mini.inference.generate import generate
from deepseek_mini.model.transformer import DeepSeekMini
from deepseek_mini.train.distributed import Parallel, Ranks
from deepseek_mini.train.expert_parallel import ExpertParallelExperts
from deepseek_mini.train.optim import build_optimizer
from deepseek_mini.train.precision import setup_precision
from deepseek_mini.train.step import accumulate_gradients, train_step

ATOL = 1e-5
# AdamW divides by the root of its second moment, so on a weight whose gradient is near 0
# the last bits of a sum in another order move the update by a share of lr: at the tiny
# config's 3e-3, even plain DDP drifted 1.5e-5 from one process on the V3 layout in 3 steps.
LR = 1e-3
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
            "train.precision=fp32", f"train.lr={LR}"])


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


def _close(actual: torch.Tensor, expected: torch.Tensor, where: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=ATOL,
                               msg=lambda detail: f"{where}: {detail}")


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
    experts = [m for m in model.modules() if isinstance(m, ExpertParallelExperts)]
    moe_layers = cfg.model.num_layers - cfg.model.first_k_dense + cfg.model.mtp_depth
    assert len(experts) == moe_layers
    assert all(m.w_up.shape[0] == cfg.model.num_experts // 2 for m in experts)

    # Loss and the gradient of every parameter over one step's micro batches
    ref_losses, _ = accumulate_gradients(reference, batches[0], group_micro, precision)
    mine = parallel.batch(_Sampler(batches[0]), case.micro)
    losses, _ = accumulate_gradients(train_model, mine, case.micro, precision, parallel)
    _close(parallel.mean(losses), ref_losses, where)
    grads = _full_grads(model, parallel)
    for name, p in reference.named_parameters():
        _close(grads[name], p.grad, f"{where}: grad {name}")
    if case.force is not None:
        _assert_forced(experts, parallel)
    reference.zero_grad(set_to_none=True)
    optimizer.zero_grad(set_to_none=True)

    # Three optimizer steps: losses, grad norm, then weights and AdamW state
    for batch in batches[1:]:
        ref_stats, _ = train_step(reference, ref_opt, batch, group_micro, 1.0, precision)
        stats, _ = train_step(train_model, optimizer, parallel.batch(_Sampler(batch), case.micro),
                              case.micro, 1.0, precision, parallel)
        _close(stats, ref_stats, where)
    model_state, optim_state = parallel.full_state(model, optimizer)
    if parallel.ranks.is_main:
        _assert_state(model_state, optim_state, reference, ref_opt, where)
    _assert_generates_alike(model, reference, cfg.model.vocab_size, where)


def _assert_forced(experts: list[ExpertParallelExperts], parallel: Parallel) -> None:
    """Every token chose expert 3 (rank 1 of the group): rank 0 kept none of its own and
    its experts received nothing; rank 1 received the whole group's."""
    for module in experts:
        sent, received = module.last_splits
        if parallel.experts.mesh.index == 0:
            assert sent[0] == 0 and sent[1] > 0 and received == [0, 0], module.last_splits
        else:
            assert sent[0] == 0 and received[0] > 0 and received[1] > 0, module.last_splits


def _assert_state(model_state: dict, optim_state: dict, reference: DeepSeekMini,
                  ref_opt: torch.optim.Optimizer, where: str) -> None:
    for name, tensor in reference.state_dict().items():
        _close(model_state[name], tensor, f"{where}: {name}")
    for index, state in ref_opt.state_dict()["state"].items():
        for key, value in state.items():
            _close(optim_state["state"][index][key], value, f"{where}: optimizer {index} {key}")


def _assert_generates_alike(model: DeepSeekMini, reference: DeepSeekMini, vocab: int,
                            where: str) -> None:
    """Greedy decoding with the cache through the split experts (every rank, the same
    prompt: each token's MoE layers are collectives) writes the one-process tokens."""
    prompt = torch.randint(0, vocab, (2, 5), generator=torch.Generator().manual_seed(3))
    model.eval()
    reference.eval()
    ids = generate(model, prompt, max_new_tokens=6, temperature=0.0)
    assert torch.equal(ids, generate(reference, prompt, max_new_tokens=6, temperature=0.0)), where
    model.train()
    reference.train()


CASES = [
    Case({"router": "softmax", "expert_activation": "gelu"}),
    Case({"router": "sigmoid", "expert_activation": "swiglu", "bias_update_rate": 0.01,
          "seq_aux_loss_coef": 0.01}),
]
# DeepSeek-V3's layout around the experts: a leading dense layer and an MTP module, whose
# MoE is split like the others.
V3_LAYOUT = Case({"router": "sigmoid", "expert_activation": "gelu", "num_layers": 3,
                  "first_k_dense": 1, "mtp_depth": 1, "bias_update_rate": 0.01})
# A forced router: every token's one expert is expert 3, on the group's second rank.
FORCED = Case({"router": "sigmoid", "expert_activation": "swiglu", "top_k": 1,
               "bias_update_rate": 0.0}, force=[3])


@needs_fork
def test_ep2_matches_one_process():
    """Softmax and sigmoid routers, GELU and SwiGLU experts, under DDP and FSDP."""
    spawn(check_cases, 2, ["ddp", "fsdp"],
          [*CASES, Case({"router": "softmax", "expert_activation": "swiglu"}), V3_LAYOUT])


@needs_fork
def test_ep2_by_dp2_matches_one_process():
    """Four ranks: two EP groups of two, each expert on two ranks (DDP's all-reduce or
    FSDP's reduce-scatter over the replicas); two micro batches per rank."""
    spawn(check_cases, 4, ["ddp", "fsdp"], CASES)


@needs_fork
def test_a_forced_router_sends_every_token_to_one_expert():
    """Rank 0's tokens all leave it and its experts get none; training still matches."""
    spawn(check_cases, 2, ["ddp", "fsdp"], [FORCED])
