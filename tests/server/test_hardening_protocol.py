"""Issue 29's protocol hardening: what an independent probe found, against a real server on 127.0.0.1 (default
model, CPU) and as unit tests of the pure parts: a prompt that cannot fit is refused before it is tokenized,
stop strings are bounded and scanned incrementally, tiny QoS targets are a 400, the schema says what the
server accepts, `niyama serve` with a missing model fails fast, and the batch-time correction logs sparingly."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")

from test_server import free_port, start_server, stop_server  # noqa: E402

from niyama.server.errors import APIError  # noqa: E402

CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    url, handle = start_server(tmp_path_factory)
    yield url, handle[0]
    stop_server(handle)


def rss_mb(pid: int) -> float:
    """VmRSS of a process and its children (the engine process), in MB."""
    total = 0.0
    pids = [pid]
    try:
        children = open(f"/proc/{pid}/task/{pid}/children").read().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    for p in pids:
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


def slowest_health(url: str, work) -> tuple[object, float]:
    """`work()`'s result and the slowest /health answer while it ran (polled from another thread)."""
    slowest, stop = [0.0], threading.Event()

    def poll():
        while not stop.is_set():
            start = time.monotonic()
            httpx.get(f"{url}/health", timeout=60)
            slowest[0] = max(slowest[0], time.monotonic() - start)
            time.sleep(0.01)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        return work(), slowest[0]
    finally:
        stop.set()
        poller.join()


def post(url: str, path: str, body: dict, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=timeout)


def error_of(r: httpx.Response) -> dict:
    assert r.status_code == 400, (r.status_code, r.text[:500])
    return r.json()["error"]


# --- item 1: a prompt that cannot fit is refused before tokenizing -------------------------------------------

@pytest.mark.parametrize("path, make", [
    ("/v1/completions", lambda text: {"prompt": text, "max_tokens": 1}),
    ("/v1/chat/completions", lambda text: {"messages": [{"role": "user", "content": text}], "max_tokens": 1}),
    ("/tokenize", lambda text: {"prompt": text}),
])
def test_a_huge_prompt_is_refused_without_stalling_or_growing_the_server(server, path, make):
    url, proc = server
    # 16.7 MB of text, within the 16 MiB body limit as JSON; encoded before the poller starts (this process's
    # own json.dumps would hold its GIL and delay the poller)
    raw = json.dumps(make("hello world " * 1_390_000)).encode()
    before = rss_mb(proc.pid)
    idle = slowest_health(url, lambda: time.sleep(1))[1]
    r, during = slowest_health(url, lambda: httpx.post(f"{url}{path}", content=raw, timeout=60,
                                                       headers={"Content-Type": "application/json"}))
    err = error_of(r)
    assert err["code"] == "context_length_exceeded" and "context length" in err["message"]
    # 100 ms on a quiet machine; on a busy 2-core one an idle /health alone may take that (before: 16-28 s)
    assert during < max(0.1, 3 * idle), f"/health took {during:.3f} s while the prompt was refused ({idle:.3f} idle)"
    assert rss_mb(proc.pid) - before < 200


def test_the_character_bound_is_safe_for_text_that_fits(server):
    url, _ = server
    r = post(url, "/tokenize", {"prompt": "hello world " * 1000})
    assert r.status_code == 200 and 2000 <= r.json()["count"] <= 2001


def test_max_chars_per_token_comes_from_the_vocabulary():
    from niyama.server.protocol import max_token_chars

    class Fake:
        class _tok:
            normalizer = None

            @staticmethod
            def get_vocab(with_added_tokens=True):
                return {"a": 0, "ĠHello": 1, "<|im_start|>": 2}
    assert max_token_chars(Fake()) == len("<|im_start|>")


# --- item 2: stop strings ---------------------------------------------------------------------------------

@pytest.mark.parametrize("stop, hint", [
    ([f"s{i}" for i in range(17)], "at most 16"),
    ("x" * 257, "256"),
    (["ok", "y" * 257], "256"),
])
def test_too_many_or_too_long_stop_strings_are_a_400(server, stop, hint):
    url, _ = server
    err = error_of(post(url, "/v1/completions", {"prompt": "a", "max_tokens": 1, "stop": stop}))
    assert err["param"].startswith("stop") and hint in err["message"]


def test_sixteen_stop_strings_of_256_characters_are_accepted(server):
    url, _ = server
    r = post(url, "/v1/completions", {"prompt": "a", "max_tokens": 2, "stop": ["z" * 256] * 16})
    assert r.status_code == 200


class CharTokenizer:
    """One character per token id (ord), enough for the Detokenizer."""

    def decode(self, ids, skip_special=True):
        return "".join(chr(i) for i in ids)


def scanned_per_token(length: int) -> float:
    from niyama.engine.text_output import TextOutput

    stops = ["never here", "also absent", "zzzz"]
    out = TextOutput(CharTokenizer(), stop=stops)
    ids = [ord("a") + i % 20 for i in range(length)]
    for n in range(1, length - 100):
        out.update(ids[:n])
    before = out.scanned_chars
    for n in range(length - 100, length + 1):
        out.update(ids[:n])
    assert not out.stopped and out.text == "".join(map(chr, ids))[:len(out.text)]
    return (out.scanned_chars - before) / 101


def test_stop_string_scan_per_token_does_not_grow_with_the_text():
    short, long = scanned_per_token(1_000), scanned_per_token(20_000)
    assert long <= short * 1.1 + 1, (short, long)
    assert short < 100      # new text + the held-back tail per stop string, not the whole text


def test_incremental_stop_scan_finds_a_stop_string_across_tokens():
    from niyama.engine.text_output import TextOutput

    text = "x" * 3000 + "the END here"
    out = TextOutput(CharTokenizer(), stop=["END", "never"])
    ids = [ord(c) for c in text]
    for n in range(1, len(ids) + 1):
        if out.update(ids[:n]):
            break
    assert out.stopped and out.text == "x" * 3000 + "the "
    held = TextOutput(CharTokenizer(), stop=["ENDING"])
    held.update([ord(c) for c in "abcEND"])
    assert held.text == "abc"          # "END" may still become "ENDING": held back


# --- item 8: tiny positive targets -------------------------------------------------------------------------

@pytest.mark.parametrize("targets, field", [
    ({"ttlt_ms": 5e-324}, "ttlt_ms"),
    ({"ttft_ms": 1e-322, "tbt_ms": 50}, "ttft_ms"),
    ({"ttft_ms": 1000, "tbt_ms": 5e-324}, "tbt_ms"),
    ({"ttlt_ms": 1e300}, "ttlt_ms"),
])
def test_tiny_or_huge_targets_are_a_400_naming_the_field(server, targets, field):
    url, _ = server
    err = error_of(post(url, "/v1/completions", {"prompt": "a", "max_tokens": 1, **targets}))
    assert err["param"] == field and field in err["message"]


def test_targets_tier_checks_the_seconds_value():
    from niyama.server.request_qos import targets_tier

    for bad in (5e-324, 0.5, float("inf"), float("nan"), 31 * 86400 * 1000):
        with pytest.raises(APIError) as e:
            targets_tier({"ttlt_ms": bad})
        assert e.value.param == "ttlt_ms"
    assert targets_tier({"ttlt_ms": 1}).ttlt_s == 0.001


# --- item 12: the schema and the server agree --------------------------------------------------------------

def test_schema_says_what_the_server_accepts(server):
    url, _ = server
    spec = httpx.get(f"{url}/openapi.json", timeout=30).json()
    schemas = spec["components"]["schemas"]
    prompt = schemas["CompletionRequest"]["properties"]["prompt"]
    lists = [m for m in prompt["anyOf"] if m.get("type") == "array" and m["items"].get("type") != "integer"]
    assert lists and all(m["minItems"] == 1 and m["maxItems"] == 1 for m in lists)
    cont = schemas["ChatCompletionRequest"]["properties"]["continue_final_message"]
    assert cont.get("enum") == [False, None] or cont.get("const") is False
    assert schemas["DetokenizeRequest"]["properties"]["tokens"]["items"]["minimum"] == 0
    stop = schemas["CompletionRequest"]["properties"]["stop"]
    assert "16" in stop["description"] and "256" in stop["description"]


@pytest.mark.parametrize("path, body, param, words", [
    ("/v1/completions", {"prompt": ["a", "b"], "max_tokens": 1}, "prompt", "one prompt"),
    ("/v1/completions", {"prompt": [[1, 2], [3]], "max_tokens": 1}, "prompt", "one prompt"),
    ("/v1/chat/completions", {"messages": CHAT, "continue_final_message": True}, "continue_final_message",
     "continue_final_message"),
    ("/detokenize", {"tokens": [-1]}, "tokens", ""),
    ("/v1/completions", {"prompt": "a", "max_tokens": 1, "stop_token_ids": [-3]}, "stop_token_ids", "at least 0"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 1, "stream_options": {"include_usage": True}},
     "stream_options", "stream_options is only allowed with stream true"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 1, "stream": False,
                         "stream_options": {"include_usage": True}},
     "stream_options", "stream_options is only allowed with stream true"),
    ("/tokenize", {"prompt": "a", "messages": CHAT}, "prompt", "send one"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 1, "stop_token_ids": [5, 10_000_000]},
     "stop_token_ids", "10000000"),
])
def test_what_the_schema_refuses_or_the_server_ignored_is_a_400(server, path, body, param, words):
    url, _ = server
    err = error_of(post(url, path, body))
    assert err["param"].startswith(param) and words in err["message"], err


def test_stream_options_with_stream_still_work(server):
    url, _ = server
    with httpx.stream("POST", f"{url}/v1/completions", timeout=60, json={
            "prompt": "a", "max_tokens": 2, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        text = r.read().decode()
    assert '"usage"' in text


# --- item 15: niyama serve with a missing model -----------------------------------------------------------

def test_serve_with_a_missing_model_fails_fast_with_one_line():
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "niyama.cli", "serve", "--model", "/nonexistent",
                           "--port", str(free_port())], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    took = time.monotonic() - start
    assert proc.returncode in (1, 2), proc
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "/nonexistent" in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert took < 5, took


# --- item 16: the batch-time correction logs a move at most once a minute per kind of step ------------------

class LinearBase:
    name = "fake"

    def batch_time(self, num_prefill_tokens, num_decode_tokens, decode_context, prefill_context, num_sampled=0):
        return 0.01


def test_batch_time_correction_logs_at_most_once_a_minute_per_kind(caplog):
    from niyama.predictor.online import OnlineCorrection

    now = [0.0]
    online = OnlineCorrection(LinearBase(), clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="niyama.predictor")
    for i in range(1200):                 # 20 minutes, a step a second, the ratio swinging between 0.5x and 2x
        now[0] = float(i)
        measured = 0.02 if (i // 30) % 2 else 0.005
        online.observe(0, 8, 100, 0, measured)       # decode-only
        online.observe(100, 8, 100, 100, measured)   # small
    lines = [r for r in caplog.records if "batch-time correction" in r.getMessage()]
    per_kind = {kind: sum(kind in r.getMessage() for r in lines) for kind in ("decode-only", "small")}
    assert 1 <= per_kind["decode-only"] <= 21 and 1 <= per_kind["small"] <= 21, per_kind
    assert online.ratios["decode-only"] != 1
