"""Sampling, stop conditions, streaming text and request validation on the real default model."""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")

from niyama.engine import LLMEngine, SamplingParams  # noqa: E402

from helpers import batched_sample  # noqa: E402
from sampling_oracle import penalize, probabilities  # noqa: E402


@pytest.fixture(scope="module")
def engine():
    return LLMEngine(kv_tokens=8192)


@pytest.fixture(scope="module")
def prompt(engine):
    return engine.chat_prompt([{"role": "user", "content": "What is the capital of France?"}])


def test_sampler_distribution_and_filters():
    def draws(logits, p, n):
        return batched_sample(logits.expand(n, -1).contiguous(), [p] * n)

    logits = torch.log(torch.tensor([[0.25, 0.75]]))
    got = draws(logits, SamplingParams(temperature=1.0), 4000)
    assert abs(sum(got) / len(got) - 0.75) < 0.03                  # follows the softmax
    for p in (SamplingParams(temperature=1.0, top_p=0.5), SamplingParams(temperature=1.0, top_k=1)):
        assert set(draws(logits, p, 200)) == {1}                   # only the top token survives
    hot = draws(logits, SamplingParams(temperature=50.0), 4000)
    assert abs(sum(hot) / len(hot) - 0.5) < 0.04                    # high temperature flattens
    three = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    assert set(draws(three, SamplingParams(top_p=0.7), 300)) == {0, 1}   # 0.5 + 0.3 reaches 0.7; 0.2 is cut


def test_seed_reproduces_and_greedy_filters_agree(engine, prompt):
    def run(**kw):
        return engine.generate([prompt], SamplingParams(max_tokens=20, ignore_eos=True, **kw))[0].output_ids

    assert run(seed=7) == run(seed=7)
    assert run(seed=7) != run(seed=8)
    assert run(temperature=0) == run(top_k=1, seed=3) == run(top_p=1e-6, seed=4)


def test_a_seeded_request_gives_the_same_tokens_alone_and_in_two_batches(engine, prompt):
    """The same seeded request (chat sampling with a repetition penalty) alone, beside 3 others, and beside
    7 others of other lengths and parameters, some of them penalized, arriving first: the same 24 tokens."""
    want = SamplingParams(max_tokens=24, temperature=0.7, top_p=0.9, repetition_penalty=1.1, seed=1234,
                          ignore_eos=True)
    others = [engine.chat_prompt([{"role": "user", "content": f"Tell me about the number {i}."}]) for i in range(7)]
    kinds = [SamplingParams(max_tokens=30, temperature=1.0, seed=i, presence_penalty=0.5 * (i % 2), ignore_eos=True)
             for i in range(7)]

    def run(n_others: int) -> list[int]:
        seqs = [engine.add_request(o, k) for o, k in zip(others[:n_others], kinds[:n_others])]
        seq = engine.add_request(prompt, want)
        while not all(s.finished for s in seqs + [seq]):
            engine.step()
        return seq.output_ids

    alone = run(0)
    assert len(alone) == 24 and run(3) == alone and run(7) == alone
    assert engine.generate([prompt], dataclasses.replace(want, seed=1235))[0].output_ids != alone


def test_logprobs_are_the_raw_log_softmax_of_the_sampled_and_top_tokens(engine, prompt):
    """vLLM's default: the model's own logits, before penalties and temperature, whatever the request
    samples with; the top list is sorted, holds the asked-for count, and a greedy token is its first."""
    captured = []
    engine.executor.logits_hook = lambda seqs, logits: captured.append((list(seqs), logits.clone()))
    try:
        sampled = engine.add_request(prompt, SamplingParams(max_tokens=6, temperature=1.3, repetition_penalty=1.3,
                                                            logprobs=5, seed=3, ignore_eos=True))
        greedy = engine.add_request(prompt, SamplingParams(max_tokens=6, temperature=0, logprobs=0, ignore_eos=True))
        plain = engine.add_request(prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
        while not all(s.finished for s in (sampled, greedy, plain)):
            engine.step()
    finally:
        engine.executor.logits_hook = None
    assert plain.logprobs is None
    for seq, top in ((sampled, 5), (greedy, 0)):
        rows = [logits[seqs.index(seq)] for seqs, logits in captured if seq in seqs]
        assert len(seq.logprobs) == len(rows) == 6
        for token, (logprob, alternatives), row in zip(seq.output_ids, seq.logprobs, rows):
            raw = torch.log_softmax(row, dim=0)
            assert logprob == pytest.approx(float(raw[token]), abs=1e-5)
            assert len(alternatives) == top
            assert [t for t, _ in alternatives] == raw.topk(top).indices.tolist()
            assert all(lp == pytest.approx(float(raw[t]), abs=1e-5) for t, lp in alternatives)
        if top == 0:
            assert all(lp == pytest.approx(float(torch.log_softmax(r, 0).max()), abs=1e-5)
                       for (lp, _), r in zip(seq.logprobs, rows))     # greedy: the most likely token's


def test_stop_string_streaming_and_max_tokens(engine, prompt):
    seq = engine.add_request(prompt, SamplingParams(max_tokens=40, temperature=0, stop=["Paris"]))
    streamed = ""
    while not seq.finished:
        engine.step()
        streamed += seq.take_text()
    assert seq.finish_reason == "stop" and seq.text == "The capital of France is "
    assert streamed == seq.text                                   # the stop string never leaked into the stream
    kept = engine.add_request(prompt, SamplingParams(max_tokens=40, temperature=0, stop=["Par", "Paris"],
                                                     include_stop_str_in_output=True))
    streamed = ""
    while not kept.finished:
        engine.step()
        streamed += kept.take_text()
    # the earliest stop string ends it; of the two starting there, the text keeps the longer one
    assert kept.text == "The capital of France is Paris" and streamed == kept.text
    long = engine.generate([prompt], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert long.finish_reason == "length" and len(long.output_ids) == 5 and long.request.num_output_tokens == 5
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_steps_report_measured_time(engine, prompt):
    durations, ends = [], []
    engine.add_step_hook(lambda plan, result, end: (durations.append(result.duration_s), ends.append(end)))
    try:
        engine.generate([prompt, prompt], SamplingParams(max_tokens=8, temperature=0))
    finally:
        engine.replica.on_step.clear()
    assert durations and all(d > 0 for d in durations)
    assert all(b > a for a, b in zip(ends, ends[1:]))             # the wall clock moved with the work


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
    (dict(top_k=-2), "top_k"), (dict(stop=[""]), "stop"), (dict(temperature=1e-40), "at least 0.01"),
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(min_p=-0.1), r"min_p must be in \[0, 1\]"), (dict(min_p=1.5), r"min_p must be in \[0, 1\]"),
    (dict(min_p=float("nan")), "min_p"), (dict(repetition_penalty=0), "repetition_penalty must be a finite number > 0"),
    (dict(repetition_penalty=-1.2), "repetition_penalty"), (dict(repetition_penalty=float("inf")), "repetition_penalty"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty"),
    (dict(presence_penalty=2.5), r"presence_penalty must be in \[-2, 2\]"), (dict(presence_penalty=-3), "presence"),
    (dict(frequency_penalty=-2.01), r"frequency_penalty must be in \[-2, 2\]"),
    (dict(frequency_penalty=float("nan")), "frequency_penalty"),
])
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_penalty_and_min_p_limits_are_accepted():
    p = SamplingParams(min_p=1, repetition_penalty=0.5, presence_penalty=-2, frequency_penalty=2)
    assert p.penalized and not SamplingParams(min_p=0.5, top_k=3).penalized


def test_sampler_survives_extreme_filters_and_logits():
    logits = torch.tensor([[3.0, 1.0, -2.0], [float("nan"), 0.0, 1.0], [float("-inf")] * 3])
    # top_p that float32 rounds to 0 keeps the top token; rows without a usable distribution fall back to
    # greedy instead of failing the step (and the other rows with it)
    params = [SamplingParams(top_p=1e-300), SamplingParams(temperature=0.01), SamplingParams(temperature=2.0)]
    for seed in range(20):
        tokens = batched_sample(logits, params, seeds=[seed] * 3)
        assert tokens[0] == 0 and all(0 <= t < 3 for t in tokens)
    # and so do rows with penalties and min_p
    params = [SamplingParams(min_p=1.0), SamplingParams(repetition_penalty=1.5, min_p=0.5),
              SamplingParams(presence_penalty=2, frequency_penalty=-2, temperature=0)]
    histories = [([0], [1]), ([1, 2], [0, 0]), ([2], [0, 1, 1])]
    for seed in range(20):
        tokens = batched_sample(logits, params, histories, seeds=[seed] * 3)
        assert tokens[0] == 0 and all(0 <= t < 3 for t in tokens)


def test_a_failed_step_loses_no_request_and_no_block():
    """A step that raises (here: the logits hook, inside the real executor) leaves every request where
    the loop can find it: paused prefills back in the queue, decodes in the decode set; aborting them
    all returns every block."""
    engine = LLMEngine(model="tiny", load_format="dummy", kv_tokens=2048, policy="fcfs")
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    decoding = engine.add_request([3] * 40, params)
    engine.step()
    prefilling = engine.add_request([4] * 600, params)          # mid-prefill when the step fails

    def fail(seqs, logits):
        raise RuntimeError("injected fault")

    engine.executor.logits_hook = fail
    with pytest.raises(RuntimeError, match="injected"):
        engine.step()
    assert prefilling.request.block_ids and prefilling.request in engine.replica.scheduler.waiting
    engine.executor.logits_hook = None
    for seq in (decoding, prefilling):
        assert engine.abort(seq)
    assert engine.allocator.num_free == engine.allocator.num_blocks
    engine.replica.check_blocks()
    after = engine.generate([[9] * 20], params)[0]              # and the engine still serves
    assert len(after.output_ids) == 30


def test_bad_requests_are_refused_clearly(engine, prompt):
    with pytest.raises(ValueError, match="context"):
        engine.add_request("word " * 9000, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="unknown tier"):
        engine.add_request(prompt, tier="Q9")
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([])
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request([10**9])
    with pytest.raises(ValueError, match="KV blocks"):
        engine.add_request(prompt, SamplingParams(max_tokens=8100))   # fits the context, not this cache
    ok = engine.generate([prompt], SamplingParams(max_tokens=4, temperature=0))[0]   # still serving
    assert ok.output_ids


def test_dummy_weights_for_a_named_shape():
    tiny = LLMEngine(model="tiny", load_format="dummy", kv_tokens=1024)
    a = tiny.generate([[5, 6, 7, 8] * 20], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    again = LLMEngine(model="tiny", load_format="dummy", kv_tokens=1024)
    b = again.generate([[5, 6, 7, 8] * 20], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    assert len(a.output_ids) == 12 and a.output_ids == b.output_ids   # seeded random weights
    with pytest.raises(ValueError, match="no tokenizer"):
        tiny.add_request("text")
    with pytest.raises(ValueError, match="shape"):
        LLMEngine(model="llama-9000", load_format="dummy")


def test_measured_profile_times_this_machine_and_leaves_the_engine_clean():
    engine = LLMEngine(model="tiny", load_format="dummy", kv_tokens=8192, profile="measure")
    rows = engine.calibration_rows
    assert engine.scheduler.predictor is engine.predictor and engine.predictor.base is engine.profile
    assert engine.profile.name == "measured-dummy-tiny-cpu"
    assert len(rows) >= 8 and any(r[0] + r[1] > 512 for r in rows) and any(r[3] > 0 for r in rows)
    assert all(r[4] > 0 for r in rows)
    # a bigger prefill costs more, in the measurements and in the fitted model the scheduler plans with
    single = {r[0]: r[4] for r in rows if r[1] == 0 and r[3] == 0}
    assert single[1024] > single[64]
    assert engine.profile.batch_time(1024, 0, 0, 0) > engine.profile.batch_time(64, 0, 0, 0)
    assert engine.allocator.num_free == engine.allocator.num_blocks and not engine.executor.sequences
    out = engine.generate([[5, 6, 7, 8] * 20], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    assert len(out.output_ids) == 4


def test_abort_frees_blocks_wherever_the_request_is():
    engine = LLMEngine(model="tiny", load_format="dummy", kv_tokens=2048, policy="fcfs")
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    decoding = engine.add_request([3] * 40, params)
    engine.step()                                         # prefilled: now decoding
    paused = engine.add_request([4] * 600, params)        # longer than one 256-token chunk: a paused prefill
    waiting = engine.add_request([5] * 40, params)
    later = engine.add_request([6] * 40, params, arrival_s=engine.now() + 3600)   # not arrived yet
    keep = engine.add_request([7] * 40, params)
    engine.step()
    assert decoding.request in engine.replica.decodes and paused.request.num_computed_tokens == 256 - 1
    assert paused.request.block_ids and not waiting.request.block_ids
    for seq in (decoding, paused, waiting, later):
        assert engine.abort(seq) and seq.finish_reason == "abort"
        assert not engine.abort(seq)                      # once only
    assert engine.allocator.num_free == engine.allocator.num_blocks   # `keep` has not started either
    while engine.has_work:
        engine.step()
    assert keep.finish_reason == "length" and len(keep.output_ids) == 30
    assert engine.allocator.num_free == engine.allocator.num_blocks and not engine.executor.sequences


# --- penalties and min_p ---------------------------------------------------------------------------------

def _hf_distribution(logits, p, ids):
    """transformers' own processors, in `generate`'s order, as probabilities `[vocab]`."""
    from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper,
                                                        RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    steps = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(p.repetition_penalty),
                                 TemperatureLogitsWarper(p.temperature)])
    if p.top_k:
        steps.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1:
        steps.append(TopPLogitsWarper(p.top_p))
    if p.min_p:
        steps.append(MinPLogitsWarper(p.min_p))
    return torch.softmax(steps(torch.tensor([ids]), logits[None].clone())[0], dim=-1)


@pytest.mark.parametrize("kwargs", [
    dict(repetition_penalty=1.3), dict(repetition_penalty=0.7, temperature=0.6), dict(min_p=0.1),
    dict(min_p=0.3, temperature=1.5, top_k=40), dict(repetition_penalty=1.8, temperature=0.8, top_p=0.9, min_p=0.05),
])
def test_penalties_and_min_p_match_transformers(kwargs):
    gen = torch.Generator().manual_seed(3)
    p = SamplingParams(**kwargs)
    for _ in range(10):
        logits = torch.randn(200, generator=gen) * 3              # both signs, so both sides of the penalty
        prompt = torch.randint(0, 200, (30,), generator=gen).tolist()
        output = torch.randint(0, 200, (10,), generator=gen).tolist()
        ours = probabilities(penalize(logits, p, (prompt, output)), p)
        want = _hf_distribution(logits, p, prompt + output)
        assert torch.equal(ours > 0, want > 0)                      # the same tokens survive
        torch.testing.assert_close(ours / ours.sum(), want, rtol=1e-5, atol=1e-6)
        if p.min_p:
            assert (ours == 0).sum() > 0                            # the filter did cut something here


def test_presence_and_frequency_penalties_follow_openai():
    logits = torch.tensor([1.0, -2.0, 3.0, 0.5, 4.0, -1.0])
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    got = penalize(logits, p, ([0, 1, 2], [2, 4, 4, 4, 5]))
    # logit - frequency * count - presence * (count > 0), counting the output only (the prompt's 0, 1 are free)
    want = torch.tensor([1.0, -2.0, 3.0 - 0.25 - 0.5, 0.5, 4.0 - 0.75 - 0.5, -1.0 - 0.25 - 0.5])
    torch.testing.assert_close(got, want)
    assert torch.equal(logits, torch.tensor([1.0, -2.0, 3.0, 0.5, 4.0, -1.0]))   # the input row is left alone
    # negative values reward repeats; with a repetition penalty too, it comes first (vLLM's order)
    both = SamplingParams(repetition_penalty=2.0, presence_penalty=-1.0, frequency_penalty=-0.5)
    got = penalize(logits, both, ([1], [4, 4]))
    torch.testing.assert_close(got, torch.tensor([1.0, -4.0, 3.0, 0.5, 4.0 / 2 + 1.0 + 1.0, -1.0]))
    assert torch.equal(penalize(logits, p, ([0, 2, 4], [])), logits)    # nothing generated yet: no change


def test_greedy_rows_take_penalties():
    logits = torch.tensor([[5.0, 4.5, 1.0]] * 4)
    greedy = SamplingParams(temperature=0)
    params = [greedy, SamplingParams(temperature=0, repetition_penalty=1.2),
              SamplingParams(temperature=0, presence_penalty=1.0), SamplingParams(temperature=0, presence_penalty=1.0)]
    histories = [([0], [0]), ([0, 2], []), ([2], [0]), ([0], [2])]   # token 0 seen in the prompt or output
    # 5 / 1.2 and 5 - 1 fall below 4.5; a presence penalty ignores the prompt (row 3 keeps token 0)
    assert batched_sample(logits, params, histories) == [0, 1, 1, 0]


def test_min_p_keeps_tokens_near_the_top():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    # 0.05 < 0.2 x 0.5 is cut; the rest stay
    assert set(batched_sample(logits.expand(400, -1), [SamplingParams(min_p=0.2)] * 400)) == {0, 1, 2}
    assert set(batched_sample(logits.expand(50, -1), [SamplingParams(min_p=1.0)] * 50)) == {0}


def _repeats(ids):
    return len(ids) - len(set(ids))


def test_engine_penalties_read_each_sequences_own_history(engine, prompt):
    """One batch: a plain greedy request samples the argmax of its logits, as before penalties existed;
    penalized ones sample what transformers' processor (or the OpenAI formula) makes of their logits with
    their own prompt and output so far, and the repetition penalty cuts repeats."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    base = dict(max_tokens=16, temperature=0, ignore_eos=True)
    seqs = [engine.add_request(prompt, SamplingParams(**base)),
            engine.add_request(prompt, SamplingParams(**base, repetition_penalty=1.3)),
            engine.add_request(prompt, SamplingParams(**base, presence_penalty=1.0, frequency_penalty=0.5))]
    seen = {id(s): [] for s in seqs}

    def record(sampled, logits):
        for i, s in enumerate(sampled):
            seen[id(s)].append((list(s.prompt_ids), list(s.output_ids), logits[i].clone()))

    engine.executor.logits_hook = record
    try:
        while not all(s.finished for s in seqs):
            engine.step()
    finally:
        engine.executor.logits_hook = None
    plain, rep, openai = seqs
    assert plain.output_ids == [int(lg.argmax()) for _, _, lg in seen[id(plain)]]
    hf = RepetitionPenaltyLogitsProcessor(1.3)
    assert rep.output_ids == [int(hf(torch.tensor([p + o]), lg[None].clone()).argmax()) for p, o, lg in seen[id(rep)]]

    def openai_pick(output, lg):
        lg = lg.clone()                                            # recorded under inference mode: read-only
        for t in set(output):
            lg[t] -= 0.5 * output.count(t) + 1.0
        return int(lg.argmax())

    assert openai.output_ids == [openai_pick(o, lg) for _, o, lg in seen[id(openai)]]
    assert len(plain.output_ids) == len(rep.output_ids) == 16
    assert rep.output_ids != plain.output_ids and _repeats(rep.output_ids) < _repeats(plain.output_ids)
    assert _repeats(openai.output_ids) < _repeats(plain.output_ids)


def test_sampling_mixes_by_name_and_file(tmp_path):
    import json
    import random

    from niyama.engine.sampling import SamplingMix

    chat = SamplingMix.parse("chat")
    assert chat.settings == ({"temperature": 0.7, "top_p": 0.9},) and chat.sampled_share == 1.0
    serving = SamplingMix.parse("serving")
    assert sum(serving.shares) == pytest.approx(1) and serving.sampled_share == pytest.approx(0.75)
    rng = random.Random(0)
    picks = [serving.pick(rng)["temperature"] for _ in range(2000)]
    assert picks.count(0.0) / 2000 == pytest.approx(0.25, abs=0.03)
    path = tmp_path / "mix.json"
    path.write_text(json.dumps([{"share": 1, "temperature": 0}, {"share": 3, "temperature": 1.0, "min_p": 0.1}]))
    mix = SamplingMix.parse(str(path))
    assert mix.name == "mix" and mix.shares == (0.25, 0.75) and mix.sampled_share == 0.75
    for bad, words in ((["not", "objects"], "list of objects"), ([{"share": -1}], "share must be a number > 0"),
                       ([{"temperature": -3}], "temperature")):
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=words):
            SamplingMix.parse(str(path))
    with pytest.raises(ValueError, match="unknown sampling 'spicy'"):
        SamplingMix.parse("spicy")


def test_a_sampler_that_raises_loses_no_block_and_no_penalty_slot():
    """A step that fails inside the sampler, after penalized requests took their slots: aborting every request
    returns every KV block and every penalty slot, and the engine serves on (slots reused, not grown)."""
    engine = LLMEngine(model="tiny", load_format="dummy", kv_tokens=2048, policy="fcfs")
    params = SamplingParams(max_tokens=20, temperature=0.8, repetition_penalty=1.3, ignore_eos=True)
    seqs = [engine.add_request([3 + i] * 30, params) for i in range(3)]
    engine.step()                                                # prefilled: slots taken
    sampler = engine.executor.sampler
    assert all(s.penalty_slot is not None for s in seqs) and len(sampler.penalties.free) == 16 - 3

    def fail(*args):
        raise RuntimeError("injected sampler fault")

    sampler._draw = fail
    with pytest.raises(RuntimeError, match="injected sampler fault"):
        engine.step()
    del sampler._draw
    for s in seqs:
        assert engine.abort(s)
    engine.take_finished()
    assert engine.allocator.num_free == engine.allocator.num_blocks
    assert sorted(sampler.penalties.free) == list(range(16)) and all(s.penalty_slot is None for s in seqs)
    after = engine.generate([[9] * 20, [8] * 20], params)
    assert all(len(s.output_ids) == 20 for s in after) and sampler.penalties.capacity == 16
