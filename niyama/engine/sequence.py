"""One generation in the engine: its tokens, sampling state and how it ends.

The scheduler's `Request` carries the QoS and progress the scheduler needs;
the `Sequence` carries what only the engine needs (token ids, the sampler's
random stream, why it stopped). Text (detokenization, stop strings) is a
`TextOutput` beside it, updated outside the model step."""

from __future__ import annotations

from ..request import Request
from .sampling import SamplingParams
from .text_output import TextOutput
from .tokenizer import Tokenizer


def stop_token_ids(params: SamplingParams, eos_token_ids: "tuple[int, ...]") -> frozenset[int]:
    """Tokens that end generation (and are no text)."""
    return frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else frozenset(eos_token_ids))


# one output token's log-probabilities: (the token's, [(token id, logprob) of the most likely tokens])
Logprobs = tuple[float, list[tuple[int, float]]]


class Sequence:
    def __init__(self, request: Request, prompt_ids: list[int], params: SamplingParams,
                 tokenizer: Tokenizer | None, eos_token_ids: tuple[int, ...], seed: int = 0):
        """`tokenizer`: None for token ids only (dummy weights, or the server's engine process, where text is
        made on the HTTP side). `seed`: the request's random stream (sampler.py: with the output position it
        decides every draw)."""
        self.request = request
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.num_emitted = 0                     # output tokens already handed to the caller (the server's core)
        self.params = params
        self.seed = seed
        self.penalty_slot: int | None = None     # the sampler's, while the request is in the engine
        self.matcher = None                      # llguidance's LLMatcher when params.grammar is set (grammar.py)
        # per output token, with params.logprobs set (None otherwise)
        self.logprobs: list[Logprobs] | None = [] if params.logprobs is not None else None
        self.finish_reason: str | None = None    # "stop" (EOS, stop string/token), "length", "abort"
        self._stop_ids = stop_token_ids(params, eos_token_ids)
        self.output = (TextOutput(tokenizer, params.stop, self._stop_ids, params.include_stop_str_in_output)
                       if tokenizer is not None else None)

    @property
    def all_ids(self) -> list[int]:
        """Prompt + generated: what a (re-)prefill computes."""
        return self.prompt_ids + self.output_ids if self.output_ids else self.prompt_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return self.output.text if self.output is not None else ""

    def append(self, token: int, logprobs: Logprobs | None = None) -> None:
        """Record a sampled token (and its log-probabilities, if asked for) and decide whether generation ends
        here (stop token or length). The one place that decides it: the replica and the server read it."""
        self.output_ids.append(token)
        if self.logprobs is not None:
            self.logprobs.append(logprobs)
        if token in self._stop_ids:
            self.finish_reason = "stop"
        elif len(self.output_ids) >= self.params.max_tokens:
            self.finish_reason = "length"

    def update_text(self) -> bool:
        """Bring the text up to the tokens; True when a stop string ends it (the caller stops the request)."""
        if self.output is None:
            return False
        if self.output.update(self.output_ids, self.finished):
            del self.output_ids[self.output.num_tokens:]    # tokens made after the stop string's are dropped
            if self.logprobs is not None:
                del self.logprobs[self.output.num_tokens:]
            return True
        return False

    def take_text(self) -> str:
        """Text produced since the last call (streaming)."""
        return self.output.take_text() if self.output is not None else ""

    def finish(self, reason: str) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
