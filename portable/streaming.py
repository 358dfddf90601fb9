"""Streaming generated text to a terminal as tokens arrive.

Byte-level tokenizers can end a step in the middle of a UTF-8 character, and a stop string may be arriving a token at
a time: the streamer decodes the whole sequence each time and prints only the part that can no longer change (no
trailing replacement character, no tail that could still grow into a stop string).
"""

from __future__ import annotations

import sys
from typing import TextIO


class TextStreamer:
    def __init__(self, decode, stop_strings: tuple[str, ...] = (), out: TextIO | None = None):
        self.decode = decode
        self.stop_strings = stop_strings
        self.out = out or sys.stdout
        self.tokens: list[int] = []
        self.printed = ""
        self.stopped = False

    def _visible(self, final: bool) -> str:
        text = self.decode(self.tokens)
        cut = min((i for i in (text.find(s) for s in self.stop_strings) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return text[:cut]
        if final:
            return text
        text = text.rstrip("\ufffd")
        hold = max((k for s in self.stop_strings for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return text[:len(text) - hold]

    def push(self, token: int | None) -> None:
        if token is None or self.stopped:
            return
        self.tokens.append(token)
        self._emit(self._visible(final=False))

    def end(self) -> None:
        if not self.stopped:
            self._emit(self._visible(final=True))
        self.out.write("\n")
        self.out.flush()

    def _emit(self, visible: str) -> None:
        if visible.startswith(self.printed) and len(visible) > len(self.printed):
            self.out.write(visible[len(self.printed):])
            self.out.flush()
            self.printed = visible
