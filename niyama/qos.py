"""QoS tiers, priorities and deadline arithmetic.

An interactive tier has a TTFT and a TBT target; a non-interactive tier has
only a TTLT target. Inside the scheduler both look the same: a first-token
deadline and a per-token pace. A non-interactive request gets an *effective*
TTFT that leaves room for its predicted output at the batch pace
(`TTFT_eff = TTLT - L_pred * TBT_batch`), and its decodes carry loose
per-token deadlines at that pace.

Token n (n = 1 is the first) is due at `A + (n - 1) * TBT` with the anchor
`A = max(actual first-token time, arrival + TTFT_eff)`: an early first token
banks slack, a late one re-anchors instead of staying late forever.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, replace
from pathlib import Path


class Priority(enum.IntEnum):
    """Priority hint; `low` requests are relegated first."""

    IMPORTANT = 0
    LOW = 1

    @classmethod
    def parse(cls, value: "str | int | Priority") -> "Priority":
        if isinstance(value, Priority):
            return value
        if isinstance(value, str):
            try:
                return cls[value.strip().upper()]
            except KeyError:
                raise ValueError(f"unknown priority {value!r}; use 'important' or 'low'") from None
        return cls(int(value))


ON_INFEASIBLE = ("relegate", "reject")


@dataclass(frozen=True)
class Tier:
    """One service class. Interactive: `ttft_s` + `tbt_s`. Non-interactive: `ttlt_s`.

    `on_infeasible`: what happens to a request whose first-token deadline the scheduler predicts, at
    arrival, that it cannot meet: `relegate` (the paper's way: accept it, serve it behind on-time work) or
    `reject` (admission control: refuse it at once, so a client or a router can go elsewhere)."""

    name: str
    ttft_s: float | None = None
    tbt_s: float | None = None
    ttlt_s: float | None = None
    on_infeasible: str = "relegate"

    def __post_init__(self):
        if self.on_infeasible not in ON_INFEASIBLE:
            raise ValueError(f"tier {self.name}: on_infeasible must be relegate or reject, "
                             f"got {self.on_infeasible!r}")
        interactive = self.ttft_s is not None or self.tbt_s is not None
        if interactive and (self.ttft_s is None or self.tbt_s is None):
            raise ValueError(f"tier {self.name}: an interactive tier needs both TTFT and TBT")
        if interactive == (self.ttlt_s is not None):
            raise ValueError(f"tier {self.name}: give either TTFT+TBT or TTLT, not both or neither")
        for field in ("ttft_s", "tbt_s", "ttlt_s"):
            value = getattr(self, field)
            if value is not None and not value > 0:
                raise ValueError(f"tier {self.name}: {field} must be > 0, got {value}")

    @property
    def interactive(self) -> bool:
        return self.ttlt_s is None

    @property
    def rejects_infeasible(self) -> bool:
        return self.on_infeasible == "reject"

    def describe(self) -> str:
        if self.interactive:
            return f"{self.name}: TTFT {self.ttft_s:g} s, TBT {self.tbt_s * 1000:g} ms"
        return f"{self.name}: TTLT {self.ttlt_s:g} s"


@dataclass(frozen=True)
class DeadlineRule:
    """How a tier turns into first-token deadline and token pace for one request.

    `tbt_batch_s`: the pace given to non-interactive decodes (0.4 s).
    `output_len_pred`: L_pred, the predicted output length of non-interactive
    requests (artifact: 15 by default, 150 for Azure Conv and ShareGPT).
    """

    tbt_batch_s: float = 0.4
    output_len_pred: int = 15

    def __post_init__(self):
        if not self.tbt_batch_s > 0:
            raise ValueError("tbt_batch_s must be > 0")
        if self.output_len_pred < 0:
            raise ValueError("output_len_pred must be >= 0")

    def ttft_s(self, tier: Tier) -> float:
        """Effective TTFT: the tier's TTFT, or TTLT minus the predicted decode time."""
        if tier.interactive:
            return tier.ttft_s
        return max(0.0, tier.ttlt_s - self.output_len_pred * self.tbt_batch_s)

    def tbt_s(self, tier: Tier) -> float:
        return tier.tbt_s if tier.interactive else self.tbt_batch_s


def token_deadline(n: int, arrival_s: float, ttft_s: float, tbt_s: float, first_token_s: float | None) -> float:
    """Deadline of output token n (1-based). Before the first token exists, the anchor is D_1."""
    d1 = arrival_s + ttft_s
    if n == 1:
        return d1
    anchor = d1 if first_token_s is None else max(first_token_s, d1)
    return anchor + (n - 1) * tbt_s


# --- tier sets -------------------------------------------------------------

def _paper_tiers(q1_tbt_s: float) -> tuple[Tier, ...]:
    return (Tier("Q1", ttft_s=6.0, tbt_s=q1_tbt_s), Tier("Q2", ttlt_s=600.0), Tier("Q3", ttlt_s=1800.0))


# Paper Table 3; ShareGPT runs used a 55 ms TBT for Q1.
TIER_PRESETS: dict[str, tuple[Tier, ...]] = {
    "default": _paper_tiers(0.050),
    "sharegpt": _paper_tiers(0.055),
    # Paper §4.4.2 "varying SLOs" on Azure Conv.
    "slo-variants": (Tier("Q1", ttft_s=3.0, tbt_s=0.050), Tier("Q2", ttft_s=6.0, tbt_s=0.050), Tier("Q3", ttlt_s=1000.0)),
    # Long prompts (Mooncake: mean 12K tokens, up to 126K): the paper's tiers with a 20 s Q1 TTFT. A 126K-token
    # prompt alone prefills in 8.5 s on the H100 profile, 64K in 3 s: 6 s would fail such prompts at any load.
    "long-context": (Tier("Q1", ttft_s=20.0, tbt_s=0.050), Tier("Q2", ttlt_s=600.0), Tier("Q3", ttlt_s=1800.0)),
}


def load_tiers(spec: str) -> tuple[Tier, ...]:
    """A preset name, or a JSON file: [{"name": "Q1", "ttft_ms": 6000, "tbt_ms": 50, "on_infeasible": "reject"},
    {"name": "Q2", "ttlt_ms": 600000}] (`on_infeasible` is optional: relegate by default)."""
    if spec in TIER_PRESETS:
        return TIER_PRESETS[spec]
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"unknown tier set {spec!r}: use one of {sorted(TIER_PRESETS)} or a JSON file")
    rows = json.loads(path.read_text())
    tiers = []
    for row in rows:
        ms = {k: row.get(k) for k in ("ttft_ms", "tbt_ms", "ttlt_ms")}
        tiers.append(Tier(row["name"], **{k[:-3] + "_s": (v / 1000.0 if v is not None else None) for k, v in ms.items()},
                          on_infeasible=row.get("on_infeasible", "relegate")))
    names = [t.name for t in tiers]
    if len(set(names)) != len(names) or not tiers:
        raise ValueError(f"{spec}: tier names must be unique and non-empty, got {names}")
    return tuple(tiers)


def with_admission(tiers: "tuple[Tier, ...]", spec: str | None) -> tuple[Tier, ...]:
    """Tiers with `on_infeasible` set from a CLI value: `reject` or `relegate` (every tier), or per tier
    `Q1=reject,Q2=relegate` (tiers not named keep theirs). None leaves them as they are."""
    if not spec:
        return tiers
    if spec in ON_INFEASIBLE:
        return tuple(replace(t, on_infeasible=spec) for t in tiers)
    by_name = {t.name: t for t in tiers}
    for item in spec.split(","):
        name, sep, value = (x.strip() for x in item.partition("="))
        if not sep or name not in by_name or value not in ON_INFEASIBLE:
            raise ValueError(f"--on-infeasible {spec!r}: write relegate, reject, or TIER=reject,... with tiers "
                             f"from {', '.join(by_name)}")
        by_name[name] = replace(by_name[name], on_infeasible=value)
    return tuple(by_name[t.name] for t in tiers)


def parse_mix(text: str | None, num_tiers: int) -> tuple[float, ...]:
    """'70,15,15' (or '70-15-15') -> normalised shares; None -> equal shares."""
    if text is None:
        return tuple(1.0 / num_tiers for _ in range(num_tiers))
    try:
        parts = [float(x) for x in text.replace("-", ",").split(",")]
    except ValueError:
        raise ValueError(f"tier mix {text!r}: write shares like 70,15,15") from None
    if len(parts) != num_tiers or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ValueError(f"tier mix {text!r} must be {num_tiers} non-negative numbers")
    total = sum(parts)
    return tuple(p / total for p in parts)
