"""A Llama-architecture decoder over one flat token batch (Qwen2 is the same with a Q/K/V bias).

The batch is whatever the scheduler's `BatchPlan` says: prefill chunks of
several requests and one token per running decode, concatenated into one
sequence of rows. Every row knows its position; attention knows, through the
backend's metadata, which rows belong to which request. Weights use fused
projections (QKV, gate+up) and are filled from HF-named tensors by
`load_hf_weights`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionBackend
from .config import ModelConfig
from .kv_cache import PagedKVCache
from .ops import TorchOps


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequency per rotary pair (float32), with Llama-3 scaling when configured:
    wavelengths longer than the original context / low_freq_factor are slowed by
    `factor`, those shorter than context / high_freq_factor are kept, the band between blends."""
    d = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
    rs = config.rope_scaling or {}
    if rs.get("rope_type", rs.get("type")) != "llama3":
        return inv
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    orig = rs["original_max_position_embeddings"]
    wavelen = 2 * torch.pi / inv
    smooth = (orig / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv / factor + smooth * inv
    out = torch.where(wavelen > orig / low, inv / factor, blended)
    return torch.where(wavelen < orig / high, inv, out)


class DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c = c
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.qkv_proj = nn.Parameter(torch.empty(q + 2 * kv, c.hidden_size), requires_grad=False)
        self.qkv_bias = nn.Parameter(torch.empty(q + 2 * kv), requires_grad=False) if c.qkv_bias else None
        self.o_proj = nn.Parameter(torch.empty(c.hidden_size, q), requires_grad=False)
        self.gate_up_proj = nn.Parameter(torch.empty(2 * c.intermediate_size, c.hidden_size), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(c.hidden_size, c.intermediate_size), requires_grad=False)
        self.input_norm = nn.Parameter(torch.empty(c.hidden_size), requires_grad=False)
        self.post_attention_norm = nn.Parameter(torch.empty(c.hidden_size), requires_grad=False)

    def forward(self, x, delta, rope, k_cache, v_cache, backend: AttentionBackend, meta, ops):
        """Add the previous layer's output `delta` to the residual stream `x`; return (x, this layer's output)."""
        c = self.c
        x, h = ops.add_rms_norm(x, delta, self.input_norm, c.rms_norm_eps)
        qkv = F.linear(h, self.qkv_proj, self.qkv_bias)                               # [T, (H + 2 KVH) * D]
        q, k, v = ops.rope_qkv(qkv, c.num_heads, c.num_kv_heads, c.head_dim, rope)
        attn = backend.forward(q, k, v, k_cache, v_cache, meta)                       # [T, H, D]
        x, h = ops.add_rms_norm(x, F.linear(attn.flatten(1), self.o_proj), self.post_attention_norm, c.rms_norm_eps)
        return x, F.linear(ops.silu_mul(F.linear(h, self.gate_up_proj)), self.down_proj)


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, ops=None):
        super().__init__()
        self.config = config
        self.ops = ops or TorchOps()       # elementwise stages: TorchOps, or triton_ops.TritonOps on CUDA
        self.embed = nn.Parameter(torch.empty(config.vocab_size, config.hidden_size), requires_grad=False)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = nn.Parameter(torch.empty(config.hidden_size), requires_grad=False)
        self.lm_head = (None if config.tie_embeddings else
                        nn.Parameter(torch.empty(config.vocab_size, config.hidden_size), requires_grad=False))
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv: PagedKVCache,
                backend: AttentionBackend, meta) -> torch.Tensor:
        """Hidden states `[T, hidden]` of the flat batch (final norm applied)."""
        x = F.embedding(input_ids, self.embed)
        rope = self.ops.rope_state(positions, self.inv_freq, x.dtype)
        delta = None
        for i, layer in enumerate(self.layers):
            k_cache, v_cache = kv.layer(i)
            x, delta = layer(x, delta, rope, k_cache, v_cache, backend, meta, self.ops)
        return self.ops.add_rms_norm(x, delta, self.norm, self.config.rms_norm_eps)[1]

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.embed if self.lm_head is None else self.lm_head
        return F.linear(hidden, head).float()

    # --- weights ---------------------------------------------------------
    @torch.inference_mode()
    def load_hf_weights(self, tensors) -> None:
        """Fill from HF Llama/Qwen2 names (`model.layers.0.self_attn.q_proj.weight`, `...q_proj.bias`, ...).
        `tensors` maps name -> tensor (any dtype/device; copied into this model's)."""
        missing = []

        def take(name: str) -> torch.Tensor:
            if name not in tensors:
                missing.append(name)
                return None
            return tensors[name]

        def fill(param: torch.Tensor, *names: str) -> None:
            parts = [take(n) for n in names]
            if any(p is None for p in parts):
                return
            src = parts[0] if len(parts) == 1 else torch.cat([p.to(param.device) for p in parts], dim=0)
            if tuple(src.shape) != tuple(param.shape):
                raise ValueError(f"{names[0]}: shape {tuple(src.shape)} in the checkpoint, "
                                 f"{tuple(param.shape)} expected by the config")
            param.copy_(src)

        fill(self.embed, "model.embed_tokens.weight")
        fill(self.norm, "model.norm.weight")
        if self.lm_head is not None:
            fill(self.lm_head, "lm_head.weight")
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            fill(layer.qkv_proj, *(p + f"self_attn.{n}_proj.weight" for n in "qkv"))
            if layer.qkv_bias is not None:
                fill(layer.qkv_bias, *(p + f"self_attn.{n}_proj.bias" for n in "qkv"))
            fill(layer.o_proj, p + "self_attn.o_proj.weight")
            fill(layer.gate_up_proj, p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")
            fill(layer.down_proj, p + "mlp.down_proj.weight")
            fill(layer.input_norm, p + "input_layernorm.weight")
            fill(layer.post_attention_norm, p + "post_attention_layernorm.weight")
        if missing:
            shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            raise ValueError(f"checkpoint is missing {len(missing)} tensors: {shown}")

    @torch.inference_mode()
    def init_random(self, seed: int = 0, std: float = 0.02) -> None:
        """Random weights for a named shape (`--load-format dummy`): normal(0, std) matrices and biases,
        unit norms."""
        gen = torch.Generator(device=self.embed.device).manual_seed(seed)
        for name, param in self.named_parameters():
            if param.dim() == 1 and not name.endswith("bias"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, std, generator=gen)
