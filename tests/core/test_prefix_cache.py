"""Automatic prefix caching (kv.py): shared refcounted blocks, the idle LRU cache, block keys, and whole runs."""

import random

import pytest

from niyama.kv import BlockAllocator, OutOfBlocks, TokenKeys, TraceKeys
from niyama.replica import Recorder, Replica
from niyama.request import Phase, blocks_for
from niyama.sim import SimulatedExecutor, simulate
from niyama.workload import make_workload
from niyama.workload.build import RequestSpec, Workload

from helpers import PREDICTOR, RULE, TIERS, req, scheduler

BS = 16


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(50_000) for _ in range(n)]


def keyed(rid: int, prompt: list[int], output: list[int] | None = None):
    """A request over `prompt` whose block keys are the live token lists (as the engine builds them)."""
    r = req(rid, 0.0, len(prompt), output=1000)
    r.block_keys = TokenKeys((prompt, output if output is not None else []), BS)
    return r


def start(kv: BlockAllocator, r) -> None:
    assert kv.start(r)
    r.move_to(Phase.PREFILL)


def prefill(kv: BlockAllocator, r) -> None:
    """`r`'s whole prefill ran (one chunk) and was committed, as the replica does."""
    r.num_computed_tokens = r.num_prefill_target
    kv.commit(r, r.num_computed_tokens)


def a_blocks_of(kv: BlockAllocator, prompt: list[int]) -> list[int]:
    """The cached blocks of `prompt`'s leading full blocks, by looking its keys up in the index."""
    keys = TokenKeys((prompt,), BS)
    out = []
    for i in range(len(keys)):
        b = kv._index.get(keys[i])
        if b is None:
            break
        out.append(b)
    return out


def idle(kv: BlockAllocator) -> set[int]:
    return set(kv._idle) | set(kv._reused_idle)


def free(kv: BlockAllocator) -> set[int]:
    return set(kv._free)


# --- 1. sharing ------------------------------------------------------------

def test_a_released_prompt_is_attached_by_the_next_equal_prompt_and_only_the_rest_is_new():
    kv = BlockAllocator(32, BS, watermark=0)
    prompt = tokens(100, 1)                      # 6 full blocks + 4 tokens
    a = keyed(0, prompt)
    start(kv, a)
    assert a.num_cached_tokens == a.num_computed_tokens == 0 and len(a.block_ids) == 7
    prefill(kv, a)
    assert kv.num_cached_blocks == 6
    a_blocks = list(a.block_ids)
    kv.release(a)
    assert idle(kv) == set(a_blocks[:6]) and a_blocks[6] in free(kv)
    assert kv.num_free == 32 and kv.num_idle_blocks == 6
    kv.check([])

    b = keyed(1, list(prompt))                   # equal content, another list
    assert kv.cached_tokens(b) == 96
    start(kv, b)
    assert b.block_ids[:6] == a_blocks[:6]
    assert b.num_computed_tokens == b.num_cached_tokens == 6 * BS
    assert b.num_remaining_prefill == 4
    assert len(b.block_ids) == 7 and b.block_ids[6] not in a_blocks[:6]
    assert kv.num_idle_blocks == 0 and kv.num_free == 32 - 7
    assert kv.num_hit_tokens == 96 and kv.num_query_tokens == 200
    kv.check([b])

    # c attaches them too while b holds them: every shared block counts two holders
    c = keyed(2, list(prompt))
    start(kv, c)
    assert c.block_ids[:6] == a_blocks[:6] and c.block_ids[6] != b.block_ids[6]
    assert all(kv._refs[blk] == 2 for blk in a_blocks[:6])
    kv.check([b, c])
    with pytest.raises(AssertionError):
        kv.check([c])                            # b's holds are real: leaving b out breaks conservation
    assert kv.num_free == 32 - 8
    prefill(kv, c)
    kv.release(b)                                # the shared blocks stay held by c: neither free nor idle
    assert not set(a_blocks[:6]) & (free(kv) | idle(kv))
    assert kv.num_free == 32 - 7
    kv.check([c])
    kv.release(c)
    assert kv.num_free == 32 and kv.num_idle_blocks == 6
    kv.check([])


def test_a_prompt_diverging_inside_a_block_shares_only_the_full_blocks_before_it():
    kv = BlockAllocator(32, BS, watermark=0)
    prompt = tokens(100, 2)
    a = keyed(0, prompt)
    start(kv, a)
    prefill(kv, a)
    ab = list(a.block_ids)
    kv.release(a)
    other = prompt[:40] + [t + 1 for t in prompt[40:]]      # differs from token 40: inside block 2
    b = keyed(1, other)
    start(kv, b)
    assert b.num_cached_tokens == b.num_computed_tokens == 32
    assert b.block_ids[:2] == ab[:2] and not set(b.block_ids[2:]) & set(ab[:6])
    assert len(b.block_ids) == 7                             # 5 new ones
    assert kv.num_idle_blocks == 4                           # a's blocks 2..5 untouched
    kv.check([b])


# --- 3. the last prompt token is always computed ---------------------------

@pytest.mark.parametrize("n, cached", [(32, 16), (33, 32), (17, 16), (16, 0), (1, 0), (47, 32), (48, 32)])
def test_the_last_prompt_token_is_never_cached(n, cached):
    kv = BlockAllocator(16, BS, watermark=0)
    prompt = tokens(n, 3)
    a = keyed(0, prompt)
    start(kv, a)
    prefill(kv, a)
    kv.release(a)
    assert kv.num_cached_blocks == n // BS                   # every full block is cached...
    b = keyed(1, list(prompt))
    start(kv, b)
    assert b.num_cached_tokens == b.num_computed_tokens == cached      # ...but not the last token's
    assert b.num_remaining_prefill >= 1
    assert len(b.block_ids) == blocks_for(n, BS)
    kv.check([b])


# --- 4. the idle cache: room, LRU eviction ---------------------------------

def test_idle_blocks_are_free_room_evicted_only_when_free_blocks_run_out_tail_first():
    kv = BlockAllocator(10, BS, watermark=0, eviction="lru")
    prompt = tokens(65, 4)                       # blocks 0..3 full, block 4 holds 1 token
    a = keyed(0, prompt)
    start(kv, a)
    prefill(kv, a)
    ab = list(a.block_ids)
    kv.release(a)
    assert list(kv._idle) == [ab[3], ab[2], ab[1], ab[0]]    # tail first: the head is used most recently
    assert kv.num_free == 10 and kv.num_idle_blocks == 4 and kv.num_used == 0

    filler = req(1, 0.0, 100)                    # no keys: never shared
    kv.allocate(filler, 6)                       # exactly the free blocks: nothing evicted
    assert not set(filler.block_ids) & set(ab[:4])
    assert kv.num_idle_blocks == 4 and kv.num_cached_blocks == 4 and kv.num_free == 4
    kv.check([filler])
    kv.allocate(filler, 1)                       # free ones ran out: the least recently used idle block goes
    assert filler.block_ids[-1] == ab[3]
    assert kv.num_idle_blocks == 3 and kv.num_cached_blocks == 3 and kv.num_free == 3
    kv.check([filler])
    kv.allocate(filler, 1)
    assert filler.block_ids[-1] == ab[2]
    assert kv.num_cached_blocks == 2
    kv.release(filler)                           # unkeyed: free, not idle
    assert kv.num_idle_blocks == 2 and kv.num_free == 10
    kv.check([])

    b = keyed(2, list(prompt))
    assert kv.cached_tokens(b) == 32             # blocks 0, 1 only: 2 was evicted
    start(kv, b)
    assert b.block_ids[:2] == ab[:2] and b.num_computed_tokens == 32
    kv.check([b])
    with pytest.raises(OutOfBlocks):
        kv.allocate(b, kv.num_free + 1)


def test_hits_stop_at_the_first_missing_block_even_when_later_ones_are_cached():
    """x computes blocks 0, 1 of a prompt first; y computes the same prompt alongside (its 0, 1 stay unkeyed
    duplicates) and indexes blocks 2, 3. x releases before y, so x's block 1 is evicted before y's 2 and 3:
    block 2 and 3 stay indexed, but no request can reach them past the hole."""
    kv = BlockAllocator(8, BS, watermark=0, eviction="lru")
    prompt = tokens(65, 5)
    x = keyed(0, prompt[:33])
    y = keyed(1, list(prompt))
    start(kv, x)
    start(kv, y)                                  # before x committed: no hits
    assert y.num_cached_tokens == 0
    prefill(kv, x)
    prefill(kv, y)
    xb, yb = list(x.block_ids), list(y.block_ids)
    assert kv.num_cached_blocks == 4
    assert a_blocks_of(kv, prompt) == [xb[0], xb[1], yb[2], yb[3]]
    kv.release(x)
    kv.release(y)
    assert list(kv._idle) == [xb[1], xb[0], yb[3], yb[2]]
    assert free(kv) == {xb[2], yb[4], yb[1], yb[0]}          # y's duplicates were never cached
    kv.check([])
    filler = req(2, 0.0, 100)
    kv.allocate(filler, 5)                        # 4 free + the LRU idle one: x's block 1
    assert xb[1] in filler.block_ids
    kv.release(filler)
    z = keyed(3, list(prompt))
    assert kv.cached_tokens(z) == 16
    start(kv, z)
    assert z.block_ids[0] == xb[0] and z.num_cached_tokens == z.num_computed_tokens == 16
    assert yb[2] not in z.block_ids and yb[3] not in z.block_ids
    kv.check([z])


def test_starting_on_idle_hits_respects_the_watermark_and_takes_nothing_when_refused():
    kv = BlockAllocator(10, BS, watermark=0.2)    # 2 blocks kept free
    prompt = tokens(97, 6)                        # 7 blocks, 6 cacheable
    a = keyed(0, prompt)
    start(kv, a)
    prefill(kv, a)
    kv.release(a)
    filler = req(1, 0.0, 16)
    kv.allocate(filler, 3)                        # 1 free block left beside the 6 idle ones
    assert kv.num_free == 7 and kv.num_idle_blocks == 6
    b = keyed(2, list(prompt))
    # 6 hits (all idle), 1 new: 7 free-room blocks of 7 taken, 0 left < the watermark of 2
    assert not kv.start(b)
    assert b.block_ids == [] and kv.num_idle_blocks == 6 and kv.num_free == 7
    kv.check([filler])
    kv.release(filler)
    start(kv, b)
    assert b.num_cached_tokens == 96
    kv.check([b])


# --- release commits what was computed; a preempted request finds it -------

def test_a_preempted_decode_finds_its_prompt_and_generated_blocks_cached():
    kv = BlockAllocator(16, BS, watermark=0)
    prompt, out = tokens(20, 12), []
    r = keyed(0, prompt, out)
    start(kv, r)
    prefill(kv, r)
    assert kv.num_cached_blocks == 1
    out.append(7)                                # the prefill emits token 1
    r.num_output_tokens = 1
    r.move_to(Phase.DECODE)
    for k in range(20):                          # decode steps: each writes the last token's KV
        if len(r.block_ids) * BS <= r.num_kv_tokens:
            kv.allocate(r, 1)
        out.append(100 + k)
        r.num_output_tokens += 1
    assert r.num_kv_tokens == 40 and len(r.block_ids) == 3
    assert kv.num_cached_blocks == 1             # decodes index nothing as they go...
    held = list(r.block_ids)
    kv.release(r)                                # ...their release does: 40 computed tokens, 2 full blocks
    assert kv.num_cached_blocks == kv.num_idle_blocks == 2 and held[2] in free(kv)
    r.move_to(Phase.WAITING)                     # recompute preemption, as the scheduler does it
    r.num_prefill_target = r.num_prompt_tokens + r.num_output_tokens
    r.num_computed_tokens = 0
    r.num_cached_tokens = kv.cached_tokens(r)
    assert r.num_cached_tokens == 32 and r.num_remaining_prefill == 41 - 32
    start(kv, r)
    assert r.block_ids[:2] == held[:2] and r.num_computed_tokens == 32 and len(r.block_ids) == 3
    kv.check([r])
    # another request whose prompt is this one's prompt and first outputs: the same content, the same blocks
    other = keyed(1, prompt + out[:13])
    assert kv.cached_tokens(other) == 32
    start(kv, other)
    assert other.block_ids[:2] == held[:2]
    kv.check([r, other])


def test_releasing_a_paused_prefill_caches_its_computed_full_blocks_only():
    kv = BlockAllocator(16, BS, watermark=0)
    prompt = tokens(100, 13)
    a = keyed(0, prompt)
    start(kv, a)
    a.num_computed_tokens = 40                   # a chunk ran, not committed yet (aborted right after)
    kv.release(a)
    assert kv.num_cached_blocks == kv.num_idle_blocks == 2 and kv.num_free == 16
    b = keyed(1, list(prompt))
    start(kv, b)
    assert b.num_cached_tokens == 32
    kv.check([b])


# --- 5. the same content computed twice at once ----------------------------

def test_a_duplicate_computed_alongside_stays_unkeyed_and_is_freed_not_cached():
    kv = BlockAllocator(16, BS, watermark=0)
    prompt = tokens(65, 7)
    a = keyed(0, prompt)
    b = keyed(1, list(prompt))
    start(kv, a)
    start(kv, b)
    assert not set(a.block_ids) & set(b.block_ids)
    prefill(kv, a)
    prefill(kv, b)
    assert kv.num_cached_blocks == 4
    assert a_blocks_of(kv, prompt) == a.block_ids[:4]
    ab, bb = list(a.block_ids), list(b.block_ids)
    kv.check([a, b])
    kv.release(b)
    assert kv.num_idle_blocks == 0 and set(bb) <= free(kv)
    assert a_blocks_of(kv, prompt) == ab[:4]
    kv.check([a])
    c = keyed(2, list(prompt))
    start(kv, c)
    assert c.block_ids[:4] == ab[:4]
    kv.release(a)
    kv.release(c)
    assert kv.num_idle_blocks == 4 and idle(kv) == set(ab[:4]) and kv.num_free == 16
    kv.check([])


# --- 6. caching off ---------------------------------------------------------

def test_without_prefix_caching_nothing_is_attached_or_kept():
    kv = BlockAllocator(20, BS, watermark=0, prefix_caching=False)
    prompt = tokens(65, 8)
    seen = []
    for rid in range(4):
        r = keyed(rid, list(prompt))
        assert kv.cached_tokens(r) == 0
        start(kv, r)
        assert r.num_cached_tokens == r.num_computed_tokens == 0
        assert not set(r.block_ids) & set(b for s in seen for b in s.block_ids)
        prefill(kv, r)
        assert kv.num_cached_blocks == 0 and kv.num_idle_blocks == 0
        seen.append(r)
        kv.check(seen)
    for r in seen:
        kv.release(r)
        assert kv.num_idle_blocks == 0 and kv.num_cached_blocks == 0
    assert kv.num_free == 20 and kv.num_hit_tokens == 0
    kv.check([])


# --- 7. a seeded fuzz, with the blocks' contents tracked ------------------

class Shadow:
    """What each block holds: the token written at each of its slots, so that every attached block can be
    compared with the tokens of the request that attaches it."""

    def __init__(self, kv: BlockAllocator):
        self.kv = kv
        self.slots: dict[int, list] = {}

    def fresh(self, blocks) -> None:
        for b in blocks:
            self.slots[b] = [None] * BS

    def write(self, r, seq: list[int], lo: int, hi: int) -> None:
        for t in range(lo, hi):
            b = r.block_ids[t // BS]
            assert self.kv._refs[b] == 1, "a request writes a block someone else holds"
            assert self.kv._key[b] is None, "a request writes a cached block"
            self.slots[b][t % BS] = seq[t]

    def check_hits(self, r, seq: list[int]) -> None:
        for i in range(r.num_cached_tokens // BS):
            assert self.slots[r.block_ids[i]] == seq[i * BS:(i + 1) * BS], "attached a block of other content"


def test_fuzz_keeps_the_accounting_exact_and_every_hit_holds_the_same_tokens():
    rng = random.Random(12345)
    kv = BlockAllocator(96, BS, watermark=0.03)
    shadow = Shadow(kv)
    bases = [[rng.randrange(3) for _ in range(300)] for _ in range(3)]   # tiny vocab: many equal blocks
    live = []        # started (PREFILL or DECODE)
    waiting = []     # preempted, to restart
    state = {}       # request -> (prompt, output)
    rid = 0
    hits = starts = preemptions = evictions = 0

    def seq(r):
        p, o = state[r]
        return p + o

    def try_start(r) -> bool:
        nonlocal hits, starts, evictions
        want, cached = kv.cached_tokens(r), kv.num_cached_blocks
        if not kv.start(r):
            assert r.block_ids == [] and kv.num_cached_blocks == cached
            return False
        evictions += cached - kv.num_cached_blocks          # (starting indexes nothing: a drop is evictions)
        assert r.num_cached_tokens == r.num_computed_tokens == want
        assert r.num_cached_tokens % BS == 0 and r.num_remaining_prefill >= 1
        assert len(r.block_ids) == blocks_for(r.num_prefill_target, BS)
        shadow.check_hits(r, seq(r))
        shadow.fresh(r.block_ids[r.num_cached_tokens // BS:])
        r.move_to(Phase.PREFILL)
        live.append(r)
        hits += r.num_cached_tokens > 0
        starts += 1
        return True

    for op in range(4000):
        roll = rng.random()
        if roll < 0.22 or not (live or waiting):                 # a new request
            base = rng.choice(bases)
            prompt = base[:rng.randrange(1, 260)] + [rng.randrange(3) for _ in range(rng.randrange(0, 24))]
            output: list[int] = []
            r = req(rid, 0.0, len(prompt), output=10_000)
            r.block_keys = TokenKeys((prompt, output), BS)
            state[r] = (prompt, output)
            rid += 1
            try_start(r)
        elif roll < 0.30 and waiting:                            # a preempted request restarts
            r = rng.choice(waiting)
            if try_start(r):
                waiting.remove(r)
        elif roll < 0.55 and live:                               # a prefill chunk runs
            pre = [r for r in live if r.phase == Phase.PREFILL]
            if pre:
                r = rng.choice(pre)
                n = min(rng.randrange(1, 80), r.num_remaining_prefill)
                lo = r.num_computed_tokens
                shadow.write(r, seq(r), lo, lo + n)
                r.num_computed_tokens += n
                kv.commit(r, r.num_computed_tokens)
                if r.num_computed_tokens == r.num_prefill_target:    # the last chunk emits a token
                    state[r][1].append(rng.randrange(3))
                    r.num_output_tokens += 1
                    r.move_to(Phase.DECODE)
        elif roll < 0.85 and live:                               # a decode step
            dec = [r for r in live if r.phase == Phase.DECODE]
            if dec:
                r = rng.choice(dec)
                s = seq(r)
                pos = len(s) - 1                                 # this step writes the last token's KV
                assert r.num_kv_tokens == pos
                if len(r.block_ids) * BS <= pos:
                    if kv.num_free == 0:                         # out of room: preempted (recompute)
                        kv.release(r)
                        r.move_to(Phase.WAITING)
                        live.remove(r)
                        r.num_preemptions += 1
                        preemptions += 1
                        r.num_prefill_target = r.num_prompt_tokens + r.num_output_tokens
                        r.num_computed_tokens = 0
                        r.num_cached_tokens = kv.cached_tokens(r)
                        waiting.append(r)
                        kv.check(live)
                        continue
                    cached = kv.num_cached_blocks
                    kv.allocate(r, 1)
                    evictions += cached - kv.num_cached_blocks
                    shadow.fresh(r.block_ids[-1:])
                assert len(r.block_ids) == blocks_for(pos + 1, BS)
                shadow.write(r, s, pos, pos + 1)
                state[r][1].append(rng.randrange(3))
                r.num_output_tokens += 1
                if rng.random() < 0.2:
                    kv.commit(r, r.num_kv_tokens)
        elif live:                                               # finishes, or is preempted at once
            r = rng.choice(live)
            live.remove(r)
            if r.phase == Phase.DECODE and rng.random() < 0.4:
                kv.release(r)
                r.move_to(Phase.WAITING)
                r.num_prefill_target = r.num_prompt_tokens + r.num_output_tokens
                r.num_computed_tokens = 0
                r.num_cached_tokens = kv.cached_tokens(r)
                waiting.append(r)
                preemptions += 1
            else:
                kv.release(r)
                r.move_to(Phase.DONE)
        kv.check(live)
        assert all(not r.block_ids for r in waiting)
        assert kv.num_free + len({b for r in live for b in r.block_ids}) == kv.num_blocks
    assert starts > 400 and hits > 200 and preemptions > 50 and evictions > 100    # it reached what it is for
    for r in live:
        kv.release(r)
    kv.check([])
    assert kv.num_free == kv.num_blocks
    assert kv.num_idle_blocks == kv.num_cached_blocks > 0


def test_check_raises_on_a_corrupted_state():
    def setup():
        kv = BlockAllocator(16, BS, watermark=0)
        a = keyed(0, tokens(40, 9))
        start(kv, a)
        prefill(kv, a)
        b = keyed(1, tokens(40, 10))
        start(kv, b)
        prefill(kv, b)
        kv.release(b)                           # 2 idle, 1 free beside the never-used ones
        kv.check([a])
        return kv, a

    kv, a = setup()
    a.block_ids.append(a.block_ids[0])          # held twice, counted once
    with pytest.raises(AssertionError):
        kv.check([a])

    kv, a = setup()
    kv._key[kv._free[-1]] = 123                 # a free block that is keyed
    with pytest.raises(AssertionError):
        kv.check([a])

    kv, a = setup()
    kv._free.append(kv._free[-1])               # free twice
    with pytest.raises(AssertionError):
        kv.check([a])

    kv, a = setup()
    blk = next(iter(kv._idle))
    kv._free.append(blk)                        # idle and free at once
    del kv._idle[blk]
    with pytest.raises(AssertionError):
        kv.check([a])

    kv, a = setup()
    del kv._index[next(iter(kv._index))]        # the index loses a keyed block
    with pytest.raises(AssertionError):
        kv.check([a])

    kv, a = setup()
    with pytest.raises(AssertionError):
        kv.check([])                            # a holder left out
    kv.check([a])                               # (the untouched state passes)


# --- 8. token keys ----------------------------------------------------------

def test_token_keys_are_chained_equal_for_equal_prefixes_and_follow_growing_lists():
    p = tokens(40, 11)
    a = TokenKeys((p,), BS)
    b = TokenKeys((list(p) + [7] * 10,), BS)
    assert len(a) == 2 and len(b) == 3
    assert [a[0], a[1]] == [b[0], b[1]] and b[2] not in (a[0], a[1])
    with pytest.raises(IndexError):
        a[2]

    changed = list(p)
    changed[3] += 1                              # block 0 differs: every later key does too (chained)
    c = TokenKeys((changed,), BS)
    assert c[0] != a[0] and c[1] != a[1]
    late = list(p)
    late[20] += 1                                # block 1 differs: block 0 still equal
    d = TokenKeys((late,), BS)
    assert d[0] == a[0] and d[1] != a[1]

    prompt, out = p[:20], []                     # live references: the key list grows with the lists
    g = TokenKeys((prompt, out), BS)
    assert len(g) == 1 and g[0] == a[0]
    out.extend(p[20:30])
    assert len(g) == 1
    out.extend(p[30:40])
    assert len(g) == 2 and g[1] == a[1]          # split across prompt and output: the same as one list
    out.extend([5] * 30)
    whole = TokenKeys((p + [5] * 30,), BS)
    assert len(g) == 4 and [g[i] for i in range(4)] == [whole[i] for i in range(4)]
    assert len({g[i] for i in range(4)}) == 4


# --- 9. trace keys ----------------------------------------------------------

def test_trace_keys_share_covered_prompt_blocks_and_never_generated_ones():
    r = 512 // BS                                # 32 cache blocks a trace block
    a = TraceKeys([1, 2, 3], 1200, 1300, owner=0)
    b = TraceKeys([1, 2, 4], 1100, 1200, owner=1)
    assert len(a) == 1300 // BS and len(b) == 1200 // BS
    assert all(a[i] == b[i] for i in range(2 * r))               # trace blocks 1, 2 equal
    assert all(a[i] != b[i] for i in range(2 * r, 1100 // BS))   # trace block 3 vs 4
    same = TraceKeys([1, 2, 3], 1100, 1200, owner=2)             # shorter prompt, same ids
    assert all(a[i] == same[i] for i in range(1100 // BS))
    assert a[1100 // BS] != same[1100 // BS]                     # past same's prompt: its own tokens
    assert len({a[i] for i in range(len(a))}) == len(a)          # sub-blocks of one trace block differ
    # generated blocks: never equal across owners, stable for the owner (a preempted re-prefill finds them)
    a2 = TraceKeys([1, 2, 3], 1200, 1300, owner=0)
    c = TraceKeys([1, 2, 3], 1200, 1300, owner=5)
    gen = range(1200 // BS, 1300 // BS)
    assert all(a[i] == a2[i] for i in range(len(a)))
    assert all(a[i] != c[i] for i in gen) and all(a[i] == c[i] for i in range(1200 // BS))
    # chained: an equal id after a different one is different content
    e = TraceKeys([9, 2, 3], 1200, 1300, owner=0)
    assert all(a[i] != e[i] for i in range(1200 // BS))
    with pytest.raises(IndexError):
        a[len(a)]
    # other sizes
    k = TraceKeys([1, 2], 1024, 1100, owner=0, block_size=32, trace_block=256)
    assert len(k) == 1100 // 32 and k[0] == TraceKeys([1], 256, 256, owner=9, block_size=32, trace_block=256)[0]
    with pytest.raises(ValueError):
        TraceKeys([1], 512, 600, owner=0, block_size=16, trace_block=520)
    with pytest.raises(ValueError):
        TraceKeys([1], 512, 600, owner=0, block_size=48, trace_block=512)


def test_mooncake_requests_carry_trace_keys_that_match_on_shared_hash_ids():
    wl = make_workload("mooncake", 0.5, num_requests=60, seed=0)
    reqs = wl.requests(BS)
    assert all(isinstance(r.block_keys, TraceKeys) for r in reqs)
    pairs = differing = 0
    for i, s in enumerate(wl.specs):
        for j in range(i):
            t = wl.specs[j]
            n = 0
            while n < min(len(s.block_ids), len(t.block_ids)) and s.block_ids[n] == t.block_ids[n]:
                n += 1
            full = min(n * wl.block_tokens, s.num_prompt_tokens, t.num_prompt_tokens) // BS
            if full:
                pairs += 1
                assert all(reqs[i].block_keys[k] == reqs[j].block_keys[k] for k in range(full))
            if n < min(len(s.block_ids), len(t.block_ids)) and full == n * wl.block_tokens // BS:
                k = full                                  # the first sub-block of the first different id
                if k < min(reqs[i].block_keys.num_prompt_blocks, reqs[j].block_keys.num_prompt_blocks):
                    differing += 1
                    assert reqs[i].block_keys[k] != reqs[j].block_keys[k]
    assert pairs > 100 and differing > 100


# --- 10, 11. whole runs -----------------------------------------------------

def _prefill_tokens(wl, **kw):
    total = [0]

    def on_step(plan, result, end):
        total[0] += plan.num_prefill_tokens
    res = simulate(wl, "niyama", on_step=on_step, **kw)
    return res, total[0]


def test_mooncake_run_computes_only_the_uncached_prompt_tokens():
    wl = make_workload("mooncake", 0.5, num_requests=300, seed=0)
    on, on_tokens = _prefill_tokens(wl, prefix_caching=True)
    off, off_tokens = _prefill_tokens(wl, prefix_caching=False)
    prompts = sum(s.num_prompt_tokens for s in wl.specs)
    for res in (on, off):
        assert res.num_preemptions == 0
        assert all(r.phase == Phase.DONE and not r.block_ids and not r.rejected for r in res.requests)
        assert all(r.num_computed_tokens == r.num_prompt_tokens for r in res.requests)
    assert all(r.num_cached_tokens == 0 for r in off.requests)
    assert off_tokens == prompts
    hit = [r for r in on.requests if r.num_cached_tokens > 0]
    assert len(hit) > 30
    assert all(r.num_cached_tokens % BS == 0 and r.num_cached_tokens < r.num_prompt_tokens for r in on.requests)
    # each request computed exactly what it did not attach
    assert on_tokens == prompts - sum(r.num_cached_tokens for r in on.requests) < off_tokens
    assert on.requests[0].num_cached_tokens == 0                 # nothing before the first request
    # caching saves prefill time: first tokens come no later on the whole
    assert sum(r.ttft for r in on.requests) < sum(r.ttft for r in off.requests)


def test_mooncake_with_room_for_the_whole_run_reuses_whole_conversations():
    """With the default KV most reuse is the shared first trace block (the next turn of a conversation comes
    after its blocks were evicted); with room for the whole run nothing is evicted and later turns attach
    their conversation's earlier prompt."""
    wl = make_workload("mooncake", 0.5, num_requests=300, seed=0)
    res, computed = _prefill_tokens(wl, kv_tokens=10_000_000)
    assert computed == sum(s.num_prompt_tokens for s in wl.specs) - sum(r.num_cached_tokens for r in res.requests)
    assert sum(r.num_cached_tokens > 10 * 512 for r in res.requests) >= 5


def _shared_prefix_workload(n: int = 60, seed: int = 0) -> Workload:
    """Short prompts on a few shared system prompts (64-token trace blocks), long outputs, fast arrivals."""
    rng = random.Random(seed)
    systems = [[1000 * s + k for k in range(4)] for s in range(3)]
    specs = []
    for i in range(n):
        sys_ids = rng.choice(systems)[:rng.randrange(1, 5)]
        prompt = len(sys_ids) * 64 + rng.randrange(1, 200)
        own = [10_000 + 100 * i + k for k in range(blocks_for(prompt, 64) - len(sys_ids))]
        specs.append(RequestSpec(i * 0.02, prompt, rng.randrange(150, 500), "Q1", block_ids=tuple(sys_ids + own)))
    return Workload("shared", specs, tuple(TIERS.values()), RULE, 400, block_tokens=64)


def test_preemption_under_prefix_caching_returns_every_block():
    wl = _shared_prefix_workload()
    res, computed = _prefill_tokens(wl, kv_tokens=3000)
    assert res.num_preemptions > 0
    assert any(r.num_preemptions for r in res.requests)
    assert all(r.phase == Phase.DONE and r.num_output_tokens == r.max_output_tokens and not r.block_ids
               for r in res.requests)
    assert any(r.num_cached_tokens > 0 for r in res.requests)
    off, off_computed = _prefill_tokens(wl, kv_tokens=3000, prefix_caching=False)
    assert off.num_preemptions > 0 and all(r.num_cached_tokens == 0 for r in off.requests)
    assert computed < off_computed


def test_replica_with_preemptions_and_caching_conserves_blocks_after_every_step():
    wl = _shared_prefix_workload(seed=1)
    kv = BlockAllocator.for_tokens(3000)
    replica = Replica(scheduler("niyama"), SimulatedExecutor(PREDICTOR), kv, recorder=Recorder())
    requests = wl.requests(kv.block_size)
    for r in requests:
        replica.add(r)
    reattached = 0
    prefill_blocks = [0, 0]                      # decodes' prefill blocks seen keyed, unkeyed
    while replica.has_work:
        plan = replica.step()
        replica.check_blocks()
        for r in replica.decodes:               # every decode holds the blocks of the KV it has computed
            kv_tokens = r.num_prompt_tokens + replica.decodes.num_output_at(r, replica.iteration - 1) - 1
            assert len(r.block_ids) * BS >= kv_tokens
            # its prefill's full blocks are indexed under its own keys, as the chunks ran (not once it ends),
            # but for duplicates of blocks someone computed alongside (those stay unkeyed)
            for i in range(r.num_prefill_target // BS):
                key = kv._key[r.block_ids[i]]
                assert key is None or key == r.block_keys[i]
                prefill_blocks[key is None] += 1
        for r in replica.scheduler.waiting:
            assert len(r.block_ids) == (blocks_for(r.num_prefill_target, BS) if r.started else 0)
        if plan is None:
            continue
        for c in plan.prefills:
            r = c.request
            assert c.start >= r.num_cached_tokens
            if r.num_preemptions and c.start == r.num_cached_tokens > r.num_prompt_tokens:
                reattached += 1                  # a re-prefill found its own generated blocks still cached
    assert replica.recorder.num_preemptions > 0
    assert all(r.phase == Phase.DONE for r in requests)
    assert kv.num_free == kv.num_blocks
    kv.check([])
    assert kv.num_hit_tokens > 0 and reattached > 0
    assert prefill_blocks[1] < 0.05 * prefill_blocks[0]


def test_blocks_that_served_a_hit_are_evicted_after_those_that_never_did():
    """reused-last (the default): a's head blocks were reused by b; a newer, never-reused prompt's idle blocks
    go before them, though they are older; with plain LRU the older ones go first."""
    for eviction, first_evicted in (("reused-last", "c"), ("lru", "a")):
        kv = BlockAllocator(12, BS, watermark=0, eviction=eviction)
        prompt = tokens(64, 7)
        a = keyed(0, prompt + [1])
        start(kv, a)
        prefill(kv, a)
        kv.release(a)
        b = keyed(1, prompt + [2])
        start(kv, b)                              # hits a's 4 blocks
        assert b.num_cached_tokens == 64
        prefill(kv, b)
        kv.release(b)
        c = keyed(2, tokens(64, 9) + [3])         # newer, never reused
        start(kv, c)
        prefill(kv, c)
        kv.release(c)
        kv.check([])
        filler = req(3, 0.0, 100)
        kv.allocate(filler, kv.num_free - 4)      # leaves exactly 4 idle blocks cached
        kv.check([filler])
        survivor = keyed(4, prompt + [4]) if first_evicted == "c" else keyed(4, tokens(64, 9) + [5])
        assert kv.cached_tokens(survivor) == 64, eviction
