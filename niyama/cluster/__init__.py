"""Fleets of replicas: routers, shared pools and silos, one simulated clock (docs/design.md, "Cluster")."""

from ..routing import ROUTERS, Router, make_router
from .fleet import Fleet, Pool, make_fleet, parse_fleet
from .sim import ClusterResult, ReplicaStats, simulate_cluster

__all__ = ["Fleet", "Pool", "make_fleet", "parse_fleet", "ROUTERS", "Router", "make_router", "ClusterResult",
           "ReplicaStats", "simulate_cluster"]
