"""Prefix caching in the real engine (SmolLM2-135M on CPU, float32): a request that starts on cached blocks
computes only the rest of its prompt, and its greedy tokens are the ones it makes with caching off; that
holds for a prompt diverging inside a block, a next turn that reuses the previous answer's blocks, a whole
prompt seen before, a cached block evicted between two requests, and preemptions."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from niyama.engine import LLMEngine, SamplingParams  # noqa: E402

SYSTEM = ("You are a careful assistant for a shipping company. Answer in one or two short sentences, "
          "name the port when you know it, and never invent tracking numbers or delivery dates. ")
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def chat(engine: LLMEngine, user: str, history: list | None = None) -> list[int]:
    return engine.tokenizer.encode(engine.chat_prompt(
        [{"role": "system", "content": SYSTEM}, *(history or []), {"role": "user", "content": user}]))


def run_one(engine: LLMEngine, ids: list[int], params: SamplingParams = GREEDY):
    """Run `ids` alone to completion; (the sequence, prompt tokens the steps computed)."""
    computed = []
    engine.add_step_hook(lambda plan, result, end: computed.append(plan.num_prefill_tokens))
    seq = engine.generate([ids], params)[0]
    engine.replica.on_step.pop()
    engine.check_blocks()
    return seq, sum(computed)


@pytest.fixture(scope="module")
def engines():
    return LLMEngine(policy="fcfs"), LLMEngine(policy="fcfs", prefix_caching=False)


def test_cached_prefixes_skip_their_prefill_and_change_no_token(engines):
    cached, plain = engines
    first = chat(cached, "Where is the port of Rotterdam?")
    second = chat(cached, "Which port is the busiest in Asia?")              # same system prompt, then diverges
    common = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert common % 16, "the prompts should diverge inside a block"
    seq1, work1 = run_one(cached, first)
    seq2, work2 = run_one(cached, second)
    assert seq1.request.num_cached_tokens == 0 and work1 == len(first)
    assert seq2.request.num_cached_tokens == common // 16 * 16               # the full blocks before the split
    assert work2 == len(second) - seq2.request.num_cached_tokens
    # the next turn resends the first exchange: its prompt and the answer's blocks are cached
    answer = cached.tokenizer.decode(seq1.output_ids)
    turn2 = chat(cached, "And how far is it from Hamburg?",
                 [{"role": "user", "content": "Where is the port of Rotterdam?"},
                  {"role": "assistant", "content": answer}])
    seq3, work3 = run_one(cached, turn2)
    assert seq3.request.num_cached_tokens > len(first) - 16
    # the same prompt again: everything but its last token's block
    seq4, work4 = run_one(cached, first)
    assert seq4.request.num_cached_tokens == (len(first) - 1) // 16 * 16 and 1 <= work4 <= 16
    assert seq4.output_ids == seq1.output_ids
    for ids, seq in ((first, seq1), (second, seq2), (turn2, seq3)):
        ref, work = run_one(plain, ids)
        assert ref.request.num_cached_tokens == 0 and work == len(ids)
        assert seq.output_ids == ref.output_ids, "prefix caching changed the tokens"
    assert plain.allocator.num_cached_blocks == 0


def test_requests_in_one_batch_share_what_the_first_computed(engines):
    cached, plain = engines
    prompts = [chat(cached, q) for q in ("Is Antwerp a port?", "Is Le Havre a port?", "Is Genoa a port?")]
    seqs = cached.generate(prompts, GREEDY)
    refs = plain.generate(prompts, GREEDY)
    assert [s.output_ids for s in seqs] == [r.output_ids for r in refs]
    assert all(s.request.num_cached_tokens >= len(chat(cached, "")) // 16 * 16 - 16 for s in seqs[1:])
    cached.check_blocks()


def test_an_evicted_block_is_recomputed_and_tokens_stay_the_same():
    """A cache of 12 blocks: a long unrelated request evicts the first prompt's idle blocks."""
    small = LLMEngine(policy="fcfs", kv_tokens=12 * 16)
    plain = LLMEngine(policy="fcfs", kv_tokens=12 * 16, prefix_caching=False)
    ids = list(range(1000, 1090))                       # 90 tokens: 5 full blocks, 1 partial
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    ref, _ = run_one(plain, ids, params)
    seq1, _ = run_one(small, ids, params)
    seq2, work2 = run_one(small, ids, params)            # all cached but the last block
    assert seq2.request.num_cached_tokens == 80 and work2 == 10
    # 160 tokens + 8 need 11 of the 12 blocks: 5 of the first prompt's 6 idle ones go, tail first
    run_one(small, list(range(2000, 2160)), params)
    seq3, work3 = run_one(small, ids, params)
    assert seq3.request.num_cached_tokens == 16 and work3 == 74     # only its head block was left
    assert seq1.output_ids == seq2.output_ids == seq3.output_ids == ref.output_ids
    assert small.allocator.num_free == small.allocator.num_blocks


def test_preempted_requests_reattach_their_own_blocks():
    """Too little KV for four requests at once: a preempted decode re-prefills from its own cached blocks."""
    small = LLMEngine(policy="niyama", kv_tokens=20 * 16)
    plain = LLMEngine(policy="niyama", kv_tokens=20 * 16, prefix_caching=False)
    prompts = [[7 + k] + list(range(3000 + 50 * k, 3040 + 50 * k)) for k in range(4)]
    params = SamplingParams(max_tokens=56, temperature=0, ignore_eos=True)      # 41 + 55 tokens: 6 blocks each
    preempted, reattached = [], []

    def hook(plan, result, end):
        preempted.extend(plan.preempted)
        reattached.extend(c.start for c in plan.prefills if c.request.num_preemptions and c.start)
    small.add_step_hook(hook)
    seqs = small.generate(prompts, params)
    refs = plain.generate(prompts, params)
    assert preempted and reattached
    assert [s.output_ids for s in seqs] == [r.output_ids for r in refs]
    assert small.allocator.num_free == small.allocator.num_blocks
