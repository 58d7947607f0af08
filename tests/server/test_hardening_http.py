"""Issue 29's HTTP hardening, against real server processes on 127.0.0.1 (the default model, CPU): the queue
bound under a burst, connection and header limits, the Content-Type and Host checks, a graceful SIGTERM,
quiet client disconnects, the API key on /v1/models, and (in-process) the bound on concurrent tokenizations."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time

import pytest

pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")

from tests.server.test_server import MODEL, metrics, start_server, stop_server, wait_all_blocks_free  # noqa: E402

KEY = {"Authorization": "Bearer sesame"}
KEEP_ALIVE_S = 1


@pytest.fixture(scope="module")
def hardened(tmp_path_factory):
    """A server with an API key, room for 4 requests in flight and a 1 s keep-alive timeout: (url, log)."""
    url, handle = start_server(tmp_path_factory, "--api-key", "sesame", "--max-queued", "4",
                               "--keep-alive-timeout", str(KEEP_ALIVE_S))
    yield url, handle[1]
    stop_server(handle)


def test_a_burst_is_bounded_by_max_queued(hardened):
    """Issue 29 item 4: 20 simultaneous requests against --max-queued 4: at most 4 are admitted, the rest get
    429 with Retry-After, and every KV block is free afterwards."""
    url, _ = hardened
    body = {"prompt": "Tell a long story.", "max_tokens": 100, "ignore_eos": True}

    async def burst():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=40)) as c:
            return await asyncio.gather(*(c.post(f"{url}/v1/completions", json=body, headers=KEY)
                                          for _ in range(20)))

    answers = asyncio.run(burst())
    codes = [r.status_code for r in answers]
    assert set(codes) <= {200, 429}, codes
    assert 1 <= codes.count(200) <= 4, codes
    for r in answers:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full"
    # n counts: 5 choices are over a bound of 4 (checked again once the body says n)
    many = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "n": 5}, headers=KEY,
                      timeout=30)
    assert many.status_code == 429 and many.headers["retry-after"] == "1"
    health, _ = wait_all_blocks_free(url)
    assert health["kv_blocks_free"] == health["kv_blocks"]
    ok = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "n": 4}, headers=KEY,
                    timeout=30)
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 4       # nothing leaked from the count


def test_clients_that_leave_give_their_places_back(hardened):
    """Issue 29 items 4 and 9: 4 non-streamed requests (the --max-queued bound) whose clients leave end at once:
    their places in the bound return (a handler used to wait for ever, holding its place until shutdown) and
    niyama:client_disconnects_total counts them."""
    url, _ = hardened
    before = metrics(url).get(("niyama:client_disconnects_total", ()), 0)
    body = {"prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": True}

    async def leave():
        async with httpx.AsyncClient(timeout=1.5) as c:
            return await asyncio.gather(*(c.post(f"{url}/v1/completions", json=body, headers=KEY) for _ in range(4)),
                                        return_exceptions=True)

    assert all(isinstance(r, httpx.TimeoutException) for r in asyncio.run(leave()))
    health, _ = wait_all_blocks_free(url)
    assert health["kv_blocks_free"] == health["kv_blocks"]
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers=KEY, timeout=30)
    assert r.status_code == 200, r.text
    assert metrics(url)[("niyama:client_disconnects_total", ())] == before + 4


def test_an_oversized_header_is_refused(hardened):
    """Issue 29 item 5: an 8 MB header gets a 4xx or the connection closed, never a 200."""
    url, _ = hardened
    try:
        r = httpx.get(f"{url}/health", headers={"X-Big": "a" * 8 * 2**20}, timeout=30)
    except httpx.TransportError:
        return
    assert 400 <= r.status_code < 500, r.status_code


def read_response(s: socket.socket) -> bytes:
    got = b""
    while b"\r\n\r\n" not in got:
        got += s.recv(65536)
    head, _, rest = got.partition(b"\r\n\r\n")
    length = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")][0].split(b":")[1])
    while len(rest) < length:
        rest += s.recv(65536)
    return head


def test_idle_connections_are_closed(hardened):
    """Issue 29 item 5: a connection that never sends a request, and a keep-alive one idle after its response,
    are closed after --keep-alive-timeout."""
    url, _ = hardened
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as s:       # says nothing
        s.settimeout(KEEP_ALIVE_S + 5)
        start = time.monotonic()
        assert s.recv(1) == b""
        assert time.monotonic() - start < KEEP_ALIVE_S + 3
    with socket.create_connection(("127.0.0.1", port)) as s:       # a request, then idle
        s.settimeout(KEEP_ALIVE_S + 5)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert read_response(s).startswith(b"HTTP/1.1 200")
        start = time.monotonic()
        assert s.recv(1) == b""
        assert time.monotonic() - start < KEEP_ALIVE_S + 3


def test_a_post_needs_a_json_content_type_and_a_loopback_host(hardened):
    """Issue 29 item 6: no Content-Type is a 415 (a browser's no-cors fetch can send none); a server on
    loopback answers only loopback Host values (DNS rebinding)."""
    url, _ = hardened
    body = b'{"prompt": "Hi", "max_tokens": 1}'
    r = httpx.post(f"{url}/v1/completions", content=body, headers=KEY, timeout=30)
    assert "content-type" not in r.request.headers
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
    json_type = {**KEY, "Content-Type": "application/json"}
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "10.0.0.1"):
        r = httpx.post(f"{url}/v1/completions", content=body, headers={**json_type, "Host": host}, timeout=30)
        assert r.status_code == 421, (host, r.status_code)
        err = r.json()["error"]
        assert err["code"] == "invalid_host" and err["type"] == "invalid_request_error" and host in err["message"]
    assert httpx.get(f"{url}/health", headers={"Host": "evil.example"}, timeout=10).status_code == 421
    for host in ("localhost", "localhost:8000", "127.0.0.1", "127.0.0.1:9", "[::1]", "[::1]:8000"):
        r = httpx.post(f"{url}/v1/completions", content=body, headers={**json_type, "Host": host}, timeout=30)
        assert r.status_code == 200, (host, r.text)


def test_a_client_that_leaves_mid_body_is_counted_quietly(hardened):
    """Issue 29 item 9: a body cut off half way: no traceback in the log, niyama:client_disconnects_total moves."""
    url, log = hardened
    before = metrics(url).get(("niyama:client_disconnects_total", ()), 0)
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer sesame\r\nContent-Length: 1000\r\n\r\n" + b'{"prompt": "' + b"x" * 88)
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while metrics(url).get(("niyama:client_disconnects_total", ()), 0) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metrics(url)[("niyama:client_disconnects_total", ())] == before + 1
    text = log.read_text()
    assert "Traceback" not in text and "unhandled error" not in text, text[-3000:]


def test_models_need_the_key_health_and_metrics_do_not(hardened):
    """Issue 29 item 10 (and item 12's HEAD /health)."""
    url, _ = hardened
    with httpx.Client(timeout=30) as c:
        for path in ("/v1/models", f"/v1/models/{MODEL}"):
            r = c.get(f"{url}{path}")
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert c.get(f"{url}{path}", headers=KEY).status_code == 200
        assert c.get(f"{url}/health").status_code == 200 and c.get(f"{url}/metrics").status_code == 200
        assert c.head(f"{url}/health").status_code == 200


def test_sigterm_ends_requests_in_flight_cleanly(tmp_path_factory):
    """Issue 29 item 7: SIGTERM with --shutdown-grace 2: a long stream ends with an error event and [DONE], a
    long non-streamed request gets a JSON 503, and the process exits 0."""
    url, handle = start_server(tmp_path_factory, "--shutdown-grace", "2")
    proc, log = handle
    try:
        full: dict = {}

        def non_streamed():
            full["r"] = httpx.post(f"{url}/v1/completions", timeout=60,
                                   json={"prompt": "Tell a very long story.", "max_tokens": 1500, "ignore_eos": True})

        t = threading.Thread(target=non_streamed)
        t.start()
        events = []
        body = {"prompt": "Tell another very long story.", "max_tokens": 1500, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=60) as c, c.stream("POST", f"{url}/v1/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data:"):
                    events.append(line[5:].strip())
                    if len(events) == 3:
                        signalled = time.monotonic()
                        proc.send_signal(signal.SIGTERM)
        ended = time.monotonic() - signalled
        t.join(60)
        assert events[-1] == "[DONE]", events[-3:]
        err = json.loads(events[-2])["error"]
        assert err["code"] == "server_shutdown" and err["type"] == "server_error"
        assert len(events) < 1400 and 1.5 < ended < 10, (len(events), ended)
        r = full["r"]
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutdown", r.text
        assert proc.wait(timeout=30) == 0
        assert "Traceback" not in log.read_text()
    finally:
        stop_server(handle)


def test_tokenizations_run_at_most_a_few_at_once(monkeypatch):
    """Issue 29 item 1: a flood of requests does not tokenize many bodies at once (each holds a thread and
    memory): at most `app.TOKENIZE_CONCURRENCY` run together."""
    from niyama.qos import TIER_PRESETS
    from niyama.server import app as app_module
    from niyama.server.errors import APIError
    from niyama.server.request_qos import QoSPolicy

    running, peak = [0], [0]
    lock = threading.Lock()

    def slow_parse(*args, **kwargs):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.2)
        with lock:
            running[0] -= 1
        raise APIError("parsed", 400)

    class Runner:
        info = {"max_position": 2048, "kv_tokens": 4096, "vocab_size": 100, "sampling_defaults": {},
                "mode": "test", "pid": 0}
        tokenizer = None
        metrics = None

    monkeypatch.setattr(app_module, "parse_generation", slow_parse)
    app = app_module.build_app(Runner(), "m", QoSPolicy.build(TIER_PRESETS["default"]))

    async def flood():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
            return await asyncio.gather(*(c.post("/v1/completions", json={"prompt": "x"}) for _ in range(12)))

    answers = asyncio.run(flood())
    assert [r.status_code for r in answers] == [400] * 12
    assert 1 <= peak[0] <= app_module.TOKENIZE_CONCURRENCY < 12
