"""Workloads: traces, arrival processes and QoS mixes -> a list of request specs."""

from .build import RequestSpec, Workload, clip_lengths, make_workload
from .traces import PAPER_TRACES, TRACES, Trace, load_trace

__all__ = ["RequestSpec", "Workload", "clip_lengths", "make_workload", "PAPER_TRACES", "TRACES", "Trace", "load_trace"]
