"""Policies by name. A new policy is one module plus one line here."""

from __future__ import annotations

import dataclasses

from ..predictor import BatchTimePredictor
from .base import Scheduler, SchedulerConfig
from .niyama import NiyamaConfig, NiyamaScheduler
from .batch_plan import BatchPlan, PrefillChunk
from .sarathi import FixedChunkScheduler

# name -> (config class, preset overrides, factory)
POLICIES = {
    "fcfs": (SchedulerConfig, {}, lambda cfg, pred: FixedChunkScheduler(cfg, "fcfs", pred)),
    "edf": (SchedulerConfig, {}, lambda cfg, pred: FixedChunkScheduler(cfg, "edf", pred)),
    "srpf": (SchedulerConfig, {}, lambda cfg, pred: FixedChunkScheduler(cfg, "srpf", pred)),
    "niyama": (NiyamaConfig, {}, None),
    # ablations (paper Table 5: edf -> edf-dc -> niyama-alpha0 -> niyama)
    "niyama-no-dc": (NiyamaConfig, {"dynamic_chunking": False}, None),
    "niyama-no-relegation": (NiyamaConfig, {"relegation": False}, None),
    "niyama-alpha0": (NiyamaConfig, {"alpha_s": 0.0}, None),
    "niyama-no-priority": (NiyamaConfig, {"priority_relegation": False}, None),
    "edf-dc": (NiyamaConfig, {"alpha_s": 0.0, "relegation": False}, None),
}


def policy_options(name: str) -> dict[str, object]:
    """The knobs of a policy and their defaults (after its preset)."""
    cls, preset, _ = _lookup(name)
    return {f.name: preset.get(f.name, f.default) for f in dataclasses.fields(cls)}


def scheduler_config(name: str, **overrides) -> SchedulerConfig:
    """Policy `name`'s configuration (its preset, then `overrides`), e.g. to size memory by its
    `max_batch_tokens` before a scheduler exists."""
    cls, preset, _ = _lookup(name)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"policy {name!r} has no option(s) {sorted(unknown)}; it has {sorted(known)}")
    return cls(**{**preset, **overrides})


def make_scheduler(name: str, predictor: BatchTimePredictor, **overrides) -> Scheduler:
    config = scheduler_config(name, **overrides)
    factory = _lookup(name)[2]
    if factory is not None:
        return factory(config, predictor)
    return NiyamaScheduler(config, predictor, name=name)


def _lookup(name: str):
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")
    return POLICIES[name]


__all__ = ["POLICIES", "BatchPlan", "PrefillChunk", "Scheduler", "make_scheduler", "policy_options", "scheduler_config"]
