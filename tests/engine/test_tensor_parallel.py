"""Tensor parallelism on CPU: two processes over gloo against one process.

The sharding itself (every rank's rows and columns put back together give the full weights; KV heads
replicated when there are more ranks than KV heads; random weights drawn shard by shard equal the
unsharded model's), then whole engines: TP=2 gives the same greedy tokens as TP=1, and logits within float32
tolerance, on random weights and on small checkpoints written by transformers (Llama, and Qwen2 whose Q/K/V
biases are sharded like their rows), with prompts prefilled in chunks beside running decodes. Failures: a
size that does not split the model is refused before anything starts; a worker that raises, or is killed,
gives rank 0 a TensorParallelError naming it, not a hang; closing the engine, or killing its process,
leaves no worker behind.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")

from niyama.engine import LLMEngine, SamplingParams  # noqa: E402
from niyama.engine.config import SHAPES, ModelConfig  # noqa: E402
from niyama.engine.engine import build_model  # noqa: E402
from niyama.engine.tensor_parallel import (Shard, TensorParallelError, check_tensor_parallel,  # noqa: E402
                                           init_random_shard, shard_hf_tensors, shard_param)

from helpers import greedy_with_logits  # noqa: E402

TINY = SHAPES["tiny"]                          # 4 heads, 2 KV heads, FFN 128
ENGINE = dict(policy="fcfs", kv_tokens=4096, profile="a100-llama3-8b", online_correction=False)
TWO_GPUS = torch.cuda.is_available() and torch.cuda.device_count() >= 2
PROMPT_LENS = (150, 23, 310, 64)
NUM_TOKENS = 12


def full_model(config: ModelConfig, seed: int = 0):
    model = build_model(config, torch.float32, torch.device("cpu"))
    model.init_random(seed)
    return model


# --- the sharding, no processes -----------------------------------------------------------------
@pytest.mark.parametrize("size", [2, 4])
def test_shards_put_back_together_are_the_full_weights(size):
    config = dataclasses.replace(TINY, qkv_bias=True)
    full = dict(full_model(config).named_parameters())
    shards = [Shard(config, size, r) for r in range(size)]
    d, h, kv, f = config.head_dim, config.num_heads, config.num_kv_heads, config.intermediate_size
    for name, w in full.items():
        parts = [shard_param(name, w, s) for s in shards]
        kind = name.rsplit(".", 1)[-1]
        if kind in ("qkv_proj", "qkv_bias"):
            q_rows = (h // size) * d
            assert torch.equal(torch.cat([p[:q_rows] for p in parts]), w[:h * d])
            for r, (s, p) in enumerate(zip(shards, parts)):
                kv_rows = s.config.num_kv_heads * d
                k, v = p[q_rows:q_rows + kv_rows], p[q_rows + kv_rows:]
                first = r * kv // size if size <= kv else r // (size // kv)     # the KV head(s) rank r reads
                assert torch.equal(k, w[h * d + first * d:][:kv_rows])
                assert torch.equal(v, w[(h + kv) * d + first * d:][:kv_rows])
        elif kind == "o_proj":
            assert torch.equal(torch.cat(parts, dim=1), w)
        elif kind == "gate_up_proj":
            assert torch.equal(torch.cat([p[:f // size] for p in parts]), w[:f])
            assert torch.equal(torch.cat([p[f // size:] for p in parts]), w[f:])
        elif kind == "down_proj":
            assert torch.equal(torch.cat(parts, dim=1), w)
        else:                                              # embedding, norms: replicated
            assert all(p is w for p in parts)
    if size == 4:        # 4 ranks, 2 KV heads: ranks 0 and 1 share KV head 0, ranks 2 and 3 KV head 1
        assert [s.kv_heads for s in shards] == [(0, 1), (0, 1), (1, 1), (1, 1)]
        assert all(s.config.num_heads == 1 and s.config.num_kv_heads == 1 for s in shards)


@pytest.mark.parametrize("size", [2, 4])
def test_random_weights_drawn_per_shard_equal_the_unsharded_ones(size):
    """`--load-format dummy` under TP: each rank's weights are its part of what TP=1 draws with that seed."""
    config = dataclasses.replace(TINY, qkv_bias=True)
    full = dict(full_model(config, seed=3).named_parameters())
    for rank in range(size):
        shard = Shard(config, size, rank)
        model = build_model(shard.config, torch.float32, torch.device("cpu"))
        init_random_shard(model, shard, seed=3)
        for name, p in model.named_parameters():
            assert torch.equal(p, shard_param(name, full[name], shard)), name


def test_checkpoint_shards_equal_the_fused_shards():
    """HF-named tensors sharded before loading give the same rank model as sharding the loaded full model."""
    full = full_model(TINY, seed=5)
    hf = hf_names(full)
    for rank in range(2):
        shard = Shard(TINY, 2, rank)
        model = build_model(shard.config, torch.float32, torch.device("cpu"))
        model.load_hf_weights(shard_hf_tensors(hf, shard))
        for name, p in model.named_parameters():
            assert torch.equal(p, shard_param(name, dict(full.named_parameters())[name], shard)), name


def hf_names(model) -> dict[str, torch.Tensor]:
    """The HF checkpoint tensors of one of our (fused) models."""
    c = model.config
    q, kv, f = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
    out = {"model.embed_tokens.weight": model.embed, "model.norm.weight": model.norm}
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        out |= {p + "self_attn.q_proj.weight": layer.qkv_proj[:q],
                p + "self_attn.k_proj.weight": layer.qkv_proj[q:q + kv],
                p + "self_attn.v_proj.weight": layer.qkv_proj[q + kv:], p + "self_attn.o_proj.weight": layer.o_proj,
                p + "mlp.gate_proj.weight": layer.gate_up_proj[:f], p + "mlp.up_proj.weight": layer.gate_up_proj[f:],
                p + "mlp.down_proj.weight": layer.down_proj, p + "input_layernorm.weight": layer.input_norm,
                p + "post_attention_layernorm.weight": layer.post_attention_norm}
    if model.lm_head is not None:
        out["lm_head.weight"] = model.lm_head
    return out


def test_sizes_that_do_not_split_the_model_are_refused():
    smollm = SHAPES["smollm2-135m"]         # the default model's shape: 9 heads, 3 KV heads, FFN 1536
    with pytest.raises(ValueError, match=r"size 2 does not split this model evenly: its 9 attention heads; "
                                         r"sizes that do: 3"):
        check_tensor_parallel(smollm, 2)
    with pytest.raises(ValueError, match="its 2 KV heads"):
        check_tensor_parallel(dataclasses.replace(TINY, num_heads=6, num_kv_heads=2, head_dim=16), 3)
    with pytest.raises(ValueError, match="FFN size 101"):
        check_tensor_parallel(dataclasses.replace(TINY, intermediate_size=101), 2)
    check_tensor_parallel(smollm, 3)
    # the engine refuses before it starts a worker or reads a weight
    with pytest.raises(ValueError, match="9 attention heads"):
        LLMEngine(model="smollm2-135m", load_format="dummy", tensor_parallel_size=2, **ENGINE)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs 2 GPUs from cuda:0; this machine has 0"):
            LLMEngine(model="tiny", load_format="dummy", device="cuda", tensor_parallel_size=2, **ENGINE)


# --- whole engines ------------------------------------------------------------------------------
def prompts(vocab_size: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENS]


def run(engine: LLMEngine, ids: list[list[int]], chunk_size: int = 64, force: list[list[int]] | None = None):
    """Greedy, EOS ignored; per request its tokens and the logits of each; the steps' shapes. `force`: feed
    these tokens instead of the argmax (teacher forcing)."""
    seqs, logits, shapes = greedy_with_logits(engine, ids, NUM_TOKENS, chunk_size=chunk_size, force=force)
    return [s.output_ids for s in seqs], logits, shapes


def assert_same(one, two) -> float:
    (tokens1, logits1, shapes), (tokens2, logits2, _) = one, two
    assert any(p > 0 and d > 0 for p, d in shapes), shapes      # chunks beside decodes
    assert tokens2 == tokens1
    worst = max(float((a - b).abs().max()) for a, b in zip(logits1, logits2))
    assert worst < 1e-4, worst
    return worst


def closed_cleanly(engine: LLMEngine, code: int | None = 0) -> None:
    procs = list(engine.tp.procs.values())
    engine.close()
    assert all(p.poll() is not None for p in procs)
    if code is not None:
        assert [p.returncode for p in procs] == [code] * len(procs)
    for p in procs:
        with pytest.raises(ProcessLookupError):
            os.kill(p.pid, 0)


def test_tp2_matches_tp1_on_random_weights():
    ids = prompts(TINY.vocab_size)
    one = run(LLMEngine(model="tiny", load_format="dummy", **ENGINE), ids)
    two_engine = LLMEngine(model="tiny", load_format="dummy", tensor_parallel_size=2, **ENGINE)
    try:
        assert two_engine.kv_cache.data.shape[-2] == 1            # this rank's KV head only
        two = run(two_engine, ids)
        assert two_engine.executor.tp.size == 2 and "tensor parallel x2 (gloo)" in two_engine.describe()
    finally:
        closed_cleanly(two_engine)
    print(f"\n[TP=2 vs TP=1, random weights] max |logit diff| {assert_same(one, two):.1e}")


def write_checkpoint(directory, arch: str):
    """A random 2-layer Llama or Qwen2 (large Q/K/V biases) checkpoint as transformers writes it."""
    transformers = pytest.importorskip("transformers")
    from niyama.engine.weights import resolve

    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  tie_word_embeddings=False, initializer_range=0.1, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    if arch == "llama":
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(head_dim=16, **common))
    else:
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(use_sliding_window=False, **common))
        with torch.no_grad():
            for layer in hf.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.5)
    hf.save_pretrained(directory)
    tokenizer_dir = resolve(None)[1]      # the default model's tokenizer (the same 49,152 ids)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, directory / name)
    return directory


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tp2_matches_tp1_on_a_checkpoint(arch, tmp_path):
    path = str(write_checkpoint(tmp_path, arch))
    ids = prompts(1000)
    one_engine = LLMEngine(model=path, **ENGINE)
    assert one_engine.model_config.num_kv_heads == 2
    one = run(one_engine, ids, chunk_size=128)
    two_engine = LLMEngine(model=path, tensor_parallel_size=2, **ENGINE)
    try:
        two = run(two_engine, ids, chunk_size=128)
    finally:
        closed_cleanly(two_engine)
    print(f"\n[TP=2 vs TP=1, {arch} checkpoint] max |logit diff| {assert_same(one, two):.1e}")


# --- failures -----------------------------------------------------------------------------------
def test_a_worker_that_raises_fails_rank_0_clearly(monkeypatch):
    monkeypatch.setenv("NIYAMA_TP_FAIL_AT_STEP", "3")
    engine = LLMEngine(model="tiny", load_format="dummy", tensor_parallel_size=2, **ENGINE)
    try:
        t0 = time.monotonic()
        with pytest.raises(TensorParallelError, match=r"worker 1 failed: RuntimeError: injected fault at step 3"):
            run(engine, prompts(TINY.vocab_size))
        assert time.monotonic() - t0 < 30
        with pytest.raises(TensorParallelError, match="cannot go on"):      # and every later step says so
            engine.step()
    finally:
        closed_cleanly(engine, code=1)


def test_a_killed_worker_fails_rank_0_clearly():
    engine = LLMEngine(model="tiny", load_format="dummy", tensor_parallel_size=2, **ENGINE)
    try:
        seq = engine.add_request(prompts(TINY.vocab_size)[1], SamplingParams(max_tokens=8, ignore_eos=True))
        engine.step()
        engine.tp.procs[1].send_signal(signal.SIGKILL)
        with pytest.raises(TensorParallelError, match=r"worker 1 .*code -9"):
            while not seq.finished:
                engine.step()
    finally:
        closed_cleanly(engine, code=-9)


def test_workers_leave_when_the_engine_process_dies(tmp_path):
    script = ("import sys; from niyama.engine import LLMEngine; "
              "e = LLMEngine(model='tiny', load_format='dummy', tensor_parallel_size=2, kv_tokens=1024, "
              "profile='a100-llama3-8b'); print(*[p.pid for p in e.tp.procs.values()], flush=True); "
              "sys.stdin.read()")
    parent = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        pid = int(parent.stdout.readline())
        parent.kill()                    # no atexit, no close(): the worker must notice by itself
        parent.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and alive(pid):
            time.sleep(0.2)
        assert not alive(pid), "the worker outlived its engine"
    finally:
        parent.kill()


def alive(pid: int) -> bool:
    """Running (not exited, nor a zombie waiting for its adopter to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_cli_flag_reaches_the_engine_config():
    from niyama.cli import build_parser
    from niyama.cli.common import engine_config_from_args

    for verb in (["generate", "hi"], ["serve"], ["profile"]):
        args = build_parser().parse_args(verb + ["-tp", "2"])
        assert engine_config_from_args(args).tensor_parallel_size == 2
        args = build_parser().parse_args(verb + ["--tensor-parallel-size", "4"])
        assert engine_config_from_args(args).tensor_parallel_size == 4
    assert engine_config_from_args(build_parser().parse_args(["generate", "hi"])).tensor_parallel_size == 1


# --- NCCL (run where there are 2 GPUs; CI has none) ----------------------------------------------
@pytest.mark.skipif(not TWO_GPUS, reason="needs 2 GPUs")
def test_tp2_on_two_gpus():
    """On 2 GPUs over NCCL: the reference path in float32 gives TP=1's tokens exactly; the fast path (triton
    attention and ops, bf16) fed TP=1's tokens stays as close to TP=1's logits as bf16 allows, with CUDA
    graphs (all-reduces captured) giving the eager path's bits; an engine whose KV cache comes from the
    memory plan (every rank runs the plan's steps) runs."""
    ids = prompts(TINY.vocab_size)
    cuda = dict(ENGINE, model="tiny", load_format="dummy", device="cuda")
    ref = dict(cuda, dtype="float32", attention="torch-reference")
    one = run(LLMEngine(**ref), ids)
    with LLMEngine(**ref, tensor_parallel_size=2) as engine:
        print(f"\n[NCCL, float32 reference] max |logit diff| {assert_same(one, run(engine, ids)):.1e}")
    fast = dict(cuda, dtype="bfloat16")
    tokens, logits, _ = run(LLMEngine(**fast), ids)
    logits2 = {}
    for graphs in (False, True):
        with LLMEngine(**fast, tensor_parallel_size=2, cuda_graphs=graphs) as engine:
            assert (engine.executor.graphs is not None) == graphs
            logits2[graphs] = run(engine, ids, force=tokens)[1]
    assert all(torch.equal(a, b) for a, b in zip(logits2[True], logits2[False]))
    worst = max(float((a - b).norm() / b.norm()) for a, b in zip(logits2[True], logits))
    print(f"[NCCL, triton bf16, teacher-forced, graphs = eager] worst relative logit error {worst:.1e}")
    assert worst < 2e-2
    planned = dict(fast, kv_tokens=None, gpu_memory_utilization=0.3)
    with LLMEngine(**planned, tensor_parallel_size=2) as engine:
        assert engine.memory is not None
        print(engine.describe())
        assert run(engine, ids)[0]


@pytest.mark.skipif(not TWO_GPUS, reason="needs 2 GPUs")
def test_a_worker_that_raises_on_a_gpu_fails_rank_0_clearly():
    """Under NCCL rank 0 would wait on its GPU for the dead worker's all-reduce; it raises instead."""
    script = ("import os; os.environ['NIYAMA_TP_FAIL_AT_STEP'] = '3'\n"
              "from niyama.engine import LLMEngine, SamplingParams\n"
              "e = LLMEngine(model='tiny', load_format='dummy', device='cuda', kv_tokens=4096, "
              "profile='a100-llama3-8b', tensor_parallel_size=2)\n"
              "try:\n    e.generate([[5] * 300, [7] * 20], SamplingParams(max_tokens=8))\n"
              "except Exception as ex:\n    print('RAISED', type(ex).__name__, str(ex).splitlines()[0], flush=True)\n"
              "e.close()\nprint('CLOSED', flush=True)\n")
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240).stdout
    print(f"\n{out.strip()} ({time.monotonic() - t0:.0f} s)")
    assert "RAISED TensorParallelError tensor-parallel worker 1 failed: RuntimeError: injected fault" in out
    assert "CLOSED" in out
