"""Incremental detokenisation: text out as soon as the tokens so far spell it completely.

Byte-level BPE splits a multi-byte character (an emoji, an accented letter) across tokens;
decoding such a token alone gives U+FFFD. So each new piece is the difference between the
decoding of a short window ending at the new token and of the same window without it, and
nothing is emitted while the window's text still ends in an incomplete character. The
window (``prefix_offset`` .. end) keeps the work per token constant; decoding it with a
little left context keeps word-leading spaces that some decoders drop at a sequence start.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDecoder:
    """Feed token ids one at a time; get back the text each one completes."""

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        prefix = self.decode(self.ids[self.prefix_offset:self.read_offset])
        text = self.decode(self.ids[self.prefix_offset:])
        if len(text) <= len(prefix) or text.endswith(REPLACEMENT_CHAR):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix):]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        prefix = self.decode(self.ids[self.prefix_offset:self.read_offset])
        text = self.decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix):]
