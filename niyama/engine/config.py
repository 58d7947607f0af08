"""Model shape: everything the engine needs to know about a Llama-family
checkpoint, read from an HF `config.json` (or a named shape for dummy weights).

Two HF architectures share this one decoder: Llama, and Qwen2 (Qwen-2.5), which
differs only in its biases on the Q/K/V projections (`qkv_bias`); its large rope
base and tied head of small sizes are ordinary fields."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None   # HF's dict; rope_type "llama3" is applied, None/"default" is plain RoPE
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    max_position: int = 8192
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    qkv_bias: bool = False             # biases on the q/k/v projections (Qwen2; none on o_proj or the MLP)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.num_heads} attention heads do not split into {self.num_kv_heads} KV heads")
        kind = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type", "default"))
        if kind not in ("default", "llama3"):
            raise ValueError(f"rope scaling {kind!r} is not supported (default and llama3 are)")

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V per token per element byte (multiply by the dtype's size)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    @property
    def architecture(self) -> str:
        """The HF model_type this shape is (the key of ARCHITECTURES)."""
        return "qwen2" if self.qkv_bias else "llama"

    @property
    def num_params(self) -> int:
        h, f, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (2 * self.num_heads + 2 * self.num_kv_heads)
        bias = d * (self.num_heads + 2 * self.num_kv_heads) if self.qkv_bias else 0
        layer = attn + bias + 3 * h * f + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return self.num_layers * layer + embed + h

    # --- HF config.json --------------------------------------------------
    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        kind = _architecture(cfg)
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters")
        theta = cfg.get("rope_theta") or (rope or {}).get("rope_theta", 10000.0)
        if rope is not None:
            rope = {k: v for k, v in rope.items() if k != "rope_theta"}
        return cls(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                   intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
                   num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads", heads),
                   head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                   rope_theta=float(theta), rope_scaling=rope, rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
                   tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                   max_position=cfg.get("max_position_embeddings", 8192),
                   bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos, qkv_bias=kind == "qwen2")

    def to_hf(self) -> dict:
        """A config.json that transformers' LlamaForCausalLM (or Qwen2ForCausalLM, with qkv_bias) also reads."""
        cfg = {"architectures": [ARCHITECTURES[self.architecture]], "model_type": self.architecture,
               "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
               "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
               "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
               "head_dim": self.head_dim, "rope_theta": self.rope_theta, "rms_norm_eps": self.rms_norm_eps,
               "tie_word_embeddings": self.tie_embeddings, "max_position_embeddings": self.max_position,
               "hidden_act": "silu"}
        cfg.update({"use_sliding_window": False} if self.qkv_bias else {"attention_bias": False, "mlp_bias": False})
        if self.rope_scaling:
            cfg["rope_scaling"] = dict(self.rope_scaling)
        if self.bos_token_id is not None:
            cfg["bos_token_id"] = self.bos_token_id
        if self.eos_token_ids:
            cfg["eos_token_id"] = list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else self.eos_token_ids[0]
        return cfg

    @classmethod
    def from_file(cls, path: "str | Path") -> "ModelConfig":
        return cls.from_hf(json.loads(Path(path).read_text()))

    def describe(self) -> str:
        return (f"{self.architecture}, {self.num_layers} layers, hidden {self.hidden_size}, "
                f"{self.num_heads}/{self.num_kv_heads} heads x {self.head_dim}, FFN {self.intermediate_size}, vocab {self.vocab_size}, "
                f"{self.num_params / 1e9:.2f}B params")


# HF model_type -> architecture class, the ones this engine runs.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def _architecture(cfg: dict) -> str:
    """The model_type of an HF config.json, refused unless this engine computes that model exactly."""
    arch = (cfg.get("architectures") or [""])[0]
    kind = cfg.get("model_type")
    if kind not in ARCHITECTURES:        # a config.json without model_type (or only a class name) is Llama's
        by_class = {a: k for k, a in ARCHITECTURES.items()}
        kind = by_class.get(arch) or ("llama" if "Llama" in arch or not (arch or kind) else None)
    if kind is None:
        raise ValueError(f"model architecture {arch or cfg.get('model_type')!r} is not supported; niyama runs "
                         + ", ".join(f"{a} (model_type {k!r})" for k, a in ARCHITECTURES.items()))
    if kind == "llama" and (cfg.get("attention_bias") or cfg.get("mlp_bias")):
        raise ValueError("Llama checkpoints with attention_bias or mlp_bias are not supported")
    if cfg.get("use_sliding_window") or "sliding_attention" in (cfg.get("layer_types") or ()):
        raise ValueError(f"{arch or kind}: sliding-window attention (use_sliding_window: true) is not supported; "
                         "niyama attends over the whole context (the released Qwen-2.5 models set it false)")
    return kind


_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

# Named shapes for `--load-format dummy` (random weights, published architectures).
SHAPES: dict[str, ModelConfig] = {
    "llama-3-8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                              num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                              max_position=8192, bos_token_id=128000, eos_token_ids=(128001, 128009)),
    "llama-3.1-8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                                num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                                rope_scaling=_LLAMA3_ROPE, max_position=131072, bos_token_id=128000,
                                eos_token_ids=(128001, 128008, 128009)),
    "llama-3-70b": ModelConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
                               num_heads=64, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                               max_position=8192, bos_token_id=128000, eos_token_ids=(128001, 128009)),
    "smollm2-135m": ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                                num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
                                tie_embeddings=True, max_position=8192, bos_token_id=1, eos_token_ids=(2,)),
    # Qwen-2.5: biased Q/K/V, rope base 1e6, RMSNorm eps 1e-6; the small sizes tie the head to the embeddings.
    "qwen2.5-7b": ModelConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                              num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6,
                              max_position=32768, eos_token_ids=(151645, 151643), qkv_bias=True),
    "qwen2.5-0.5b": ModelConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                                num_heads=14, num_kv_heads=2, head_dim=64, rope_theta=1e6, rms_norm_eps=1e-6,
                                tie_embeddings=True, max_position=32768, eos_token_ids=(151645, 151643),
                                qkv_bias=True),
    # A few-MB model for fast tests of the plumbing (not a real checkpoint).
    "tiny": ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16, rope_theta=10000.0, rope_scaling=_LLAMA3_ROPE,
                        max_position=8192, bos_token_id=1, eos_token_ids=(2,)),
    # `tiny` with SmolLM2's 49,152-token vocabulary: serves text with `--tokenizer` in fast tests.
    "tiny-49k": ModelConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=16, rope_theta=10000.0, tie_embeddings=True,
                            max_position=8192, bos_token_id=1, eos_token_ids=(2,)),
}
