from __future__ import annotations

from typing import Protocol


class BatchTimePredictor(Protocol):
    """Predicted wall time, in seconds, of one engine step of the given shape.

    Features (the artifact's): prefill tokens, decode tokens (= number of
    decodes, one token each), sum of decode context lengths, and prefill
    context already processed before this batch's chunks. Total tokens is
    prefill + decode tokens. Beyond the artifact's: the rows whose token is
    drawn with temperature or penalties rather than by argmax (a model may
    ignore it).
    """

    name: str

    def batch_time(self, num_prefill_tokens: int, num_decode_tokens: int,
                   decode_context: int, prefill_context: int, num_sampled: int = 0) -> float: ...
