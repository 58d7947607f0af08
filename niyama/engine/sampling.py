"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, seeded."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Below this a temperature turns float32 logits into inf and the softmax into NaN (a request sent 1e-40
# and failed the whole step); vLLM clamps to the same value. 0 means greedy.
MIN_TEMPERATURE = 0.01


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0        # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                  # 0 = off
    seed: int | None = None         # per-request stream; None draws from the engine's seed
    stop: tuple[str, ...] = ()      # stop strings (not included in the text)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False        # keep going past EOS (trace replay: outputs follow the trace)

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of `logits` `[n, vocab]` (float32)."""
    return sample_on_device(logits, params, generators).tolist()


def sample_on_device(logits: torch.Tensor, params: list[SamplingParams],
                     generators: list[torch.Generator | None]) -> torch.Tensor:
    """The tokens as a tensor on the logits' device; nothing waits for the GPU."""
    out = logits.argmax(dim=-1)
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = logits[i] / p.temperature
        if p.top_k and p.top_k < row.shape[-1]:
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            # drop tokens once the mass before them already reaches top_p; the first always stays (a top_p
            # that float32 rounds to 0 must not drop every token)
            drop = (sorted_probs.cumsum(-1) - sorted_probs) >= p.top_p
            drop[0] = False
            probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
        # one request's odd logits must not fail the step for everyone: without a usable distribution, greedy
        usable = torch.isfinite(probs).all() & (probs.sum() > 0)
        probs = torch.where(usable, torch.nan_to_num(probs, nan=0.0, posinf=0.0, neginf=0.0),
                            torch.nn.functional.one_hot(out[i], probs.shape[-1]).to(probs.dtype))
        out[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    return out
