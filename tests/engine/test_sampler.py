"""The batched sampler (niyama/engine/sampler.py) against the per-row oracle (sampling_oracle.py), and its
Triton kernels against its PyTorch reference.

Distributions: for each filter and their combinations, one row of logits is drawn 20,000 times (a batch
of 20,000 copies, seeds 0..19,999) and the counts are held to the oracle's probabilities: no draw may
fall on a token the oracle gives probability 0, and a chi-square test over the tokens it keeps (those
expected fewer than 5 times pooled) must pass at alpha = 1e-4 (critical value by Wilson-Hilferty). Planted
bugs (top-p off by one token; a repetition penalty that forgets the prompt; a temperature off by 10%)
fail the same check. Without a GPU the Triton kernels run in Triton's interpreter on small batches and
must give the reference's tokens exactly; with one they run compiled, and the distribution tests run
through them too.
"""

from __future__ import annotations

import math
import os

import pytest

torch = pytest.importorskip("torch")
GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")     # before the kernels are defined

from helpers import SamplerRow, batched_sample  # noqa: E402
from sampling_oracle import distribution  # noqa: E402

from niyama.engine.sampler import PenaltyState, Sampler  # noqa: E402
from niyama.engine.sampling import SamplingParams  # noqa: E402

try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

DEVICE = torch.device("cuda" if GPU else "cpu")
DRAWS = 20_000
VOCAB = 64
Z_1E4 = 3.719                     # the standard normal's upper 1e-4 quantile
HISTORY = ([1, 2, 3, 5, 8, 40, 41], [2, 2, 7, 13, 40, 40, 40])


def the_row(seed: int = 11) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(VOCAB, generator=gen) * 1.2          # both signs: both sides of the repetition penalty


def chi2_critical(df: int, z: float = Z_1E4) -> float:
    """Wilson-Hilferty: the chi-square distribution's upper quantile at the normal quantile z."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def fit(counts: torch.Tensor, probs: torch.Tensor) -> tuple[bool, str]:
    """Do `counts` (over the vocabulary) follow `probs`? (verdict, the numbers behind it)"""
    n = int(counts.sum())
    leaked = int(counts[probs == 0].sum())
    if leaked:
        return False, f"{leaked} draws on tokens of probability 0"
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([counts[big].double(), counts[~big & (probs > 0)].sum().double()[None]])
    exp = torch.cat([expected[big], expected[~big & (probs > 0)].sum()[None]])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    df = obs.numel() - 1
    if df == 0:                     # one token carries all the probability: every draw must be it
        return True, "a single token"
    stat = float(((obs - exp) ** 2 / exp).sum())
    tv = 0.5 * float((counts.double() / n - probs).abs().sum())
    crit = chi2_critical(df)
    return stat <= crit, f"chi2 {stat:.1f} vs {crit:.1f} (df {df}), total variation {tv:.4f}"


def draw_counts(row: torch.Tensor, params: SamplingParams, history=([], []), use_triton: bool = False):
    logits = row.to(DEVICE)[None].expand(DRAWS, -1).contiguous()
    sampler = Sampler(VOCAB, DEVICE, use_triton=use_triton)
    tokens = batched_sample(logits, [params] * DRAWS, [history] * DRAWS, sampler=sampler)
    return torch.bincount(torch.tensor(tokens), minlength=VOCAB)


CASES = {
    "temperature 1": SamplingParams(temperature=1.0),
    "chat: t 0.7, top-p 0.9": SamplingParams(temperature=0.7, top_p=0.9),
    "top-k 5": SamplingParams(temperature=0.7, top_k=5),
    "top-k 10 then top-p 0.8": SamplingParams(temperature=1.0, top_k=10, top_p=0.8),
    "min-p 0.1": SamplingParams(temperature=1.0, min_p=0.1),
    "top-p 0.95 and min-p 0.05": SamplingParams(temperature=1.2, top_p=0.95, min_p=0.05),
    "hot, top-p 0.5": SamplingParams(temperature=3.0, top_p=0.5),
    "top-p 0.05": SamplingParams(temperature=1.0, top_p=0.05),
    "repetition 1.3, top-p 0.9": SamplingParams(temperature=0.8, top_p=0.9, repetition_penalty=1.3),
    "repetition 0.7": SamplingParams(temperature=1.0, repetition_penalty=0.7),
    "presence 0.5, frequency 0.3": SamplingParams(temperature=1.0, presence_penalty=0.5, frequency_penalty=0.3),
    "everything": SamplingParams(temperature=0.9, top_k=20, top_p=0.85, min_p=0.05, repetition_penalty=1.2,
                                 presence_penalty=0.4, frequency_penalty=-0.2),
}
PATHS = [False] + ([True] if GPU and HAVE_TRITON else [])      # use_triton


@pytest.mark.parametrize("use_triton", PATHS, ids=lambda t: "triton" if t else "reference")
@pytest.mark.parametrize("name", list(CASES))
def test_distribution_matches_the_oracle(name, use_triton):
    params, row = CASES[name], the_row()
    probs = distribution(row, params, HISTORY)
    ok, why = fit(draw_counts(row, params, HISTORY, use_triton), probs)
    assert ok, f"{name}: {why}"


def _top_p_one_more(row: torch.Tensor, params: SamplingParams) -> SamplingParams:
    """The planted bug: a top_p that keeps exactly one token more than `params.top_p` does."""
    probs = torch.softmax(row / params.temperature, dim=0).sort(descending=True).values
    mass = torch.cumsum(probs, 0)
    kept = int((mass - probs < params.top_p).sum())           # the tokens params keep
    return SamplingParams(temperature=params.temperature, top_p=float(mass[kept]) + 1e-6)


@pytest.mark.parametrize("bug", ["top-p keeps one token more", "repetition penalty forgets the prompt",
                                 "temperature 10% high"])
def test_the_check_catches_planted_bugs(bug):
    row = the_row()
    if bug == "top-p keeps one token more":
        want, history = SamplingParams(temperature=0.7, top_p=0.9), ([], [])
        drawn, drawn_history = _top_p_one_more(row, want), history
    elif bug == "repetition penalty forgets the prompt":
        want, history = SamplingParams(temperature=1.0, repetition_penalty=1.5), HISTORY
        drawn, drawn_history = want, ([], HISTORY[1])
    else:
        want, history = SamplingParams(temperature=0.8), ([], [])
        drawn, drawn_history = SamplingParams(temperature=0.88), history
    ok, why = fit(draw_counts(row, drawn, drawn_history), distribution(row, want, history))
    assert not ok, f"the planted bug ({bug}) passed: {why}"


def test_greedy_rows_are_the_argmax_in_any_mix():
    """Greedy rows beside sampled and penalized ones take exactly torch's argmax (the first of tied
    maxima: bf16-rounded logits tie often), penalized greedy rows the argmax of their penalized logits."""
    gen = torch.Generator().manual_seed(5)
    n, vocab = 40, 500
    logits = (torch.randn(n, vocab, generator=gen) * 3).to(torch.bfloat16).float()
    logits[3, [7, 9, 200]] = logits[3].max() + 1                 # planted ties: the first index wins
    params = [SamplingParams(temperature=0) if i % 3 == 0 else
              SamplingParams(temperature=0, repetition_penalty=1.5) if i % 3 == 1 else
              SamplingParams(temperature=0.8, top_p=0.9) for i in range(n)]
    histories = [([1, 2, 3], [int(logits[i].argmax())]) for i in range(n)]
    got = batched_sample(logits.to(DEVICE), params, histories)
    for i, p in enumerate(params):
        if p.greedy:
            assert got[i] == int(distribution(logits[i], p, histories[i]).argmax()), i
    assert got[3] == 7


def test_a_seed_decides_a_row_whatever_the_batch():
    """The same row with the same seed and position draws the same token alone, in a batch of 7 and in a
    batch of 64 with other parameters around it; another seed or position draws differently (over many)."""
    row = the_row(3)
    p = SamplingParams(temperature=1.0, top_p=0.95, repetition_penalty=1.1)
    history = ([4, 5], [6, 7, 7])
    gen = torch.Generator().manual_seed(9)

    def in_batch(size: int, at: int, seed: int, history=history) -> int:
        logits = torch.randn(size, VOCAB, generator=gen) * 2
        logits[at] = row
        params = [SamplingParams(temperature=float(torch.rand(1, generator=gen)) + 0.1, top_k=int(i % 5) * 3)
                  for i in range(size)]
        params[at] = p
        histories = [([i], [i + 1]) for i in range(size)]
        histories[at] = history
        seeds = list(range(1000, 1000 + size))
        seeds[at] = seed
        return batched_sample(logits.to(DEVICE), params, histories, seeds)[at]

    for seed in range(30):
        alone = in_batch(1, 0, seed)
        assert alone == in_batch(7, 3, seed) == in_batch(64, 60, seed)
    assert len({in_batch(1, 0, s) for s in range(30)}) > 3
    moved = ([4, 5], [6, 7, 7, 9])                               # one position later: another draw
    assert [in_batch(1, 0, s) for s in range(30)] != [in_batch(1, 0, s, moved) for s in range(30)]


def test_unusable_rows_fall_back_to_greedy_and_extreme_filters_keep_the_top_token():
    logits = torch.tensor([[3.0, 1.0, -2.0], [float("nan"), 0.0, 1.0], [float("-inf")] * 3, [1.0, 2.0, 3.0]])
    params = [SamplingParams(top_p=1e-300), SamplingParams(temperature=0.01), SamplingParams(temperature=2.0),
              SamplingParams(min_p=1.0, temperature=5.0)]
    for seed in range(20):
        tokens = batched_sample(logits.to(DEVICE), params, seeds=[seed] * 4)
        assert tokens[0] == 0 and tokens[3] == 2 and all(0 <= t < 3 for t in tokens)


def test_penalty_counts_stay_on_the_device_and_follow_the_output():
    """Counts grow by one per sampled token without re-reading the history; a slot given back is clean when
    reused; the tables grow past their first 16 slots."""
    vocab = 50
    sampler = Sampler(vocab, DEVICE, use_triton=False)
    p = SamplingParams(temperature=1.0, frequency_penalty=0.5)
    rows = [SamplerRow(p, [1, 2], [3], seed=i) for i in range(20)]
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        tokens, _ = sampler.sample(torch.randn(20, vocab, generator=gen).to(DEVICE), rows).to_host()
        for r, t in zip(rows, tokens):
            r.output_ids.append(t)
    assert sampler.penalties.capacity == 32
    for r in rows:
        want = torch.bincount(torch.tensor(r.output_ids), minlength=vocab).to(torch.int32)
        assert torch.equal(sampler.penalties.counts[r.penalty_slot].cpu(), want)
        assert sorted(torch.nonzero(sampler.penalties.prompt[r.penalty_slot]).flatten().tolist()) == [1, 2]
    old = rows[0].penalty_slot
    sampler.release(rows[0])
    fresh = SamplerRow(p, [9], [], seed=0)
    sampler.sample(torch.randn(1, vocab).to(DEVICE), [fresh])
    assert fresh.penalty_slot == old and int(sampler.penalties.counts[old].sum()) == 1
    assert torch.nonzero(sampler.penalties.prompt[old]).flatten().tolist() == [9]


# --- the Triton kernels against the PyTorch reference ----------------------------------------------------

def random_mix(n: int, vocab: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, vocab, generator=gen) * 2.5).to(torch.bfloat16).float()    # ties, as in bf16
    choice = lambda options: options[int(torch.randint(len(options), (1,), generator=gen))]   # noqa: E731
    params, histories = [], []
    for _ in range(n):
        params.append(SamplingParams(
            temperature=choice([0.0, 0.5, 0.7, 1.0, 2.0]), top_p=choice([1.0, 0.9, 0.5, 0.1]),
            top_k=choice([0, 0, 5, 50]), min_p=choice([0.0, 0.0, 0.05, 0.2]),
            repetition_penalty=choice([1.0, 1.0, 1.2, 0.8]), presence_penalty=choice([0.0, 0.5]),
            frequency_penalty=choice([0.0, -0.3, 0.4])))
        histories.append((torch.randint(vocab, (5,), generator=gen).tolist(),
                          torch.randint(vocab, (int(torch.randint(4, (1,), generator=gen)),), generator=gen).tolist()))
    return logits, params, histories


@pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_triton_kernels_draw_the_references_tokens(seed):
    n, vocab = (48, 700) if not GPU else (256, 128_256)
    logits, params, histories = random_mix(n, vocab, seed)
    logits[5, 3] = float("nan")
    logits[6] = float("-inf")
    got = {}
    for use_triton in (False, True):
        sampler = Sampler(vocab, DEVICE, use_triton=use_triton)
        rows = [SamplerRow(p, h[0], h[1], seed=1000 * seed + i) for i, (p, h) in enumerate(zip(params, histories))]
        penalized = logits.to(DEVICE).clone()
        tokens, _ = sampler.sample(penalized, rows).to_host()
        slots = [r.penalty_slot for r in rows if r.penalty_slot is not None]
        got[use_triton] = (tokens, penalized.cpu(), sampler.penalties.counts[slots].cpu())
    ref, tri = got[False], got[True]
    # the penalties, element for element (on a GPU within float32 rounding: the compiler fuses a multiply-add)
    if GPU:
        torch.testing.assert_close(tri[1].nan_to_num(), ref[1].nan_to_num(), rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(ref[1].nan_to_num(), tri[1].nan_to_num())
    same = sum(a == b for a, b in zip(ref[0], tri[0]))
    # float sums in another order can move a top-p boundary on a GPU-sized vocabulary; in the interpreter
    # every token agrees
    assert same == n if not GPU else same >= n - 2, f"{n - same} of {n} tokens differ"
    if same == n:
        assert torch.equal(ref[2], tri[2])                           # the counts after the draw


def test_penalty_state_grows_from_nothing():
    state = PenaltyState(10, DEVICE)
    assert state.capacity == 0 and state.counts.numel() == 0        # no memory until a penalized request
    slots = [state.acquire([1], [2, 2]) for _ in range(17)]
    assert state.capacity == 32 and len(set(slots)) == 17
    assert state.counts[slots[0]].tolist() == [0, 0, 2] + [0] * 7
