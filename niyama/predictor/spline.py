"""A linear spline in total tokens plus attention's costs: one model for every batch shape.

    time = intercept + a * T + sum_k h_k * max(0, T - k)      T = prefill + decode tokens
         + [P > 0] * prefill_step + [decodes > 0] * decode_step (each part's fixed cost: its kernels)
         + b * decodes + c * decode_context                    (lm_head and sampling per decode; KV read)
         + d * C + e * P * C + f * P * P / 2                   (a chunk of P tokens after C cached ones:
                                                                its KV read; its attention's query-key pairs)
         + g * S                                               (S rows drawn with temperature or penalties:
                                                                the sampler's passes over their logits)

The hinges bend the curve where a step turns from memory-bound (weights read once, time nearly flat in
T) to compute-bound (time proportional to T), wherever that is on the machine; the two-regime linear
model (linear.py) fixes one break at 512 tokens and jumps there. P * C + P * P / 2 is the number of
query-key pairs of a causal chunk, attention's quadratic term; the two parts get their own coefficients
because a kernel that skips masked pairs (flash attention on a GPU) pays P * P / 2 where one that masks
them (the CPU reference) pays P * P.
Fitted by `fit.fit_spline` to minimise relative error. Beyond the largest measured total the curve
goes on at its last slope (never downhill), and no prediction is below `min_s`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

KIND = "linear-spline"


@dataclass(frozen=True)
class LinearSpline:
    name: str
    knots: tuple[int, ...]          # total tokens where the slope may change
    intercept: float                # seconds
    total_tokens: float             # seconds per token, below the first knot
    hinges: tuple[float, ...]       # change of slope at each knot, seconds per token
    prefill_step: float             # seconds added when the step has a prefill chunk
    decode_step: float              # seconds added when the step has decodes
    decodes: float                  # seconds per decode, beyond its token
    decode_context: float           # seconds per token of decode context
    prefill_context: float          # seconds per cached token before the chunk
    chunk_context_pairs: float      # seconds per (chunk token x cached token), P * C
    chunk_self_pairs: float         # seconds per causal pair within the chunk, P * P / 2
    max_total: int                  # largest total measured; beyond it the curve is extrapolated
    min_s: float                    # floor of every prediction, seconds
    sampled: float = 0.0            # seconds per row drawn with temperature or penalties (beyond an argmax)
    end_slope: float = field(init=False)     # slope of the curve beyond max_total (>= 0)
    end_value: float = field(init=False)     # the curve's value at max_total

    def __post_init__(self):
        if len(self.hinges) != len(self.knots):
            raise ValueError(f"{len(self.knots)} knots but {len(self.hinges)} hinge coefficients")
        object.__setattr__(self, "end_slope", max(0.0, self.total_tokens + sum(self.hinges)))
        object.__setattr__(self, "end_value", self._curve(self.max_total))

    def _curve(self, total: int) -> float:
        t = self.intercept + self.total_tokens * total
        for k, h in zip(self.knots, self.hinges):
            if total > k:
                t += h * (total - k)
        return t

    def batch_time(self, num_prefill_tokens: int, num_decode_tokens: int,
                   decode_context: int, prefill_context: int, num_sampled: int = 0) -> float:
        total = num_prefill_tokens + num_decode_tokens
        if total <= self.max_total:
            t = self._curve(total)
        else:
            t = self.end_value + self.end_slope * (total - self.max_total)
        if num_prefill_tokens:
            t += self.prefill_step
        if num_decode_tokens:
            t += self.decode_step
        t += (self.decodes * num_decode_tokens + self.decode_context * decode_context
              + (self.prefill_context + self.chunk_context_pairs * num_prefill_tokens) * prefill_context
              + self.chunk_self_pairs * 0.5 * num_prefill_tokens * num_prefill_tokens + self.sampled * num_sampled)
        return t if t > self.min_s else self.min_s

    def to_dict(self) -> dict:
        return {"kind": KIND, "name": self.name, "knots": list(self.knots), "intercept": self.intercept,
                "total_tokens": self.total_tokens, "hinges": list(self.hinges), "prefill_step": self.prefill_step,
                "decode_step": self.decode_step, "decodes": self.decodes,
                "decode_context": self.decode_context, "prefill_context": self.prefill_context,
                "chunk_context_pairs": self.chunk_context_pairs, "chunk_self_pairs": self.chunk_self_pairs,
                "max_total": self.max_total, "min_s": self.min_s, "sampled": self.sampled}

    @classmethod
    def from_dict(cls, data: dict) -> "LinearSpline":
        return cls(name=data["name"], knots=tuple(int(k) for k in data["knots"]), intercept=float(data["intercept"]),
                   total_tokens=float(data["total_tokens"]), hinges=tuple(float(h) for h in data["hinges"]),
                   prefill_step=float(data.get("prefill_step", 0.0)), decode_step=float(data.get("decode_step", 0.0)),
                   decodes=float(data["decodes"]), decode_context=float(data["decode_context"]),
                   prefill_context=float(data["prefill_context"]),
                   chunk_context_pairs=float(data["chunk_context_pairs"]),
                   chunk_self_pairs=float(data["chunk_self_pairs"]), max_total=int(data["max_total"]),
                   min_s=float(data["min_s"]), sampled=float(data.get("sampled", 0.0)))
