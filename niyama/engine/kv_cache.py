"""The paged KV cache in device memory.

One tensor holds every layer's K and V: `[layers, 2, blocks, block_size,
kv_heads, head_dim]`. Block ids come from the scheduler's `BlockAllocator`
(`Request.block_ids`), so position p of a request lives in block
`block_ids[p // block_size]` at offset `p % block_size`.
"""

from __future__ import annotations

import torch

from .config import ModelConfig

DEFAULT_CPU_KV_TOKENS = 32_768


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class PagedKVCache:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.data = torch.zeros(config.num_layers, 2, num_blocks, block_size, config.num_kv_heads, config.head_dim,
                                dtype=dtype, device=device)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V blocks of layer i: `[blocks, block_size, kv_heads, head_dim]` each."""
        return self.data[i, 0], self.data[i, 1]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()
