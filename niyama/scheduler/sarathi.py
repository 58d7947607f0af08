"""Sarathi-Serve baselines: fixed chunk, one queue order.

All running decodes run; the prefill budget is `chunk_size - decodes`
(256 by default), filled in the queue order: arrival (fcfs), first-token
deadline (edf) or fewest remaining prefill tokens (srpf). No relegation.
"""

from __future__ import annotations

from ..request import Request
from .base import Scheduler, SchedulerConfig


def fcfs_order(req: Request) -> float:
    return req.arrival_s


def edf_order(req: Request) -> float:
    return req.arrival_s + req.ttft_s


def srpf_order(req: Request) -> float:
    return req.num_remaining_prefill


ORDERS = {"fcfs": fcfs_order, "edf": edf_order, "srpf": srpf_order}


class FixedChunkScheduler(Scheduler):
    def __init__(self, config: SchedulerConfig | None = None, order: str = "fcfs", predictor=None):
        if order not in ORDERS:
            raise ValueError(f"unknown order {order!r}; one of {sorted(ORDERS)}")
        super().__init__(config or SchedulerConfig(), ORDERS[order], predictor)
        self.name = order
