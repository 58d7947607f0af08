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


def kv_tokens_for_memory(config: ModelConfig, dtype: torch.dtype, device: torch.device,
                         utilization: float, block_size: int = 16) -> int:
    """Tokens of KV that fit in `utilization` x the GPU's total memory, minus what is already in use
    (weights, activations of a warm-up pass); on CPU, the default `DEFAULT_CPU_KV_TOKENS`."""
    if device.type != "cuda":
        return DEFAULT_CPU_KV_TOKENS
    if not 0 < utilization <= 1:
        raise ValueError(f"gpu memory utilization must be in (0, 1], got {utilization}")
    free, total = torch.cuda.mem_get_info(device)
    budget = utilization * total - (total - free)
    per_token = config.kv_bytes_per_token * dtype_size(dtype)
    tokens = int(budget // per_token) // block_size * block_size
    if tokens < block_size:
        raise ValueError(f"no room for a KV cache: {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB "
                         f"at utilization {utilization}")
    return tokens


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
