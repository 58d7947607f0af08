"""Sampling parameters and the sampler: penalties, greedy, temperature, top-k, top-p, min-p, seeded.

A row goes through the steps in the order transformers' `generate` applies them: repetition penalty
(prompt and output tokens), presence and frequency penalties (output tokens, OpenAI's definition), then
greedy argmax or temperature, top-k, top-p, min-p and a draw. Rows that set no penalty skip the first
steps and need no token history."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Below this a temperature turns float32 logits into inf and the softmax into NaN (a request sent 1e-40
# and failed the whole step); vLLM clamps to the same value. 0 means greedy.
MIN_TEMPERATURE = 0.01
MAX_OPENAI_PENALTY = 2.0          # presence and frequency penalties lie in [-2, 2] (OpenAI API)

# (prompt_ids, output_ids) of one row: the tokens a penalty looks at
History = tuple[list[int], list[int]]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0        # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                  # 0 = off
    min_p: float = 0.0              # 0 = off; drop tokens below min_p x the top token's probability
    repetition_penalty: float = 1.0     # 1 = off; HF's: seen (prompt or output) logits /p if > 0, *p if < 0
    presence_penalty: float = 0.0       # OpenAI's: minus this once for each token already in the output
    frequency_penalty: float = 0.0      # OpenAI's: minus this times the token's count in the output
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
        self._check_penalties()
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    def _check_penalties(self):
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1] (0 = off), got {self.min_p!r}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1 = off), "
                             f"got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -MAX_OPENAI_PENALTY <= value <= MAX_OPENAI_PENALTY:
                raise ValueError(f"{name} must be in [-{MAX_OPENAI_PENALTY:g}, {MAX_OPENAI_PENALTY:g}] (0 = off), "
                                 f"got {value!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        """Whether the row needs its token history."""
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           histories: list[History] | None = None) -> list[int]:
    """One token per row of `logits` `[n, vocab]` (float32)."""
    return sample_on_device(logits, params, generators, histories).tolist()


def sample_on_device(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                     histories: list[History] | None = None) -> torch.Tensor:
    """The tokens as a tensor on the logits' device; nothing waits for the GPU. `histories[i]` is row i's
    (prompt_ids, output_ids), read only for rows whose params set a penalty (then it is required)."""
    out = logits.argmax(dim=-1)
    for i, p in enumerate(params):
        if p.greedy and not p.penalized:
            continue
        row = logits[i]
        if p.penalized:
            if histories is None:
                raise ValueError("penalties need each row's token history")
            row = penalize(row, p, histories[i])
        if p.greedy:
            out[i] = row.argmax()
        else:
            out[i] = _draw(probabilities(row, p), out[i], generators[i])
    return out


def penalize(row: torch.Tensor, p: SamplingParams, history: History) -> torch.Tensor:
    """A logits row `[vocab]` after the repetition, presence and frequency penalties (a new tensor)."""
    prompt_ids, output_ids = history
    ids = _ids_on(row.device, prompt_ids + output_ids)        # one upload serves both penalties
    if p.repetition_penalty != 1:
        # index_fill_, not `seen[ids] = True`: that copies the True from the host and waits for the GPU
        seen = torch.zeros_like(row, dtype=torch.bool).index_fill_(0, ids, True)
        scaled = torch.where(row < 0, row * p.repetition_penalty, row / p.repetition_penalty)
        row = torch.where(seen, scaled, row)
    if (p.presence_penalty or p.frequency_penalty) and output_ids:
        out_ids = ids[len(prompt_ids):]
        # scatter_add, not bincount: bincount on CUDA reads its input's max back to the host
        counts = torch.zeros_like(row).scatter_add_(0, out_ids, torch.ones_like(out_ids, dtype=row.dtype))
        row = row - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)
    return row


def probabilities(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """What a sampled row draws from `[vocab]`: temperature, then top-k, top-p and min-p (unnormalized;
    dropped tokens are 0)."""
    row = row / p.temperature
    if p.top_k and p.top_k < row.shape[-1]:
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, dim=-1)
    if p.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # drop tokens once the mass before them already reaches top_p; the first always stays (a top_p
        # that float32 rounds to 0 must not drop every token)
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= p.top_p
        drop[0].fill_(False)                # `drop[0] = False` would wait for the GPU
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    if p.min_p:
        # the top token never falls below min_p (<= 1) x itself, so at least one stays
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return probs


def _draw(probs: torch.Tensor, fallback: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # one request's odd logits must not fail the step for everyone: without a usable distribution, greedy
    usable = torch.isfinite(probs).all() & (probs.sum() > 0)
    probs = torch.where(usable, torch.nan_to_num(probs, nan=0.0, posinf=0.0, neginf=0.0),
                        torch.nn.functional.one_hot(fallback, probs.shape[-1]).to(probs.dtype))
    return torch.multinomial(probs, 1, generator=generator)[0]


def _ids_on(device: torch.device, ids: list[int]) -> torch.Tensor:
    ids = torch.tensor(ids, dtype=torch.long)
    if device.type == "cuda":
        # a copy from pageable memory would block the host until the forward pass finishes
        return ids.pin_memory().to(device, non_blocking=True)
    return ids.to(device)
