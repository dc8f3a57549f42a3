"""A completion's text as its tokens arrive: decoded incrementally, cut at stop strings."""

from __future__ import annotations

import codecs
from collections.abc import Callable


class CompletionText:
    """Decodes committed tokens into text and cuts it at the first stop string.

    Text is released (``feed`` returns it) only once no stop string can still begin in it,
    and a UTF-8 sequence split across tokens is held until it is whole, so a client never
    sees a stop string or half a character. ``tokens`` counts the tokens that made the
    text: up to and including the one that completed a stop string."""

    def __init__(self, detokenize: Callable[[list[int]], bytes], stops: list[str]):
        self._detokenize = detokenize
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = [s for s in stops if s]
        self.text = ""
        self.tokens = 0
        self.stopped = False  # a stop string matched: the text ends before it
        self._released = 0

    def feed(self, tokens: list[int]) -> str:
        """Take one round's tokens; the text that can now be released."""
        for token in tokens:
            if self.stopped:
                break
            self.tokens += 1
            self._extend(self._decoder.decode(self._detokenize([token])))
        return self._release(final=self.stopped)

    def finish(self) -> str:
        """The request ended: whatever is held back, complete characters or not."""
        if not self.stopped:
            self._extend(self._decoder.decode(b"", final=True))
        return self._release(final=True)

    def _extend(self, piece: str) -> None:
        if not piece:
            return
        searched_from = max(0, len(self.text) - max(map(len, self._stops), default=0))
        self.text += piece
        hits = [i for s in self._stops if (i := self.text.find(s, searched_from)) >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True

    def _release(self, final: bool) -> str:
        end = len(self.text) if final else len(self.text) - self._held_back()
        out, self._released = self.text[self._released: end], max(self._released, end)
        return out

    def _held_back(self) -> int:
        """Length of the longest end of the text that a stop string begins with."""
        return max((n for s in self._stops for n in range(min(len(s) - 1, len(self.text)), 0, -1)
                    if self.text.endswith(s[:n])), default=0)
