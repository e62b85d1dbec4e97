"""TinyStoriesInstruct records derived from plain stories (``data.instruct: derive``).

A record holds only what a program can read off the story faithfully:

* ``Words:`` one verb, one noun and one adjective of the story, in base form and in that
  order ("Words: run, ball, happy"), each drawn among the story's distinct lower-case
  words that ``pos_words`` lists (capitalised words are skipped: "Rose" is a name). All
  three or none: a story where one part of speech cannot be told gets no line.
* ``Random sentence:`` a sentence of the story, verbatim: one without quotation marks,
  of 4 to 30 words, starting with a capital letter and ending in . ! or ?.
* ``Features: Dialogue`` when the story has quoted speech (double quotes, straight or
  curly, around a word). The other features (BadEnding, Twist, Foreshadowing,
  MoralValue) need judgement and are never derived, nor is ``Summary:``.

Each derivable field is present with its own chance (``FIELD_CHANCE``; at least one is
kept), as in the real dataset where a record carries a random subset of its fields.
The draws come from a generator seeded with the run's seed and the story's own digest,
so a story gets the same record in any position, on any machine.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .inflection import lemma_index
from .instruct import FIELDS, has_instruct_layout, instruct_text

# The chance of each derivable field being kept in a training record. Chosen, not
# measured on TinyStoriesInstruct: most records ask for words, fewer quote a sentence.
FIELD_CHANCE = {"Features": 0.8, "Words": 0.8, "Random sentence": 0.4}
SENTENCE_WORDS = (4, 30)
_DIALOGUE = re.compile(r"[\"“][^\"“”\n]*[A-Za-z][^\"“”\n]*[\"”]")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[A-Za-z]+")
_QUOTES = "\"“”"


@dataclass(frozen=True)
class Derivable:
    """What a story lets a record say: candidate words per part of speech (in order of
    first use), the sentences a ``Random sentence:`` may quote, and whether it has
    dialogue."""

    words: dict[str, list[str]]
    sentences: list[str]
    dialogue: bool

    def fields(self, rng: random.Random) -> dict[str, str]:
        """Every derivable field, its values drawn with ``rng``."""
        out: dict[str, str] = {}
        if self.dialogue:
            out["Features"] = "Dialogue"
        if all(self.words.get(pos) for pos in ("verb", "noun", "adjective")):
            out["Words"] = ", ".join(rng.choice(self.words[pos])
                                     for pos in ("verb", "noun", "adjective"))
        if self.sentences:
            out["Random sentence"] = rng.choice(self.sentences)
        return out


def has_dialogue(text: str) -> bool:
    """Quoted speech: a pair of double quotes (straight or curly) around a word."""
    return bool(_DIALOGUE.search(text))


def story_sentences(story: str) -> list[str]:
    """The sentences of ``story`` a ``Random sentence:`` may quote (module docstring)."""
    found = []
    for line in story.splitlines():
        for sentence in _SENTENCE_END.split(line.strip()):
            n = len(sentence.split())
            if (SENTENCE_WORDS[0] <= n <= SENTENCE_WORDS[1] and sentence[:1].isupper()
                    and sentence.endswith((".", "!", "?"))
                    and not any(q in sentence for q in _QUOTES)):
                found.append(sentence)
    return found


def derivable(story: str) -> Derivable:
    index = lemma_index()
    words: dict[str, list[str]] = {"verb": [], "noun": [], "adjective": []}
    for token in _WORD.findall(story):
        hit = index.get(token) if token.islower() else None
        if hit and hit[0] not in words[hit[1]]:
            words[hit[1]].append(hit[0])
    return Derivable(words, story_sentences(story), has_dialogue(story))


def story_rng(story: str, seed: int) -> random.Random:
    """The generator a story's record is drawn with: the seed and the story's digest."""
    digest = hashlib.sha256(story.encode("utf-8")).hexdigest()[:16]
    return random.Random(f"deepseek-mini-derive-{seed}-{digest}")


def derive_fields(story: str, rng: random.Random, every_field: bool = False) -> dict[str, str]:
    """The record fields for ``story``: each derivable field kept with its
    ``FIELD_CHANCE`` (at least one), or all of them with ``every_field`` (the eval's
    prompts); empty when nothing can be derived."""
    fields = derivable(story).fields(rng)
    if every_field or not fields:
        return fields
    kept = {name: value for name, value in fields.items()
            if rng.random() < FIELD_CHANCE[name]}
    if not kept:
        name = rng.choice(list(fields))
        kept = {name: fields[name]}
    return kept


def record(fields: dict[str, str], story: str = "") -> str:
    """The record text (``story=""``: the prompt a model continues after ``Story:``)."""
    return instruct_text(**{_ARG[name]: fields.get(name) for name in FIELDS}, story=story)


def derive_documents(docs: Iterable[str], seed: int, fraction: float) -> Iterator[str]:
    """Each plain story, with chance ``fraction``, as a derived record (a story with
    nothing to derive stays plain); documents already in the record layout (real
    TinyStoriesInstruct) pass unchanged with all their fields."""
    for doc in docs:
        if has_instruct_layout(doc):
            yield doc
            continue
        rng = story_rng(doc, seed)
        fields = derive_fields(doc, rng) if rng.random() < fraction else {}
        yield record(fields, doc) if fields else doc


def parse_record(document: str) -> tuple[dict[str, str], str]:
    """(fields, story) of a record in the TinyStoriesInstruct layout; ({}, document) for a
    plain story."""
    if not has_instruct_layout(document):
        return {}, document
    head, _, story = document.partition("Story:")
    fields = {}
    for line in head.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in FIELDS:
            fields[name.strip()] = value.strip()
    return fields, story.strip()


_ARG = {"Features": "features", "Words": "words", "Summary": "summary",
        "Random sentence": "random_sentence"}
