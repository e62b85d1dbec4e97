"""The training loop: ``deepseek-mini train`` and ``train(cfg)``.

One optimizer step takes the global batch of ``train.batch_size`` sequences from the
seeded sampler, splits it into micro batches for gradient accumulation, clips the
gradient norm and steps the optimizer (train.optimizer) on its schedule. Losses and statistics
stay on the device between log lines, so the host waits on the device only when it
prints. Everything a run depends on (weights, optimizer, schedule, scaler, sampler
position, random generators, log window, counters) is in ``latest.pt``, so ``--resume``
continues as if the run had never stopped: on CPU in fp32 the losses match bit for bit.

Under torchrun (``train.parallel``: ddp or fsdp, distributed.py) each rank takes its
contiguous share of the same global batch and splits it into micro batches; gradients,
losses and validation are averaged over ranks, every rank computes and rank 0 alone
writes, so checkpoints and metrics read as a single process's.
"""

from __future__ import annotations

import contextlib
import math
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..allocator import keep_freed_memory
from ..config import Config
from ..data.instruct import sample_prompt
from ..data.tokens import prepare_data, val_batches
from ..data.windows import make_sampler
from ..errors import UserError
from ..evaluation import deepseek_forward, score
from ..expert_usage import CollapseWatch, ExpertUsage
from ..files import CONFIG_FILE, LATEST, METRICS_FILE, atomic_write_text
from ..inference.generate import generate
from ..inference.prompts import completion_text
from ..memory import check_fits
from ..model.sizes import flops_per_token, training_memory
from ..model.transformer import compile_model
from ..threads import busy_note, set_threads, user_chose_threads
from .distributed import Parallel, setup
from .eta import Eta, format_duration
from .log_window import LogWindow
from .mfu import format_flops, measure_matmul_peak
from .optim import build_optimizer, build_scheduler, lr_keys, set_trainable
from .precision import Precision, check_fp16_device, setup_precision
from .resume import check_changes, keep_schedule, kept_val_windows, val_windows
from .run_folder import claim_for_ranks
from .runlog import RunLog, continue_metrics
from .signals import StopRequest
from .state import Run, initial_model, resume_checkpoint, save
from .step import train_step
from .trackers import check_trackers, open_trackers

MAX_NONFINITE_STREAK = 10
SAMPLE_TOKENS = 100
FIRST_DOCUMENT_TOKENS = 512  # enough for an instruct record's fields and a story's opening


@dataclass
class TrainResult:
    step: int
    tokens_seen: int
    best_val: float | None
    last_val: float | None
    last_loss: float | None
    interrupted: bool
    out_dir: Path


def train(cfg: Config, resume: bool = False, stop_after: int | None = None,
          allow_changes: bool = False) -> TrainResult:
    """Train as ``cfg`` says; with ``resume``, continue from ``out_dir/latest.pt``.

    A resume refuses settings that change what the run is (data, seed) unless
    ``allow_changes``, and keeps the run's learning-rate decay (resume.py).

    ``stop_after`` ends this session after that many steps, saving ``latest.pt`` as a
    signal would, without touching the schedule (which still runs to ``max_steps``), so a
    long run can be trained in slices. With ``train.parallel`` ddp or fsdp, this is one
    rank of a torchrun launch.
    """
    if stop_after is not None and stop_after <= 0:
        raise UserError(f"--stop-after must be a positive number of steps, got {stop_after}")
    set_threads(cfg.train.threads, "train", "train.threads (--threads)")
    keep_freed_memory()
    parallel, precision = setup(cfg.train, setup_precision(cfg.train))
    try:
        check_fp16_device(precision)
        folder = claim_for_ranks(Path(cfg.train.out_dir), resume, parallel)
        try:
            result = _train(cfg, resume, stop_after, allow_changes, precision, parallel,
                            folder.notes if folder else [])
            parallel.finish()
            return result
        finally:
            if folder is not None:
                folder.release()
    finally:
        parallel.close()


def _train(cfg: Config, resume: bool, stop_after: int | None, allow_changes: bool,
           precision: Precision, parallel: Parallel, notes: list[str]) -> TrainResult:
    ranks = parallel.ranks
    out_dir = Path(cfg.train.out_dir)
    shards = ranks.world_size if parallel.kind == "fsdp" else 1
    check_fits(training_memory(cfg, shards), precision.device, "training this config")
    check_trackers(cfg.train.trackers if ranks.is_main else [])  # before the data's wait
    ckpt = resume_checkpoint(cfg, out_dir) if resume else None
    changes: list[str] = []
    windows = val_windows(cfg)
    if ckpt is not None:
        changes = check_changes(ckpt["config"], cfg, allow_changes)
        cfg = keep_schedule(ckpt["config"], cfg)
        windows, note = kept_val_windows(ckpt, cfg, out_dir / LATEST)
        notes = [*notes, *([note] if note else [])]
    data = prepare_data(cfg.data, cfg.train.seed, cfg.model.vocab_size,
                        cfg.model.max_position, progress=ranks.is_main)
    torch.manual_seed(cfg.train.seed)
    # training mode whatever the source (a loaded checkpoint is in eval mode): model.dropout
    model = initial_model(cfg, ckpt, data.train).to(precision.device).train()
    set_trainable(model, cfg.train.trainable)
    train_model = parallel.wrap(model, precision)
    if cfg.train.compile:
        train_model = compile_model(train_model)
    optimizer = build_optimizer(model, cfg.train)
    run = Run(cfg, parallel, precision, model, train_model, optimizer,
              build_scheduler(optimizer, cfg.train),
              make_sampler(data.train, cfg.data, cfg.train.batch_size, cfg.train.seed,
                           data.tokenizer.eos_id),
              LogWindow.zeros(precision.device), CollapseWatch())
    run.val_windows = windows
    if ckpt is not None:
        run.load_state_dict(ckpt, out_dir / LATEST)
    if ranks.is_main:
        if resume:
            continue_metrics(out_dir / METRICS_FILE, run.step)
        atomic_write_text(cfg.to_yaml(), out_dir / CONFIG_FILE)
    trackers = (open_trackers(cfg.train.trackers, out_dir, cfg.to_dict())
                if ranks.is_main else [])
    log = RunLog(out_dir, enabled=ranks.is_main, resume=resume,
                 total_steps=cfg.train.max_steps, start_step=run.step, trackers=trackers)
    try:
        for note in notes:
            log.info(note)
        # the run's windows, whatever the micro batch, scored a micro batch at a time
        evals = (list(val_batches(data.val, cfg.data.seq_len, windows, 1)[0]
                      .split(cfg.train.micro_batch_size))
                 if len(data.val) > cfg.data.seq_len else [])
        stop_step = run.step + stop_after if stop_after is not None else None
        prompt = sample_prompt(first_document(data.val if len(data.val) else data.train,
                                              data.tokenizer))
        interrupted = _loop(run, log, evals, data.tokenizer, prompt, ckpt, changes,
                            stop_step)
    finally:
        log.close()
    return TrainResult(run.step, run.tokens_seen, run.best_val, run.last_val, run.last_loss,
                       interrupted, out_dir)


def first_document(tokens: Any, tokenizer: Any) -> str:
    """The text of the first document in a token split (up to its end-of-text), at most
    ``FIRST_DOCUMENT_TOKENS`` tokens of it."""
    ids = [int(t) for t in tokens[:FIRST_DOCUMENT_TOKENS]]
    while ids and ids[0] == tokenizer.eos_id:
        ids.pop(0)
    if tokenizer.eos_id in ids:
        ids = ids[:ids.index(tokenizer.eos_id)]
    return tokenizer.decode(ids)


def _loop(run: Run, log: RunLog, evals: list[torch.Tensor], tokenizer: Any, prompt: str,
          ckpt: dict[str, Any] | None, changes: list[str], stop_step: int | None) -> bool:
    """Steps until ``max_steps``, ``stop_step`` or a signal; True when a signal stopped it."""
    cfg, tcfg = run.cfg, run.cfg.train
    tokens_per_step = tcfg.batch_size * cfg.data.seq_len
    flops = flops_per_token(cfg.model, cfg.data.seq_len)
    # Every process drives its own device: the run's peak is the sum.
    peak = measure_matmul_peak(run.precision.device, run.precision.dtype) * run.ranks.world_size
    _announce(run, log, ckpt, changes, peak, flops)
    run.window.started = time.perf_counter()
    run.saved_step, run.saved_skips = run.step, int(run.window.skipped_total)
    stopping = False
    with StopRequest(log.info) as stop:
        end = tcfg.max_steps if stop_step is None else min(stop_step, tcfg.max_steps)
        eta = Eta(run.step, end, tcfg.max_steps,
                  {"eval": tcfg.eval_interval if evals else 0, "sample": tcfg.sample_interval,
                   "save": tcfg.save_interval}, tokens_per_step)
        while run.step < end and not stopping:
            lr = run.scheduler.get_last_lr()[0]
            batch = run.parallel.batch(run.sampler, tcfg.micro_batch_size)
            stats, finite = train_step(run.train_model, run.optimizer, batch,
                                       tcfg.micro_batch_size, tcfg.grad_clip, run.precision,
                                       run.parallel, tcfg.mtp_loss_weight)
            run.scheduler.step()
            run.step += 1
            run.tokens_seen += tokens_per_step
            run.window.add(stats, finite, tokens_per_step)
            last = run.step == tcfg.max_steps
            if run.step % tcfg.log_interval == 0 or run.step == 1 or last:
                _log_train(run, log, lr, flops, peak, eta.seconds_left(run.step))
            elif run.step % MAX_NONFINITE_STREAK == 0:
                _check_streak(run)
            log.advance(_progress(run, eta))
            improved = False
            if evals and (run.step % tcfg.eval_interval == 0 or last):
                with _timed(eta, "eval"):
                    improved = _evaluate(run, log, evals)
            if run.step % tcfg.sample_interval == 0 or last:
                with _timed(eta, "sample"):
                    _sample(run, log, tokenizer, prompt)
            stopping = run.parallel.any(stop.requested is not None)
            save_latest = run.step % tcfg.save_interval == 0 or run.step == end or stopping
            if improved or save_latest:
                with _timed(eta, "save"):
                    save(run, best=improved, latest=save_latest)
            eta.step_done(run.step)
    if stopping:
        log.info(f"stopped by {stop.requested or 'a signal to another process'} at step "
                 f"{run.step}; {LATEST} saved (continue with --resume)")
        return True
    if run.step < tcfg.max_steps:
        log.info(f"paused at step {run.step} of {tcfg.max_steps}; {LATEST} saved "
                 "(continue with --resume)")
        return False
    log.info(f"done: {run.step} steps, {run.tokens_seen:,} tokens, "
             f"{run.elapsed():.1f}s; best val CE {_fmt(run.best_val)}")
    return False


@contextlib.contextmanager
def _timed(eta: Eta, kind: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    eta.periodic(kind, time.perf_counter() - started)


def _progress(run: Run, eta: Eta) -> str | None:
    """The progress bar's postfix: the last loss, and the steady rate and the time left
    once they are measured (the bar's own, counted from the first step and through every
    validation pause, would be neither)."""
    parts = [] if run.last_loss is None else [f"loss {run.last_loss:.3f}"]
    rate, left = eta.tokens_per_s(run.step), eta.seconds_left(run.step)
    if rate is not None:
        parts.append(f"{rate:,.0f} tok/s")
    if left is not None:
        parts.append(f"eta {format_duration(left)}")
    return ", ".join(parts) or None


def _announce(run: Run, log: RunLog, ckpt: dict[str, Any] | None, changes: list[str],
              peak: float, flops: int) -> None:
    cfg = run.cfg
    count = run.parallel.numel  # whole-model sizes, experts split over ranks or not
    n_params = sum(count(p) for p in run.model.parameters())
    mtp = sum(count(p) for p in run.model.mtp.parameters())
    trained = sum(count(p) for p in run.model.parameters() if p.requires_grad)
    world = run.ranks.world_size
    split = f"{run.parallel.describe()} x " if world > 1 else ""
    log.info(f"model: {n_params:,} parameters"
             + (f" ({mtp:,} in {cfg.model.mtp_depth} MTP modules)" if mtp else "")
             + (f", {trained:,} trained" if trained < n_params else "")
             + f", {flops:,} train FLOPs/token; "
             f"{run.precision.describe()}; batch {cfg.train.batch_size} x {cfg.data.seq_len} "
             f"({split}{cfg.train.grad_accum_steps // world} micro batches of "
             f"{cfg.train.micro_batch_size})")
    log.info(f"MFU against a measured peak of {format_flops(peak)} "
             f"({run.precision.name} {peak_source(run.precision)}"
             + (f", x {world} processes)" if world > 1 else ")"))
    if ckpt is None and cfg.train.warm_start is not None:
        log.info(f"warm start: model weights from {cfg.train.warm_start}; optimizer, schedule "
                 "and data order start fresh")
    if ckpt is not None:
        log.info(f"resumed from {run.out_dir / LATEST} at step {run.step}"
                 + (f"; changed settings: {'; '.join(changes)}" if changes else
                    "; settings as saved"))
        if cfg.train.schedule_steps != cfg.train.max_steps:
            log.info(f"learning rate: the {cfg.train.schedule} schedule reaches min_lr at step "
                     f"{cfg.train.schedule_steps} (train.decay_steps), then stays at "
                     f"{cfg.train.min_lr:g} to step {cfg.train.max_steps}")
    if run.precision.device.type == "cpu" and not user_chose_threads(cfg.train.threads):
        note = busy_note("--threads N (or train.threads)")
        if note:
            log.info(note)


def peak_source(precision: Precision) -> str:
    if precision.device.type == "cuda":
        return f"linear on {torch.cuda.get_device_name(precision.device)}"
    return f"linear on {torch.get_num_threads()} CPU threads"


def _log_train(run: Run, log: RunLog, lr: float, flops: int, peak: float,
               seconds_left: float | None) -> None:
    window = run.window
    sums, finite, skipped, streak = (window.sums.tolist(), int(window.finite_steps),
                                     int(window.skipped_total), int(window.streak))
    seconds = max(time.perf_counter() - window.started, 1e-9)
    tokens_per_s = window.tokens_timed / seconds
    mean = [s / finite if finite else math.nan for s in sums]
    loss, ce, aux, balance, z, grad_norm, mtp_ce = mean
    mtp = run.cfg.model.mtp_depth > 0
    mfu = flops * tokens_per_s / peak
    run.last_loss = loss
    elapsed = run.elapsed()
    skipped_now = window.steps - finite
    log.info(f"step {run.step:>6}/{run.cfg.train.max_steps} | loss {loss:.4f} | ce {ce:.4f} | "
             + (f"mtp ce {mtp_ce:.4f} | " if mtp else "")
             + f"aux {aux:.4f} | lr {lr:.2e} | {elapsed:7.1f}s | {tokens_per_s:,.0f} tok/s | "
             + (f"eta {format_duration(seconds_left)} | " if seconds_left is not None else "")
             + f"grad {grad_norm:.3f} | mfu {100 * mfu:.1f}% of {format_flops(peak)}"
             + (f" | skipped {skipped_now} non-finite steps ({skipped} in all)"
                if skipped_now else ""))
    log.metrics({"step": run.step, "loss": loss, "ce": ce, "aux": aux, "lr": lr,
                 "tokens_per_s": tokens_per_s, "elapsed_s": elapsed, "grad_norm": grad_norm,
                 "mfu": mfu, "peak_flops": peak, "balance_loss": balance, "z_loss": z,
                 "tokens_seen": run.tokens_seen, "skipped_steps": skipped,
                 "cpu_s": cpu_seconds(),
                 **({"mtp_ce": mtp_ce} if mtp else {})})
    window.reset()
    _raise_on_streak(run, streak)


def _check_streak(run: Run) -> None:
    """A read of one counter every ``MAX_NONFINITE_STREAK`` steps between log lines."""
    _raise_on_streak(run, int(run.window.streak))


def _raise_on_streak(run: Run, streak: int) -> None:
    if streak >= MAX_NONFINITE_STREAK:
        raise UserError(f"the loss was not finite for {streak} steps in a row (up to step "
                        f"{run.step}): lower {lr_keys(run.cfg.train)} or try "
                        "train.precision=fp32")


def _evaluate(run: Run, log: RunLog, batches: list[torch.Tensor]) -> bool:
    """Validation CE over the fixed batches, with expert usage; True when it is the best
    so far.

    Ranks score every ``world_size``-th batch and the sums are all-reduced. Under FSDP
    every forward is a collective, so a rank left without a batch in the last round
    runs the first one again and discards it.
    """
    model, device = run.model, run.precision.device
    rank, world = run.ranks.rank, run.ranks.world_size
    mine = batches[rank::world]
    mtp = run.cfg.model.mtp_depth > 0
    mtp_nll = torch.zeros((), dtype=torch.float64, device=device)
    forward = deepseek_forward(model, run.precision.autocast, mtp_nll if mtp else None)
    model.eval()
    totals = score(forward, mine, device)
    mine_nll = mtp_nll.clone()  # the repeated batch below is discarded
    if len(mine) < math.ceil(len(batches) / world):
        score(forward, batches[:1], device)
    model.train()
    # Only MoE layers have router statistics (not the first_k_dense ones, not MTP's): a
    # dense model (first_k_dense == num_layers) has none.
    moe_layers, experts = totals.counts.shape
    sums = run.parallel.sum(torch.cat([totals.nll[None], totals.tokens[None].double(),
                                       mine_nll[None], totals.counts.flatten(),
                                       totals.entropy])).cpu()
    tokens = float(sums[1])
    val_ce = float(sums[0]) / tokens
    val_mtp_ce = float(sums[2]) / tokens
    counts_end = 3 + moe_layers * experts
    usage = (ExpertUsage.from_counts(sums[3:counts_end].view(moe_layers, experts),
                                     sums[counts_end:] / tokens, run.cfg.model.first_k_dense)
             if moe_layers else None)
    improved = math.isfinite(val_ce) and (run.best_val is None or val_ce < run.best_val)
    if improved:
        run.best_val = val_ce
    run.last_val = val_ce
    log.info(f"step {run.step:>6} | val ce {val_ce:.4f} (best {_fmt(run.best_val)})"
             + (f" | val mtp ce {val_mtp_ce:.4f}" if mtp else "")
             + (f" | {usage.summary()}" if usage else ""))
    for warning in run.watch.update(usage) if usage else []:
        log.info(warning)
    log.metrics({"step": run.step, "val_ce": val_ce, "best_val_ce": run.best_val,
                 "tokens_seen": run.tokens_seen, "cpu_s": cpu_seconds(),
                 **({"val_mtp_ce": val_mtp_ce} if mtp else {}),
                 **(usage.to_dict() if usage else {})})
    return improved


def _sample(run: Run, log: RunLog, tokenizer: Any, prompt_text: str) -> None:
    """A greedy continuation of a prompt from the held-out data (``sample_prompt``): the
    quickest read of what the model has learnt. Greedy draws no random numbers, so it
    leaves a resumed run's RNG untouched."""
    prompt = torch.tensor([tokenizer.encode(prompt_text)], device=run.precision.device)
    room = min(SAMPLE_TOKENS, run.cfg.model.max_position - prompt.shape[1])
    if room <= 0 or prompt.shape[1] == 0:
        return
    run.model.eval()  # on every rank: under FSDP each forward gathers from all of them
    ids = generate(run.model, prompt, max_new_tokens=room, temperature=0.0,
                   eos_id=tokenizer.eos_id)
    run.model.train()
    if not run.ranks.is_main:
        return
    text = completion_text(tokenizer, ids[0, prompt.shape[1]:].tolist())
    log.info(f"sample at step {run.step} (greedy, from a validation document's opening):\n"
             f"{prompt_text}{text}")
    log.text(run.step, "sample", prompt_text + text)


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its finished children (the
    tokenising workers) since it started: what a CPU budget counts, whatever the load or
    the number of threads. A resumed session counts from its own start."""
    own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                         resource.RUSAGE_CHILDREN))
    return round(own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime, 2)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
