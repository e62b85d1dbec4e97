"""train.optimizer: muon: which parameters Muon takes, per-expert orthogonalisation of the
stacked expert weights without copies, the skipped non-finite step, exact resume, and the
refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_run import TINY_YAML, tiny_overrides
from training_steps import random_batch, skipped_non_finite_step

from deepseek_mini import Config, DeepSeekMini, UserError
from deepseek_mini.checkpoint import load_checkpoint
from deepseek_mini.cli.main import main
from deepseek_mini.train.loop import train
from deepseek_mini.train.muon import MuonWithAdamW
from deepseek_mini.train.optim import build_optimizer, build_scheduler, set_trainable
from deepseek_mini.train.precision import setup_precision
from deepseek_mini.train.step import train_step

SMALL = ["model.hidden_size=32", "model.num_heads=2", "model.num_layers=2",
         "model.vocab_size=128", "model.expert_hidden=24", "model.num_experts=4",
         "model.kv_latent_dim=16", "train.device=cpu", "train.precision=fp32",
         "train.optimizer=muon", "train.muon_lr=0.01"]


def small(*extra: str) -> Config:
    return Config.from_yaml(None, [*SMALL, *extra])


def storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def owners(model: torch.nn.Module, optimizer: MuonWithAdamW) -> tuple[list[str], list[str]]:
    """The names of the parameters AdamW updates and those Muon updates (a stacked expert
    weight counts once per expert view of its storage)."""
    names = {id(p): n for n, p in model.named_parameters()}
    by_storage = {storage(p): n for n, p in model.named_parameters()}
    adamw = [names[id(p)] for g in optimizer.adamw.param_groups for p in g["params"]]
    muon = [names.get(id(p)) or by_storage[storage(p)]
            for g in optimizer.muon.param_groups for p in g["params"]]
    return adamw, muon


@pytest.mark.parametrize("extra", [
    [], ["model.tie_embeddings=false", "model.expert_activation=swiglu"],
    ["model.first_k_dense=1", "model.router=sigmoid", "model.attention=latent_rope",
     "model.q_lora_rank=8", "model.mtp_depth=1"],
])
def test_muon_and_adamw_cover_every_trainable_parameter_once(extra):
    cfg = small(*extra)
    model = DeepSeekMini(cfg.model)
    optimizer = build_optimizer(model, cfg.train)
    adamw, muon = owners(model, optimizer)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert not set(adamw) & set(muon)
    assert sorted(set(adamw) | set(muon)) == sorted(trainable)
    assert len(adamw) == len(set(adamw))
    experts = cfg.model.num_experts
    for name, p in model.named_parameters():
        count = muon.count(name)
        if p.dim() == 3:
            assert count == experts, name  # one view per expert
        elif name in muon:
            assert count == 1 and p.dim() == 2, name
    on_adamw = set(adamw)
    assert "embed.weight" in on_adamw and "norm.weight" in on_adamw
    assert all(n in on_adamw for n in trainable if "router" in n or "norm" in n)
    if not cfg.model.tie_embeddings:
        assert "lm_head.weight" in on_adamw
    assert all(n in muon for n in trainable
               if n.endswith(("proj.weight", "up.weight", "down.weight", "w_up", "w_down")))


def test_muon_experts_false_gives_the_stacked_expert_weights_to_adamw():
    cfg = small("train.muon_experts=false")
    model = DeepSeekMini(cfg.model)
    adamw, muon = owners(model, build_optimizer(model, cfg.train))
    stacked = [n for n, p in model.named_parameters() if p.dim() == 3]
    assert stacked and all(n in adamw and n not in muon for n in stacked)
    assert sorted(adamw + muon) == sorted(n for n, _ in model.named_parameters())
    default_adamw, default_muon = owners(model, build_optimizer(model, small().train))
    assert set(muon) == set(default_muon) - set(stacked)  # the dense matrices stay on Muon


def test_trainable_mtp_gives_muon_only_the_mtp_matrices():
    cfg = small("model.mtp_depth=1", "train.trainable=mtp")
    model = DeepSeekMini(cfg.model)
    set_trainable(model, "mtp")
    adamw, muon = owners(model, build_optimizer(model, cfg.train))
    assert muon and all(n.startswith("mtp.") for n in adamw + muon)
    assert "mtp.0.proj.weight" in muon and "mtp.0.layer.moe.router.weight" in adamw


@pytest.mark.parametrize("ns_steps,ns_precision", [(5, "bf16"), (2, "bf16"), (5, "fp32")])
def test_a_stacked_expert_weight_is_updated_as_separate_2d_muon_matrices_without_copies(
        ns_steps, ns_precision):
    from deepseek_mini.train.muon import Fp32NewtonSchulzMuon

    cfg = small("model.expert_activation=swiglu", f"train.muon_ns_steps={ns_steps}",
                f"train.muon_ns_precision={ns_precision}")
    torch.manual_seed(0)
    model = DeepSeekMini(cfg.model)
    optimizer = build_optimizer(model, cfg.train)
    experts = model.layers[0].moe.experts
    stacked = [experts.w_up, experts.w_gate, experts.w_down]
    # Reference: each expert's [out, in] matrix as a parameter of its own.
    refs = [[torch.nn.Parameter(w.detach()[e].T.contiguous()) for e in range(w.shape[0])]
            for w in stacked]
    muon = torch.optim.Muon if ns_precision == "bf16" else Fp32NewtonSchulzMuon
    reference = muon([p for ps in refs for p in ps], lr=0.01, weight_decay=0.1,
                                 momentum=0.95, adjust_lr_fn="match_rms_adamw",
                                 ns_steps=ns_steps)
    views = {storage(w): [] for w in stacked}
    for g in optimizer.muon.param_groups:
        for p in g["params"]:
            views.get(storage(p), []).append(p)
    for seed in range(3):  # momentum carries over: three steps
        optimizer.zero_grad()
        model(random_batch(2, 8, 128, seed)[:, :-1],
              targets=random_batch(2, 8, 128, seed)[:, 1:]).loss.backward()
        for w, ps in zip(stacked, refs, strict=True):
            for e, view in enumerate(views[storage(w)]):
                assert storage(view.grad) == storage(w.grad)  # a view, not a copy
                assert view.data_ptr() == w[e].data_ptr()
                ps[e].grad = w.grad[e].T.contiguous()
        if seed:  # the trainer's path: a finite step's flag (and none on the first)
            optimizer.found_inf = torch.zeros(())
        optimizer.step()
        optimizer.__dict__.pop("found_inf", None)
        reference.step()
        for w, ps in zip(stacked, refs, strict=True):
            for e in range(w.shape[0]):
                assert torch.equal(w.detach()[e].T, ps[e].detach()), (e, seed)


def test_a_non_finite_step_leaves_weights_and_both_states_unchanged():
    cfg = small()
    model = DeepSeekMini(cfg.model)
    optimizer = build_optimizer(model, cfg.train)
    precision = setup_precision(cfg.train)
    batch = random_batch(4, 16, 128)
    before, state_before = skipped_non_finite_step(model, optimizer, batch, precision)
    after = optimizer.state_dict()
    for part in ("adamw", "muon"):
        assert after[part]["state"].keys() == state_before[part]["state"].keys()
        for index, state in after[part]["state"].items():
            for key, value in state.items():
                assert torch.equal(value, state_before[part]["state"][index][key]), (part, key)
    _, finite = train_step(model, optimizer, batch, 4, 1.0, precision)
    assert bool(finite)
    assert not torch.equal(model.layers[0].moe.experts.w_up, before["layers.0.moe.experts.w_up"])


def test_the_schedule_scales_muon_by_the_same_factor():
    cfg = small("train.lr=0.002", "train.muon_lr=0.02", "train.warmup_steps=4")
    model = DeepSeekMini(cfg.model)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    optimizer.step()  # no gradients yet: nothing moves
    scheduler.step()
    lrs = [g["lr"] for g in optimizer.param_groups]
    assert lrs[:2] == pytest.approx([0.002 * 2 / 4] * 2)
    assert lrs[2:] == pytest.approx([0.02 * 2 / 4])


def test_a_loaded_state_keeps_this_runs_muon_settings_and_the_saved_moments():
    cfg = small()
    torch.manual_seed(0)
    model = DeepSeekMini(cfg.model)
    saved = build_optimizer(model, cfg.train)
    train_step(model, saved, random_batch(4, 16, 128), 4, 1.0, setup_precision(cfg.train))
    changed = small("train.muon_ns_steps=3", "train.muon_momentum=0.9",
                    "train.muon_adjust_lr=original")
    resumed = build_optimizer(model, changed.train)
    resumed.load_state_dict(copy.deepcopy(saved.state_dict()))
    group = resumed.muon.param_groups[0]
    assert (group["ns_steps"], group["momentum"], group["adjust_lr_fn"]) == (3, 0.9, "original")
    for p, q in zip(saved.muon.param_groups[0]["params"], group["params"], strict=True):
        assert torch.equal(saved.muon.state[p]["momentum_buffer"],
                           resumed.muon.state[q]["momentum_buffer"])


@pytest.mark.parametrize("steps", [0, 100])
def test_newton_schulz_steps_outside_torchs_range_are_a_config_error(steps):
    with pytest.raises(UserError, match=f"train.muon_ns_steps must be in 1..99, got {steps}"):
        small(f"train.muon_ns_steps={steps}")


@pytest.fixture(scope="module")
def data_overrides(tmp_path_factory) -> list[str]:
    return [*tiny_overrides(tmp_path_factory.mktemp("muon-data")), "train.optimizer=muon",
            "train.muon_lr=0.01"]


def run_config(data_overrides: list[str], out, *extra: str) -> Config:
    return Config.from_yaml(TINY_YAML, [*data_overrides, f"train.out_dir={out}", *extra])


def test_resume_with_muon_reproduces_the_uninterrupted_run_exactly(data_overrides, tmp_path):
    steps = ["train.max_steps=12", "train.save_interval=5"]
    train(run_config(data_overrides, tmp_path / "straight", *steps))
    train(run_config(data_overrides, tmp_path / "sliced", *steps), stop_after=6)
    train(run_config(data_overrides, tmp_path / "sliced", *steps), resume=True)
    a = load_checkpoint(tmp_path / "straight" / "latest.pt")
    b = load_checkpoint(tmp_path / "sliced" / "latest.pt")
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for part in ("adamw", "muon"):
        for index, state in a["optimizer"][part]["state"].items():
            for key, value in state.items():
                assert torch.equal(value, b["optimizer"][part]["state"][index][key])
    assert a["best_val"] == b["best_val"]


def test_resume_refuses_to_change_the_optimizer(data_overrides, tmp_path):
    train(run_config(data_overrides, tmp_path, "train.max_steps=1"))
    with pytest.raises(UserError, match=r"cannot change train.optimizer \(muon -> adamw\)"):
        train(run_config(data_overrides, tmp_path, "train.optimizer=adamw"), resume=True,
              allow_changes=True)


@pytest.mark.parametrize("extra, message", [
    (["train.parallel=fsdp"], "muon is not supported with train.parallel=fsdp"),
    (["train.parallel=ddp", "train.expert_parallel=2"],
     "muon is not supported with train.expert_parallel=2: use train.expert_parallel=1"),
])
def test_muon_with_fsdp_or_expert_parallelism_is_one_error_line(extra, message, tmp_path,
                                                                 capsys):
    with pytest.raises(UserError, match=message):
        small(*extra)
    args = ["train", "--config", str(TINY_YAML), "--set", "train.optimizer=muon",
            "--set", f"train.out_dir={tmp_path}", *[a for e in extra for a in ("--set", e)]]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_training_only_the_mtp_modules_with_muon_leaves_the_main_model_alone(data_overrides,
                                                                              tmp_path):
    train(run_config(data_overrides, tmp_path, "model.mtp_depth=1", "train.trainable=mtp",
                     "train.max_steps=2"))
    model = load_checkpoint(tmp_path / "latest.pt")["model"]
    torch.manual_seed(run_config(data_overrides, tmp_path).train.seed)
    initial = DeepSeekMini(run_config(data_overrides, tmp_path, "model.mtp_depth=1").model)
    for name, tensor in initial.state_dict().items():
        assert torch.equal(model[name], tensor) != name.startswith("mtp."), name


def _newton_schulz_fp64(update: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """torch.optim.Muon's iteration, exactly as it writes it, in fp64."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = update.double()
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / x.norm().clamp(min=1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (24, 24)])
def test_fp32_newton_schulz_is_torchs_iteration_closer_to_exact_than_bf16(shape):
    from torch.optim._muon import _zeropower_via_newtonschulz

    from deepseek_mini.train.muon import newton_schulz

    updates = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0))
    ours = newton_schulz(updates, (3.4445, -4.7750, 2.0315), 5, 1e-7)
    for update, fp32 in zip(updates, ours, strict=True):
        exact = _newton_schulz_fp64(update)
        bf16 = _zeropower_via_newtonschulz(update, (3.4445, -4.7750, 2.0315), 5, 1e-7)
        fp32_error = (fp32.double() - exact).abs().max().item()
        assert fp32_error < 1e-5
        assert fp32_error < (bf16.double() - exact).abs().max().item() / 10


def test_wide_matrices_take_the_gram_form_only_where_it_saves_flops():
    from deepseek_mini.train.muon import gram_pays

    assert gram_pays(256, 1536, 5) and gram_pays(256, 512, 5)  # dense MLP, an expert
    assert not gram_pays(256, 256, 5) and not gram_pays(256, 300, 5)  # q_proj, near square


@pytest.mark.parametrize("shape", [(16, 96), (96, 16), (16, 32)])
def test_gram_newton_schulz_of_an_ill_conditioned_matrix_is_as_close_to_exact_as_plain(
        shape):
    """Singular values from 1 down to 1e-6, where rounding in a Gram matrix that is never
    recomputed grows step by step: the restarted Gram form stays within twice the plain
    fp32 iteration's distance from fp64 (without the restart it was 20x)."""
    from deepseek_mini.train import muon

    generator = torch.Generator().manual_seed(0)
    rows, cols = shape
    small = min(shape)
    left = torch.linalg.qr(torch.randn(rows, small, generator=generator,
                                       dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(cols, small, generator=generator,
                                        dtype=torch.float64))[0]
    update = left @ torch.diag(torch.logspace(0, -6, small, dtype=torch.float64)) @ right.T
    exact = _newton_schulz_fp64(update)
    coefficients = (3.4445, -4.7750, 2.0315)
    assert muon.gram_pays(small, max(shape), 5)
    gram = muon.newton_schulz(update.float()[None], coefficients, 5, 1e-7)[0]
    x = update.float().T if rows > cols else update.float()
    x = x / x.norm()
    for _ in range(5):  # the plain fp32 iteration, as torch writes it
        g = x @ x.T
        x = 3.4445 * x + (-4.7750 * g + 2.0315 * g @ g) @ x
    plain = x.T if rows > cols else x

    def error(y: torch.Tensor) -> float:
        return ((y.double() - exact).norm() / exact.norm()).item()

    assert error(gram) < 2 * error(plain) + 1e-6


def test_fp32_muon_batches_a_matrix_with_the_transposed_shape_as_it_runs_each_alone():
    """Up [inner, hidden] and down [hidden, inner] matrices share one batched
    Newton-Schulz (the tall one transposed): each comes out as it does on its own."""
    from deepseek_mini.train.muon import Fp32NewtonSchulzMuon

    generator = torch.Generator().manual_seed(0)
    shapes = [(48, 16), (16, 48), (48, 16), (24, 24)]
    together = [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in shapes]
    alone = [torch.nn.Parameter(p.detach().clone()) for p in together]
    settings = {"lr": 0.02, "weight_decay": 0.1, "adjust_lr_fn": "match_rms_adamw"}
    batched = Fp32NewtonSchulzMuon(together, **settings)
    single = [Fp32NewtonSchulzMuon([p], **settings) for p in alone]
    for _ in range(2):
        for p, q in zip(together, alone, strict=True):
            p.grad = torch.randn(p.shape, generator=generator)
            q.grad = p.grad.clone()
        batched.step()
        for optimizer in single:
            optimizer.step()
    for p, q in zip(together, alone, strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("extra", [[], ["model.expert_activation=swiglu",
                                        "model.first_k_dense=1"]])
def test_fp32_newton_schulz_muon_steps_as_torchs_muon_within_bf16_rounding(extra):
    """The same updates as torch's bf16 Muon up to its bf16 rounding: same weights after
    a step within bf16's tolerance of the update, every parameter moved alike."""
    cfg_fp32 = small("train.muon_ns_precision=fp32", *extra)
    cfg_bf16 = small("train.muon_ns_precision=bf16", *extra)
    batch = random_batch(4, 16, cfg_fp32.model.vocab_size)
    models = []
    for cfg in (cfg_fp32, cfg_bf16):
        torch.manual_seed(0)
        model = DeepSeekMini(cfg.model)
        optimizer = build_optimizer(model, cfg.train)
        assert type(optimizer.muon).__name__ == ("Fp32NewtonSchulzMuon" if cfg is cfg_fp32
                                                 else "Muon")
        start = copy.deepcopy(model.state_dict())
        for _ in range(2):
            train_step(model, optimizer, batch, 4, 1.0, setup_precision(cfg.train))
        models.append((model, start))
    (fp32_model, start), (bf16_model, _) = models
    lr = cfg_fp32.train.muon_base_lr
    for name, p in fp32_model.named_parameters():
        q = dict(bf16_model.named_parameters())[name]
        moved = (p - start[name]).abs().max().item()
        assert moved > 0, name
        assert torch.allclose(p, q, atol=0.05 * lr * 2 * 2, rtol=0), name


def test_muon_ns_precision_auto_is_fp32_without_native_bf16(monkeypatch):
    from deepseek_mini.train import optim

    cfg = small()
    monkeypatch.setattr(optim, "bf16_is_native", lambda device: False)
    assert optim.muon_ns_precision(cfg.train, torch.device("cpu")) == "fp32"
    monkeypatch.setattr(optim, "bf16_is_native", lambda device: True)
    assert optim.muon_ns_precision(cfg.train, torch.device("cpu")) == "bf16"
    assert optim.muon_ns_precision(small("train.muon_ns_precision=fp32").train,
                                   torch.device("cpu")) == "fp32"
