"""Structured outputs in the engine: the bitmask the sampler applies, a random-weight model whose outputs are
valid only because of the grammar, the default model's outputs, rows without a grammar left as they were, and
a constrained request that is preempted and resumes."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

from niyama.engine import LLMEngine, SamplingParams  # noqa: E402
from niyama.engine.grammar import compile_choice, compile_json_schema, compile_regex  # noqa: E402
from niyama.engine.sampler import apply_bitmask, apply_bitmask_host  # noqa: E402
from niyama.engine.weights import resolve  # noqa: E402

ITEM = {"type": "object", "additionalProperties": False, "required": ["sku", "qty", "tags"],
        "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                       "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                       "tags": {"type": "array", "maxItems": 2,
                                "items": {"type": "string", "enum": ["fragile", "cold", "bulk"]}},
                       "note": {"type": "string", "maxLength": 12}}}


def test_apply_bitmask_keeps_exactly_the_set_bits():
    gen = torch.Generator().manual_seed(0)
    vocab = 100                                     # not a multiple of 32: the last word is partial
    logits = torch.randn(5, vocab, generator=gen)
    before = logits.clone()
    allowed = torch.rand(2, vocab, generator=gen) < 0.3
    words = torch.zeros(2, 4, dtype=torch.int64)
    for r in range(2):
        for t in torch.nonzero(allowed[r]).flatten().tolist():
            words[r, t // 32] |= 1 << (t % 32)
    bitmask = (words - (words >= 2**31) * 2**32).to(torch.int32)     # the same 32 bits, as int32
    host = before.clone()
    apply_bitmask(logits, torch.tensor([1, 3]), bitmask)
    apply_bitmask_host(host, [1, 3], bitmask.numpy())
    for row, r in ((1, 0), (3, 1)):
        assert torch.equal(torch.isfinite(logits[row]), allowed[r])
        assert torch.equal(logits[row][allowed[r]], before[row][allowed[r]])
    for row in (0, 2, 4):                           # rows without a grammar: untouched
        assert torch.equal(logits[row], before[row])
    assert torch.equal(host, logits)
    every = before[:2].clone()                      # every row constrained: the in-place path
    apply_bitmask_host(every, [0, 1], bitmask.numpy())
    assert torch.equal(torch.isfinite(every), allowed)


@pytest.fixture(scope="module")
def random_model():
    """Random weights over SmolLM2's vocabulary, with its tokenizer: text without a grammar is noise."""
    return LLMEngine(model="tiny-49k", load_format="dummy", tokenizer=str(resolve(None, "auto")[1]))


def test_a_random_weight_models_output_is_valid_only_through_the_grammar(random_model):
    grammar = compile_json_schema(ITEM)
    sampled = SamplingParams(max_tokens=120, temperature=1.0, grammar=grammar)
    seqs = random_model.generate([[1, 2, 3]] * 8, sampled)
    for seq in seqs:
        assert seq.finish_reason == "stop", seq.text
        jsonschema.validate(json.loads(seq.text), ITEM)
    free = random_model.generate([[1, 2, 3]] * 4, SamplingParams(max_tokens=40, temperature=1.0))
    assert not any(_is_json(s.text) for s in free)          # the grammar, not the model, made them valid
    random_model.check_blocks()


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def test_regex_and_choice_on_random_weights(random_model):
    seqs = random_model.generate([[5, 6]] * 4, SamplingParams(max_tokens=30, temperature=1.0,
                                                              grammar=compile_regex(r"[a-f0-9]{8}-(yes|no)")))
    for seq in seqs:
        assert seq.finish_reason == "stop"
        head, tail = seq.text.split("-")
        assert len(head) == 8 and set(head) <= set("abcdef0123456789") and tail in ("yes", "no")
    seqs = random_model.generate([[7]] * 3, SamplingParams(max_tokens=10, temperature=0,
                                                           grammar=compile_choice(["alpha", "beta", "gamma"])))
    assert all(s.text in ("alpha", "beta", "gamma") for s in seqs)


@pytest.fixture(scope="module")
def engine():
    return LLMEngine(policy="fcfs")


def test_rows_without_a_grammar_draw_what_they_draw_alone(engine):
    """A constrained row in the batch changes nothing for the others (same seeds, same tokens)."""
    prompt = engine.chat_prompt([{"role": "user", "content": "Write a haiku about ships."}])
    plain = SamplingParams(max_tokens=20, temperature=0.8, seed=11)
    alone = [s.output_ids for s in engine.generate([prompt] * 2, plain)]
    engine.add_request(prompt, SamplingParams(max_tokens=60, temperature=0.8, seed=3,
                                              grammar=compile_json_schema(ITEM)))
    mixed = engine.generate([prompt] * 2, plain)
    assert [s.output_ids for s in mixed] == alone
    engine.check_blocks()


def test_constrained_requests_preempted_mid_answer_resume_their_grammar(engine):
    """The grammar's state lives in the sequence: requests preempted mid-answer (their blocks freed, their
    tokens recomputed) end with the answers they give with room to spare."""
    prompt = engine.tokenizer.encode(engine.chat_prompt([{"role": "user", "content": "An order item as JSON."}]))
    params = [SamplingParams(max_tokens=60, temperature=0.7, top_p=0.9, seed=s, grammar=compile_json_schema(ITEM))
              for s in range(4)]
    roomy = [engine.generate([prompt], p)[0] for p in params]
    small = LLMEngine(policy="niyama", kv_tokens=(len(prompt) // 16 + 4) * 16 * 2)
    preempted = []
    small.add_step_hook(lambda plan, result, end: preempted.extend(plan.preempted))
    seqs = [small.add_request(prompt, p) for p in params]
    while small.has_work:
        small.step()
    assert preempted
    assert [s.text for s in seqs] == [r.text for r in roomy]
    for s in seqs:
        if s.finish_reason == "stop":
            jsonschema.validate(json.loads(s.text), ITEM)
    assert any(s.finish_reason == "stop" for s in seqs)
    small.check_blocks()
