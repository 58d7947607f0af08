"""Attention backends by name: `torch-reference` (anywhere) or `triton` (CUDA), imported only when chosen
(Triton is optional on a CPU install)."""

from __future__ import annotations

import os

import torch

from .attention import AttentionBackend, TorchReference

AUTO = "auto"    # triton on a GPU, the reference elsewhere


def make_backend(name: str, config, device: torch.device, max_num_seqs: int, block_size: int) -> AttentionBackend:
    """`torch-reference` (anywhere), `triton` (CUDA; imports Triton only then), or `auto`."""
    if name == AUTO:
        name = "triton" if device.type == "cuda" else TorchReference.name
    if name == TorchReference.name:
        return TorchReference()
    if name == "triton":
        if device.type != "cuda" and not os.environ.get("TRITON_INTERPRET"):
            raise ValueError("the triton attention backend runs on a CUDA GPU (on a CPU only in Triton's "
                             "interpreter, TRITON_INTERPRET=1, for tests); use --attention torch-reference")
        try:
            from .triton_backend import TritonPaged
        except ImportError as e:
            raise ValueError(f"the triton attention backend needs the triton package ({e})") from e
        return TritonPaged(config, device, max_num_seqs, block_size)
    raise ValueError(f"unknown attention backend {name!r}; choose from auto, torch-reference, triton")
