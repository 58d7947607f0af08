"""Per-request QoS from an OpenAI-style request body.

A request says how urgent it is in one of three ways (docs/serving.md, "QoS per request"):
- `tier`: the name of a configured tier (default tiers Q1, Q2, Q3);
- explicit targets in milliseconds: `ttft_ms` + `tbt_ms` (interactive) or `ttlt_ms` (batch);
- OpenAI's `service_tier`: `auto`/`default` -> the server's default tier, `priority`/`scale` -> the first
  interactive tier, `flex` -> the last tier (a configured tier name is accepted too).
With none of them the server's default tier applies. `priority` is `important` (default) or `low`, or
vLLM's integer priority (lower runs first; default 0): > 0 means `low`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..qos import Priority, Tier
from .errors import APIError

CUSTOM_TIER = "custom"     # the tier name of requests that give explicit targets
TARGET_FIELDS = ("ttft_ms", "tbt_ms", "ttlt_ms")
MIN_TARGET_MS = 1.0                       # a tinier positive float (5e-324) would become 0 s
MAX_TARGET_MS = 30 * 86400 * 1000.0       # 30 days


@dataclass
class QoSPolicy:
    tiers: dict[str, Tier]
    default_tier: str
    service_tiers: dict[str, str] = field(default_factory=dict)   # OpenAI service_tier -> tier name
    custom_on_infeasible: str = "relegate"    # for requests that give their own targets

    @classmethod
    def build(cls, tiers: "tuple[Tier, ...]", default_tier: str | None = None,
              service_tier_map: dict[str, str] | None = None,
              custom_on_infeasible: str | None = None) -> "QoSPolicy":
        by_name = {t.name: t for t in tiers}
        default = default_tier or tiers[0].name
        if default not in by_name:
            raise ValueError(f"default tier {default!r} is not one of the tiers {', '.join(by_name)}")
        interactive = [t.name for t in tiers if t.interactive] or [tiers[0].name]
        mapping = {"auto": default, "default": default, "priority": interactive[0], "scale": interactive[0],
                   "flex": tiers[-1].name}
        for key, name in (service_tier_map or {}).items():
            if name not in by_name:
                raise ValueError(f"service tier {key!r} maps to {name!r}, which is not one of {', '.join(by_name)}")
            mapping[key] = name
        return cls(by_name, default, mapping, custom_on_infeasible or "relegate")

    def resolve(self, body: dict) -> tuple[Tier, Priority]:
        """The tier and priority a request body asks for; APIError (400) says what is wrong."""
        return self._tier(body), parse_priority(body.get("priority"))

    def _tier(self, body: dict) -> Tier:
        name, service = body.get("tier"), body.get("service_tier")
        targets = {k: body[k] for k in TARGET_FIELDS if body.get(k) is not None}
        given = [what for what, present in (("tier", name is not None), ("service_tier", service is not None),
                                            ("ttft_ms/tbt_ms/ttlt_ms", bool(targets))) if present]
        if len(given) > 1:
            raise APIError(f"give one of tier, service_tier or explicit targets, not {' and '.join(given)}",
                           param=given[1])
        if targets:
            return replace(targets_tier(targets), on_infeasible=self.custom_on_infeasible)
        if name is not None:
            if not isinstance(name, str) or name not in self.tiers:
                raise APIError(f"unknown tier {name!r}; this server's tiers are {', '.join(self.tiers)}",
                               param="tier", code="unknown_tier")
            return self.tiers[name]
        if service is not None:
            target = self.service_tiers.get(service) if isinstance(service, str) else None
            if target is None and isinstance(service, str) and service in self.tiers:
                target = service
            if target is None:
                choices = sorted(set(self.service_tiers) | set(self.tiers))
                raise APIError(f"unknown service_tier {service!r}; use one of {', '.join(choices)}",
                               param="service_tier", code="unknown_tier")
            return self.tiers[target]
        return self.tiers[self.default_tier]


OPENAI_RESPONSE_TIERS = ("default", "flex", "scale", "priority")


def response_service_tier(body: dict) -> str:
    """The `service_tier` a response reports, in OpenAI's values (typed clients parse it into an enum): the
    one asked for when it is one of them (`auto` -> `default`), else `default`. The niyama tier used goes
    in the response's `niyama` object."""
    asked = body.get("service_tier")
    return asked if asked in OPENAI_RESPONSE_TIERS else "default"


def targets_tier(targets: dict) -> Tier:
    for key, value in targets.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise APIError(f"{key} must be a number of milliseconds, got {type(value).__name__}", param=key)
        if not MIN_TARGET_MS <= value <= MAX_TARGET_MS:      # (NaN fails too)
            raise APIError(f"{key} must be from {MIN_TARGET_MS:g} ms to {MAX_TARGET_MS:g} ms (30 days), got {value}",
                           param=key)
    interactive = "ttft_ms" in targets or "tbt_ms" in targets
    if interactive and "ttlt_ms" in targets:
        raise APIError("give ttft_ms + tbt_ms (interactive) or ttlt_ms (batch), not both", param="ttlt_ms")
    if interactive:
        missing = [k for k in ("ttft_ms", "tbt_ms") if k not in targets]
        if missing:
            raise APIError(f"an interactive target needs both ttft_ms and tbt_ms; {missing[0]} is missing",
                           param=missing[0])
        return Tier(CUSTOM_TIER, ttft_s=targets["ttft_ms"] / 1000, tbt_s=targets["tbt_ms"] / 1000)
    return Tier(CUSTOM_TIER, ttlt_s=targets["ttlt_ms"] / 1000)


def parse_priority(value) -> Priority:
    if value is None:
        return Priority.IMPORTANT
    if isinstance(value, str):
        try:
            return Priority.parse(value)
        except ValueError as e:
            raise APIError(str(e), param="priority") from None
    if isinstance(value, int) and not isinstance(value, bool):
        return Priority.LOW if value > 0 else Priority.IMPORTANT      # vLLM: lower value runs first
    raise APIError(f"priority must be 'important', 'low' or an integer, got {value!r}", param="priority")
