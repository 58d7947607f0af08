"""Shipped batch-time profiles, by name (model x hardware)."""

from __future__ import annotations

import json
from pathlib import Path

from .linear import LinearCoefficients, TwoRegimeLinear

# Llama-3-8B on one A100-80GB: the artifact's fitted coefficients.
A100_LLAMA3_8B = TwoRegimeLinear(
    name="a100-llama3-8b",
    small=LinearCoefficients(total_tokens=5.882475e-5, prefill_tokens=2.247956e-5, decode_tokens=3.634519e-5,
                             decode_context=1.111258e-7, prefill_context=7.554773e-7, intercept=0.014936),
    large=LinearCoefficients(total_tokens=2.719050e-5, prefill_tokens=6.863043e-5, decode_tokens=-4.143993e-5,
                             decode_context=1.663409e-7, prefill_context=2.727223e-6, intercept=0.005004),
)

# What the scheduler and the simulator plan with unless told otherwise: the paper's A100 fit.
DEFAULT_PROFILE = "a100-llama3-8b"

PROFILES = {p.name: p for p in (A100_LLAMA3_8B,)}


def load_profile(spec: str):
    """A shipped profile name, or a JSON file written by `TwoRegimeLinear.to_dict`."""
    if spec in PROFILES:
        return PROFILES[spec]
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"unknown profile {spec!r}: use one of {sorted(PROFILES)} or a JSON file")
    data = json.loads(path.read_text())
    if data.get("kind") != "two-regime-linear":
        raise ValueError(f"{spec}: unsupported profile kind {data.get('kind')!r}")
    return TwoRegimeLinear.from_dict(data)
