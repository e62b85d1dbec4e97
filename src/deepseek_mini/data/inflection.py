"""English inflection by a few suffix rules: what counts as a story "using" a word.

A word is used when one of its forms is a word of the text, compared in lower case with
punctuation ignored (a text's words are its runs of the letters a-z, so "Ball!" and
"ball's" both hold "ball"). A base's forms are the base itself, the suffixes -s/-es,
-ed, -ing, -er and -est attached by the usual spelling rules, and the irregular forms of
``pos_words.IRREGULAR``:

* a final silent e is dropped before a vowel (bake: baked, baking, baker; nice: nicer);
* consonant + y turns to i before anything but -ing (cry: cries, cried; happy: happier);
* a one-syllable consonant-vowel-consonant word doubles its last consonant before a
  vowel (run: running; big: bigger, biggest), except after w, x or y (snow: snowed);
* -es follows s, x, z, ch, sh and o (box: boxes; go: goes), -s everything else.

Derivation reads a story with the forms of each word's own part of speech only (a noun's
plural, a verb's -s/-ed/-ing, an adjective's -er/-est), so a ``Words:`` line never names
"farm" for a story about a "farmer"; the eval counts every form, so a generation's
"farmer" does use "farm".
"""

from __future__ import annotations

import functools
import re

from .pos_words import ADJECTIVES, IRREGULAR, NOUNS, VERBS

SUFFIXES = ("s", "ed", "ing", "er", "est")  # -es is -s's spelling after a sibilant or o
POS_SUFFIXES = {"verb": ("s", "ed", "ing"), "noun": ("s",), "adjective": ("er", "est")}
_WORD = re.compile(r"[a-z]+")
_DOUBLES = re.compile(r"^[^aeiou]*[aeiou][^aeiouwxy]$")
_VOWELS = "aeiou"


def text_words(text: str) -> list[str]:
    """The words of ``text``: lower-case runs of a-z, in order."""
    return _WORD.findall(text.lower())


def attach(base: str, suffix: str) -> str:
    """``base`` with ``suffix`` (one of ``SUFFIXES``) attached by the spelling rules."""
    if suffix == "s":
        if base.endswith(("s", "x", "z", "ch", "sh", "o")):
            return base + "es"
        return base[:-1] + "ies" if _consonant_y(base) else base + "s"
    if suffix == "ing":
        if base.endswith("ie"):
            return base[:-2] + "ying"
        if base.endswith("e") and not base.endswith(("ee", "ye", "oe")) and len(base) > 2:
            return base[:-1] + "ing"
        return base + base[-1] + "ing" if _doubles(base) else base + "ing"
    # -ed, -er, -est: a vowel suffix whose y turns to i
    if base.endswith("e"):
        return base + suffix[1:]
    if _consonant_y(base):
        return base[:-1] + "i" + suffix
    return base + base[-1] + suffix if _doubles(base) else base + suffix


@functools.cache
def forms(base: str, suffixes: tuple[str, ...] = SUFFIXES) -> frozenset[str]:
    """Every form of ``base`` (lower case) by ``suffixes`` and its irregular forms."""
    base = base.lower()
    return frozenset({base, *(attach(base, s) for s in suffixes), *IRREGULAR.get(base, ())})


def uses(text_word_set: set[str] | frozenset[str], asked: str) -> bool:
    """Whether a text with these words uses ``asked``: a word, or a phrase every word of
    which is used."""
    return all(forms(word) & text_word_set for word in text_words(asked)) and bool(
        text_words(asked))


@functools.cache
def lemma_index() -> dict[str, tuple[str, str]]:
    """form -> (base, part of speech) over the word lists, each word by the forms of its
    own part of speech (a form two bases share goes to the first listed: verbs, then
    nouns, then adjectives)."""
    index: dict[str, tuple[str, str]] = {}
    for pos, words in (("verb", VERBS), ("noun", NOUNS), ("adjective", ADJECTIVES)):
        for base in sorted(words):
            for form in sorted(forms(base, POS_SUFFIXES[pos])):
                index.setdefault(form, (base, pos))
    return index


def _consonant_y(base: str) -> bool:
    return len(base) > 1 and base.endswith("y") and base[-2] not in _VOWELS


def _doubles(base: str) -> bool:
    return bool(_DOUBLES.match(base))
