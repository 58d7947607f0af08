"""HTTP load generator: replay a workload against any OpenAI-compatible server, timing on the client.

Each request is sent at its arrival time with `stream: true`; the client records when every chunk
with text arrives (tokens), reads the token count from the final usage chunk, and builds the same
`SimResult` the simulator and `niyama replay` produce, so the same per-tier report comes out.
Prompts are random token ids of the trace's length (the completions API takes token ids, so the
prompt length is exact on any server); outputs are asked for at the trace's length with
`ignore_eos` (vLLM and niyama honour it). QoS fields are sent only to a niyama server.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import numpy as np

from .request import Request
from .sim.run import SimResult
from .workload import Workload, clip_lengths
from .workload.prompts import prompt_ids


@dataclass
class Outcome:
    """What the client saw of one request; times in seconds from the start of the run."""

    index: int
    sent_s: float
    token_s: list[float] = field(default_factory=list)   # arrival of each chunk that carried text (or token ids)
    done_s: float | None = None
    num_output_tokens: int = 0
    num_prompt_tokens: int | None = None   # from the server's usage chunk
    relegated: bool = False
    rejected: bool = False                 # a niyama tier's admission control refused it (429 deadline_infeasible)
    error: str | None = None


@dataclass
class Target:
    url: str                   # base URL, e.g. http://127.0.0.1:8000
    model: str
    is_niyama: bool
    max_model_len: int | None
    tiers: tuple[str, ...]     # the server's tiers as `Tier.describe()` text (niyama only)
    vocab_size: int | None     # niyama only


async def discover(client, url: str, model: str | None) -> Target:
    """Ask /v1/models which model to use and whether the server is niyama."""
    try:
        resp = await client.get(f"{url}/v1/models", timeout=10)
    except Exception as e:
        raise ValueError(f"cannot reach {url}/v1/models: {type(e).__name__}: {e}") from None
    if resp.status_code != 200:
        raise ValueError(f"{url}/v1/models answered {resp.status_code}: {resp.text[:200]}")
    data = resp.json().get("data") or []
    if not data:
        raise ValueError(f"{url}/v1/models lists no model")
    card = next((m for m in data if m.get("id") == model), None) if model else data[0]
    if card is None:
        raise ValueError(f"model {model!r} is not served at {url}; it serves {', '.join(m.get('id') for m in data)}")
    return Target(url, card["id"], card.get("owned_by") == "niyama", card.get("max_model_len"),
                  tuple(card.get("tiers", ())), card.get("vocab_size"))


def request_bodies(workload: Workload, target: Target, qos: str, seed: int, vocab: tuple[int, int],
                   max_prompt_tokens: int | None, max_output_tokens: int | None,
                   sampling: dict | None = None) -> tuple[list[dict], int]:
    """One /v1/completions body per request, and how many had their lengths clipped; `sampling`: fields sent
    in every body (temperature, top_p, ...; default greedy)."""
    if qos == "auto":     # tier names only where the server's tier of that name has the same targets
        qos = ("tier" if {t.describe() for t in workload.tiers} <= set(target.tiers) else "targets") \
            if target.is_niyama else "off"
    rng = np.random.default_rng(seed)
    if target.vocab_size and vocab[1] > target.vocab_size:      # a small vocabulary (a test model)
        vocab = (min(vocab[0], target.vocab_size // 2), target.vocab_size)
    limit = target.max_model_len or 1 << 30
    bodies, clipped = [], 0
    for spec in workload.specs:
        prompt, out = clip_lengths(spec, limit, max_prompt_tokens, max_output_tokens)
        clipped += (out, prompt) != (spec.num_output_tokens, spec.num_prompt_tokens)
        body = {"model": target.model, "prompt": prompt_ids(spec, prompt, vocab, rng, workload.block_tokens, seed),
                "max_tokens": out, "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}, **(sampling or {})}
        tier = workload.tier_by_name[spec.tier]
        if qos == "tier":
            body["tier"] = tier.name
        elif qos == "targets":
            body.update({"ttft_ms": tier.ttft_s * 1000, "tbt_ms": tier.tbt_s * 1000} if tier.interactive
                        else {"ttlt_ms": tier.ttlt_s * 1000})
        if qos != "off":
            body["priority"] = spec.priority.name.lower()
        bodies.append(body)
    return bodies, clipped


async def send(client, url: str, body: dict, index: int, start: float, timeout: float,
               endpoint: str = "/v1/completions") -> Outcome:
    out = Outcome(index, time.monotonic() - start)
    try:
        async with client.stream("POST", f"{url}{endpoint}", json=body, timeout=timeout) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                out.error = f"HTTP {resp.status_code}: {text[:300]}"
                out.rejected = resp.status_code == 429 and "deadline_infeasible" in text
                out.done_s = time.monotonic() - start
                return out
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                chunk = json.loads(payload)
                if "error" in chunk:
                    out.error = str(chunk["error"].get("message", chunk["error"]))
                    return out
                now = time.monotonic() - start
                for choice in chunk.get("choices") or ():
                    text = choice.get("text") or (choice.get("delta") or {}).get("content")
                    if text or choice.get("token_ids"):   # token ids: a server without a tokenizer
                        out.token_s.append(now)
                if chunk.get("usage"):
                    out.num_output_tokens = chunk["usage"].get("completion_tokens", 0)
                    out.num_prompt_tokens = chunk["usage"].get("prompt_tokens")
                if chunk.get("niyama"):
                    out.relegated = bool(chunk["niyama"].get("relegated"))
        out.done_s = time.monotonic() - start
        out.num_output_tokens = out.num_output_tokens or len(out.token_s)
        if not out.token_s:
            out.error = "the stream carried no text"
    except Exception as e:         # a refused or broken connection is this request's failure, not the run's
        out.error = f"{type(e).__name__}: {e}"
    return out


async def run_load(target: Target, bodies: list[dict], arrivals: list[float], timeout: float,
                   progress=None, endpoint: str = "/v1/completions", headers: dict | None = None,
                   max_concurrency: int | None = None) -> list[Outcome]:
    """Send each body at its arrival time (seconds from the start); with `max_concurrency`, at most that many
    are in flight and the others wait for a slot (as `vllm bench serve --max-concurrency`)."""
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=100)
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    async with httpx.AsyncClient(limits=limits, timeout=timeout, headers=headers) as client:
        start = time.monotonic()

        async def one(i: int) -> Outcome:
            await asyncio.sleep(max(0.0, arrivals[i] - (time.monotonic() - start)))
            if slots is None:
                res = await send(client, target.url, bodies[i], i, start, timeout, endpoint)
            else:
                async with slots:
                    res = await send(client, target.url, bodies[i], i, start, timeout, endpoint)
            if progress is not None:
                progress(res)
            return res

        return list(await asyncio.gather(*(one(i) for i in range(len(bodies)))))


def to_result(workload: Workload, outcomes: list[Outcome], bodies: list[dict], label: str) -> SimResult:
    """The successful requests, and those admission control rejected, as a `SimResult` (token times laid end to
    end as 'iterations')."""
    tiers = workload.tier_by_name
    times: list[float] = []
    requests = []
    for o in outcomes:
        if o.error is not None and not o.rejected:
            continue
        spec = workload.specs[o.index]
        prompt_len = o.num_prompt_tokens or len(bodies[o.index].get("prompt", ())) or 1   # chat: the server's count
        req = Request(o.index, o.sent_s, prompt_len, bodies[o.index]["max_tokens"],
                      tiers[spec.tier], workload.rule, spec.priority)
        if o.rejected:
            req.rejected, req.finish_s = True, o.done_s
            requests.append(req)
            continue
        req.first_token_s = o.token_s[0]
        req.anchor_s = max(req.first_token_s, req.first_token_deadline_s)
        req.finish_s = o.done_s
        req.num_output_tokens = o.num_output_tokens
        req.relegated = o.relegated
        req.token_segments = [[len(times), len(times) + len(o.token_s)]]
        times.extend(o.token_s)
        requests.append(req)
    if not requests:
        raise ValueError("no request succeeded")
    return SimResult(workload, label, requests, times, 0, 0, sum(r.relegated for r in requests))


# --- vLLM's benchmark conventions (`vllm bench serve`) -------------------------------------------------

WORDS = ("the quick brown fox jumps over a lazy dog while seven curious students read about rivers "
         "mountains and old cities before writing a short summary of what they learned today").split()


def text_of_about(num_tokens: int, rng: np.random.Generator) -> str:
    """English words, ~0.75 per token, for the chat endpoint (the server reports the exact token count)."""
    return " ".join(rng.choice(WORDS, max(1, int(num_tokens * 0.75))).tolist())


def chat_bodies(bodies: list[dict], seed: int) -> list[dict]:
    """The completion bodies as /v1/chat/completions bodies with text prompts of about the same length."""
    rng = np.random.default_rng(seed)
    out = []
    for b in bodies:
        chat = {k: v for k, v in b.items() if k != "prompt"}
        chat["messages"] = [{"role": "user", "content": text_of_about(len(b["prompt"]), rng)}]
        out.append(chat)
    return out


def vllm_arrivals(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Arrival times as `vllm bench serve` draws them: gamma-distributed gaps with shape `burstiness` and mean
    1/rate (burstiness 1 = Poisson; smaller = burstier); rate inf = all at once."""
    if rate == float("inf"):
        return [0.0] * n
    gaps = np.random.default_rng(seed).gamma(burstiness, 1.0 / (rate * burstiness), n)
    return np.concatenate([[0.0], np.cumsum(gaps)[:-1]]).tolist()


def parse_goodput(items: list[str]) -> dict[str, float]:
    """`ttft:2000 tpot:50 e2el:10000` (milliseconds) -> {"ttft": 2.0, ...} in seconds."""
    out = {}
    for item in items:
        key, sep, value = item.partition(":")
        if key not in ("ttft", "tpot", "e2el") or not sep:
            raise ValueError(f"--goodput: expected ttft:MS, tpot:MS or e2el:MS, got {item!r}")
        try:
            out[key] = float(value) / 1000
        except ValueError:
            raise ValueError(f"--goodput: {item!r} is not a number of milliseconds") from None
    return out


def vllm_result(outcomes: list[Outcome], bodies: list[dict], duration_s: float, goodput: dict[str, float],
                metrics: list[str], percentiles: list[float]) -> dict:
    """The result keys `vllm bench serve` writes (times in ms), from what this client saw."""
    ok = [o for o in outcomes if o.error is None]
    ttft = np.array([o.token_s[0] - o.sent_s for o in ok])
    e2el = np.array([o.done_s - o.sent_s for o in ok])
    outs = np.array([o.num_output_tokens for o in ok])
    tpot = np.array([(e - t) / (n - 1) if n > 1 else 0.0 for e, t, n in zip(e2el, ttft, outs)])
    itl = np.concatenate([np.diff(o.token_s) for o in ok]) if ok else np.zeros(0)
    ins = [o.num_prompt_tokens if o.num_prompt_tokens is not None else len(bodies[o.index].get("prompt", ()))
           for o in ok]
    good = np.ones(len(ok), dtype=bool)
    for key, limit in goodput.items():
        good &= {"ttft": ttft, "tpot": tpot, "e2el": e2el}[key] <= limit
    res = {"duration": duration_s, "completed": len(ok), "failed": len(outcomes) - len(ok),
           "total_input_tokens": int(sum(ins)), "total_output_tokens": int(outs.sum()),
           "request_throughput": len(ok) / duration_s, "output_throughput": float(outs.sum()) / duration_s,
           "total_token_throughput": (sum(ins) + float(outs.sum())) / duration_s,
           "request_goodput": float(good.sum()) / duration_s if goodput else None,
           "input_lens": ins, "output_lens": outs.tolist(), "ttfts": ttft.tolist(), "errors": [o.error or "" for o in outcomes]}
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2el)):
        if name not in metrics:
            continue
        ms = values * 1000 if len(values) else np.zeros(1)
        res[f"mean_{name}_ms"] = float(ms.mean())
        res[f"median_{name}_ms"] = float(np.median(ms))
        res[f"std_{name}_ms"] = float(ms.std())
        for p in percentiles:
            res[f"p{p:g}_{name}_ms"] = float(np.percentile(ms, p))
    return res


def format_vllm_result(res: dict, metrics: list[str], percentiles: list[float]) -> str:
    lines = ["============ Serving Benchmark Result (vLLM's keys) ============",
             f"{'Successful requests:':<40}{res['completed']:>10}",
             f"{'Benchmark duration (s):':<40}{res['duration']:>10.2f}",
             f"{'Total input tokens:':<40}{res['total_input_tokens']:>10}",
             f"{'Total generated tokens:':<40}{res['total_output_tokens']:>10}",
             f"{'Request throughput (req/s):':<40}{res['request_throughput']:>10.2f}"]
    if res["request_goodput"] is not None:
        lines.append(f"{'Request goodput (req/s):':<40}{res['request_goodput']:>10.2f}")
    lines += [f"{'Output token throughput (tok/s):':<40}{res['output_throughput']:>10.2f}",
              f"{'Total token throughput (tok/s):':<40}{res['total_token_throughput']:>10.2f}"]
    for name in metrics:
        lines.append(f"{'Mean ' + name.upper() + ' (ms):':<40}{res[f'mean_{name}_ms']:>10.2f}")
        lines.append(f"{'Median ' + name.upper() + ' (ms):':<40}{res[f'median_{name}_ms']:>10.2f}")
        for p in percentiles:
            lines.append(f"{f'P{p:g} ' + name.upper() + ' (ms):':<40}{res[f'p{p:g}_{name}_ms']:>10.2f}")
    return "\n".join(lines)
