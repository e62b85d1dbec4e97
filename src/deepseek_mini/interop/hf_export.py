"""``deepseek-mini export``: a checkpoint as a Hugging Face folder others can load.

A model in DeepSeek-V3's layout (latent_rope + sigmoid router + SwiGLU) is written as
transformers' own ``deepseek_v3`` (hf_layout.py): no custom code, and the format vLLM,
SGLang and llama.cpp's converter already read. Any other model is written with
deepseek-mini's names and ``modeling_deepseek_mini.py`` (hf_remote_model.py) for
``trust_remote_code=True``. Either way: ``config.json``, ``model.safetensors`` (a tied
head is stored once), ``generation_config.json`` and the tokenizer's files. The folder is
assembled beside ``out`` and renamed into place, so it is whole or absent, with the
modes the umask gives (``mkdtemp`` and safetensors would leave it private).

The project's prompt convention travels with the folder: every prompt follows one
``<|endoftext|>`` (the context every training document followed; inference/prompts.py),
so the tokenizer adds it as its BOS token (``add_bos_token``, and a template in
``tokenizer.json`` for readers of that file alone), pads on the left with it, and both
configs name it ``bos_token_id``: ``generate`` on ``tokenizer(prompt)`` is then ours,
token for token. A checkpoint ``generate`` would refuse (non-finite weights) is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import check_finite, load_checkpoint, model_config_of
from ..config import Config, ConfigError, ModelConfig
from ..data.tokenizer import EOS_TOKEN, Tokenizer, load_tokenizer
from ..errors import UserError
from ..files import DiskFullError, ensure_dir, free_bytes, is_disk_full, umask_mode
from ..model.transformer import DeepSeekMini
from .exportable import check_exportable
from .hf_layout import hf_config, native_blocker, to_hf

REMOTE_MODELING = "modeling_deepseek_mini.py"


@dataclass
class Exported:
    out: Path
    native: bool
    why_not_native: str | None
    tensors: int


def export(checkpoint: str | Path, out: str | Path) -> Exported:
    out = Path(out)
    if out.is_symlink():  # the export is renamed into place, which a link would not take
        target = "a folder" if out.is_dir() else "a file" if out.exists() else "nothing"
        raise UserError(f"export: {out} is a symbolic link (to {target}): give the "
                        "folder's own path, or a new name")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"export: {out} already exists and is not an empty folder")
    ckpt = load_checkpoint(checkpoint)
    check_exportable(model_config_of(ckpt, checkpoint), f"checkpoint {checkpoint}", "export")
    check_finite(ckpt, checkpoint)  # as generate, eval and serve refuse it
    model = DeepSeekMini.from_checkpoint_dict(ckpt, checkpoint)
    try:
        config = Config.from_dict(ckpt["config"], f"checkpoint {checkpoint}")
    except ConfigError as exc:
        raise UserError(f"checkpoint {checkpoint} has an unusable config: {exc}") from None
    tok = load_tokenizer(config.data.tokenizer, config.data.cache_dir, model.config.vocab_size)
    blocker = native_blocker(model.config)
    state = model.state_dict()
    if blocker is None:
        tensors = to_hf(model.config, state)
        cfg_json = hf_config(model.config, tok.eos_id, tok.eos_id)
    else:
        tensors, cfg_json = _remote_tensors(model.config, state), _remote_config(model.config,
                                                                                tok.eos_id)
    staging = _staging_folder(out)
    try:
        _write_folder_or_full_disk(staging, tensors, cfg_json, tok, remote=blocker is not None)
        _follow_umask(staging)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Exported(out, blocker is None, blocker, len(tensors))


def _staging_folder(out: Path) -> Path:
    """A new folder beside ``out`` to assemble the export in; a parent that is a file, or
    one where no folder can be made (/proc, read-only), is the user's to fix."""
    parent = ensure_dir(out.parent, "export --out's parent folder")
    try:
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFullError(f"the disk is full: cannot create a folder in {parent}") from None
        raise UserError(f"export: cannot create a folder in {parent}: "
                        f"{exc.strerror or exc}") from None


def _write_folder_or_full_disk(folder: Path, *args: Any, **kwargs: Any) -> None:
    """``_write_folder``, a full disk being one error line (exit 28) whichever writer met
    it: safetensors reports it as its own error type, with the OS's message inside."""
    try:
        _write_folder(folder, *args, **kwargs)
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        raise DiskFullError(f"the disk is full: cannot write the export in {folder.parent} "
                            f"({free_bytes(folder.parent)} bytes free); nothing was "
                            "exported") from None


def _remote_tensors(cfg: ModelConfig, state: dict[str, torch.Tensor]
                    ) -> dict[str, torch.Tensor]:
    # The MTP modules are a training aid and a drafter for our own decoding: like
    # DeepseekV3's export (num_nextn_predict_layers 0), the modeling file has none.
    tensors = {f"model.{k}": v for k, v in state.items()
               if k != "lm_head.weight" and not k.startswith("mtp.")}
    if not cfg.tie_embeddings:
        tensors["lm_head.weight"] = state["lm_head.weight"]
    return {k: v.detach().float().contiguous().clone() for k, v in tensors.items()}


def _remote_config(cfg: ModelConfig, eos_id: int) -> dict[str, Any]:
    module = REMOTE_MODELING.removesuffix(".py")
    return {"architectures": ["DeepSeekMiniForCausalLM"], "model_type": "deepseek_mini",
            "auto_map": {"AutoConfig": f"{module}.DeepSeekMiniConfig",
                         "AutoModelForCausalLM": f"{module}.DeepSeekMiniForCausalLM"},
            "deepseek_mini": asdict(cfg), "tie_word_embeddings": cfg.tie_embeddings,
            "bos_token_id": eos_id, "eos_token_id": eos_id, "torch_dtype": "float32",
            "use_cache": False}


def _write_folder(folder: Path, tensors: dict[str, torch.Tensor], cfg_json: dict[str, Any],
                  tok: Tokenizer, remote: bool) -> None:
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise UserError("export needs safetensors: pip install 'deepseek-mini[hf]'") from None
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    _json(folder / "config.json", cfg_json)
    # The remote model has no KV cache: generate() must recompute, as it does without one.
    _json(folder / "generation_config.json",
          {"bos_token_id": tok.eos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.eos_id,
           "do_sample": False, "use_cache": not remote})
    (folder / "tokenizer.json").write_text(prompt_tokenizer_json(tok), encoding="utf-8")
    _json(folder / "tokenizer_config.json",
          {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOS_TOKEN,
           "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "add_bos_token": True,
           "add_eos_token": False, "padding_side": "left", "model_max_length":
               cfg_json.get("max_position_embeddings", cfg_json.get("deepseek_mini", {})
                            .get("max_position"))})
    if remote:
        shutil.copyfile(Path(__file__).with_name("hf_remote_model.py"),
                        folder / REMOTE_MODELING)


def prompt_tokenizer_json(tok: Tokenizer) -> str:
    """``tok``'s tokenizer.json with a post-processor that puts ``<|endoftext|>`` before
    every text encoded with special tokens (the default): the prompt convention for
    whoever reads the file with ``tokenizers`` alone or an older transformers. The
    vocabulary and merges are untouched, so a text's own ids stay ours."""
    from tokenizers import Tokenizer as Backend
    from tokenizers.processors import TemplateProcessing

    backend = Backend.from_str(tok.backend.to_str())
    backend.post_processor = TemplateProcessing(
        single=f"{EOS_TOKEN}:0 $A:0", pair=f"{EOS_TOKEN}:0 $A:0 {EOS_TOKEN}:1 $B:1",
        special_tokens=[(EOS_TOKEN, tok.eos_id)])
    return backend.to_str(pretty=True)


def _follow_umask(folder: Path) -> None:
    """The modes a plain ``mkdir`` and ``open`` would give the folder and its files."""
    os.chmod(folder, umask_mode(0o777))
    for path in folder.iterdir():
        os.chmod(path, umask_mode(0o666))


def _json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
