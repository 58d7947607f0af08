"""Which profile the engine plans with by default: the shipped one for this GPU and model shape, else this
machine measured at start-up and cached; a profile of other hardware only when asked for, with a warning."""

import dataclasses
import logging

import pytest
import torch

pytest.importorskip("tokenizers")

from niyama.engine import LLMEngine  # noqa: E402
from niyama.engine import profile_choice  # noqa: E402
from niyama.engine.config import SHAPES  # noqa: E402
from niyama.engine.tensor_parallel import Shard  # noqa: E402
from niyama.predictor import load_profile  # noqa: E402


def test_auto_measures_this_machine_once_and_reuses_it(tmp_path, monkeypatch):
    monkeypatch.setenv("NIYAMA_CACHE", str(tmp_path))
    first = LLMEngine(model="tiny", load_format="dummy", kv_tokens=8192)
    assert first.profile_source.startswith("measured at start-up") and first.calibration_rows
    cached = list((tmp_path / "profiles").glob("*.json"))
    assert len(cached) == 1
    second = LLMEngine(model="tiny", load_format="dummy", kv_tokens=8192)
    assert "measured on this machine earlier" in second.profile_source and not second.calibration_rows
    assert second.profile.batch_time(256, 4, 400, 0) == first.profile.batch_time(256, 4, 400, 0)
    other = LLMEngine(model="tiny", load_format="dummy", kv_tokens=8192, max_num_seqs=64)   # other settings
    assert other.calibration_rows and len(list((tmp_path / "profiles").glob("*.json"))) == 2


def test_a_shipped_profile_is_chosen_only_for_its_gpu_and_model_shape(monkeypatch, caplog):
    llama = SHAPES["llama-3-8b"]
    cuda = torch.device("cuda")
    monkeypatch.setattr(profile_choice, "device_name", lambda device: "NVIDIA A100-SXM4-80GB")
    choice = profile_choice.choose("auto", llama, cuda, torch.bfloat16, "triton")
    assert choice.profile is load_profile("a100-llama3-8b") and "shipped" in choice.why
    for model, dtype in ((SHAPES["smollm2-135m"], torch.bfloat16), (llama, torch.float16)):
        assert profile_choice.choose("auto", model, cuda, dtype, "triton").profile is None   # measure instead
    monkeypatch.setattr(profile_choice, "device_name", lambda device: "NVIDIA H100 80GB HBM3")
    assert profile_choice.choose("auto", llama, cuda, torch.bfloat16, "triton").profile is load_profile("h100-llama3-8b")
    qwen = SHAPES["qwen2.5-7b"]
    assert profile_choice.choose("auto", qwen, cuda, torch.bfloat16, "triton").profile is load_profile("h100-qwen2.5-7b")
    # the same sizes without Qwen's QKV bias, and one rank's half of it under tensor parallelism: not that model
    for other in (dataclasses.replace(qwen, qkv_bias=False), Shard(qwen, 2, 0).config):
        assert profile_choice.choose("auto", other, cuda, torch.bfloat16, "triton").profile is None
    with caplog.at_level(logging.WARNING, logger="niyama.engine"):
        asked = profile_choice.choose("a100-llama3-8b", llama, cuda, torch.bfloat16, "triton")
    assert asked.profile is load_profile("a100-llama3-8b")                  # used as asked...
    assert "measured on an A100" in caplog.text and "H100" in caplog.text   # ...but not silently
