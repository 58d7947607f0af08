"""Shipped batch-time profiles, by name (model x hardware).

Built in: the paper's A100 fit. Shipped as data: every `data/<name>.json` written by `niyama fit-predictor`
(a profile measured later ships by dropping its JSON there). Anywhere else: a JSON file by path."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .linear import LinearCoefficients, TwoRegimeLinear
from .spline import KIND as SPLINE_KIND
from .spline import LinearSpline

log = logging.getLogger("niyama.predictor")

DATA_DIR = Path(__file__).parent / "data"      # shipped JSON profiles, one per name
KINDS = {"two-regime-linear": TwoRegimeLinear, SPLINE_KIND: LinearSpline}     # a profile JSON's "kind"

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

BUILT_IN = {p.name: p for p in (A100_LLAMA3_8B,)}


def from_dict(data: dict, source: str = "profile"):
    """A predictor from its JSON form (`to_dict` of any kind in KINDS)."""
    cls = KINDS.get(data.get("kind"))
    if cls is None:
        raise ValueError(f"{source}: unsupported profile kind {data.get('kind')!r}; known: {', '.join(KINDS)}")
    return cls.from_dict(data)


def shipped_names() -> list[str]:
    """Names of the JSON profiles shipped under DATA_DIR."""
    return sorted(p.stem for p in DATA_DIR.glob("*.json")) if DATA_DIR.is_dir() else []


def _shipped(name: str):
    path = DATA_DIR / f"{name}.json"
    return from_dict(json.loads(path.read_text()), str(path)) if path.is_file() else None


def _all_profiles() -> dict:
    """Built in, then shipped as data. A shipped file that does not load is left out here (with a
    warning), not allowed to break every import; `load_profile` of its name raises the error."""
    out = dict(BUILT_IN)
    for name in shipped_names():
        try:
            out.setdefault(name, _shipped(name))
        except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
            log.warning("shipped profile %s does not load: %r", name, e)
    return out


PROFILES = _all_profiles()     # every profile by name


@dataclass(frozen=True)
class ScaledPredictor:
    """Another predictor's times x `factor`: a machine that is uniformly slower or faster than a profile
    (what-if runs, and a scheduler planning with a wrong profile in the simulator)."""

    base: object
    factor: float

    @property
    def name(self) -> str:
        return f"{self.base.name}*{self.factor:g}"

    def batch_time(self, num_prefill_tokens: int, num_decode_tokens: int,
                   decode_context: int, prefill_context: int, num_sampled: int = 0) -> float:
        return self.factor * self.base.batch_time(num_prefill_tokens, num_decode_tokens, decode_context,
                                                  prefill_context, num_sampled)


def load_profile(spec: str):
    """A built-in or shipped profile name, or a JSON file (`niyama fit-predictor`, `niyama replay`: any kind
    in KINDS); `NAME*F` scales every time by F (e.g. `a100-llama3-8b*2`: a machine twice as slow)."""
    name, star, factor = spec.rpartition("*")
    if star and name:
        try:
            f = float(factor)
        except ValueError:
            raise ValueError(f"profile {spec!r}: the factor after '*' must be a number") from None
        if not f > 0:
            raise ValueError(f"profile {spec!r}: the factor must be > 0")
        return ScaledPredictor(load_profile(name), f)
    if spec in PROFILES:
        return PROFILES[spec]
    shipped = _shipped(spec) if Path(spec).name == spec and not spec.endswith(".json") else None
    if shipped is not None:
        return shipped
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"unknown profile {spec!r}: use one of {', '.join(list(BUILT_IN) + shipped_names())} "
                         "or a profile JSON file")
    return from_dict(json.loads(path.read_text()), spec)
