"""Request state: one request's QoS, progress and timestamps.

A request carries its own facts only: what it asked for, how far it got,
when things happened, and whether it was relegated. Policies keep their own
books (queues, rates) and never store policy state here.
"""

from __future__ import annotations

import enum
import math

from .qos import DeadlineRule, Priority, Tier, token_deadline


class Phase(enum.IntEnum):
    WAITING = 0   # not started; holds no KV
    PREFILL = 1   # prefill started (holds KV), paused between chunks or running
    DECODE = 2    # first token emitted; one token per iteration
    DONE = 3


# The lifecycle, in one place: every phase change goes through `Request.move_to`, which refuses any other.
#   WAITING -> PREFILL   the scheduler admits it (takes its KV blocks, sharing its cached prefix)
#   PREFILL -> DECODE    its prefill's last chunk emitted a token
#   DECODE  -> WAITING   preempted for KV space: recompute prompt + generated tokens later
#   any     -> DONE      finished, stopped early, aborted or rejected at arrival (its blocks return)
TRANSITIONS = {Phase.WAITING: (Phase.PREFILL, Phase.DONE), Phase.PREFILL: (Phase.DECODE, Phase.DONE),
               Phase.DECODE: (Phase.WAITING, Phase.DONE), Phase.DONE: ()}


class Request:
    """A request in flight.

    Prefill covers `num_prefill_target` tokens: the prompt, plus the tokens
    already generated if the request was preempted and must recompute
    (vLLM's recompute preemption). `num_computed_tokens` is prefill progress.
    Output tokens are counted in `num_output_tokens`; while the request
    decodes, the replica derives the count from the iteration index (every
    running decode produces one token per iteration).
    """

    __slots__ = (
        "request_id", "arrival_s", "num_prompt_tokens", "max_output_tokens",
        "tier", "priority", "ttft_s", "tbt_s",
        "phase", "num_prefill_target", "num_computed_tokens", "num_output_tokens",
        "first_token_s", "anchor_s", "finish_s", "relegated", "rejected", "predicted_first_token_s", "num_preemptions",
        "block_ids", "block_keys", "num_cached_tokens", "num_keyed_blocks", "token_segments", "sampled",
        "decode_iter0", "decode_token0", "decode_seq",
    )

    def __init__(self, request_id: int, arrival_s: float, num_prompt_tokens: int, max_output_tokens: int,
                 tier: Tier, rule: DeadlineRule, priority: Priority = Priority.IMPORTANT, sampled: bool = False):
        if num_prompt_tokens < 1:
            raise ValueError(f"request {request_id}: prompt must have at least 1 token")
        if max_output_tokens < 1:
            raise ValueError(f"request {request_id}: max_output_tokens must be >= 1")
        self.request_id = request_id
        self.arrival_s = float(arrival_s)
        self.num_prompt_tokens = int(num_prompt_tokens)
        self.max_output_tokens = int(max_output_tokens)
        self.tier = tier
        self.priority = priority
        self.sampled = sampled               # its tokens are drawn with temperature or penalties, not plain argmax
        self.ttft_s = rule.ttft_s(tier)      # effective TTFT
        self.tbt_s = rule.tbt_s(tier)        # token pace
        self.phase = Phase.WAITING
        self.num_prefill_target = self.num_prompt_tokens
        self.num_computed_tokens = 0
        self.num_output_tokens = 0
        self.first_token_s: float | None = None
        self.anchor_s: float | None = None   # A = max(first token, D_1)
        self.finish_s: float | None = None
        self.relegated = False
        self.rejected = False                # refused at arrival (its tier rejects infeasible requests)
        self.predicted_first_token_s: float | None = None   # the admission check's estimate, when made
        self.num_preemptions = 0
        self.block_ids: list[int] = []
        # prefix caching (kv.py): the keys of its blocks' contents (None: never shared), the cached prefix
        # (while waiting, what the cache holds of it at the last look; once started, what it attached),
        # and how many of its leading blocks are indexed
        self.block_keys = None
        self.num_cached_tokens = 0
        self.num_keyed_blocks = 0
        # [start, end) iteration ranges in which this request emitted tokens;
        # token times are the replica's iteration end times over these ranges.
        self.token_segments: list[list[int]] = []
        self.decode_iter0 = -1     # iteration that emitted token `decode_token0`
        self.decode_token0 = 0
        self.decode_seq = -1       # validity tag for lazy heap entries

    def move_to(self, phase: Phase) -> None:
        if phase not in TRANSITIONS[self.phase]:
            raise RuntimeError(f"request {self.request_id}: no transition {self.phase.name} -> {phase.name}")
        self.phase = phase

    # --- derived ---------------------------------------------------------
    @property
    def first_token_deadline_s(self) -> float:
        return self.arrival_s + self.ttft_s

    @property
    def num_remaining_prefill(self) -> int:
        """Prefill tokens still to compute: past its progress, and before it starts, past its cached prefix."""
        return self.num_prefill_target - max(self.num_computed_tokens, self.num_cached_tokens)

    @property
    def num_kv_tokens(self) -> int:
        """Tokens whose KV it holds computed: its prefill progress, or while it decodes prompt + generated but
        the last (the next step writes that one's)."""
        if self.phase == Phase.DECODE:
            return self.num_prompt_tokens + self.num_output_tokens - 1
        return self.num_computed_tokens if self.phase == Phase.PREFILL else 0

    @property
    def started(self) -> bool:
        """Holds KV: prefill started (or decoding)."""
        return self.phase == Phase.PREFILL or self.phase == Phase.DECODE

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def ttlt(self) -> float | None:
        return None if self.finish_s is None else self.finish_s - self.arrival_s

    def token_deadline(self, n: int) -> float:
        """Deadline of output token n (1-based)."""
        return token_deadline(n, self.arrival_s, self.ttft_s, self.tbt_s, self.first_token_s)

    def __repr__(self) -> str:
        return (f"Request({self.request_id}, {self.tier.name}, t={self.arrival_s:.3f}, "
                f"prompt={self.num_prompt_tokens}, out={self.num_output_tokens}/{self.max_output_tokens}, "
                f"{self.phase.name})")


def blocks_for(num_tokens: int, block_size: int) -> int:
    return math.ceil(num_tokens / block_size)
