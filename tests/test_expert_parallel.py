"""Expert parallelism on the CPU (gloo, 2 and 4 processes): routed experts split over ranks
with all-to-all dispatch train exactly as one process whose micro batches are an EP
group's micro batches together, for both routers, both expert activations, DDP and FSDP,
EP 2 and EP 2 x DP 2; checkpoints move between EP and one process."""

from __future__ import annotations

import copy
import os
import re
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from child_process import as_rank, run_forked, torchrun
from test_distributed import (
    DISTRIBUTED,
    assert_same_run,
    one_process,
    train_args,
    two_processes,
)
from tiny_run import SMALL_MODEL, TINY_YAML, tiny_overrides

from deepseek_mini import Config
from deepseek_mini.checkpoint import load_checkpoint
from deepseek_mini.cli.main import main
from deepseek_mini.data.instruct import sample_prompt
from deepseek_mini.data.tokens import prepare_data
from deepseek_mini.inference.generate import generate
from deepseek_mini.inference.prompts import completion_text
from deepseek_mini.model.transformer import DeepSeekMini
from deepseek_mini.train.distributed import Parallel, Ranks
from deepseek_mini.train.expert_parallel import ExpertParallelExperts
from deepseek_mini.train.loop import SAMPLE_TOKENS, first_document
from deepseek_mini.train.optim import build_optimizer
from deepseek_mini.train.precision import setup_precision
from deepseek_mini.train.step import accumulate_gradients, train_step

ATOL = 1e-5
# AdamW divides by the root of its second moment, so on a weight whose gradient is near 0
# the last bits of a sum taken in another order move the update by a share of lr: at the
# tiny config's lr, rounding alone moves weights past 1e-5 in one step (BENCHMARKS.md,
# "Expert parallelism", benchmarks/distributed/adam_rounding_floor.py). The EP runs are
# compared at a tenth of it.
LR = 3e-4
CLIP = 0.01  # below every step's gradient norm: the clipping is part of what must match
STEPS = 3
needs_fork = pytest.mark.skipif(sys.platform == "win32", reason="fork")


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
    as_rank(rank, world, port)
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
    # What the ranks would each import on their first optimizer (AdamW's constructor
    # imports torch._dynamo: seconds), imported once here for all of them.
    import torch._dynamo  # noqa: F401
    import torch.distributed.checkpoint.state_dict  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401

    run_forked(_worker, world, (fn, args), timeout=240)


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


def check_cases(rank: int, world: int, runs: list[tuple[str, Case]]) -> None:
    """Each (train.parallel, case) against one process on the same global batch."""
    parallels = {kind: Parallel(kind, Ranks(rank, world, rank), None, expert_parallel=2)
                 for kind in dict(runs)}
    for kind, case in runs:
        _check(case, parallels[kind], world)


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

    # Three optimizer steps, the gradients clipped: losses, grad norm, weights, AdamW state
    for batch in batches[1:]:
        ref_stats, _ = train_step(reference, ref_opt, batch, group_micro, CLIP, precision)
        stats, _ = train_step(train_model, optimizer, parallel.batch(_Sampler(batch), case.micro),
                              case.micro, CLIP, precision, parallel)
        _close(stats, ref_stats, where)
        assert ref_stats[5] > CLIP, "the clipping is not tested"
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


SOFTMAX_GELU = Case({"router": "softmax", "expert_activation": "gelu"})
SIGMOID_SWIGLU = Case({"router": "sigmoid", "expert_activation": "swiglu",
                       "bias_update_rate": 0.01, "seq_aux_loss_coef": 0.01})
SOFTMAX_SWIGLU = Case({"router": "softmax", "expert_activation": "swiglu"})
# DeepSeek-V3's layout around the experts: a leading dense layer and an MTP module, whose
# MoE is split like the others.
V3_LAYOUT = Case({"router": "sigmoid", "expert_activation": "gelu", "num_layers": 3,
                  "first_k_dense": 1, "mtp_depth": 1, "bias_update_rate": 0.01})
# A forced router: every token's one expert is expert 3, on the group's second rank.
FORCED = Case({"router": "sigmoid", "expert_activation": "swiglu", "top_k": 1,
               "bias_update_rate": 0.0}, force=[3])


@needs_fork
def test_ep2_matches_one_process():
    """Both routers and both expert activations, DDP and FSDP on the dense rest; micro
    batches of one row, four per rank."""
    spawn(check_cases, 2, [("ddp", SOFTMAX_GELU), ("ddp", SIGMOID_SWIGLU),
                           ("fsdp", SOFTMAX_SWIGLU), ("fsdp", V3_LAYOUT)])


@needs_fork
def test_ep2_by_dp2_matches_one_process():
    """Four ranks: two EP groups of two, each expert on two ranks (DDP: an all-reduce of
    the expert gradients over those two; FSDP: sharded over them); two micro batches per
    rank."""
    spawn(check_cases, 4, [("ddp", SOFTMAX_GELU), ("fsdp", SIGMOID_SWIGLU)])


@needs_fork
def test_a_forced_router_sends_every_token_to_one_expert():
    """Rank 0's tokens all leave it and its experts get none; training still matches."""
    spawn(check_cases, 2, [("ddp", FORCED), ("fsdp", FORCED)])


# The command line: the tiny training setup of test_distributed.py (global batch 4). Two EP
# ranks with micro batches of 1 dispatch 2 rows together: one process with micro batches
# of 2 is the run they must reproduce. Both validate on eval_batches x batch_size = 12 of
# the 21 windows of a 1% split, the same 12 whatever the micro batch and the processes.
EP = ["--set", "train.expert_parallel=2"]


@pytest.fixture(scope="module")
def ep_overrides(tmp_path_factory) -> list[str]:
    return [*tiny_overrides(tmp_path_factory.mktemp("ep-data")), *DISTRIBUTED,
            "data.val_fraction=0.01", "train.eval_batches=3", f"train.lr={LR}",
            f"train.min_lr={LR / 10}"]


@pytest.fixture(scope="module")
def ep_reference(ep_overrides, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ep-reference")
    one_process(train_args(ep_overrides, out, "--set", "train.micro_batch_size=2"))
    return out


@pytest.fixture(scope="module")
def ep_run(ep_overrides, tmp_path_factory) -> Path:
    """The user-facing launch: torchrun, FSDP on the dense rest, experts split 2 ways."""
    out = tmp_path_factory.mktemp("ep-run")
    torchrun(*train_args(ep_overrides, out, "--set", "train.parallel=fsdp", *EP))
    return out


def test_ep_under_torchrun_matches_one_process(ep_run, ep_reference):
    """Losses, validation, global expert counts, weights and AdamW state of 8 steps."""
    assert_same_run(ep_run, ep_reference)
    log = (ep_run / "train.log").read_text()
    assert "2 fsdp processes (routed experts split over groups of 2) x 2 micro batches" in log
    want = (ep_reference / "train.log").read_text()
    assert re.search(r"model: ([\d,]+) parameters", log)[1] == re.search(
        r"model: ([\d,]+) parameters", want)[1]


@needs_fork
def test_an_ep_run_stopped_and_resumed_equals_the_uninterrupted_run(ep_overrides, ep_run,
                                                                    tmp_path):
    args = train_args(ep_overrides, tmp_path, "--set", "train.parallel=ddp", *EP)
    two_processes([*args, "--stop-after", "4"])
    assert load_checkpoint(tmp_path / "latest.pt")["step"] == 4
    two_processes([*args, "--resume"])
    assert_same_run(tmp_path, ep_run)


@needs_fork
def test_an_ep_checkpoint_resumes_in_one_process(ep_overrides, ep_reference, tmp_path):
    """A change of layout, not of what the run is: no --allow-changes."""
    two_processes([*train_args(ep_overrides, tmp_path, "--set", "train.parallel=fsdp", *EP),
                   "--stop-after", "4"])
    one_process([*train_args(ep_overrides, tmp_path, "--set", "train.parallel=none",
                             "--set", "train.expert_parallel=1",
                             "--set", "train.micro_batch_size=2"), "--resume"])
    assert_same_run(tmp_path, ep_reference)
    log = (tmp_path / "train.log").read_text()
    assert "train.expert_parallel: 2 -> 1" in log


@needs_fork
def test_a_one_process_checkpoint_resumes_under_ep(ep_overrides, ep_reference, tmp_path):
    one_process([*train_args(ep_overrides, tmp_path, "--set", "train.micro_batch_size=2"),
                 "--stop-after", "4"])
    two_processes([*train_args(ep_overrides, tmp_path, "--set", "train.parallel=ddp", *EP),
                   "--resume"])
    assert_same_run(tmp_path, ep_reference)


def test_an_ep_checkpoint_generates_the_same_tokens_in_one_process(ep_overrides, ep_run):
    """The sample the EP ranks wrote at step 8 (greedy, through the split experts), again
    in one process from the saved ``latest.pt``."""
    log = (ep_run / "train.log").read_text()
    logged = log.split("sample at step 8 (greedy, from a validation document's opening):\n")[1]
    logged = logged.split("\ndone: ")[0]
    cfg = Config.from_dict(load_checkpoint(ep_run / "latest.pt")["config"])
    data = prepare_data(cfg.data, cfg.train.seed, cfg.model.vocab_size, cfg.model.max_position,
                        progress=False)
    model = DeepSeekMini.from_checkpoint(ep_run / "latest.pt").eval()
    prompt_text = sample_prompt(first_document(data.val, data.tokenizer))
    prompt = torch.tensor([data.tokenizer.encode(prompt_text)])
    room = min(SAMPLE_TOKENS, cfg.model.max_position - prompt.shape[1])
    ids = generate(model, prompt, max_new_tokens=room, temperature=0.0,
                   eos_id=data.tokenizer.eos_id)
    assert prompt_text + completion_text(data.tokenizer, ids[0, prompt.shape[1]:].tolist()) \
        == logged


@pytest.mark.parametrize("extra, message", [
    (["train.expert_parallel=3"], r"train.expert_parallel \(3\) must divide model.num_experts"),
    (["train.expert_parallel=2"], "train.expert_parallel=2 needs train.parallel ddp or fsdp"),
])
def test_expert_parallel_settings_that_cannot_work_are_one_error_line(ep_overrides, tmp_path,
                                                                      capsys, extra, message):
    args = train_args(ep_overrides, tmp_path)
    for item in extra:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err


def test_processes_that_do_not_divide_into_ep_groups_are_one_error_line(
        ep_overrides, tmp_path, monkeypatch, capsys):
    for name, value in {"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    args = train_args(ep_overrides, tmp_path, "--set", "train.parallel=ddp", *EP,
                      "--set", "train.batch_size=6", "--set", "train.micro_batch_size=2")
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: train.expert_parallel (2) must divide the 3 processes into "
                   "expert-parallel groups"], err
