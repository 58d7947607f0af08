"""The model's elementwise stages in plain PyTorch: the reference, and the CPU path.

`TorchOps` and `triton_ops.TritonOps` offer the same four calls, so the model is written once:
    state = ops.rope_state(positions, inv_freq, dtype)       # once per forward
    q, k, v = ops.rope_qkv(qkv, heads, kv_heads, head_dim, state)
    x, h = ops.add_rms_norm(x, delta, weight, eps)           # residual add, then RMSNorm
    h = ops.silu_mul(gate_up)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in float32, scale in the model dtype (as the reference implementation does)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE; x `[T, heads, D]`, cos/sin `[T, 1, D]`."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class TorchOps:
    name = "torch"

    def rope_state(self, positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
        freqs = positions.float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]           # [T, 1, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def rope_qkv(self, qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, state):
        cos, sin = state
        t = qkv.shape[0]
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        q = qkv[:, :q_size].view(t, num_heads, head_dim)
        k = qkv[:, q_size:q_size + kv_size].view(t, num_kv_heads, head_dim)
        v = qkv[:, q_size + kv_size:].view(t, num_kv_heads, head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v.contiguous()

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float):
        if delta is not None:
            x = x + delta
        return x, rms_norm(x, weight, eps)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


def make_ops(name: str):
    """`torch` (anywhere) or `triton` (CUDA; imports Triton only when asked for)."""
    if name == "torch":
        return TorchOps()
    if name == "triton":
        from .triton_ops import TritonOps
        return TritonOps()
    raise ValueError(f"unknown ops {name!r}; choose torch or triton")
