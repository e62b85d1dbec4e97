"""Does a model write the story a record asks for? ``eval --instruct``.

For each held-out story the task is its record's fields: a plain story's derived ones,
every derivable field present (``data.derive``: Words, Random sentence, Features:
Dialogue), or a real TinyStoriesInstruct record's own. The model is given the prompt
(the record up to ``Story:``, or the same asks in plain English) and writes a story, once
greedily and once sampled (temperature, top-k and a seed fixed per story: ``seed + i``).
What is counted, per decoding:

* ``all_words``: the share of stories asked for words that use every one of them, a
  word counting when any of its forms is a word of the story (``data.inflection``: case
  and punctuation ignored; -s/-es/-ed/-ing/-er/-est by the spelling rules, irregular
  forms from a table);
* ``sentence``: the share of stories asked for a random sentence that contain it
  verbatim (whitespace runs count as one space; case and punctuation must match);
* ``dialogue``: the share of stories asked for Dialogue that have quoted speech (a
  pair of double quotes, straight or curly, around a word);
* ``mean_words``: the mean length of the stories written, in whitespace-separated words.

Besides, ``ce`` is the mean cross-entropy (nats per token) of the true story and its
end-of-text, given its prompt: the prompt's own tokens are context, not scored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch.nn import functional as F

from .data.derive import derive_fields, has_dialogue, parse_record, record, story_rng
from .data.inflection import text_words, uses
from .data.tokenizer import Tokenizer
from .errors import UserError
from .inference.generate import generate
from .inference.prompts import completion_text
from .progress import Progress

DECODINGS = ("greedy", "sampled")
PROMPT_STYLES = ("record", "english")


@dataclass
class Task:
    """One held-out story and what its prompt asks."""

    fields: dict[str, str]
    story: str

    @property
    def words(self) -> list[str]:
        return [w.strip() for w in self.fields.get("Words", "").split(",") if w.strip()]

    @property
    def sentence(self) -> str | None:
        return self.fields.get("Random sentence") or None

    @property
    def dialogue(self) -> bool:
        return "dialogue" in self.fields.get("Features", "").lower()


def tasks_from_documents(docs: Sequence[str], seed: int, max_stories: int | None) -> list[Task]:
    """The first ``max_stories`` documents that ask for something: real records as they
    are, plain stories with every field derivable from them (drawn with ``seed``)."""
    tasks = []
    for doc in docs:
        fields, story = parse_record(doc)
        if not fields:
            fields = derive_fields(doc, story_rng(doc, seed), every_field=True)
        if fields and story:
            tasks.append(Task(fields, story))
        if max_stories is not None and len(tasks) == max_stories:
            break
    if not tasks:
        raise UserError("--instruct: no story in the data to derive a prompt from (no "
                        "listed verb/noun/adjective, no quotable sentence, no dialogue)")
    return tasks


def prompt_text(task: Task, style: str) -> str:
    """The record up to ``Story:`` (``record``) or the same asks in plain English."""
    if style == "record":
        return record(task.fields)
    parts = ["Write a short story for children"]
    if task.words:
        parts.append(" that uses the words " + _and(task.words))
    parts.append(".")
    if task.sentence:
        parts.append(f' Include the sentence "{task.sentence}"')
    if task.dialogue:
        parts.append(" Include dialogue.")
    if "Summary" in task.fields:
        parts.append(f" The story is about this: {task.fields['Summary']}")
    return "".join(parts)


def _and(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


# ---- the counting rules ------------------------------------------------------------

def uses_all_words(text: str, words: Sequence[str]) -> bool:
    """Every asked word (or phrase) used by ``text`` (``data.inflection``)."""
    found = set(text_words(text))
    return all(uses(found, word) for word in words)


def has_sentence(text: str, sentence: str) -> bool:
    """``sentence`` in ``text`` verbatim, whitespace runs counting as one space."""
    return " ".join(sentence.split()) in " ".join(text.split())


def word_count(text: str) -> int:
    return len(text.split())


@dataclass
class Checks:
    """What one written story did of what its task asked (None: not asked)."""

    all_words: bool | None
    sentence: bool | None
    dialogue: bool | None
    words: int

    @classmethod
    def of(cls, task: Task, text: str) -> Checks:
        return cls(uses_all_words(text, task.words) if task.words else None,
                   has_sentence(text, task.sentence) if task.sentence else None,
                   has_dialogue(text) if task.dialogue else None,
                   word_count(text))


def summarize(checks: Sequence[Checks]) -> dict[str, Any]:
    """Shares (and how many stories asked) of each check, and the mean length."""
    out: dict[str, Any] = {"stories": len(checks)}
    for name in ("all_words", "sentence", "dialogue"):
        asked = [getattr(c, name) for c in checks if getattr(c, name) is not None]
        out[name] = sum(asked) / len(asked) if asked else None
        out[f"{name}_asked"] = len(asked)
    out["mean_words"] = sum(c.words for c in checks) / len(checks) if checks else 0.0
    return out


# ---- models --------------------------------------------------------------------------

class Backend(Protocol):
    """A model as the eval uses it: write a story for a prompt, and score a story."""

    def write(self, prompt: str, sampled: bool, seed: int) -> str: ...

    def story_nll(self, prompt: str, story: str) -> tuple[float, int]: ...


@dataclass
class Decoding:
    max_new_tokens: int = 256
    temperature: float = 0.8
    top_k: int | None = None


class CheckpointBackend:
    """A deepseek-mini model: the prompt follows an end-of-text, as in training."""

    def __init__(self, model: torch.nn.Module, tok: Tokenizer, decoding: Decoding) -> None:
        self.model, self.tok, self.decoding = model, tok, decoding
        self.max_position = model.config.max_position

    def _prompt_ids(self, prompt: str) -> list[int]:
        return [self.tok.eos_id, *self.tok.encode(prompt)]

    def write(self, prompt: str, sampled: bool, seed: int) -> str:
        ids = self._prompt_ids(prompt)
        room = min(self.decoding.max_new_tokens, self.max_position - len(ids))
        if room <= 0:
            return ""
        out = generate(self.model, torch.tensor([ids]), max_new_tokens=room,
                       temperature=self.decoding.temperature if sampled else 0.0,
                       top_k=self.decoding.top_k if sampled else None,
                       seed=seed if sampled else None, eos_id=self.tok.eos_id)
        return completion_text(self.tok, out[0, len(ids):].tolist()).strip()

    @torch.inference_mode()
    def story_nll(self, prompt: str, story: str) -> tuple[float, int]:
        context = self._prompt_ids(prompt)
        target = [*self.tok.encode(" " + story), self.tok.eos_id]
        inputs, targets = _scored(context, target, self.max_position)
        out = self.model(inputs.to(self.model.device), targets=targets.to(self.model.device))
        count = int((targets != -100).sum())
        return float(out.ce) * count, count


class HFBackend:
    """A transformers causal LM; ``chat`` wraps the prompt in its chat template (an
    instruction-tuned model asked in plain English)."""

    def __init__(self, model: Any, tokenizer: Any, sep_id: int, decoding: Decoding,
                 chat: bool) -> None:
        self.model, self.tokenizer, self.sep_id = model, tokenizer, sep_id
        self.decoding, self.chat = decoding, chat
        self.max_position = getattr(model.config, "max_position_embeddings", 2048)
        stops = {sep_id, tokenizer.eos_token_id}
        self.stop_ids = sorted(s for s in stops if s is not None)

    def _prompt_ids(self, prompt: str) -> list[int]:
        if self.chat:
            return list(self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True,
                tokenize=True, return_dict=False))
        return [self.sep_id, *self.tokenizer(prompt, add_special_tokens=False)["input_ids"]]

    @torch.inference_mode()
    def write(self, prompt: str, sampled: bool, seed: int) -> str:
        ids = self._prompt_ids(prompt)
        room = min(self.decoding.max_new_tokens, self.max_position - len(ids))
        if room <= 0:
            return ""
        if sampled:
            torch.manual_seed(seed)
        kwargs: dict[str, Any] = ({"do_sample": True, "temperature": self.decoding.temperature,
                                   "top_k": self.decoding.top_k or 0}
                                  if sampled else {"do_sample": False})
        inputs = torch.tensor([ids], device=self.model.device)
        out = self.model.generate(inputs, attention_mask=torch.ones_like(inputs),
                                  max_new_tokens=room, eos_token_id=self.stop_ids,
                                  pad_token_id=self.stop_ids[0], top_p=None, **kwargs)
        new = out[0, len(ids):].tolist()
        cut = [new.index(s) for s in self.stop_ids if s in new]
        return self.tokenizer.decode(new[:min(cut)] if cut else new,
                                     skip_special_tokens=True).strip()

    @torch.inference_mode()
    def story_nll(self, prompt: str, story: str) -> tuple[float, int]:
        context = self._prompt_ids(prompt)
        prefix = "" if self.chat else " "
        target = [*self.tokenizer(prefix + story, add_special_tokens=False)["input_ids"],
                  self.stop_ids[0] if self.chat else self.sep_id]
        inputs, targets = _scored(context, target, self.max_position)
        logits = self.model(input_ids=inputs.to(self.model.device), use_cache=False).logits
        targets = targets.to(logits.device)
        nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                              ignore_index=-100, reduction="sum")
        return float(nll), int((targets != -100).sum())


def _scored(context: list[int], target: list[int],
            max_position: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets [1, T] scoring ``target`` after ``context`` (-100 = not
    scored), cut to ``max_position`` tokens."""
    ids = (context + target)[:max_position + 1]
    labels = ([-100] * len(context) + target)[:max_position + 1]
    return torch.tensor([ids[:-1]]), torch.tensor([labels[1:]])


# ---- the run ------------------------------------------------------------------------

@dataclass
class InstructReport:
    """The figures per decoding, the CE of the true stories, and every story written."""

    style: str
    results: dict[str, dict[str, Any]]
    ce: float | None
    ce_tokens: int
    stories: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"prompt_style": self.style, **self.results,
                "ce": self.ce if self.ce is not None and math.isfinite(self.ce) else None,
                "ce_tokens": self.ce_tokens, "stories": self.stories}


def run_instruct_eval(tasks: Sequence[Task], backend: Backend, style: str,
                      decodings: Sequence[str], seed: int,
                      progress: bool = True) -> InstructReport:
    """Write a story per task and decoding, score the true stories, count."""
    checks: dict[str, list[Checks]] = {d: [] for d in decodings}
    stories, nll, tokens = [], 0.0, 0
    with Progress(len(tasks), "instruct eval", unit="stories", enabled=progress) as bar:
        for i, task in enumerate(tasks):
            prompt = prompt_text(task, style)
            row: dict[str, Any] = {"prompt": prompt}
            for decoding in decodings:
                text = backend.write(prompt, decoding == "sampled", seed + i)
                check = Checks.of(task, text)
                checks[decoding].append(check)
                row[decoding] = {"text": text, **vars(check)}
            story_nll, story_tokens = backend.story_nll(prompt, task.story)
            nll, tokens = nll + story_nll, tokens + story_tokens
            stories.append(row)
            bar.update(1)
    results = {d: summarize(c) for d, c in checks.items()}
    return InstructReport(style, results, nll / tokens if tokens else None, tokens, stories)
