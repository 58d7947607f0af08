"""Paged KV block allocator, shared by the simulator and the GPU engine.

Blocks hold `block_size` tokens (16). A request takes the blocks for its
whole prefill when the prefill starts, one more block each time its decode
crosses a block boundary, and returns all of them when it finishes or is
preempted. Block ids are real so the engine can build block tables from them.
"""

from __future__ import annotations

from .request import Request, blocks_for


class OutOfBlocks(RuntimeError):
    pass


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int = 16, watermark: float = 0.01):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        if not 0 <= watermark < 1:
            raise ValueError("watermark must be in [0, 1)")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Admissions keep this many blocks free so running decodes can grow
        # without being preempted at once (vLLM's watermark).
        self.num_watermark_blocks = int(watermark * num_blocks)
        self._free = list(range(num_blocks - 1, -1, -1))   # pop() hands out low ids first

    @classmethod
    def for_tokens(cls, num_tokens: int, block_size: int = 16, **kw) -> "BlockAllocator":
        return cls(num_tokens // block_size, block_size, **kw)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return blocks_for(num_tokens, self.block_size)

    def can_admit(self, num_tokens: int) -> bool:
        """Room to start a prefill of `num_tokens` while keeping the watermark free."""
        return self.num_free - self.blocks_for(num_tokens) >= self.num_watermark_blocks

    def allocate(self, req: Request, num_blocks: int) -> None:
        if num_blocks > len(self._free):
            raise OutOfBlocks(f"request {req.request_id} needs {num_blocks} blocks, {len(self._free)} free")
        for _ in range(num_blocks):
            req.block_ids.append(self._free.pop())

    def release(self, req: Request) -> None:
        self._free.extend(req.block_ids)
        req.block_ids = []

    def check(self, holders) -> None:
        """Conservation: every block is free or held by exactly one live request."""
        held = [b for r in holders for b in r.block_ids]
        every = held + self._free
        # raised, not asserted: the server's degraded check must also run under `python -O`
        if len(every) != self.num_blocks:
            raise AssertionError(f"{len(every)} blocks accounted for, expected {self.num_blocks}")
        if len(set(every)) != self.num_blocks:
            raise AssertionError("a block is held twice")
