"""`niyama serve` as users reach it: a real server process on 127.0.0.1 with the default model (SmolLM2-135M,
CPU), real HTTP, the official `openai` client, Prometheus' own parser, and `niyama bench serve` against it."""

from __future__ import annotations

import asyncio
import csv
import json
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
parser = pytest.importorskip("prometheus_client.parser")

from openai.types import Completion  # noqa: E402
from openai.types.chat import ChatCompletion  # noqa: E402

from niyama.qos import TIER_PRESETS, Priority  # noqa: E402
from niyama.server.errors import APIError  # noqa: E402
from niyama.server.request_qos import QoSPolicy  # noqa: E402

MODEL = "smollm2-135m-instruct"
KV_TOKENS = 4096


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp_path_factory, *extra: str):
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "niyama.cli", "serve", "--port", str(port),
                                 "--kv-tokens", str(KV_TOKENS), "--log-level", "warning", *extra],
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300      # the first start on a machine measures its batch times (~20 s)
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"server did not start:\n{log.read_text()}")
        time.sleep(0.3)
    return url, (proc, log)


def wait_all_blocks_free(url: str, limit_s: float = 30) -> tuple[dict, float]:
    """Poll /health until every KV block is free (or `limit_s` passes): the last health body, seconds waited."""
    start = time.monotonic()
    while True:
        health = httpx.get(f"{url}/health", timeout=10).json()
        if health["kv_blocks_free"] == health["kv_blocks"] or time.monotonic() - start > limit_s:
            return health, time.monotonic() - start
        time.sleep(0.05)


def stop_server(handle) -> int | None:
    """SIGTERM, as a supervisor stops it; the exit code (None if it had to be killed)."""
    proc, log = handle
    proc.terminate()
    try:
        code = proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = None
    print(log.read_text()[-3000:])
    return code


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    url, proc = start_server(tmp_path_factory)
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """A server with an API key, a 4 KiB body limit and room for one request in flight."""
    url, proc = start_server(tmp_path_factory, "--api-key", "sesame", "--max-request-bytes", "4096",
                             "--max-queued", "1", "--max-model-len", "64", "--seed", "7", "--dtype", "auto")
    yield url
    stop_server(proc)


def test_api_key_body_limit_and_queue_bound(guarded):
    key = {"Authorization": "Bearer sesame"}
    body = {"prompt": "Hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(f"{guarded}/v1/completions", json=body, headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{guarded}/health", timeout=10).status_code == 200         # open, as in vLLM
    assert httpx.get(f"{guarded}/metrics", timeout=10).status_code == 200
    assert httpx.post(f"{guarded}/v1/completions", json=body, headers=key, timeout=30).status_code == 200
    big = httpx.post(f"{guarded}/v1/completions", json={"prompt": "x" * 5000}, headers=key, timeout=30)
    assert big.status_code == 413 and "4096" in big.json()["error"]["message"]
    long = {"prompt": "Tell a story.", "max_tokens": 55, "ignore_eos": True, "stream": True}   # within --max-model-len 64
    with httpx.Client(timeout=60) as c, c.stream("POST", f"{guarded}/v1/completions", json=long, headers=key) as r:
        lines = r.iter_lines()
        next(lines)                                       # in flight now: the one request the server holds
        full = c.post(f"{guarded}/v1/completions", json=body, headers=key)
        assert full.status_code == 429 and full.headers["retry-after"] == "1"
    assert httpx.post(f"{guarded}/v1/completions", json=body, headers=key, timeout=30).status_code == 200


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def chat(msg: str) -> list[dict]:
    return [{"role": "user", "content": msg}]


def test_openai_client_chat_streaming_and_not(client):
    assert [m.id for m in client.models.list()] == [MODEL]
    r = client.chat.completions.create(model=MODEL, messages=chat("What is the capital of France?"),
                                       temperature=0, max_tokens=24)
    text = r.choices[0].message.content
    assert "Paris" in text and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 10
    assert r.service_tier == "default" and r.model_extra["niyama"] == {"tier": "Q1", "priority": "important",
                                                                       "relegated": False}
    ChatCompletion.model_validate(r.model_dump())       # typed parse: service_tier must be one of OpenAI's values
    chunks = list(client.chat.completions.create(model=MODEL, messages=chat("What is the capital of France?"),
                                                 temperature=0, max_tokens=24, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # no max_tokens: the room the context and this server's small KV cache leave, not a 400
    r = client.chat.completions.create(model=MODEL, messages=chat("Say hi."), temperature=0)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content


def test_openai_client_completions_streaming_and_not(client):
    r = client.completions.create(model=MODEL, prompt="The three primary colors are", temperature=0, max_tokens=12)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
    parts = [c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="The three primary colors are", temperature=0, max_tokens=12, stream=True) if c.choices]
    assert "".join(parts) == r.choices[0].text and len(parts) >= 2
    ids = client.completions.create(model=MODEL, prompt=[504, 1845, 3994], max_tokens=3, temperature=0,
                                    extra_body={"return_token_ids": True})
    assert ids.usage.prompt_tokens == 3 and ids.usage.completion_tokens == 3
    assert len(ids.choices[0].model_extra["token_ids"]) == 3
    streamed = [c.choices[0].model_extra["token_ids"] for c in client.completions.create(
        model=MODEL, prompt=[504, 1845, 3994], max_tokens=3, temperature=0, stream=True,
        extra_body={"return_token_ids": True}) if c.choices and c.choices[0].finish_reason is None]
    assert sum(streamed, []) == ids.choices[0].model_extra["token_ids"]


def test_logprobs_through_the_openai_client_streamed_and_not(client):
    """Chat's and completions' logprobs in OpenAI's shapes, parsed by the client's own types: one entry per
    token, the asked-for number of alternatives, most likely first, a greedy token the most likely one, the
    same numbers streamed and not, and probabilities that sum to at most 1."""
    import math

    from openai.types.chat import ChatCompletionChunk

    kw = dict(model=MODEL, messages=chat("What is the capital of France?"), temperature=0, max_tokens=8)
    r = client.chat.completions.create(**kw, logprobs=True, top_logprobs=3)
    ChatCompletion.model_validate(r.model_dump())
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens                  # the EOS token too, as vLLM counts it
    assert "".join(t.token for t in content).strip().startswith(r.choices[0].message.content.strip()[:5])
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert [a.logprob for a in t.top_logprobs] == sorted((a.logprob for a in t.top_logprobs), reverse=True)
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert sum(math.exp(a.logprob) for a in t.top_logprobs) <= 1 + 1e-4
        assert bytes(t.bytes).decode("utf-8", errors="replace") == t.token
    chunks = list(client.chat.completions.create(**kw, logprobs=True, top_logprobs=3, stream=True))
    for c in chunks:
        ChatCompletionChunk.model_validate(c.model_dump())
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [(t.token, round(t.logprob, 4)) for t in content]
    plain = client.chat.completions.create(**kw, logprobs=True)
    assert all(t.top_logprobs == [] for t in plain.choices[0].logprobs.content)
    assert client.chat.completions.create(**kw).choices[0].logprobs is None

    sampled = client.completions.create(model=MODEL, prompt="The three primary colors are", max_tokens=6,
                                        temperature=0.9, top_p=0.9, seed=5, logprobs=2)
    Completion.model_validate(sampled.model_dump())
    lp = sampled.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == sampled.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top[token] == pytest.approx(logprob) and 2 <= len(top) <= 3     # the 2 most likely + the drawn one
    again = [c.choices[0].logprobs for c in client.completions.create(
        model=MODEL, prompt="The three primary colors are", max_tokens=6, temperature=0.9, top_p=0.9, seed=5,
        logprobs=2, stream=True) if c.choices and c.choices[0].logprobs]
    assert sum((a.token_logprobs for a in again), []) == pytest.approx(lp.token_logprobs, abs=1e-4)
    assert sum((a.text_offset for a in again), []) == lp.text_offset


def test_concurrent_requests_match_their_solo_answers(server, client):
    prompts = ["Name a fruit.", "What is 2+2?", "Say hello in French.", "What color is the sky?"]
    solo = [client.chat.completions.create(model=MODEL, messages=chat(p), temperature=0, max_tokens=20)
            .choices[0].message.content for p in prompts]

    async def together():
        aclient = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
        rs = await asyncio.gather(*(aclient.chat.completions.create(
            model=MODEL, messages=chat(p), temperature=0, max_tokens=20) for p in prompts))
        await aclient.close()
        return [r.choices[0].message.content for r in rs]

    assert asyncio.run(together()) == solo      # batched together on one engine, same greedy tokens


def qos_of(client, **extra):
    r = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, temperature=0, extra_body=extra)
    Completion.model_validate(r.model_dump())
    return r.model_extra["niyama"]["tier"], r.model_extra["niyama"], r.service_tier


def test_qos_fields_pick_the_tier_and_priority(client):
    assert qos_of(client, tier="Q3")[::2] == ("Q3", "default")
    assert qos_of(client, ttft_ms=2000, tbt_ms=100)[0] == "custom"
    assert qos_of(client, ttlt_ms=60000)[0] == "custom"
    assert qos_of(client, service_tier="priority")[::2] == ("Q1", "priority")
    assert qos_of(client, service_tier="flex")[::2] == ("Q3", "flex")
    assert qos_of(client, service_tier="auto")[::2] == ("Q1", "default")
    assert qos_of(client, service_tier="Q2")[::2] == ("Q2", "default")
    assert qos_of(client, priority="low")[1]["priority"] == "low"
    assert qos_of(client, priority=1)[1]["priority"] == "low"         # vLLM: larger = later
    assert qos_of(client, priority=-3)[1] == {"tier": "Q1", "priority": "important", "relegated": False}
    # OpenAI's "off" values of features niyama does not have are accepted
    r = client.chat.completions.create(model=MODEL, messages=chat("Hi"), max_tokens=2, logprobs=False, n=1,
                                       presence_penalty=0, frequency_penalty=0.0, logit_bias={})
    assert r.usage.completion_tokens == 2


BAD = [   # (path, body, status, words the message must contain)
    ("/v1/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/completions", b"[1, 2]", 400, "must be a JSON object"),
    ("/v1/completions", {"prompt": "hi", "tier": "Q9"}, 400, "unknown tier 'Q9'"),
    ("/v1/completions", {"prompt": "hi", "ttft_ms": 0, "tbt_ms": 50}, 400, "ttft_ms must be at least 1"),
    ("/v1/completions", {"prompt": "hi", "ttlt_ms": -5}, 400, "ttlt_ms must be at least 1"),
    ("/v1/completions", {"prompt": "hi", "ttft_ms": 500}, 400, "tbt_ms is missing"),
    ("/v1/completions", {"prompt": "hi", "tier": "Q1", "ttlt_ms": 9}, 400, "not tier and"),
    ("/v1/completions", {"prompt": "hi", "service_tier": "turbo"}, 400, "unknown service_tier"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "logit_bias": {"5": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "min_p": 1.5}, 400, "min_p must be in [0, 1]"),
    ("/v1/completions", {"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty must be a finite number > 0"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 3}, 400, "presence_penalty must be in [-2, 2]"),
    ("/v1/completions", {"prompt": "hi", "priority": "urgent"}, 400, "unknown priority"),
    ("/v1/completions", {"prompt": [1000] * 9000, "max_tokens": 4}, 400, "maximum context length is 8192"),
    ("/v1/completions", {"prompt": [1000] * 5000, "max_tokens": 4}, 400, "KV blocks"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens must be at least 1"),
    ("/v1/chat/completions", {"messages": chat("hi"), "max_tokens": -3}, 400, "max_tokens must be at least 1"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "'gpt-4' does not exist"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens must be an integer"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature must be a number"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream must be true or false"),
    ("/v1/completions", {"prompt": "hi", "top_p": 3}, 400, "top_p must be in (0, 1]"),
    ("/v1/completions", {"prompt": "hi", "temperature": 1e-40}, 400, "temperature must be 0 (greedy) or at least"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n must be at least 1"),
    ("/v1/completions", {"prompt": "hi", "seed": -1, "temperature": 0.7}, 400, "seed must be an integer in [0, 2^63)"),
    ("/v1/chat/completions", {"messages": chat("hi"), "logprobs": 3}, 400, "logprobs must be true or false"),
    ("/v1/chat/completions", {"messages": chat("hi"), "top_logprobs": 2}, 400, "top_logprobs needs logprobs: true"),
    ("/v1/chat/completions", {"messages": chat("hi"), "logprobs": True, "top_logprobs": 21}, 400,
     "top_logprobs must be at most 20"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs must be an integer in [0, 20]"),
    ("/v1/completions", {"prompt": "hi", "logprobs": True}, 400, "logprobs must be an integer in [0, 20]"),
    ("/v1/completions", {"prompt": "hi", "top_logprobs": 3}, 400, "send logprobs: N"),
    ("/v1/completions", {"prompt": "hi", "n": 17}, 400, "n must be at most 16"),
    ("/v1/completions", {"prompt": "hi", "best_of": 3}, 400, "send n: N"),
    ("/v1/completions", {"prompt": 42}, 400, "prompt must be a non-empty string or a list of token ids"),
    ("/v1/completions", {"max_tokens": 4}, 400, "prompt is required"),
    ("/v1/completions", {"prompt": [5, 10 ** 9]}, 400, "token ids must be in [0, 49152)"),
    ("/v1/chat/completions", {"messages": "hello"}, 400, "messages must be a non-empty list"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role 'wizard'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 7}]}, 400, "content must be a string"),
    ("/v1/nothing", {}, 404, "Not Found"),
    ("/v1/completions", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "nests too deeply"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}", 400, "not valid JSON"),
    ("/v1/completions", b'{"prompt": "\\ud800 hi"}', 400, "lone surrogate"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}]}', 400, "lone surrogate"),
]


@pytest.mark.parametrize("path,body,status,words", BAD, ids=[f"{b[0]}:{b[3][:40]}" for b in BAD])
def test_bad_input_gets_a_4xx_that_says_what_to_fix(server, path, body, status, words):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server}{path}", content=raw, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["type"]
    ok = httpx.post(f"{server}/v1/completions", json={"prompt": "Hello", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2     # still serving


def test_a_body_that_is_not_json_by_its_content_type_gets_a_415(server):
    # a page in any browser may POST text/plain cross-origin without asking: it must not be served
    r = httpx.post(f"{server}/v1/completions", content=b'{"prompt": "hi"}', headers={"Content-Type": "text/plain"},
                   timeout=10)
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]


def test_a_non_streaming_client_that_leaves_is_aborted_at_once(server):
    body = {"prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True}
    before = metrics(server)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server}/v1/completions", json=body, timeout=1.5)
    health, freed_s = wait_all_blocks_free(server)
    assert health["kv_blocks_free"] == health["kv_blocks"] and freed_s < 1.0, freed_s
    after = metrics(server)
    key = ("niyama:request_success_total", (("finished_reason", "abort"),))
    assert after[key] - before.get(key, 0) == 1


def test_wrong_method_is_a_405_in_openai_shape(server):
    r = httpx.get(f"{server}/v1/completions", timeout=10)
    assert r.status_code == 405 and r.json()["error"]["message"]


def metrics(server) -> dict[tuple, float]:
    text = httpx.get(f"{server}/metrics", timeout=10).text
    assert "_created" not in text
    out = {}
    for family in parser.text_string_to_metric_families(text):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
            out[(s.name, labels)] = s.value
    return out


def test_metrics_parse_and_move(server, client):
    before = metrics(server)
    assert before[("niyama:kv_cache_usage_perc", ())] == 0.0
    r = client.completions.create(model=MODEL, prompt="Count: one, two,", max_tokens=7, temperature=0,
                                  extra_body={"tier": "Q3", "ignore_eos": True})
    assert r.usage.completion_tokens == 7
    after = metrics(server)

    def moved(name, labels=()):
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    assert moved("niyama:tier_requests_total", (("tier", "Q3"),)) == 1
    assert moved("niyama:tier_violations_total", (("tier", "Q3"),)) == 0
    assert moved("niyama:generation_tokens_total") == 7
    assert moved("niyama:prompt_tokens_total") == r.usage.prompt_tokens
    q3 = (("tier", "Q3"),)
    assert moved("niyama:time_to_first_token_seconds_count", q3) == 1
    assert moved("niyama:inter_token_latency_seconds_count", q3) == 6
    assert moved("niyama:e2e_request_latency_seconds_count", q3) == 1
    assert moved("niyama:request_queue_time_seconds_count", q3) == 1
    assert moved("niyama:time_to_first_token_seconds_count", (("tier", "Q1"),)) == 0
    assert moved("niyama:chunk_size_tokens_count") >= 1
    assert moved("niyama:iteration_tokens_total_count") >= 2          # the prefill step and 6 decode steps
    assert moved("niyama:iteration_duration_seconds_count") >= 2
    assert moved("niyama:request_success_total", (("finished_reason", "length"),)) == 1
    for tier in ("Q1", "Q2", "Q3"):
        assert ("niyama:relegations_total", (("tier", tier),)) in after
    assert after[("niyama:num_requests_running", ())] == 0


def test_a_repeated_prompt_prefix_is_served_from_the_cache(server, client):
    """The same 200-token prompt prefix twice over HTTP: the second request's prefill starts on cached blocks
    (prefix_cache_hits per tier), the answers are the same, /health shows the cached blocks, none is held."""
    prompt = [(17 * k) % 4000 + 100 for k in range(200)]
    before = metrics(server)
    answers = [client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0,
                                         extra_body={"tier": "Q2", "ignore_eos": True}).choices[0].text
               for _ in range(2)]
    after = metrics(server)
    q2 = (("tier", "Q2"),)
    queries = after[("niyama:prefix_cache_queries_total", q2)] - before.get(("niyama:prefix_cache_queries_total", q2), 0)
    hits = after[("niyama:prefix_cache_hits_total", q2)] - before.get(("niyama:prefix_cache_hits_total", q2), 0)
    assert queries == 400 and hits == 192           # the second: 12 of its 12.5 blocks (never the last token's)
    assert answers[0] == answers[1]
    health, _ = wait_all_blocks_free(server)
    assert health["kv_blocks_cached"] >= 12 and health["kv_blocks_free"] == health["kv_blocks"]
    assert after[("niyama:kv_cache_cached_blocks", ())] >= 12


def test_client_disconnect_aborts_and_frees_the_kv_cache(server):
    body = {"prompt": "Tell me a very long story.", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    before = metrics(server)
    with httpx.Client(timeout=30) as c, c.stream("POST", f"{server}/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        got = 0
        for line in resp.iter_lines():
            got += line.startswith("data:")
            if got == 5:       # still reading: the request holds blocks while it streams
                health = httpx.get(f"{server}/health", timeout=10).json()
                assert health["kv_blocks_free"] < health["kv_blocks"]
                break          # leaving the loop closes the stream's connection
    deadline = time.monotonic() + 30
    while True:
        health = httpx.get(f"{server}/health", timeout=10).json()
        if health["kv_blocks_free"] == health["kv_blocks"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert health["kv_blocks_free"] == health["kv_blocks"] == KV_TOKENS // 16
    after = metrics(server)
    key = ("niyama:request_success_total", (("finished_reason", "abort"),))
    assert after[key] - before.get(key, 0) == 1
    assert after[("niyama:kv_cache_usage_perc", ())] == 0.0
    assert after[("niyama:generation_tokens_total", ())] - before.get(("niyama:generation_tokens_total", ()), 0) < 2000


def test_hostile_sampling_values_leave_other_streams_and_the_cache_alone(server):
    """A tiny temperature (NaN logits once) is refused; a top_p float32 rounds to 0 is served greedily; a
    stream running meanwhile gets all its tokens, and every block is free at the end."""
    body = {"prompt": "Count to fifty.", "max_tokens": 60, "ignore_eos": True, "stream": True, "temperature": 0}
    with httpx.Client(timeout=60) as c, c.stream("POST", f"{server}/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        chunks = [next(lines) for _ in range(3)]
        bad = c.post(f"{server}/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "temperature": 1e-40})
        odd = c.post(f"{server}/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "top_p": 1e-300})
        chunks += list(lines)
    assert bad.status_code == 400 and "temperature" in bad.json()["error"]["message"]
    assert odd.status_code == 200 and odd.json()["usage"]["completion_tokens"] == 4
    events = [json.loads(x[5:]) for x in chunks if x.startswith("data:") and x != "data: [DONE]"]
    assert "error" not in json.dumps(events) and events[-1]["choices"][0]["finish_reason"] == "length"
    health = httpx.get(f"{server}/health", timeout=10).json()
    assert health["status"] == "ok" and health["kv_blocks_free"] == health["kv_blocks"]


def test_bench_serve_reports_per_tier_latency(server, tmp_path):
    r = subprocess.run([sys.executable, "-m", "niyama.cli", "bench", "serve", "--url", server, "--trace",
                        "azure-conv", "--qps", "4", "--requests", "8", "--max-prompt-tokens", "48",
                        "--max-output-tokens", "6", "--out", str(tmp_path), "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "(niyama)" in r.stdout and "QoS fields: tier names" in r.stdout
    for tier in ("Q1", "Q2", "Q3"):
        assert f"\n{tier} " in r.stdout
    assert "goodput" in r.stdout
    rows = list(csv.DictReader(open(tmp_path / "records.csv")))
    assert len(rows) == 8
    assert all(int(row["output_tokens"]) == 6 and int(row["prompt_tokens"]) <= 48 for row in rows)
    assert all(0 < float(row["ttft_s"]) <= float(row["ttlt_s"]) for row in rows)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["failed"] == 0 and summary["num_requests"] == 8


def test_bench_serve_speaks_vllms_flags_and_result_keys(server, tmp_path):
    """The issue's command with vLLM's flag names against the chat endpoint (real text prompts), plus
    --max-concurrency and percentiles: vllm_result.json carries vLLM's keys with sane values."""
    r = subprocess.run([sys.executable, "-m", "niyama.cli", "bench", "serve", "--base-url", server,
                        "--request-rate", "4", "--num-prompts", "8", "--endpoint", "/v1/chat/completions",
                        "--goodput", "ttft:20000", "--max-output-tokens", "5", "--max-prompt-tokens", "40",
                        "--max-concurrency", "3", "--percentile-metrics", "ttft,tpot,itl,e2el",
                        "--metric-percentiles", "50,99", "--burstiness", "0.5", "--out", str(tmp_path), "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Serving Benchmark Result" in r.stdout and "Request goodput (req/s):" in r.stdout
    res = json.loads((tmp_path / "vllm_result.json").read_text())
    assert res["completed"] == 8 and res["failed"] == 0 and res["num_prompts"] == 8
    assert res["total_output_tokens"] == 40 and res["output_lens"] == [5] * 8
    assert all(0 < n <= 80 for n in res["input_lens"])       # ~40 tokens of English, counted by the server
    assert res["request_throughput"] == pytest.approx(8 / res["duration"])
    assert res["output_throughput"] == pytest.approx(40 / res["duration"])
    assert res["request_goodput"] == pytest.approx(res["request_throughput"])   # a 20 s TTFT bound: all good
    for name in ("ttft", "tpot", "itl", "e2el"):
        assert res[f"p99_{name}_ms"] >= res[f"p50_{name}_ms"] >= 0 and f"mean_{name}_ms" in res
    assert res["p99_ttft_ms"] <= res["p99_e2el_ms"]


def test_bench_serve_takes_what_users_type_for_vllm_first(server, tmp_path):
    """`vllm bench serve`'s usual line: --backend, --host/--port, the random dataset, sampling flags, --ignore-eos,
    --save-result/--result-dir/--result-filename, and no --request-rate (inf: all at once). The sampling fields go
    into every request, the lengths are the random dataset's."""
    host, port = server.removeprefix("http://").split(":")
    r = subprocess.run([sys.executable, "-m", "niyama.cli", "bench", "serve", "--backend", "openai-chat", "--host", host,
                        "--port", port, "--dataset-name", "random", "--random-input-len", "24", "--random-output-len",
                        "4", "--num-prompts", "5", "--temperature", "0.7", "--top-p", "0.9", "--top-k", "40",
                        "--ignore-eos", "--save-result", "--result-dir", str(tmp_path), "--result-filename",
                        "run.json", "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "at inf QPS from random-24-4" in r.stdout
    res = json.loads((tmp_path / "run.json").read_text())
    assert res["completed"] == 5 and res["output_lens"] == [4] * 5 and res["endpoint"] == "/v1/chat/completions"
    assert (res["temperature"], res["top_p"], res["top_k"]) == (0.7, 0.9, 40)
    assert res["request_rate"] == float("inf")

    from niyama.loadgen import Target, request_bodies
    from niyama.workload import make_workload

    wl = make_workload("sharegpt", 1.0, num_requests=3, seed=0)
    bodies, _ = request_bodies(wl, Target("http://x", "m", True, 8192, (), 49152), "off", 0, (10, 100), None, None,
                               {"temperature": 0.7, "top_p": 0.9})
    assert all(b["temperature"] == 0.7 and b["top_p"] == 0.9 for b in bodies)
    greedy, _ = request_bodies(wl, Target("http://x", "m", True, 8192, (), 49152), "off", 0, (10, 100), None, None)
    assert all(b["temperature"] == 0 and "top_p" not in b for b in greedy)


def test_bench_serve_says_when_no_server_answers(tmp_path):
    r = subprocess.run([sys.executable, "-m", "niyama.cli", "bench", "serve", "--url",
                        f"http://127.0.0.1:{free_port()}", "--qps", "1", "--requests", "2", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cannot reach" in r.stderr


def test_qos_policy_resolution_rules():
    qos = QoSPolicy.build(TIER_PRESETS["default"], "Q2", {"flex": "Q2"})
    assert qos.resolve({})[0].name == "Q2"
    assert qos.resolve({"service_tier": "auto"})[0].name == "Q2"
    assert qos.resolve({"service_tier": "flex"})[0].name == "Q2"
    tier, prio = qos.resolve({"ttft_ms": 1500, "tbt_ms": 40, "priority": "low"})
    assert (tier.ttft_s, tier.tbt_s, prio) == (1.5, 0.04, Priority.LOW)
    with pytest.raises(ValueError, match="not one of"):
        QoSPolicy.build(TIER_PRESETS["default"], "Q7")
    with pytest.raises(APIError, match="priority must be"):
        qos.resolve({"priority": True})


def test_serve_refuses_a_busy_port_before_loading_the_model():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "niyama.cli", "serve", "--port", str(port)],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Address already in use" in r.stderr and "loaded in" not in r.stderr


def test_a_stop_string_found_on_the_http_side_ends_the_request_in_the_engine(server):
    """Text and stop strings are made in the HTTP process: the answer ends before the stop string (streamed
    or not), the engine stops generating, and its blocks come back."""
    body = {"prompt": "List the days of the week:", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    with httpx.Client(timeout=60) as c:
        full = c.post(f"{server}/v1/completions", json=body).json()["choices"][0]["text"]
        words = [w for w in full.split() if len(w) >= 4]
        assert len(words) >= 3, full
        stop = words[len(words) // 2]
        expected = full[:full.index(stop)]
        plain = c.post(f"{server}/v1/completions", json={**body, "stop": [stop]}).json()
        with c.stream("POST", f"{server}/v1/completions", json={**body, "stop": stop, "stream": True}) as resp:
            events = [json.loads(x[5:]) for x in resp.iter_lines() if x.startswith("data:") and x != "data: [DONE]"]
    assert plain["choices"][0]["text"] == expected and plain["choices"][0]["finish_reason"] == "stop"
    assert plain["usage"]["completion_tokens"] < 40
    assert "".join(e["choices"][0]["text"] for e in events) == expected
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    with httpx.Client(timeout=60) as c:
        kept = c.post(f"{server}/v1/completions", json={**body, "stop": [stop], "include_stop_str_in_output": True})
    assert kept.json()["choices"][0]["text"] == expected + stop
    health, _ = wait_all_blocks_free(server, 5)
    assert health["kv_blocks_free"] == health["kv_blocks"]


def test_echo_puts_the_prompt_before_the_completion(server, client):
    """Completions' `echo`: the text starts with the prompt (as sent, or its token ids decoded), streamed as a
    first chunk; refused with logprobs (the prompt's are not computed) and on chat."""
    base = dict(model=MODEL, prompt="Count: one, two,", max_tokens=6, temperature=0)
    plain = client.completions.create(**base).choices[0].text
    echoed = client.completions.create(**base, echo=True)
    assert echoed.choices[0].text == "Count: one, two," + plain
    assert echoed.usage.completion_tokens == 6
    chunks = [c.choices[0].text for c in client.completions.create(**base, echo=True, stream=True) if c.choices]
    assert chunks[0] == "Count: one, two," and "".join(chunks) == echoed.choices[0].text
    with httpx.Client(timeout=30) as c:
        prompt_text = c.post(f"{server}/detokenize", json={"tokens": [4093, 42]}).json()["prompt"]
        from_ids = client.completions.create(**{**base, "prompt": [4093, 42]}, echo=True).choices[0].text
        assert prompt_text and from_ids.startswith(prompt_text) and len(from_ids) > len(prompt_text)
        r = c.post(f"{server}/v1/completions", json={**base, "echo": True, "logprobs": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "echo"
        r = c.post(f"{server}/v1/chat/completions", json={"model": MODEL, "messages": chat("Hi"), "echo": True})
        assert r.status_code == 400 and r.json()["error"]["param"] == "echo"


def test_penalties_and_min_p_are_honoured(client):
    base = dict(model=MODEL, prompt="Monday, Tuesday, Wednesday, Monday, Tuesday, Wednesday, Monday,",
                max_tokens=16, temperature=0)
    plain = client.completions.create(**base).choices[0].text
    for extra in ({"repetition_penalty": 1.8}, {"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        changed = client.completions.create(**base, extra_body=extra).choices[0].text
        assert changed != plain, extra          # the repeated days were the greedy choice
    # min_p = 1 keeps only the most likely token: sampling at temperature 1 is then greedy, whatever the seed
    for seed in (1, 2):
        top_only = client.completions.create(**{**base, "temperature": 1.0}, seed=seed, extra_body={"min_p": 1.0})
        assert top_only.choices[0].text == plain


def test_requests_without_sampling_fields_get_the_models_defaults(client, server):
    """The shipped model has no generation_config.json: its model card's temperature 0.2 / top_p 0.9 apply
    (at OpenAI's 1.0 it babbled), and /v1/models says so. A seed decides the draws, so a request without the
    fields answers exactly as one that sends 0.2 / 0.9 with the same seed. (At 0.2 / 0.9 the model's first
    token is "The" with probability 0.60 and "L" with 0.40 for this question, so not every seed says Paris.)"""
    listed = httpx.get(f"{server}/v1/models", timeout=10).json()["data"][0]["default_sampling"]
    assert listed == {"temperature": 0.2, "top_p": 0.9, "top_k": 0}

    def ask(seed, **kw):
        return client.chat.completions.create(model=MODEL, messages=chat("What is the capital of France?"),
                                              max_tokens=24, seed=seed, **kw).choices[0].message.content

    answers = [ask(seed) for seed in range(4)]
    assert answers == [ask(seed, temperature=0.2, top_p=0.9) for seed in range(4)]
    assert answers != [ask(seed, temperature=1.0, top_p=1.0) for seed in range(4)]
    assert any("Paris" in a for a in answers), answers


def test_every_metric_the_grafana_dashboard_queries_is_exported(server):
    """deploy/grafana/niyama-dashboard.json reads only series this server exports (histograms by their
    _bucket/_sum/_count samples), and every panel has a query."""
    import re
    from pathlib import Path

    dashboard = json.loads((Path(__file__).parents[2] / "deploy" / "grafana" / "niyama-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(dashboard["panels"]) >= 10 and all(p["targets"] for p in dashboard["panels"])
    queried = {m for e in exprs for m in re.findall(r"niyama:[a-z0-9_:]+", e)}
    exported = {name for name, _ in metrics(server)}
    assert queried and not queried - exported, sorted(queried - exported)
    families = {re.sub(r"_(bucket|sum|count)$", "", m) for m in queried}
    for needed in ("niyama:time_to_first_token_seconds", "niyama:inter_token_latency_seconds",
                   "niyama:tier_target_seconds", "niyama:tier_violations_total", "niyama:relegations_total",
                   "niyama:chunk_size_tokens", "niyama:kv_cache_usage_perc", "niyama:num_requests_waiting",
                   "niyama:iteration_duration_seconds", "niyama:prefix_cache_hits_total",
                   "niyama:prefix_cache_queries_total", "niyama:kv_cache_cached_blocks"):
        assert needed in families, needed
    targets = metrics(server)
    assert targets[("niyama:tier_target_seconds", (("kind", "tbt"), ("tier", "Q1")))] == 0.05
    assert targets[("niyama:tier_target_seconds", (("kind", "ttlt"), ("tier", "Q3")))] == 1800


def test_tokenize_detokenize_version_and_model_card(server):
    with httpx.Client(timeout=30) as c:
        tok = c.post(f"{server}/tokenize", json={"prompt": "Hello world"}).json()
        assert tok["count"] == len(tok["tokens"]) >= 2 and tok["max_model_len"] == 8192
        assert c.post(f"{server}/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"] == "Hello world"
        chat_tok = c.post(f"{server}/tokenize", json={"messages": chat("Hello world")}).json()
        assert chat_tok["count"] > tok["count"]                     # the chat template's tokens around it
        gen = c.post(f"{server}/v1/chat/completions", json={"messages": chat("Hello world"), "max_tokens": 1}).json()
        assert gen["usage"]["prompt_tokens"] == chat_tok["count"]     # the same ids the model sees
        assert c.post(f"{server}/detokenize", json={"tokens": [-1]}).status_code == 400
        assert c.post(f"{server}/tokenize", json={"prompt": "hi", "model": "nope"}).status_code == 404
        assert c.get(f"{server}/version").json()["version"]
        assert c.get(f"{server}/v1/models/{MODEL}").json()["id"] == MODEL
        missing = c.get(f"{server}/v1/models/gpt-4")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_max_model_len_caps_requests(guarded):
    auth = {"Authorization": "Bearer sesame"}
    with httpx.Client(timeout=30) as c:
        assert c.get(f"{guarded}/v1/models", headers=auth).json()["data"][0]["max_model_len"] == 64
        r = c.post(f"{guarded}/v1/completions", headers=auth, json={"prompt": "word " * 60, "max_tokens": 10})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert "64 tokens" in r.json()["error"]["message"]
        ok = c.post(f"{guarded}/v1/completions", headers=auth, json={"prompt": "Hi", "max_tokens": 3})
        assert ok.status_code == 200
