"""Which batch-time profile the engine's scheduler plans with.

`auto` (the default of serve, replay and generate): the shipped profile measured on this kind of GPU with a
model of this shape, if there is one; else a profile measured on this machine at start-up (`calibrate`),
kept in the cache so that the next start on the same machine, model shape and engine settings reuses it.
Never, silently, a profile of other hardware: a profile named explicitly is used as asked, with a warning
when it was measured on other hardware or another model shape (the online correction then rescales it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from dataclasses import dataclass

import torch

from ..predictor import load_profile
from .config import SHAPES, ModelConfig
from .weights import cache_dir

log = logging.getLogger("niyama.engine")

AUTO = "auto"
MEASURE = "measure"

# shipped profile -> (a substring of the GPU's name, the model shape it was measured with, dtype)
MEASURED_ON = {
    "a100-llama3-8b": ("A100", "llama-3-8b", torch.bfloat16),     # the paper's fit
    "h100-llama3-8b": ("H100", "llama-3-8b", torch.bfloat16),     # `niyama profile` + `fit-predictor`, this engine
    "h200-llama3-8b": ("H200", "llama-3-8b", torch.bfloat16),
    "h100-qwen2.5-7b": ("H100", "qwen2.5-7b", torch.bfloat16),
}


@dataclass
class Choice:
    profile: object | None      # None: measure this machine now
    why: str                    # for the engine's description
    cache_key: str | None = None   # where a measurement is kept (auto only)


def shape_of(model: ModelConfig) -> tuple:
    return (model.vocab_size, model.hidden_size, model.intermediate_size, model.num_layers, model.num_heads,
            model.num_kv_heads, model.head_dim, model.qkv_bias)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.processor() or platform.machine()} x{os.cpu_count()}"


def choose(spec: str, model: ModelConfig, device: torch.device, dtype: torch.dtype, settings: str) -> Choice:
    """`settings`: what else changes step times (attention backend, CUDA graphs), for the cache key."""
    name = device_name(device)
    if spec == MEASURE:
        return Choice(None, "measured at start-up (--profile measure)")
    if spec != AUTO:
        profile = load_profile(spec)
        made_for = MEASURED_ON.get(spec)
        if made_for is not None and not matches(made_for, model, name, dtype):
            log.warning("profile %s was measured on an %s with %s in %s; this is %s: its times will be off "
                        "(the online correction rescales them as steps are measured; --profile auto measures "
                        "this machine)", spec, made_for[0], made_for[1], made_for[2], name)
        return Choice(profile, f"{spec} (asked for)")
    for shipped, made_for in MEASURED_ON.items():
        if matches(made_for, model, name, dtype):
            return Choice(load_profile(shipped), f"{shipped} (shipped, measured on {made_for[0]} with {made_for[1]})")
    key = hashlib.blake2b(json.dumps([name, shape_of(model), str(dtype), settings, torch.__version__]).encode(),
                          digest_size=8).hexdigest()
    path = cache_dir() / "profiles" / f"{key}.json"
    if path.exists():
        try:
            return Choice(load_profile(str(path)), f"measured on this machine earlier ({path})", key)
        except (ValueError, KeyError, json.JSONDecodeError):
            log.warning("ignoring an unreadable cached profile %s", path)
    return Choice(None, f"measured at start-up: no shipped profile for {name} (cached as {path})", key)


def matches(made_for: tuple, model: ModelConfig, device: str, dtype: torch.dtype) -> bool:
    gpu, shape, made_dtype = made_for
    return gpu in device and shape_of(model) == shape_of(SHAPES[shape]) and dtype == made_dtype


def remember(choice: Choice, profile) -> None:
    """Keep a start-up measurement for the next start (auto only); a failure to write costs nothing."""
    if choice.cache_key is None:
        return
    path = cache_dir() / "profiles" / f"{choice.cache_key}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(profile.to_dict(), indent=1))
        tmp.replace(path)
    except OSError as e:
        log.warning("could not cache the measured profile at %s: %s", path, e)
