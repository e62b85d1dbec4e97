"""Configuration as data: three dataclasses read from YAML, checked once, at the edge.

Every key has a default, unknown keys and wrong types are errors, and ``--set a.b=v``
overrides are parsed as YAML values, so the command line speaks the same language as
the files. Nothing here is ever executed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

DEFAULT_CACHE_DIR = ".cache/deepseek-mini"
# Keys that were renamed: the old name is an error that says what to write instead.
RENAMED = {("model", "kv_compression"): "model.kv_latent_dim (the latent width itself, "
                                        "hidden_size / kv_compression)"}


class ConfigError(UserError):
    """A config file, key or value that cannot be used."""


@dataclass
class ModelConfig:
    vocab_size: int = 49152
    hidden_size: int = 576
    num_layers: int = 30
    num_heads: int = 8
    num_kv_heads: int = 1
    kv_latent_dim: int = 72
    rope_theta: float = 10000.0
    max_position: int = 2048
    num_experts: int = 8
    num_shared_experts: int = 1
    top_k: int = 2
    expert_hidden: int = 1536
    expert_activation: str = "gelu"
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    tie_embeddings: bool = True
    norm_eps: float = 1.0e-5
    # DeepSeek-V2/V3 layout (the defaults keep the seed's).
    attention: str = "latent"
    q_lora_rank: int = 0
    qk_nope_head_dim: int = 48
    qk_rope_head_dim: int = 24
    v_head_dim: int = 72
    router: str = "softmax"
    routed_scaling_factor: float = 1.0
    bias_update_rate: float = 1.0e-3
    n_group: int = 1
    topk_group: int = 1
    seq_aux_loss_coef: float = 0.0
    first_k_dense: int = 0
    dense_hidden: int = 0
    mtp_depth: int = 0  # multi-token prediction modules (DeepSeek-V3); 0 = none
    mtp_ffn: str = "moe"  # each MTP module's feed-forward: moe (the model's) | dense (one expert)
    # LM head over the training split's N most frequent ids + one "other" class (0: full)
    head_vocab: int = 0
    # Dropout while training (attention probabilities, each residual branch's output, the
    # embeddings); 0 runs no dropout op at all. Evaluation and generation never drop.
    dropout: float = 0.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rope_dim(self) -> int:
        """Width RoPE rotates: the whole head (seed) or the decoupled rope key."""
        return self.qk_rope_head_dim if self.attention == "latent_rope" else self.head_dim

    @property
    def dense_width(self) -> int:
        """A leading dense layer's MLP width; by default as wide as the experts a token
        runs in an MoE layer, so a dense layer costs what an MoE layer does."""
        return self.dense_hidden or (self.top_k + self.num_shared_experts) * self.expert_hidden

    def validate(self) -> None:
        _positive(self, "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                  "kv_latent_dim", "rope_theta", "max_position", "num_experts", "top_k",
                  "expert_hidden", "norm_eps")
        _non_negative(self, "num_shared_experts", "aux_loss_coef", "z_loss_coef", "mtp_depth")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"model.hidden_size ({self.hidden_size}) must be divisible by "
                              f"model.num_heads ({self.num_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"model.hidden_size / model.num_heads = {self.head_dim} must be "
                              "even for RoPE")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model.num_heads ({self.num_heads}) must be divisible by "
                              f"model.num_kv_heads ({self.num_kv_heads})")
        if self.top_k > self.num_experts:
            raise ConfigError(f"model.top_k ({self.top_k}) must not exceed model.num_experts "
                              f"({self.num_experts})")
        _one_of(self, "expert_activation", ("gelu", "swiglu"))
        _one_of(self, "attention", ("latent", "latent_rope"))
        _one_of(self, "router", ("softmax", "sigmoid"))
        _positive(self, "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                  "routed_scaling_factor", "n_group", "topk_group")
        _non_negative(self, "q_lora_rank", "bias_update_rate", "seq_aux_loss_coef",
                      "first_k_dense", "dense_hidden")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"model.qk_rope_head_dim ({self.qk_rope_head_dim}) must be even "
                              "for RoPE")
        if self.first_k_dense > self.num_layers:
            raise ConfigError(f"model.first_k_dense ({self.first_k_dense}) must not exceed "
                              f"model.num_layers ({self.num_layers}) (equal: a dense model)")
        _one_of(self, "mtp_ffn", ("moe", "dense"))
        _non_negative(self, "head_vocab")
        if self.head_vocab > self.vocab_size:
            raise ConfigError(f"model.head_vocab ({self.head_vocab}) must not exceed "
                              f"model.vocab_size ({self.vocab_size})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        self._validate_groups()

    def _validate_groups(self) -> None:
        """Node-limited routing: experts split into ``n_group`` equal groups, a token's
        experts drawn from its ``topk_group`` best (each group scored by its top two)."""
        if self.n_group == 1 and self.topk_group == 1:
            return
        per_group = self.num_experts // self.n_group
        if self.num_experts % self.n_group or per_group < 2:
            raise ConfigError(f"model.n_group ({self.n_group}) must divide model.num_experts "
                              f"({self.num_experts}) into groups of at least 2")
        if self.topk_group > self.n_group:
            raise ConfigError(f"model.topk_group ({self.topk_group}) must not exceed "
                              f"model.n_group ({self.n_group})")
        if self.top_k > self.topk_group * per_group:
            raise ConfigError(f"model.top_k ({self.top_k}) exceeds the "
                              f"{self.topk_group * per_group} experts of model.topk_group groups")
        if self.router != "sigmoid":
            raise ConfigError("model.n_group / model.topk_group need model.router: sigmoid")


@dataclass
class DataConfig:
    source: str = "tinystories-instruct"
    files: list[str] = field(default_factory=list)
    tokenizer: str = "smollm2"
    seq_len: int = 128
    val_fraction: float = 0.01
    cache_dir: str = DEFAULT_CACHE_DIR
    demo_stories: int = 20000
    num_workers: int = 2
    max_documents: int | None = None  # stop after this many documents (bounds a Hub download)
    windows: str = "grid"  # grid (a seeded shifted grid) | documents (from document starts)
    instruct: str = "none"  # none | derive (plain stories become TinyStoriesInstruct records)
    instruct_fraction: float = 0.8  # derive: the share of plain stories made records

    def validate(self) -> None:
        _one_of(self, "source", ("tinystories-instruct", "demo", "files"))
        _one_of(self, "windows", ("grid", "documents"))
        _one_of(self, "instruct", ("none", "derive"))
        if not 0.0 <= self.instruct_fraction <= 1.0:
            raise ConfigError(f"data.instruct_fraction must be in [0, 1], got "
                              f"{self.instruct_fraction}")
        _positive(self, "seq_len", "demo_stories", "num_workers")
        if self.max_documents is not None:
            _positive(self, "max_documents")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.source == "files" and not self.files:
            raise ConfigError("data.files is empty but data.source is 'files': list paths or globs")


@dataclass
class TrainConfig:
    out_dir: str = "checkpoints"
    seed: int = 1337
    device: str = "auto"
    precision: str = "auto"
    tf32: bool = True
    batch_size: int = 8
    micro_batch_size: int = 8
    max_steps: int = 10000
    decay_steps: int | None = None  # where the cosine reaches min_lr; None: max_steps
    lr: float = 3.0e-4
    min_lr: float = 3.0e-5
    warmup_steps: int = 20
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    log_interval: int = 10
    eval_interval: int = 250
    eval_batches: int = 20  # validation: eval_batches x batch_size fixed windows (a run's own)
    save_interval: int = 250
    sample_interval: int = 500
    warm_start: str | None = None
    compile: bool = False
    parallel: str = "none"
    expert_parallel: int = 1  # ranks each MoE layer's routed experts are split over
    threads: int | None = None  # CPU threads; None: chosen by measurement (threads.py)
    trackers: list[str] = field(default_factory=list)  # tensorboard | wandb
    mtp_loss_weight: float = 0.3  # weight of the mean MTP CE in the loss
    trainable: str = "all"  # all | mtp (only the MTP modules, on a frozen model)
    optimizer: str = "adamw"  # adamw | muon (Muon for the hidden matrices, AdamW the rest)
    muon_lr: float | None = None  # Muon's base lr; None: train.lr
    muon_momentum: float = 0.95
    muon_adjust_lr: str = "match_rms_adamw"  # match_rms_adamw | original (torch.optim.Muon's)
    muon_ns_steps: int = 5  # Newton-Schulz iterations per Muon update (torch's default)
    # Newton-Schulz's number format: auto (bf16 where the device has it natively, as
    # torch.optim.Muon does; fp32 on a CPU without bf16 instructions) | bf16 | fp32
    muon_ns_precision: str = "auto"
    # Muon for the routed experts' stacked weights too (true), or AdamW for them (false):
    # Newton-Schulz runs once per expert, so its cost follows total, not active, parameters
    muon_experts: bool = True
    schedule: str = "cosine"  # cosine | wsd (warm-up, stable, decay)
    decay_fraction: float = 0.2  # wsd: the share of the schedule's steps spent decaying

    def validate(self) -> None:
        _one_of(self, "device", ("auto", "cpu", "cuda"))
        _one_of(self, "precision", ("auto", "fp16", "bf16", "fp32"))
        _one_of(self, "parallel", ("none", "ddp", "fsdp"))
        _one_of(self, "trainable", ("all", "mtp"))
        _one_of(self, "optimizer", ("adamw", "muon"))
        _one_of(self, "muon_adjust_lr", ("match_rms_adamw", "original"))
        _one_of(self, "muon_ns_precision", ("auto", "bf16", "fp32"))
        _one_of(self, "schedule", ("cosine", "wsd"))
        _positive(self, "batch_size", "micro_batch_size", "max_steps", "log_interval",
                  "eval_interval", "eval_batches", "save_interval", "sample_interval",
                  "expert_parallel")
        _non_negative(self, "lr", "min_lr", "warmup_steps", "weight_decay", "grad_clip",
                      "mtp_loss_weight")
        if self.muon_lr is not None:
            _non_negative(self, "muon_lr")
        if not 1 <= self.muon_ns_steps < 100:  # torch.optim.Muon's own bound
            raise ConfigError(f"train.muon_ns_steps must be in 1..99, got {self.muon_ns_steps}")
        if not 0.0 <= self.muon_momentum < 1.0:
            raise ConfigError(f"train.muon_momentum must be in [0, 1), got {self.muon_momentum}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ConfigError(f"train.decay_fraction must be in (0, 1], got "
                              f"{self.decay_fraction}")
        if self.optimizer == "muon" and self.parallel == "fsdp":
            raise ConfigError("train.optimizer muon is not supported with train.parallel=fsdp: "
                              "use train.parallel=ddp, or train.optimizer=adamw")
        if self.optimizer == "muon" and self.expert_parallel > 1:
            raise ConfigError("train.optimizer muon is not supported with "
                              f"train.expert_parallel={self.expert_parallel}: use "
                              "train.expert_parallel=1 (ddp), or train.optimizer=adamw")
        for key in ("threads", "decay_steps"):
            if getattr(self, key) is not None:
                _positive(self, key)
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(f"train.batch_size ({self.batch_size}) must be a multiple of "
                              f"train.micro_batch_size ({self.micro_batch_size})")
        known = ("tensorboard", "wandb")
        if (not isinstance(self.trackers, list) or len(set(self.trackers)) < len(self.trackers)
                or not all(t in known for t in self.trackers)):
            raise ConfigError(f"train.trackers must be a list of distinct names from "
                              f"{', '.join(known)}, got {self.trackers!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), got {self.betas}")

    @property
    def schedule_steps(self) -> int:
        """The step at which the schedule reaches ``min_lr`` (flat after it)."""
        return self.max_steps if self.decay_steps is None else self.decay_steps

    @property
    def muon_base_lr(self) -> float:
        return self.lr if self.muon_lr is None else self.muon_lr

    @property
    def grad_accum_steps(self) -> int:
        return self.batch_size // self.micro_batch_size


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None, source: str = "config") -> Config:
        """Build and validate a config; ``source`` names the origin in error messages."""
        raw = raw or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping with sections model / data / train")
        unknown = sorted(set(raw) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"{source}: unknown section '{unknown[0]}' "
                              f"(known: {', '.join(SECTIONS)})")
        sections = {name: _build_section(name, kind, raw.get(name), source)
                    for name, kind in SECTIONS.items()}
        cfg = cls(**sections)
        cfg.validate()
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path | None = None,
                  overrides: list[str] | tuple[str, ...] = ()) -> Config:
        """Read a YAML file (or start from defaults when ``path`` is None), then apply
        ``section.key=value`` overrides."""
        raw: dict[str, Any] = {}
        source = "defaults"
        if path is not None:
            source = str(path)
            raw = _read_yaml(Path(path))
        for item in overrides:
            _apply_override(raw, item)
        return cls.from_dict(raw, source)

    def validate(self) -> None:
        self.model.validate()
        self.data.validate()
        self.train.validate()
        if self.model.num_experts % self.train.expert_parallel:
            raise ConfigError(f"train.expert_parallel ({self.train.expert_parallel}) must divide "
                              f"model.num_experts ({self.model.num_experts}): each rank of an "
                              "expert-parallel group holds the same number of experts")
        if self.train.expert_parallel > 1 and self.train.parallel == "none":
            raise ConfigError(f"train.expert_parallel={self.train.expert_parallel} needs "
                              "train.parallel ddp or fsdp (a torchrun launch)")
        if self.train.trainable == "mtp" and self.model.mtp_depth == 0:
            raise ConfigError("train.trainable is 'mtp' but model.mtp_depth is 0: set "
                              "model.mtp_depth to the number of MTP modules to train")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def model_config_from_dict(raw: dict[str, Any], source: str = "checkpoint") -> ModelConfig:
    """A validated ModelConfig from a plain dict, as stored in a checkpoint; a checkpoint
    written before ``kv_latent_dim`` stored the ratio ``kv_compression``, converted here."""
    raw = upgrade_model_dict(raw)
    cfg = _build_section("model", ModelConfig, raw, source)
    cfg.validate()
    return cfg


# Keys added after checkpoints were first written, with the value that reproduces the
# older model (their defaults): a stored config without them means exactly that.
ADDED_MODEL_KEYS = ("attention", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                    "v_head_dim", "router", "routed_scaling_factor", "bias_update_rate",
                    "n_group", "topk_group", "seq_aux_loss_coef", "first_k_dense",
                    "dense_hidden", "mtp_depth", "mtp_ffn", "head_vocab", "dropout")


# Model keys that shape no weight: a run may resume (with --allow-changes) or warm-start
# from a checkpoint that had another value.
TRAINING_MODEL_KEYS = ("dropout",)


def upgrade_model_dict(raw: dict[str, Any]) -> dict[str, Any]:
    """A stored model section in today's keys (``kv_compression`` -> ``kv_latent_dim``;
    keys added since, at the defaults that mean the older model)."""
    missing = [k for k in ADDED_MODEL_KEYS if k not in raw]
    if missing:
        defaults = ModelConfig()
        raw = {**raw, **{k: getattr(defaults, k) for k in missing}}
    if "kv_compression" not in raw:
        return raw
    raw = dict(raw)
    ratio = raw.pop("kv_compression")
    raw.setdefault("kv_latent_dim", round(raw.get("hidden_size", ModelConfig.hidden_size) / ratio))
    return raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error: the
    last value silently winning hides a typo'd edit."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Any:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                hash(key)
            except TypeError:
                raise ConfigError(f"{self.name} line {line}: a key must be a name, got "
                                  f"{key!r}") from None
            if key in seen:
                raise ConfigError(f"{self.name}: duplicate key {key!r} at lines {seen[key]} "
                                  f"and {line}")
            seen[key] = line
        return super().construct_mapping(node, deep)


def _read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ConfigError(f"config {path} is a directory, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loader = _UniqueKeyLoader(path.read_text(encoding="utf-8"))
        loader.name = str(path)
        try:
            raw = loader.get_single_data()
        finally:
            loader.dispose()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with sections model / data / train")
    return raw


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. train.max_steps=50")
    section, name = parts
    if section not in SECTIONS:
        raise ConfigError(f"--set {item!r}: unknown section '{section}' "
                          f"(known: {', '.join(SECTIONS)})")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML") from None
    if (section, name) in RENAMED:
        raise ConfigError(f"--set {item!r}: '{key.strip()}' is no longer a key: write "
                          f"{RENAMED[section, name]} instead")
    fields = [f.name for f in dataclasses.fields(SECTIONS[section])]
    if name not in fields:  # the command line's mistake, not the file's
        raise ConfigError(f"--set {item!r}: unknown key '{section}.{name}'"
                          + _did_you_mean(section, name, fields))
    target = raw.setdefault(section, {})
    if not isinstance(target, dict):
        raise ConfigError(f"config section '{section}' must be a mapping")
    target[name] = value


def _did_you_mean(section: str, name: Any, known: list[str]) -> str:
    close = difflib.get_close_matches(str(name), known, n=1)
    return f" (did you mean '{section}.{close[0]}'?)" if close else ""


def _build_section(name: str, kind: type, raw: Any, source: str) -> Any:
    if raw is None:
        return kind()
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: section '{name}' must be a mapping")
    hints = typing.get_type_hints(kind)
    fields = {f.name for f in dataclasses.fields(kind)}
    values = {}
    for key, value in raw.items():
        if (name, key) in RENAMED:
            raise ConfigError(f"{source}: '{name}.{key}' is no longer a key: write "
                              f"{RENAMED[name, key]} instead")
        if key not in fields:
            raise ConfigError(f"{source}: unknown key '{name}.{key}'"
                              + _did_you_mean(name, key, sorted(fields)))
        values[key] = _coerce(f"{name}.{key}", value, hints[key])
    return kind(**values)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against a field's type; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        hint = next(t for t in options if t is not type(None))
        origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str) and item is str:
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(key, v, item) for v in value]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        value = _float_from_text(key, value)
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, hint) or (hint is not bool and isinstance(value, bool)):
        raise ConfigError(f"{key} must be {hint.__name__}, got {value!r}")
    if hint is float and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    return value


def _float_from_text(key: str, text: str) -> float:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; accept it as the number it means."""
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{key} must be float, got {text!r}") from None


def _positive(obj: Any, *names: str) -> None:
    for n in names:
        if getattr(obj, n) <= 0:
            raise ConfigError(f"{_section_of(obj)}.{n} must be positive, got {getattr(obj, n)}")


def _non_negative(obj: Any, *names: str) -> None:
    for n in names:
        if getattr(obj, n) < 0:
            raise ConfigError(f"{_section_of(obj)}.{n} must be >= 0, got {getattr(obj, n)}")


def _one_of(obj: Any, name: str, options: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if value not in options:
        raise ConfigError(f"{_section_of(obj)}.{name} must be one of {', '.join(options)}; "
                          f"got {value!r}")


def _section_of(obj: Any) -> str:
    return {ModelConfig: "model", DataConfig: "data", TrainConfig: "train"}[type(obj)]
