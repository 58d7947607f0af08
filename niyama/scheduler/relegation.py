"""Eager relegation and the prefill-rate estimate it relies on."""

from __future__ import annotations

from ..request import Request


class PrefillRate:
    """Exponential moving average of observed prefill tokens per second."""

    def __init__(self, initial: float = 8500.0, decay: float = 0.995):
        if initial <= 0 or not 0 <= decay < 1:
            raise ValueError("prefill rate must be > 0 and decay in [0, 1)")
        self.tokens_per_s = initial
        self.decay = decay

    def observe(self, num_prefill_tokens: int, duration_s: float) -> None:
        if num_prefill_tokens > 0 and duration_s > 0:
            self.tokens_per_s = self.decay * self.tokens_per_s + (1 - self.decay) * num_prefill_tokens / duration_s


def too_late(now: float, req: Request, rate: PrefillRate) -> bool:
    """Would `req`'s prefill, started now at the observed rate, miss its first-token deadline?"""
    return now + req.num_remaining_prefill / rate.tokens_per_s > req.first_token_deadline_s
