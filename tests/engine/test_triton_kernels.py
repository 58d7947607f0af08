"""The Triton backend and ops against the PyTorch reference, on fresh random inputs.

On a machine without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, numpy on
the CPU: the same kernel code, slow, so the shapes stay small and the dtype is float32; the
interpreter cannot cast to bfloat16). With a GPU they run compiled, in bfloat16, with contexts up to
32K tokens. Each case draws new inputs and poisons the output buffers' memory first (NaN), so an
unwritten row fails the comparison.
"""

from __future__ import annotations

import os
import random

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")     # must be set before the kernels are defined
pytest.importorskip("triton")

from niyama.engine.attention import SeqSlice, TorchReference  # noqa: E402
from niyama.engine.config import SHAPES  # noqa: E402
from niyama.engine.ops import TorchOps  # noqa: E402
from niyama.engine.triton_backend import TritonPaged  # noqa: E402
from niyama.engine.triton_ops import TritonOps  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
DTYPE = torch.bfloat16 if GPU else torch.float32
TOL = 2e-2 if GPU else 1e-4          # relative error: bf16 operands on the GPU, float32 in the interpreter
BS = 16


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def make_batch(prefills: list[tuple[int, int]], decodes: list[int], config, num_blocks: int, gen):
    """Random K/V already cached, new q/k/v rows, and SeqSlices with scattered (shuffled) blocks.
    prefills: (tokens cached before the chunk, chunk length); decodes: context length after the step."""
    free = list(range(num_blocks))
    random.Random(int(torch.randint(1 << 30, (1,), generator=gen))).shuffle(free)
    slices, row = [], 0
    for cached, q_len in prefills:
        ctx = cached + q_len
        blocks = [free.pop() for _ in range(-(-ctx // BS))]
        slices.append(SeqSlice(row, q_len, ctx, blocks))
        row += q_len
    for ctx in decodes:
        blocks = [free.pop() for _ in range(-(-ctx // BS))]
        slices.append(SeqSlice(row, 1, ctx, blocks))
        row += 1
    h, kvh, d = config.num_heads, config.num_kv_heads, config.head_dim
    shape = (num_blocks, BS, kvh, d)
    k_cache = torch.randn(shape, generator=gen).to(DEVICE, DTYPE)
    v_cache = torch.randn(shape, generator=gen).to(DEVICE, DTYPE)
    q = torch.randn(row, h, d, generator=gen).to(DEVICE, DTYPE)
    k = torch.randn(row, kvh, d, generator=gen).to(DEVICE, DTYPE)
    v = torch.randn(row, kvh, d, generator=gen).to(DEVICE, DTYPE)
    return slices, q, k, v, k_cache, v_cache


def check_attention(prefills, decodes, shape="tiny", seed=0, bucket=None):
    """The reference and the Triton backend on one random batch; `bucket`: the padded layout of that
    many rows (as CUDA graphs run it) instead of the exact one."""
    config = SHAPES[shape]
    gen = torch.Generator().manual_seed(seed)
    need = sum(-(-(a + b) // BS) for a, b in prefills) + sum(-(-c // BS) for c in decodes)
    slices, q, k, v, kc, vc = make_batch(prefills, decodes, config, need + 4, gen)
    ref_kc, ref_vc = kc.clone(), vc.clone()
    ref = TorchReference()
    expect = ref.forward(q, k, v, ref_kc, ref_vc, ref.prepare(slices, len(decodes), BS, DEVICE))
    fast = TritonPaged(config, DEVICE, max_num_seqs=max(len(slices), bucket or 0), block_size=BS)
    layout = fast.bucket_layout(bucket) if bucket else None
    meta = fast.prepare(slices, len(decodes), BS, DEVICE, layout=layout)
    pad = (bucket or q.shape[0]) - q.shape[0]
    if pad:   # padding rows: random queries whose outputs are ignored and whose K/V must go nowhere
        q, k, v = (torch.cat([x, torch.randn((pad,) + x.shape[1:], generator=gen).to(DEVICE, DTYPE)]) for x in (q, k, v))
    fast.part_acc.fill_(float("nan"))
    fast.part_ml.fill_(float("nan"))
    got = fast.forward(q, k, v, kc, vc, meta)
    rows = expect.shape[0]
    assert torch.isfinite(got[:rows]).all()
    assert rel_err(got[:rows], expect) < TOL
    assert torch.equal(kc, ref_kc) and torch.equal(vc, ref_vc), "new K/V written to other slots than the reference's"


def test_every_section_of_a_packed_step_starts_aligned():
    """Triton compiles one kernel variant per pointer alignment: exact layouts of any odd size must still
    hand every kernel 64-byte-aligned metadata, or a running server compiles new variants mid-run."""
    from niyama.engine.triton_backend import SECTION_ALIGN

    fast = TritonPaged(SHAPES["tiny"], DEVICE, max_num_seqs=64, block_size=BS)
    rng = random.Random(0)
    for _ in range(50):
        prefills = [(rng.randint(0, 300), rng.randint(1, 300)) for _ in range(rng.randint(0, 5))]
        decodes = [rng.randint(1, 400) for _ in range(rng.randint(0 if prefills else 1, 40))]
        slices, row = [], 0
        for cached, q_len in prefills:
            slices.append(SeqSlice(row, q_len, cached + q_len, [0] * -(-(cached + q_len) // BS)))
            row += q_len
        slices += [SeqSlice(row + i, 1, c, [0] * -(-c // BS)) for i, c in enumerate(decodes)]
        for layout in (fast.exact_layout(slices, len(decodes)), fast.bucket_layout(max(row + len(decodes), 16))):
            spans = sorted(layout.offsets.values())
            assert all(start % SECTION_ALIGN == 0 for start, _ in spans)
            assert all(a + n <= b for (a, n), (b, _) in zip(spans, spans[1:]))        # no overlap
            assert spans[-1][0] + spans[-1][1] == layout.size


def test_prefill_chunks_with_and_without_cached_context():
    check_attention([(0, 37), (16, 16), (5, 70), (130, 1)], [])


def test_decodes_at_block_boundaries():
    check_attention([], [1, 15, 16, 17, 31, 32, 33, 64, 200], seed=1)


def test_mixed_batch_with_ragged_lengths():
    gen = random.Random(2)
    for seed in range(3):
        prefills = [(gen.randrange(0, 100), gen.randrange(1, 90)) for _ in range(gen.randrange(1, 4))]
        decodes = [gen.randrange(1, 300) for _ in range(gen.randrange(1, 6))]
        check_attention(prefills, decodes, seed=seed)


def test_padded_decode_rows_write_nothing():
    check_attention([], [5, 40, 77], seed=3, bucket=8)


def test_mixed_batch_in_a_bucket_layout():
    # two chunks and three decodes padded to 256 rows: unused tiles and decode slots must do nothing
    check_attention([(30, 70), (0, 20)], [9, 130, 48], seed=7, bucket=256)
    check_attention([(30, 200), (0, 20)], [9, 130, 48], seed=8, bucket=512)     # 128-row tiles


def test_gqa_group_that_is_not_a_power_of_two():
    # SmolLM2: 9 query heads over 3 KV heads, head_dim 64
    check_attention([(20, 30)], [50, 3], shape="smollm2-135m", seed=4)


@pytest.mark.skipif(not GPU, reason="long contexts are too slow for the interpreter")
@pytest.mark.parametrize("ctx", [1, 17, 511, 2048, 8191, 32768])
def test_long_contexts_on_gpu(ctx):
    check_attention([(ctx - 1, 1), (max(0, ctx - 300), min(ctx, 300))], [ctx, max(1, ctx // 3)], shape="llama-3-8b",
                    seed=ctx)


@pytest.mark.skipif(not GPU, reason="GPU only")
def test_large_mixed_batch_on_gpu():
    # the 1000-token first chunk goes to cuDNN (padded to 1024), the other to the Triton kernel
    check_attention([(0, 1000), (1000, 256)], [2048] * 64 + [7, 4000], shape="llama-3-8b", seed=9)


def test_elementwise_ops_match_torch():
    gen = torch.Generator().manual_seed(5)
    ref, fast = TorchOps(), TritonOps()
    t, hidden, h, kvh, d = 7, 96, 4, 2, 16
    x = torch.randn(t, hidden, generator=gen).to(DEVICE, DTYPE)
    delta = torch.randn(t, hidden, generator=gen).to(DEVICE, DTYPE)
    w = torch.randn(hidden, generator=gen).to(DEVICE, DTYPE)
    x_ref, h_ref = ref.add_rms_norm(x, delta, w, 1e-5)
    x_fast, h_fast = fast.add_rms_norm(x.clone(), delta, w, 1e-5)
    assert rel_err(x_fast, x_ref) < TOL and rel_err(h_fast, h_ref) < TOL
    assert rel_err(fast.add_rms_norm(x.clone(), None, w, 1e-5)[1], ref.add_rms_norm(x, None, w, 1e-5)[1]) < TOL

    gate_up = torch.randn(t, 2 * 1500, generator=gen).to(DEVICE, DTYPE)     # not a multiple of the block
    assert rel_err(fast.silu_mul(gate_up), ref.silu_mul(gate_up)) < TOL

    qkv = torch.randn(t, (h + 2 * kvh) * d, generator=gen).to(DEVICE, DTYPE)
    positions = torch.randint(0, 8000, (t,), generator=gen).to(DEVICE)
    inv_freq = (1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))).to(DEVICE)
    want = ref.rope_qkv(qkv, h, kvh, d, ref.rope_state(positions, inv_freq, DTYPE))
    got = fast.rope_qkv(qkv.clone(), h, kvh, d, fast.rope_state(positions, inv_freq, DTYPE))
    for a, b in zip(got, want):
        assert rel_err(a, b) < TOL


def run_engine(opts: dict, prompts, params, force=None, weights_from=None, max_bucket=None):
    """Greedy outputs and every sampled row's logits per prompt; `force`: teacher-force these tokens;
    `max_bucket`: steps of more tokens than this get exact (unpadded) layouts."""
    from niyama.engine import LLMEngine
    from niyama.engine.cuda_graphs import bucket_sizes

    engine = LLMEngine(**opts)
    if max_bucket is not None:
        engine.executor.use_buckets(bucket_sizes(8, max_rows=max_bucket), graphs=False)
    if weights_from is not None:
        with torch.no_grad():
            for mine, theirs in zip(engine.model.parameters(), weights_from.model.parameters()):
                mine.copy_(theirs)
    first = engine.replica._num_added
    seen: dict[int, list] = {}

    def hook(seqs, rows):
        for s, row in zip(seqs, rows):
            got = seen.setdefault(s.request.request_id - first, [])
            got.append(row.clone())
            if force is not None:
                row.fill_(float("-inf"))
                row[force[s.request.request_id - first][len(got) - 1]] = 0.0

    engine.executor.logits_hook = hook
    steps = []
    engine.replica.on_step.append(lambda plan, res, end: steps.append((len(plan.prefills), plan.num_decodes)))
    tokens = [s.output_ids for s in engine.generate(prompts, params)]
    assert any(p and d for p, d in steps), "no mixed prefill + decode step was exercised"
    assert engine.allocator.num_free == engine.allocator.num_blocks
    return engine, tokens, [torch.stack(seen[i]).float() for i in range(len(prompts))]


def test_engine_on_the_triton_path_matches_the_reference():
    """The whole engine on the fast path (fused ops, paged attention, padded decodes; CUDA graphs on a
    GPU) over mixed chunked batches, against the reference engine with the same random weights.
    In the interpreter (float32) the greedy tokens are identical. On a GPU (bfloat16) two correct
    implementations break near-ties differently and then diverge, so there every engine is fed the
    bf16 reference's tokens (teacher forcing) and: the graph path's logits equal the eager fast path's
    bit for bit, and the fast path is as close to a float32 oracle (same weights, reference path) as
    the bf16 reference is."""
    import gc

    from niyama.engine import SamplingParams

    shape = "llama-3-8b" if GPU else "tiny"
    opts = dict(model=shape, load_format="dummy", device=DEVICE.type, dtype="bfloat16" if GPU else "float32",
                kv_tokens=1 << 15, policy="fcfs", policy_options={"chunk_size": 48})
    gen = torch.Generator().manual_seed(6)
    vocab = SHAPES[shape].vocab_size
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (5, 40, 100, 17)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    ref, ref_tokens, ref_logits = run_engine({**opts, "attention": "torch-reference"}, prompts, params)
    if not GPU:
        del ref
        for max_bucket in (None, 16):     # every step in a bucket layout; the prefill steps in exact ones
            _, tokens, _ = run_engine({**opts, "attention": "triton"}, prompts, params, max_bucket=max_bucket)
            assert tokens == ref_tokens
        return
    oracle, _, oracle_logits = run_engine({**opts, "attention": "torch-reference", "dtype": "float32"}, prompts,
                                          params, force=ref_tokens, weights_from=ref)
    del ref, oracle
    gc.collect()
    fast = {}
    for graphs in (False, True):
        engine, _, fast[graphs] = run_engine({**opts, "attention": "triton", "cuda_graphs": graphs}, prompts, params,
                                             force=ref_tokens)
        assert (engine.executor.graphs is not None) == graphs
        del engine
        gc.collect()
    for i in range(len(prompts)):
        assert torch.equal(fast[True][i], fast[False][i]), f"prompt {i}: graph and eager logits differ"
        fast_err, ref_err = rel_err(fast[False][i], oracle_logits[i]), rel_err(ref_logits[i], oracle_logits[i])
        assert fast_err <= 1.5 * ref_err + 1e-3, (i, fast_err, ref_err)


@pytest.mark.skipif(not GPU, reason="GPU memory planning")
def test_worst_case_step_fits_at_the_default_memory_settings():
    """An engine sized by its start-up plan (default --gpu-memory-utilization 0.9) runs the largest flat
    batch its scheduler can plan (the largest token budget: one prefill chunk after a long cached prefix,
    beside max_num_seqs - 1 decodes) through its full KV cache, CUDA graphs captured, and stays within
    the memory it was given."""
    import math

    from niyama.engine import LLMEngine, SamplingParams
    from niyama.engine.sequence import Sequence
    from niyama.qos import TIER_PRESETS, DeadlineRule
    from niyama.request import Request
    from niyama.scheduler import BatchPlan, PrefillChunk

    engine = LLMEngine(model="llama-3-8b", load_format="dummy", device="cuda")
    cfg, alloc = engine.config, engine.allocator
    total = torch.cuda.mem_get_info()[1]
    decodes = cfg.max_num_seqs - 1
    chunk = engine.scheduler.max_batch_tokens - decodes
    prefix = 4096
    context = min(2048, (alloc.num_blocks * alloc.block_size - prefix - chunk) // decodes - alloc.block_size)
    made = []

    def request(tokens: int, outputs: int) -> Request:
        req = Request(-1 - len(made), 0.0, tokens - outputs, outputs + 1, TIER_PRESETS["default"][0], DeadlineRule())
        seq = Sequence(req, [7] * (tokens - outputs), SamplingParams(max_tokens=outputs + 1, temperature=0,
                                                                      ignore_eos=True), None, ())
        seq.output_ids = [7] * outputs
        alloc.allocate(req, alloc.blocks_for(tokens + 1))
        engine.executor.add(seq)
        made.append(req)
        return req

    long_prompt = request(prefix + chunk, 0)
    decoding = [request(context, 1) for _ in range(decodes)]
    plan = BatchPlan(0, decodes, decodes * context, [PrefillChunk(long_prompt, prefix, chunk)], chunk + decodes,
                     math.inf)
    torch.cuda.reset_peak_memory_stats()
    engine.executor.execute(plan, decoding)
    peak = torch.cuda.max_memory_allocated()
    print(f"{engine.memory.describe()}; worst step peak {peak / 2**30:.1f} GiB of {total / 2**30:.1f}")
    assert peak <= cfg.gpu_memory_utilization * total
    for req in made:
        engine.executor.release(req)
        alloc.release(req)
    engine.executor.take_released()
    assert alloc.num_free == alloc.num_blocks


def test_triton_backend_refuses_a_cpu_outside_the_interpreter(monkeypatch):
    from niyama.engine.backends import make_backend

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="runs on a CUDA GPU"):
        make_backend("triton", SHAPES["tiny"], torch.device("cpu"), 8, BS)
