"""Hostile and malformed requests against a real server on 127.0.0.1 (default model, CPU): every one gets
an answer below 500, a good request still succeeds afterwards, and every KV block is free at the end."""

from __future__ import annotations

import itertools
import json
import random

import pytest

httpx = pytest.importorskip("httpx")

from test_server import start_server, stop_server, wait_all_blocks_free  # noqa: E402

FIELDS = ("prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "stream",
          "ignore_eos", "tier", "priority", "ttft_ms", "tbt_ms", "ttlt_ms", "service_tier", "model", "n",
          "stream_options", "return_token_ids")
# JSON text, not Python values: NaN and Infinity are literals Python's parser accepts
VALUES = ("null", "true", "-1", "0", "1e308", "-1e308", "1e-300", "NaN", "Infinity", "-Infinity", "1" + "0" * 5000,
          '"x"', '""', '"\\u0000\\u001b[31m"', '"\\ud800"', "[]", "[[[]]]", "{}", '{"a": [1, 2]}', "[1, \"a\", null]",
          '"' + "a" * 3000 + '"', "[" + ",".join(["99999999"] * 50) + "]")


def bodies(rng: random.Random) -> list[bytes]:
    out = []
    base = {"prompt": "Hi", "max_tokens": 3}
    for field, value in itertools.product(FIELDS, VALUES):
        text = json.dumps(base)[:-1] + f', "{field}": {value}}}'
        out.append(text.encode())
    for field in FIELDS:        # chat messages with hostile content beside a hostile field (a repeated key: the last wins)
        out.append(f'{{"messages": [{{"role": "user", "content": {rng.choice(VALUES)}}}], "max_tokens": 3, '
                   f'"{field}": {rng.choice(VALUES)}}}'.encode())
    out += [b"", b"{", b"null", b"[]", b'"text"', b"\xff\xfe\x00garbage", b'{"prompt": "\xc3\x28"}',
            b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", b'{"messages": "' + b"x" * 100_000 + b'"}']
    return out


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    url, handle = start_server(tmp_path_factory)
    yield url
    stop_server(handle)


def test_no_hostile_body_gets_a_5xx_or_leaks_a_block(fuzz_server):
    rng = random.Random(0)
    cases = [(path, body) for body in bodies(rng) for path in ("/v1/completions", "/v1/chat/completions")]
    assert len(cases) > 800
    statuses = {}
    with httpx.Client(timeout=120) as c:
        for path, body in cases:
            r = c.post(f"{fuzz_server}{path}", content=body, headers={"Content-Type": "application/json"})
            statuses.setdefault(r.status_code, []).append((path, body[:80]))
            if r.status_code >= 400:
                assert r.json()["error"]["message"], body[:80]
        assert not [s for s in statuses if s >= 500], {s: v[:3] for s, v in statuses.items() if s >= 500}
        ok = c.post(f"{fuzz_server}/v1/completions", json={"prompt": "Hello", "max_tokens": 3})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
        health = c.get(f"{fuzz_server}/health").json()
    assert health["status"] == "ok" and health["kv_blocks_free"] == health["kv_blocks"]
    print(f"{len(cases)} hostile requests: " + ", ".join(f"{s}: {len(v)}" for s, v in sorted(statuses.items())))


def test_disconnect_storm_returns_every_block(fuzz_server):
    """40 clients, streaming and not, leave at random points while others finish; within 1 s of the last
    leaving, every KV block is free and a new request is served."""
    import asyncio

    rng = random.Random(1)

    async def one(client: httpx.AsyncClient, k: int) -> None:
        body = {"prompt": f"Story {k}:", "max_tokens": rng.choice([5, 40, 400]), "ignore_eos": True,
                "stream": k % 2 == 0}
        try:
            if body["stream"]:
                async with client.stream("POST", f"{fuzz_server}/v1/completions", json=body) as r:
                    stop_after = rng.randrange(1, 30)
                    async for i, _ in _enumerate(r.aiter_lines()):
                        if i == stop_after:
                            return                        # leaving mid-stream closes the connection
            else:
                await client.post(f"{fuzz_server}/v1/completions", json=body, timeout=rng.uniform(0.2, 3.0))
        except httpx.TimeoutException:
            pass                                          # a non-streaming client that gave up

    async def storm() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            await asyncio.gather(*(one(client, k) for k in range(40)))

    asyncio.run(storm())
    health, freed_s = wait_all_blocks_free(fuzz_server)
    assert health["kv_blocks_free"] == health["kv_blocks"] and freed_s < 1.0, (health, freed_s)
    ok = httpx.post(f"{fuzz_server}/v1/completions", json={"prompt": "Hello", "max_tokens": 3}, timeout=60)
    assert ok.status_code == 200


async def _enumerate(lines):
    i = 0
    async for line in lines:
        yield i, line
        i += 1


def test_a_failed_engine_step_fails_its_requests_and_returns_every_block():
    """The server's failure path, in process with a real (tiny, random) engine: a step raises (injected
    through the executor's logits hook) while one request decodes and one is mid-prefill; both get an
    error event without exception internals, every KV block is back, /health's state stays ok, and the
    engine serves the next request."""
    import asyncio
    import time

    from niyama.engine import LLMEngine, SamplingParams
    from niyama.qos import Priority
    from niyama.server.engine_client import EngineClient
    from niyama.server.protocol import Generation

    engine = LLMEngine(model="tiny", load_format="dummy", kv_tokens=4096, policy="fcfs")
    tier = engine.tiers[engine.default_tier]
    runner = EngineClient.in_thread(engine)

    def gen(n_prompt: int, n_out: int) -> Generation:
        return Generation("completion", [5] * n_prompt, SamplingParams(max_tokens=n_out, temperature=0, ignore_eos=True),
                          tier, Priority.IMPORTANT, True, False, "tiny", True)

    faults = []

    def hook(seqs, logits):
        mid_prefill = [s for s in engine.executor.sequences.values()
                       if len(s.prompt_ids) == 1500 and 0 < s.request.num_computed_tokens < 1500]
        if mid_prefill and not faults:           # a step with the long prompt between its chunks
            faults.append(len(seqs))
            raise RuntimeError("injected fault: secret detail")

    engine.executor.logits_hook = hook

    async def run():
        runner.start(asyncio.get_running_loop())
        try:
            decoding = runner.submit(gen(20, 2000), time.monotonic())
            prefilling = runner.submit(gen(1500, 10), time.monotonic())      # six 256-token chunks
            events = [[e async for e in s] for s in (decoding, prefilling)]
            after = runner.submit(gen(10, 5), time.monotonic())
            return events, [e async for e in after]
        finally:
            runner.shutdown()

    events, after = asyncio.run(run())
    assert faults, "the fault was never injected"
    for stream_events in events:
        last = stream_events[-1]
        assert last.error and "internal error" in last.error and "secret" not in last.error
    assert after[-1].finish_reason == "length" and after[-1].num_tokens == 5
    assert engine.allocator.num_free == engine.allocator.num_blocks and runner.stats.degraded is None
    engine.replica.check_blocks()
