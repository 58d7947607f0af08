"""Simulation: a timing-model executor under the shared replica loop."""

from .executor import SimulatedExecutor
from .run import SimResult, simulate

__all__ = ["SimulatedExecutor", "SimResult", "simulate"]
