"""The model's elementwise stages as Triton kernels, one pass over memory each.

`TritonOps` computes the same functions as `ops.TorchOps` and rounds where it does (the residual
add in the model dtype, the normalised row cast before the weight multiply, SiLU's output cast
before the multiply by `up`); RoPE runs in float32 and rounds once, where the eager form rounds the
cos/sin tables and each product to the model dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm(x_ptr, delta_ptr, w_ptr, out_ptr, n_cols, eps,
                  stride_x, stride_d, stride_o, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    ok = c < n_cols
    x = tl.load(x_ptr + row * stride_x + c, mask=ok, other=0.0)
    if HAS_DELTA:
        x = (x.to(tl.float32) + tl.load(delta_ptr + row * stride_d + c, mask=ok, other=0.0).to(tl.float32))
        x = x.to(x_ptr.dtype.element_ty)
        tl.store(x_ptr + row * stride_x + c, x, mask=ok)       # the residual stream, updated in place
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    y = (xf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + c, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + c, (w * y).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _silu_mul(gu_ptr, out_ptr, n_cols, stride_gu, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = c < n_cols
    g = tl.load(gu_ptr + row * stride_gu + c, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_gu + n_cols + c, mask=ok, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + c, (s * u).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _rope(x_ptr, positions, inv_freq, stride_t, num_heads,
          HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Rotate-half RoPE in place on the first `num_heads` heads of each row (the q and k heads of qkv)."""
    t = tl.program_id(0).to(tl.int64)
    HALF: tl.constexpr = HEAD_DIM // 2
    h = tl.arange(0, HEADS_PAD)[:, None]
    i = tl.arange(0, HALF)[None, :]
    ok = h < num_heads
    angle = tl.load(positions + t).to(tl.float32) * tl.load(inv_freq + i)
    cos, sin = tl.cos(angle), tl.sin(angle)
    p1 = x_ptr + t * stride_t + h * HEAD_DIM + i
    x1 = tl.load(p1, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=ok, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=ok)
    tl.store(p1 + HALF, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=ok)


class TritonOps:
    name = "triton"

    def rope_state(self, positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
        return positions, inv_freq

    def rope_qkv(self, qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, state):
        """Rotate q and k inside `qkv` `[T, (H + 2 KVH) * D]` in place; return q, k, v views `[T, heads, D]`."""
        positions, inv_freq = state
        t = qkv.shape[0]
        rotated = num_heads + num_kv_heads
        if t:
            _rope[(t,)](qkv, positions, inv_freq, qkv.stride(0), rotated,
                        HEADS_PAD=triton.next_power_of_2(rotated), HEAD_DIM=head_dim, num_warps=4)
        q = qkv[:, :num_heads * head_dim].view(t, num_heads, head_dim)
        k = qkv[:, num_heads * head_dim:rotated * head_dim].view(t, num_kv_heads, head_dim)
        v = qkv[:, rotated * head_dim:].view(t, num_kv_heads, head_dim)
        return q, k, v

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float):
        """x += delta (in place, model dtype), then (x, rms_norm(x) * weight)."""
        out = torch.empty_like(x)
        n = x.shape[-1]
        block = triton.next_power_of_2(n)
        if x.shape[0]:
            _add_rms_norm[(x.shape[0],)](x, x if delta is None else delta, weight, out, n, eps,
                                         x.stride(0), 0 if delta is None else delta.stride(0), out.stride(0),
                                         HAS_DELTA=delta is not None, BLOCK=block,
                                         num_warps=min(16, max(1, block // 256)))
        return x, out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for `gate_up` = [gate | up] along the last dimension."""
        t, n = gate_up.shape[0], gate_up.shape[1] // 2
        out = gate_up.new_empty((t, n))
        block = min(1024, triton.next_power_of_2(n))
        if t:
            _silu_mul[(t, triton.cdiv(n, block))](gate_up, out, n, gate_up.stride(0), out.stride(0),
                                                  BLOCK=block, num_warps=4)
        return out
