"""The batched sampler: one step's rows, whatever their mix, in a handful of launches and no host wait.

Each row's parameters are tensors (temperature, top-k, top-p, min-p, the three penalties, a seed), so
greedy and sampled, penalized and plain rows go through the same few operations. What a row draws from
is the per-row sampler's (tests/sampling_oracle.py keeps it as the oracle), in transformers' order:
repetition penalty (prompt and output tokens), presence and frequency penalties (output tokens), then
greedy argmax, or temperature, top-k, top-p on the top-k renormalised distribution, min-p against the
top token. How a token is drawn is new:

- **Gumbel-max**: token = argmax over the allowed tokens of logit/T + Gumbel noise, which is a draw from
  their softmax: one pass, no cumulative sum, no sort.
- **Rejection for top-p and min-p**: both keep an upper set of tokens (every token at least as likely as
  a kept one is kept), so draw from the tokens above a pivot (at first: all), keep the draw if it is in
  the set (the probability mass strictly above it is < top_p, and it clears min-p), else make it the
  pivot and draw again. Each accepted draw is exactly a draw from the filtered distribution; a rejected
  draw removes at least itself and everything less likely, so rounds are few (a round is rejected with
  probability at most 1 - top_p, and the excluded mass grows geometrically). After `MAX_ROUNDS` the top
  token is taken, which is always in the set (a safety bound; not reached in our tests).
- **Top-k** by a bounded candidate set: `torch.topk` of the rows that set it gives their k-th logit, a
  floor below which nothing is drawn (ties with it are kept, as the oracle keeps them).
- **Noise from a counter-based hash** of (request seed, output position, round, token id): a request's
  draws depend on nothing else in the batch, on the batch size, or on preemption.
- **Penalties from counts kept on the device** (`PenaltyState`): a penalized request gets a slot with a
  prompt-token mask (uploaded once) and output-token counts (+1 per sampled token, on the device).

On CUDA the draw is one Triton program per row (triton_sampler.py); elsewhere the same algorithm in
PyTorch below, which is also the Triton kernel's reference in the tests.

Log-probabilities are vLLM's default ("raw_logprobs"): the log-softmax of the model's own logits, before
penalties, temperature and filters, for the sampled token and the top `logprobs` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MAX_ROUNDS = 64          # rejection rounds before a row takes its top token (see above)
M32 = 0xFFFFFFFF

# The per-row parameters, packed on the host into one float32 and one int64 array per step.
FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
INT_FIELDS = ("top_k", "seed", "position", "slot")       # slot: the row's penalty slot, -1 if none


# --- the noise --------------------------------------------------------------------------------------
def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32) on int64 tensors holding values in [0, 2^32): products
    wrap in int64 and are masked back, so the low 32 bits are the uint32 arithmetic Triton does."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def row_keys(seed: torch.Tensor, position: torch.Tensor, round_: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 32-bit keys per row from its seed (< 2^63), the output position it draws and the round."""
    k1 = mix32((seed & M32) ^ mix32((position & M32) ^ (round_ << 24)))
    k2 = mix32((seed >> 32) ^ mix32((k1 + 0x9E3779B9) & M32))
    return k1, k2


def gumbel(num_tokens: int, k1: torch.Tensor, k2: torch.Tensor) -> torch.Tensor:
    """Gumbel noise `[rows, num_tokens]`, float32: token i of a row gets hash(hash(i ^ k1) ^ k2)."""
    ids = torch.arange(num_tokens, dtype=torch.int64, device=k1.device)
    h = mix32(mix32(ids[None, :] ^ k1[:, None]) ^ k2[:, None])
    u = ((h >> 8).to(torch.float32) + 0.5) * (1.0 / 2**24)          # in (0, 1)
    return -torch.log(-torch.log(u))


# --- penalties ---------------------------------------------------------------------------------------
class PenaltyState:
    """Per penalized request, on the device: a mask of its prompt's tokens and counts of its output tokens.
    Slots are taken at a request's first draw and given back when it leaves; the tables grow (doubling)
    when every slot is taken, and take no memory until a penalized request comes."""

    def __init__(self, vocab_size: int, device: torch.device):
        self.vocab_size = vocab_size
        self.device = device
        self.counts = torch.zeros(0, vocab_size, dtype=torch.int32, device=device)
        self.prompt = torch.zeros(0, vocab_size, dtype=torch.bool, device=device)
        self.free: list[int] = []

    @property
    def capacity(self) -> int:
        return self.counts.shape[0]

    def acquire(self, prompt_ids: list[int], output_ids: list[int]) -> int:
        if not self.free:
            self._grow(max(16, 2 * self.capacity))
        slot = self.free.pop()
        self.counts[slot].zero_()
        self.prompt[slot].zero_()
        self.prompt[slot].index_fill_(0, _upload(prompt_ids, self.device), True)
        if output_ids:
            ids = _upload(output_ids, self.device)
            self.counts[slot].index_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))
        return slot

    def release(self, slot: int) -> None:
        self.free.append(slot)

    def record(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """Count each row's new token (rows with slot -1 are skipped); no host wait."""
        ok = slots >= 0
        rows = torch.where(ok, slots, 0)
        self.counts.index_put_((rows, tokens), ok.to(torch.int32), accumulate=True)

    def _grow(self, capacity: int) -> None:
        old = self.capacity
        extra = capacity - old
        self.counts = torch.cat([self.counts, self.counts.new_zeros(extra, self.vocab_size)])
        self.prompt = torch.cat([self.prompt, self.prompt.new_zeros(extra, self.vocab_size)])
        self.free.extend(range(capacity - 1, old - 1, -1))


def penalize_reference(logits: torch.Tensor, rows: torch.Tensor, params: torch.Tensor, slots: torch.Tensor,
                       state: PenaltyState) -> None:
    """Apply the penalties to `logits[rows]` in place. `params`: the rows' (repetition, presence, frequency)
    `[n, 3]`; `slots`: their penalty slots."""
    x = logits[rows]
    counts = state.counts[slots]
    in_output = counts > 0
    seen = state.prompt[slots] | in_output
    rep, presence, frequency = (params[:, i:i + 1] for i in range(3))
    x = torch.where(seen, torch.where(x < 0, x * rep, x / rep), x)       # exact when rep is 1
    x = x - frequency * counts - presence * in_output
    logits[rows] = x


# --- the draw -----------------------------------------------------------------------------------------
def draw_reference(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
                   floor: torch.Tensor, seed: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """One token per row of (penalized) `logits` `[n, vocab]`; rows with temperature 0 are greedy.
    `floor`: each row's top-k floor on the logits (-inf: no top-k). The algorithm of the module docstring,
    vectorised over rows (it waits for the device between rounds: the CPU path and the reference)."""
    n, vocab = logits.shape
    tokens = logits.argmax(dim=1)                   # greedy rows, and the fallback of unusable rows
    sampled = torch.nonzero(temperature > 0).flatten()
    if not sampled.numel():
        return tokens
    t = temperature[sampled, None]
    s = logits[sampled] / t
    allowed = s >= (floor[sampled, None] / t)
    masked = s.masked_fill(~allowed, float("-inf"))
    m = masked.amax(dim=1)
    z = torch.exp(masked - m[:, None]).sum(dim=1)
    # a row without a usable distribution (NaN or infinite logits) stays greedy rather than fail the step
    usable = torch.isfinite(m) & torch.isfinite(z) & (z > 0)
    minp_floor = torch.where(min_p[sampled] > 0, m + torch.log(min_p[sampled]), float("-inf"))
    pivot = torch.full_like(m, float("-inf"))
    todo = torch.nonzero(usable).flatten()          # indices into `sampled`
    for round_ in range(MAX_ROUNDS):
        if not todo.numel():
            break
        k1, k2 = row_keys(seed[sampled[todo]], position[sampled[todo]], round_)
        st = s[todo]
        ok_tokens = allowed[todo] & (st > pivot[todo, None])
        pick = torch.where(ok_tokens, st + gumbel(vocab, k1, k2), float("-inf")).argmax(dim=1)
        sp = st.gather(1, pick[:, None])[:, 0]
        accept = sp >= minp_floor[todo]
        p = top_p[sampled[todo]]
        above = torch.where(allowed[todo] & (st > sp[:, None]), torch.exp(st - m[todo, None]), 0.0).sum(dim=1)
        accept &= (p >= 1) | (above <= 0) | (above < p * z[todo])
        tokens[sampled[todo[accept]]] = pick[accept]
        pivot[todo[~accept]] = sp[~accept]
        todo = todo[~accept]
    if todo.numel():                                # the safety bound: the top token is always kept
        tokens[sampled[todo]] = masked[todo].argmax(dim=1)
    return tokens


def top_k_floor(logits: torch.Tensor, rows: torch.Tensor, k: torch.Tensor, kmax: int) -> torch.Tensor:
    """Each row's top-k floor: the k-th largest logit of `rows` (whose k is `k`, at most `kmax`), -inf for
    the other rows (no top-k)."""
    floor = torch.full((logits.shape[0],), float("-inf"), device=logits.device)
    if kmax:
        values = torch.topk(logits[rows], kmax, dim=1).values
        floor[rows] = values.gather(1, (k - 1)[:, None])[:, 0]
    return floor


# --- one step -------------------------------------------------------------------------------------------
@dataclass
class Draws:
    """A step's draws, on the device until `to_host`."""
    tokens: torch.Tensor                          # [n] int64
    logprob_rows: list[int]                       # rows that asked for logprobs
    num_top: list[int]                            # ... and how many top tokens each
    chosen: torch.Tensor | None = None            # [len(logprob_rows)] the sampled tokens' logprobs
    top_ids: torch.Tensor | None = None           # [len(logprob_rows), k] the most likely tokens
    top_logprobs: torch.Tensor | None = None

    def to_host(self) -> tuple[list[int], dict[int, tuple]]:
        """(tokens, {row: (logprob, [(token id, logprob), ...])}): the step's only wait for the device."""
        tokens = self.tokens.tolist()
        if not self.logprob_rows:
            return tokens, {}
        chosen = self.chosen.tolist()
        ids = self.top_ids.tolist() if self.top_ids is not None else [[] for _ in chosen]
        lps = self.top_logprobs.tolist() if self.top_logprobs is not None else [[] for _ in chosen]
        return tokens, {row: (chosen[i], list(zip(ids[i][:k], lps[i][:k])))
                        for i, (row, k) in enumerate(zip(self.logprob_rows, self.num_top))}


@dataclass
class StepRows:
    """A step's per-row parameters on the device, and the row sets the host already knows."""
    floats: torch.Tensor             # [n, 6] FLOAT_FIELDS
    ints: torch.Tensor               # [n, 4] INT_FIELDS
    penalized: torch.Tensor          # rows with a penalty
    top_k_rows: torch.Tensor         # sampled rows with 0 < top_k < vocab
    kmax: int                        # their largest k (0: none)


class Sampler:
    """Draws one token per row for a step's sequences (`Sequence`: params, prompt and output ids, seed)."""

    def __init__(self, vocab_size: int, device: torch.device, use_triton: bool | None = None):
        self.vocab_size = vocab_size
        self.device = device
        self.penalties = PenaltyState(vocab_size, device)
        self.use_triton = device.type == "cuda" if use_triton is None else use_triton

    def admit(self, seq) -> None:
        """Give a penalized sequence its penalty slot (at its first draw, or ahead of it: the profiler)."""
        if seq.params.penalized and seq.penalty_slot is None:
            seq.penalty_slot = self.penalties.acquire(seq.prompt_ids, seq.output_ids)

    def release(self, seq) -> None:
        """`seq` left the engine: its penalty slot is free again."""
        if seq.penalty_slot is not None:
            self.penalties.release(seq.penalty_slot)
            seq.penalty_slot = None

    def sample(self, logits: torch.Tensor, seqs: list, masks: "tuple[list[int], np.ndarray] | None" = None) -> Draws:
        """Tokens for `logits` `[n, vocab]` (float32; penalized and masked in place), row i for `seqs[i]`.
        `masks`: structured outputs' (rows, bitmasks `[rows, words]` int32, grammar.py): tokens whose bit is
        clear cannot be drawn."""
        params = [s.params for s in seqs]
        logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if logprob_rows:                 # raw log-probabilities, before the penalties change the logits
            lp_index = _upload(logprob_rows, self.device)
            raw = torch.log_softmax(logits[lp_index], dim=1)
        if masks is not None:
            if self.device.type == "cuda":      # the packed masks go up (32x fewer bytes), bits expand there
                apply_bitmask(logits, _upload(masks[0], self.device), _to_device(masks[1], self.device))
            else:
                apply_bitmask_host(logits, *masks)
        if all(p.plain_greedy for p in params):
            tokens = logits.argmax(dim=1)
        else:
            rows = self._rows(seqs)
            if rows.penalized.numel():
                self._penalize(logits, rows)
            tokens = self._draw(logits, rows)
            if rows.penalized.numel():
                self.penalties.record(rows.ints[:, 3], tokens)
        draws = Draws(tokens, logprob_rows, [params[i].logprobs for i in logprob_rows])
        if logprob_rows:
            draws.chosen = raw.gather(1, tokens[lp_index][:, None])[:, 0]
            k = max(draws.num_top)
            if k:
                draws.top_logprobs, draws.top_ids = torch.topk(raw, k, dim=1)
        return draws

    def _rows(self, seqs: list) -> StepRows:
        """The rows' parameters, packed on the host and uploaded (a penalized sequence gets its slot at its
        first draw)."""
        n = len(seqs)
        floats = np.empty((n, len(FLOAT_FIELDS)), dtype=np.float32)
        ints = np.empty((n, len(INT_FIELDS)), dtype=np.int64)
        penalized, top_k_rows, top_k = [], [], []
        for i, seq in enumerate(seqs):
            p = seq.params
            if p.penalized:
                self.admit(seq)
                penalized.append(i)
            if 0 < p.top_k < self.vocab_size and not p.greedy:
                top_k_rows.append(i)
                top_k.append(p.top_k)
            floats[i] = (p.temperature, p.top_p, p.min_p, p.repetition_penalty, p.presence_penalty,
                         p.frequency_penalty)
            ints[i] = (p.top_k, seq.seed, len(seq.output_ids), -1 if seq.penalty_slot is None else seq.penalty_slot)
        dev = self.device
        return StepRows(_to_device(floats, dev), _to_device(ints, dev), _upload(penalized, dev),
                        _upload(top_k_rows, dev), max(top_k, default=0))

    def _penalize(self, logits: torch.Tensor, rows: StepRows) -> None:
        if self.use_triton:
            from .triton_sampler import penalize
            penalize(logits, rows.penalized, rows.floats, rows.ints, self.penalties)
        else:
            r = rows.penalized
            penalize_reference(logits, r, rows.floats[r, 3:6], rows.ints[r, 3], self.penalties)

    def _draw(self, logits: torch.Tensor, rows: StepRows) -> torch.Tensor:
        temperature, top_p, min_p = rows.floats[:, 0], rows.floats[:, 1], rows.floats[:, 2]
        floor = top_k_floor(logits, rows.top_k_rows, rows.ints[rows.top_k_rows, 0], rows.kmax)
        seed, position = rows.ints[:, 1], rows.ints[:, 2]
        if self.use_triton:
            from .triton_sampler import draw
            return draw(logits, temperature, top_p, min_p, floor, seed, position, MAX_ROUNDS)
        return draw_reference(logits, temperature, top_p, min_p, floor, seed, position)


def apply_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set `logits[rows]` to -inf where the row's bit is clear (bit i of word w: token 32 w + i)."""
    vocab = logits.shape[1]
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).view(bitmask.shape[0], -1)[:, :vocab].bool()
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))


def apply_bitmask_host(logits: torch.Tensor, rows: list[int], bitmask: np.ndarray) -> None:
    """`apply_bitmask` for logits in host memory: numpy unpacks the bits in one pass (2-3x faster than the
    tensor ops on a CPU)."""
    banned = torch.from_numpy(np.unpackbits(~bitmask.view(np.uint8), axis=1, bitorder="little")
                              [:, :logits.shape[1]].view(bool))
    if len(rows) == logits.shape[0]:            # every row constrained (rows are in order): in place
        logits.masked_fill_(banned, float("-inf"))
    else:
        index = torch.tensor(rows)
        logits[index] = logits[index].masked_fill(banned, float("-inf"))


def _upload(ids: list[int], device: torch.device) -> torch.Tensor:
    ids = torch.tensor(ids, dtype=torch.long)
    if device.type == "cuda":
        # a copy from pageable memory would block the host until the forward pass finishes
        return ids.pin_memory().to(device, non_blocking=True)
    return ids.to(device)


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(array)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t
