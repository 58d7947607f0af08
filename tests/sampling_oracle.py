"""The per-row sampler niyama used before the batched one (niyama/engine/sampler.py), kept as the oracle
of the distribution tests: it loops over rows, sorts each sampled row's whole vocabulary for top-p and
re-reads a penalized row's whole token history every step, which is slow on a GPU but plainly right
(transformers' order and definitions)."""

from __future__ import annotations

import torch

from niyama.engine.sampling import SamplingParams

# (prompt_ids, output_ids) of one row: the tokens a penalty looks at
History = tuple[list[int], list[int]]


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           histories: list[History] | None = None) -> list[int]:
    """One token per row of `logits` `[n, vocab]` (float32)."""
    return sample_on_device(logits, params, generators, histories).tolist()


def sample_on_device(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                     histories: list[History] | None = None) -> torch.Tensor:
    """The tokens as a tensor on the logits' device; nothing waits for the GPU. `histories[i]` is row i's
    (prompt_ids, output_ids), read only for rows whose params set a penalty (then it is required)."""
    out = logits.argmax(dim=-1)
    for i, p in enumerate(params):
        if p.greedy and not p.penalized:
            continue
        row = logits[i]
        if p.penalized:
            if histories is None:
                raise ValueError("penalties need each row's token history")
            row = penalize(row, p, histories[i])
        if p.greedy:
            out[i] = row.argmax()
        else:
            out[i] = _draw(probabilities(row, p), out[i], generators[i])
    return out


def penalize(row: torch.Tensor, p: SamplingParams, history: History) -> torch.Tensor:
    """A logits row `[vocab]` after the repetition, presence and frequency penalties (a new tensor)."""
    prompt_ids, output_ids = history
    ids = _ids_on(row.device, prompt_ids + output_ids)        # one upload serves both penalties
    if p.repetition_penalty != 1:
        # index_fill_, not `seen[ids] = True`: that copies the True from the host and waits for the GPU
        seen = torch.zeros_like(row, dtype=torch.bool).index_fill_(0, ids, True)
        scaled = torch.where(row < 0, row * p.repetition_penalty, row / p.repetition_penalty)
        row = torch.where(seen, scaled, row)
    if (p.presence_penalty or p.frequency_penalty) and output_ids:
        out_ids = ids[len(prompt_ids):]
        # scatter_add, not bincount: bincount on CUDA reads its input's max back to the host
        counts = torch.zeros_like(row).scatter_add_(0, out_ids, torch.ones_like(out_ids, dtype=row.dtype))
        row = row - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)
    return row


def probabilities(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """What a sampled row draws from `[vocab]`: temperature, then top-k, top-p and min-p (unnormalized;
    dropped tokens are 0)."""
    row = row / p.temperature
    if p.top_k and p.top_k < row.shape[-1]:
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, dim=-1)
    if p.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # drop tokens once the mass before them already reaches top_p; the first always stays (a top_p
        # that float32 rounds to 0 must not drop every token)
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= p.top_p
        drop[0].fill_(False)                # `drop[0] = False` would wait for the GPU
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    if p.min_p:
        # the top token never falls below min_p (<= 1) x itself, so at least one stays
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return probs


def _draw(probs: torch.Tensor, fallback: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # one request's odd logits must not fail the step for everyone: without a usable distribution, greedy
    usable = torch.isfinite(probs).all() & (probs.sum() > 0)
    probs = torch.where(usable, torch.nan_to_num(probs, nan=0.0, posinf=0.0, neginf=0.0),
                        torch.nn.functional.one_hot(fallback, probs.shape[-1]).to(probs.dtype))
    return torch.multinomial(probs, 1, generator=generator)[0]


def _ids_on(device: torch.device, ids: list[int]) -> torch.Tensor:
    ids = torch.tensor(ids, dtype=torch.long)
    if device.type == "cuda":
        # a copy from pageable memory would block the host until the forward pass finishes
        return ids.pin_memory().to(device, non_blocking=True)
    return ids.to(device)


def distribution(row: torch.Tensor, p: SamplingParams, history: History = ([], [])) -> torch.Tensor:
    """The oracle's probability of each token `[vocab]` (float64) for one row of logits: what its draw
    follows (a greedy row: all on its argmax)."""
    if p.penalized:
        row = penalize(row, p, history)
    if p.greedy:
        return torch.nn.functional.one_hot(row.argmax(), row.shape[-1]).double()
    probs = probabilities(row, p).double()
    return probs / probs.sum()
