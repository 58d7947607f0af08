"""One generation in the engine: its tokens, sampling state and text.

The scheduler's `Request` carries the QoS and progress the scheduler needs;
the `Sequence` carries what only the engine needs (token ids, the sampler's
random stream, detokenised text, why it stopped)."""

from __future__ import annotations

import torch

from ..request import Request
from .sampling import SamplingParams
from .tokenizer import Detokenizer, Tokenizer


class Sequence:
    def __init__(self, request: Request, prompt_ids: list[int], params: SamplingParams,
                 tokenizer: Tokenizer | None, eos_token_ids: tuple[int, ...], generator: torch.Generator | None):
        self.request = request
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.params = params
        self.generator = generator
        self.finish_reason: str | None = None    # "stop" (EOS, stop string/token), "length", "abort"
        self._stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        self._detok = Detokenizer(tokenizer) if tokenizer is not None else None
        self._text = ""
        self._visible = 0     # text[:_visible] may be shown (a possible stop-string prefix is held back)
        self._taken = 0

    @property
    def all_ids(self) -> list[int]:
        """Prompt + generated: what a (re-)prefill computes."""
        return self.prompt_ids + self.output_ids if self.output_ids else self.prompt_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return self._text[:self._visible]

    def append(self, token: int) -> None:
        """Record a sampled token and decide whether generation ends here."""
        self.output_ids.append(token)
        if token in self._stop_ids:
            self._finish("stop")
            return
        if self._detok is not None:
            self._detok.add(self.output_ids)
            self._text = self._detok.text
            if self._check_stop_strings():
                return
        if len(self.output_ids) >= self.params.max_tokens:
            self._finish("length")

    def take_text(self) -> str:
        """Text produced since the last call (streaming)."""
        delta = self._text[self._taken:self._visible]
        self._taken = self._visible
        return delta

    def abort(self) -> None:
        if self.finish_reason is None:
            self._finish("abort")

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        self._visible = len(self._text)

    def _check_stop_strings(self) -> bool:
        stops = self.params.stop
        if not stops:
            self._visible = len(self._text)
            return False
        longest = max(len(s) for s in stops)
        start = max(0, self._taken - longest)
        hits = [i for i in (self._text.find(s, start) for s in stops) if i >= 0]
        if hits:
            self._text = self._text[:min(hits)]
            self._finish("stop")
            return True
        hold = 0   # keep back a tail that could still become a stop string
        for s in stops:
            for k in range(min(len(s) - 1, len(self._text)), hold, -1):
                if self._text.endswith(s[:k]):
                    hold = k
                    break
        self._visible = len(self._text) - hold
        return False
