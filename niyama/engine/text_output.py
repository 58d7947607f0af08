"""A request's output text: incremental detokenization and stop strings.

It runs outside the model step: in-process `LLMEngine.step` updates it after each step, and the server
runs it in the HTTP process, so neither the step times the scheduler plans with nor the engine process pay
for it. A stop string found here ends the request (the engine stops it at its next pause; tokens it made
meanwhile are dropped here)."""

from __future__ import annotations

from .tokenizer import Detokenizer, Tokenizer


class TextOutput:
    def __init__(self, tokenizer: Tokenizer, stop: "tuple[str, ...] | list[str]" = (),
                 stop_token_ids: "set[int] | frozenset[int]" = frozenset(), include_stop: bool = False):
        """`include_stop`: the text keeps the stop string that ended it (vLLM's include_stop_str_in_output)."""
        self._detok = Detokenizer(tokenizer)
        self._stop = tuple(stop)
        self._include_stop = include_stop
        self._stop_ids = stop_token_ids       # a stop token ends generation and is no text
        self._text = ""
        self._visible = 0      # text[:_visible] may be shown (a possible stop-string prefix is held back)
        self._taken = 0
        self._scanned = 0      # text[:_scanned] has been searched for stop strings (none ends inside it)
        self._longest = max(map(len, self._stop), default=0)
        self.scanned_chars = 0  # characters the stop-string search has looked at (a test's operation count)
        self.num_tokens = 0    # output tokens consumed (at a stop string: the tokens up to it)
        self.stopped = False   # a stop string ended the text

    @property
    def text(self) -> str:
        return self._text[:self._visible]

    def update(self, output_ids: list[int], finished: bool = False) -> bool:
        """Catch up with `output_ids` (every token generated so far); `finished`: the engine ended the
        request. True when a stop string ends the text (tokens after it are ignored from then on)."""
        if self.stopped:
            return True
        if len(output_ids) > self.num_tokens:
            ids = output_ids[:-1] if output_ids[-1] in self._stop_ids else output_ids
            self.num_tokens = len(output_ids)
            if ids:
                self._detok.add(ids)
                self._text = self._detok.text
                if self._check_stop_strings():
                    return True
        if finished:
            self._visible = len(self._text)
        return False

    def take_text(self) -> str:
        """Text produced since the last call (streaming)."""
        delta = self._text[self._taken:self._visible]
        self._taken = self._visible
        return delta

    def _check_stop_strings(self) -> bool:
        """Search the new text (and the tail of longest - 1 characters before it, where a stop string may
        have begun) for stop strings, so a token costs the same at any length of text."""
        stops, text = self._stop, self._text
        if not stops:
            self._visible = len(text)
            return False
        start = max(0, self._scanned - (self._longest - 1))   # every earlier stop string would have been found
        self._scanned = len(text)
        self.scanned_chars += (len(text) - start) * len(stops)
        hits = [(i, -len(s)) for i, s in ((text.find(s, start), s) for s in stops) if i >= 0]
        if hits:
            at, minus_len = min(hits)         # the earliest stop string; of those starting there, the longest
            self._text = text[:at - minus_len if self._include_stop else at]
            self._visible = len(self._text)
            self.stopped = True
            return True
        hold = 0   # keep back a tail that could still become a stop string: its longest proper prefix here
        tail = text[len(text) - min(len(text), self._longest - 1):]
        for s in stops:
            first = s[0]
            p = len(tail) - min(len(s) - 1, len(tail))
            while True:
                p = tail.find(first, p)
                if p < 0 or len(tail) - p <= hold:
                    break
                self.scanned_chars += len(tail) - p
                if s.startswith(tail[p:]):
                    hold = len(tail) - p
                    break
                p += 1
        self._visible = len(text) - hold
        return False
