"""A fleet: replicas grouped in pools, each pool with its policy and router.

Two shapes (the paper's Table 4):
- `shared:N`: one pool of N replicas; every replica serves every tier with
  the same policy (niyama by default) and a router picks the replica.
- `silo:A,B,C`: one pool per tier, in the tier set's order (Q1, Q2, Q3);
  a request goes only to its tier's pool, round-robin inside it (as the
  paper). Silo replicas run Sarathi-style fixed chunks, as in the artifact:
  an interactive tier's pool chunk 256, a batch tier's pool chunk 2048. The
  order is `edf`; inside a pool of one tier every request has the same
  TTFT_eff, so EDF's order (arrival + TTFT_eff) is FCFS's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..qos import Tier

SILO_POLICY = "edf"
SILO_CHUNK_INTERACTIVE = 256
SILO_CHUNK_BATCH = 2048
SILO_ROUTER = "round-robin"
SHARED_POLICY = "niyama"
SHARED_ROUTER = "qos"
KINDS = ("shared", "silo")


@dataclass(frozen=True)
class Pool:
    name: str                          # "shared", or the tier a silo serves
    num_replicas: int
    tiers: tuple[str, ...] | None      # tiers routed here; None = every tier
    policy: str
    router: str
    policy_options: dict = field(default_factory=dict)

    def serves(self, tier: str) -> bool:
        return self.tiers is None or tier in self.tiers


@dataclass(frozen=True)
class Fleet:
    kind: str                          # "shared" or "silo"
    pools: tuple[Pool, ...]

    @property
    def num_replicas(self) -> int:
        return sum(p.num_replicas for p in self.pools)

    @property
    def counts(self) -> tuple[int, ...]:
        return tuple(p.num_replicas for p in self.pools)

    @property
    def spec(self) -> str:
        """The config text this fleet parses from: shared:10, silo:7,3,3."""
        return f"{self.kind}:{','.join(str(n) for n in self.counts)}"

    @property
    def label(self) -> str:
        if self.kind == "shared":
            pool = self.pools[0]
            return f"{self.spec} {pool.policy}/{pool.router}"
        return f"silo-({','.join(str(n) for n in self.counts)})"


def parse_fleet(spec: str) -> tuple[str, tuple[int, ...]]:
    """'shared:10' -> ('shared', (10,)); 'silo:7,3,3' -> ('silo', (7, 3, 3))."""
    kind, sep, rest = spec.strip().partition(":")
    if not sep or kind not in KINDS:
        raise ValueError(f"fleet {spec!r}: write shared:N or silo:A,B,C (replicas per tier)")
    try:
        counts = tuple(int(x) for x in rest.split(","))
    except ValueError:
        raise ValueError(f"fleet {spec!r}: replica counts must be integers") from None
    if kind == "shared" and (len(counts) != 1 or counts[0] < 1):
        raise ValueError(f"fleet {spec!r}: a shared pool is shared:N with N >= 1")
    if any(n < 0 for n in counts) or sum(counts) < 1:
        raise ValueError(f"fleet {spec!r}: counts must be >= 0 and add up to at least 1")
    return kind, counts


def make_fleet(spec: str, tiers: tuple[Tier, ...], *, policy: str = SHARED_POLICY, router: str = SHARED_ROUTER,
               policy_options: dict | None = None, silo_policy: str = SILO_POLICY, silo_router: str = SILO_ROUTER,
               silo_options: dict | None = None) -> Fleet:
    """`policy`/`router`/`policy_options`: the shared pool's. `silo_options` are added to each silo's own
    (its chunk size by tier class)."""
    kind, counts = parse_fleet(spec)
    if kind == "shared":
        return Fleet(kind, (Pool("shared", counts[0], None, policy, router, dict(policy_options or {})),))
    if len(counts) != len(tiers):
        raise ValueError(f"fleet {spec!r}: give one count per tier ({', '.join(t.name for t in tiers)})")
    pools = []
    for tier, n in zip(tiers, counts):
        pools.append(Pool(tier.name, n, (tier.name,), silo_policy, silo_router,
                          {"chunk_size": silo_chunk(tier), **(silo_options or {})}))
    return Fleet(kind, tuple(pools))


def silo_chunk(tier: Tier) -> int:
    """A silo's fixed chunk: small for an interactive tier (token pace), large for a batch tier (throughput)."""
    return SILO_CHUNK_INTERACTIVE if tier.interactive else SILO_CHUNK_BATCH


def silo_spec(counts) -> str:
    return "silo:" + ",".join(str(int(n)) for n in counts)
