"""The model runner: a Llama-family model over flat
chunked-prefill batches, a paged KV cache, attention backends, weight
loading (HF safetensors, GGUF, dummy), tokenizer and sampling, and the
`LLMEngine` that runs the scheduler's replica loop on it."""

from .engine import EngineConfig, LLMEngine
from .sampling import SamplingParams
from .sequence import Sequence

__all__ = ["EngineConfig", "LLMEngine", "SamplingParams", "Sequence"]
