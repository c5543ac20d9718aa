"""Streaming a batch's text to a terminal in row order while every row is still being generated."""

from __future__ import annotations

from typing import TextIO


class OrderedStream:
    """Writes rows' text in row order while they are generated: the current row live, later rows buffered until
    every row before them is done. Incomplete UTF-8 (a trailing U+FFFD) is held back until its bytes arrive."""

    def __init__(self, tokenizer, headers: list[str], prompts: list[str], budgets: list[int], eos_id: int,
                 out: TextIO):
        self.tokenizer, self.headers, self.prompts, self.budgets, self.eos_id = tokenizer, headers, prompts, budgets, eos_id
        self.out = out
        self.tokens: list[list[int]] = [[] for _ in prompts]
        self.current, self.written = 0, 0  # row being written live; characters of its completion already out
        self._start_row()

    def __call__(self, row: int, token: int) -> None:
        self.tokens[row].append(token)
        while self.current < len(self.prompts):
            self._write_new_text(final=self._done(self.current))
            if not self._done(self.current):
                return
            self.current += 1
            self._start_row()

    def finish(self) -> None:
        while self.current < len(self.prompts):
            self._write_new_text(final=True)
            self.current += 1
            self._start_row()

    def _done(self, row: int) -> bool:
        tokens = self.tokens[row]
        return len(tokens) >= self.budgets[row] or (bool(tokens) and tokens[-1] == self.eos_id)

    def _start_row(self) -> None:
        if self.current > 0:
            self.out.write("\n")
        if self.current < len(self.prompts):
            if self.headers[self.current]:
                self.out.write(self.headers[self.current] + "\n")
            self.out.write(self.prompts[self.current])
            self.written = 0
        self.out.flush()

    def _write_new_text(self, final: bool) -> None:
        text = self.tokenizer.decode(self.tokens[self.current], skip_special_tokens=True)
        if not final:
            text = text.rstrip("\ufffd")
        if len(text) > self.written:
            self.out.write(text[self.written:])
            self.written = len(text)
            self.out.flush()
