"""The TinyStoriesInstruct record layout, written once: the demo corpus writes records in
it, and prompts (generate's --summary/--words/--features, training samples, the server)
end in it where the story begins."""

from __future__ import annotations

FIELDS = ("Features", "Words", "Summary", "Random sentence")


def instruct_text(features: str | None = None, words: str | None = None,
                  summary: str | None = None, random_sentence: str | None = None,
                  story: str = "") -> str:
    """The given fields in the corpus's order, then ``Story:`` and the story (none: the
    prompt a model continues)."""
    values = (features, words, summary, random_sentence)
    lines = [f"{name}: {value.strip()}" for name, value in zip(FIELDS, values, strict=True)
             if value is not None]
    lines.append(f"Story: {story}" if story else "Story:")
    return "\n".join(lines)


def instruct_prompt(summary: str | None, words: str | None, features: str | None) -> str:
    """The prompt for a story with this summary, these words and these features."""
    return instruct_text(features=features, words=words, summary=summary)


def has_instruct_layout(document: str) -> bool:
    """True when ``document`` is a record in this layout: field lines, then ``Story:``."""
    head, sep, _ = document.partition("Story:")
    lines = [line for line in head.splitlines() if line.strip()]
    return bool(sep and lines) and all(
        any(line.startswith(f"{name}:") for name in FIELDS) for line in lines)


def sample_prompt(document: str, opening_words: int = 8) -> str:
    """The prompt a training sample continues, taken from a held-out ``document`` so it
    suits the data: in this layout, the record's fields up to ``Story:`` (the story is the
    model's to write); in plain text, the document's opening words."""
    if has_instruct_layout(document):
        return document.partition("Story:")[0] + "Story:"
    return " ".join(document.split()[:opening_words])
