from __future__ import annotations

from dataclasses import asdict, dataclass

FEATURES = ("total_tokens", "prefill_tokens", "decode_tokens", "decode_context", "prefill_context")


@dataclass(frozen=True)
class LinearCoefficients:
    """Seconds per unit of each feature, plus an intercept in seconds."""

    total_tokens: float
    prefill_tokens: float
    decode_tokens: float
    decode_context: float
    prefill_context: float
    intercept: float

    def __call__(self, total: int, prefill: int, decode: int, decode_ctx: int, prefill_ctx: int) -> float:
        return (self.intercept + self.total_tokens * total + self.prefill_tokens * prefill
                + self.decode_tokens * decode + self.decode_context * decode_ctx
                + self.prefill_context * prefill_ctx)


@dataclass(frozen=True)
class TwoRegimeLinear:
    """Two linear fits split on total tokens (memory-bound / compute-bound): the paper's features only (it
    has no term for sampled rows)."""

    name: str
    small: LinearCoefficients      # total tokens <= split
    large: LinearCoefficients      # total tokens > split
    split: int = 512

    def batch_time(self, num_prefill_tokens: int, num_decode_tokens: int,
                   decode_context: int, prefill_context: int, num_sampled: int = 0) -> float:
        total = num_prefill_tokens + num_decode_tokens
        fit = self.small if total <= self.split else self.large
        return fit(total, num_prefill_tokens, num_decode_tokens, decode_context, prefill_context)

    def to_dict(self) -> dict:
        return {"kind": "two-regime-linear", "name": self.name, "split": self.split,
                "small": asdict(self.small), "large": asdict(self.large)}

    @classmethod
    def from_dict(cls, data: dict) -> "TwoRegimeLinear":
        return cls(name=data["name"], split=int(data.get("split", 512)),
                   small=LinearCoefficients(**data["small"]), large=LinearCoefficients(**data["large"]))
