"""The Batch API (/v1/files, /v1/batches) against real servers on 127.0.0.1 (default model, CPU) through the
official `openai` client: the whole flow, expiry, cancel, validation and limits, a SIGKILLed server that
resumes its batch without re-running answered lines, and `niyama run-batch`."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from test_server import KV_TOKENS, MODEL, start_server, stop_server, wait_all_blocks_free  # noqa: E402

CHAT = "/v1/chat/completions"


def line(custom_id: str, content: str = "Say hi", max_tokens: int = 4, url: str = CHAT, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url,
            "body": {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                     **body}}


def jsonl(lines: list) -> bytes:
    return "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()


def long_line(custom_id: str) -> dict:
    return line(custom_id, "Tell a long story.", max_tokens=400, ignore_eos=True)


def submit(client, lines: list, window: str = "24h"):
    file = client.files.create(file=("requests.jsonl", jsonl(lines)), purpose="batch")
    return client.batches.create(input_file_id=file.id, endpoint=CHAT, completion_window=window)


def wait(client, batch_id: str, until=lambda b: b.status in ("completed", "failed", "expired", "cancelled"),
         limit_s: float = 60):
    start = time.monotonic()
    while True:
        batch = client.batches.retrieve(batch_id)
        if until(batch):
            return batch
        assert time.monotonic() - start < limit_s, batch
        time.sleep(0.1)


def lines_of(client, file_id: str | None) -> list[dict]:
    return [] if file_id is None else [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("batches")
    url, handle = start_server(tmp_path_factory, "--data-dir", str(data), "--batch-min-window", "1s",
                               "--batch-max-file-bytes", "16384", "--batch-max-lines", "20",
                               "--batch-max-active", "2", "--batch-concurrency", "8")
    yield url
    stop_server(handle)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def test_openai_client_files_batches_and_content(client):
    lines = [line(f"q{i}", f"Count to {i}.", ignore_eos=True) for i in range(4)]
    lines[1]["body"]["tier"] = "Q1"                  # replaced: the window is every line's deadline
    file = client.files.create(file=("requests.jsonl", jsonl(lines)), purpose="batch")
    assert (file.object, file.purpose, file.bytes, file.filename) == ("file", "batch", len(jsonl(lines)),
                                                                       "requests.jsonl")
    assert client.files.retrieve(file.id).id == file.id and client.files.content(file.id).content == jsonl(lines)
    batch = client.batches.create(input_file_id=file.id, endpoint=CHAT, completion_window="24h",
                                  metadata={"job": "test"})
    assert batch.status == "in_progress" and batch.request_counts.total == 4 and batch.metadata == {"job": "test"}
    assert batch.expires_at - batch.created_at == 24 * 3600
    done = wait(client, batch.id)
    assert done.status == "completed" and done.error_file_id is None and done.errors is None
    assert (done.request_counts.completed, done.request_counts.failed) == (4, 0)
    assert done.completed_at >= done.finalizing_at >= done.in_progress_at and done.usage.output_tokens == 16
    out = lines_of(client, done.output_file_id)
    assert [o["custom_id"] for o in out] == ["q0", "q1", "q2", "q3"]
    for o in out:
        assert o["id"].startswith("batch_req_") and o["error"] is None and o["response"]["status_code"] == 200
        body = o["response"]["body"]
        assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] == 4
        assert body["niyama"]["tier"] == "custom"    # a batch-tier request with its own TTLT target
    assert [b.id for b in client.batches.list()] == [batch.id]
    listed = [f.id for f in client.files.list()]
    assert listed == [done.output_file_id, file.id]                 # newest first
    first = client.files.list(limit=1)
    assert first.has_more and [f.id for f in first.data] == listed[:1]
    assert [f.id for f in client.files.list(limit=1, after=first.data[0].id).data] == listed[1:]
    assert client.files.retrieve(done.output_file_id).purpose == "batch_output"
    assert client.files.delete(file.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.content(file.id)


def test_window_passing_expires_the_batch(client, server):
    lines = [line("short", max_tokens=2)] + [long_line(f"long{i}") for i in range(3)]
    batch = submit(client, lines, window="4s")
    assert batch.expires_at - batch.created_at == 4
    start = time.monotonic()
    done = wait(client, batch.id)
    assert done.status == "expired" and done.expired_at is not None and time.monotonic() - start < 15
    answered = {o["custom_id"] for o in lines_of(client, done.output_file_id)}
    errors = lines_of(client, done.error_file_id)
    assert {e["custom_id"] for e in errors} | answered == {x["custom_id"] for x in lines}
    assert not answered & {e["custom_id"] for e in errors}
    assert {f"long{i}" for i in range(3)} <= {e["custom_id"] for e in errors}
    for e in errors:
        assert e["response"] is None and e["error"]["code"] == "batch_expired"
    assert done.request_counts.completed == len(answered) and done.request_counts.failed == len(errors)
    health, _ = wait_all_blocks_free(server)             # the lines in flight were aborted
    assert health["kv_blocks_free"] == health["kv_blocks"]


def test_cancel_keeps_answered_lines_and_active_batches_are_bounded(client, server):
    first = submit(client, [line("a", max_tokens=2), line("b", max_tokens=2)] + [long_line(f"l{i}") for i in range(3)])
    second = submit(client, [long_line("x")])
    with pytest.raises(openai.RateLimitError) as full:        # --batch-max-active 2
        submit(client, [line("c")])
    assert "--batch-max-active" in full.value.message
    wait(client, first.id, until=lambda b: b.request_counts.completed >= 2)
    cancelling = client.batches.cancel(first.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at is not None
    client.batches.cancel(second.id)
    done = wait(client, first.id)
    assert done.status == "cancelled" and done.cancelled_at is not None
    assert [o["custom_id"] for o in lines_of(client, done.output_file_id)] == ["a", "b"]
    errors = lines_of(client, done.error_file_id)
    assert [e["custom_id"] for e in errors] == ["l0", "l1", "l2"]
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    assert (done.request_counts.completed, done.request_counts.failed) == (2, 3)
    assert wait(client, second.id).status == "cancelled"
    with pytest.raises(openai.ConflictError, match="only a batch in progress"):
        client.batches.cancel(first.id)
    health, _ = wait_all_blocks_free(server)
    assert health["kv_blocks_free"] == health["kv_blocks"]


def test_bad_input_is_refused_or_reported_as_openai_does(client, server):
    def status_of(call) -> tuple[int, str]:
        with pytest.raises(openai.APIStatusError) as e:
            call()
        return e.value.status_code, e.value.message

    good = jsonl([line("1")])
    assert status_of(lambda: client.files.create(file=("f.jsonl", good), purpose="fine-tune"))[0] == 400
    code, message = status_of(lambda: client.files.create(file=("f.jsonl", b"x" * 20000), purpose="batch"))
    assert code == 413 and "--batch-max-file-bytes" in message
    r = httpx.post(f"{server}/v1/files", json={"purpose": "batch"}, timeout=10)
    assert r.status_code == 415 and "multipart/form-data" in r.json()["error"]["message"]
    file = client.files.create(file=("f.jsonl", good), purpose="batch")
    for kwargs, want in ((dict(input_file_id="file-nope"), 404), (dict(endpoint="/v1/embeddings"), 400),
                         (dict(completion_window="48h"), 400), (dict(completion_window="soon"), 400)):
        args = dict(input_file_id=file.id, endpoint=CHAT, completion_window="24h") | kwargs
        code, message = status_of(lambda: client.batches.create(**args))
        assert code == want, message
    assert "from 1s to 24h" in status_of(lambda: client.batches.create(input_file_id=file.id, endpoint=CHAT,
                                                                       completion_window="25h"))[1]
    code, message = status_of(lambda: submit(client, [line(str(i)) for i in range(21)]))   # --batch-max-lines 20
    assert code == 400 and "split it into several batches" in message
    r = httpx.post(f"{server}/v1/batches", json={"input_file_id": 5, "endpoint": CHAT, "completion_window": "24h"},
                   timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "input_file_id"

    bad = [line("1"), "not json", {**line("x"), "custom_id": None}, line("1"), line("5", url="/v1/completions"),
           {**line("6"), "method": "GET"}, {**line("7"), "body": [1]}]
    failed = submit(client, bad)
    assert failed.status == "failed" and failed.failed_at is not None and failed.request_counts.total == 0
    found = {e.line: e.code for e in failed.errors.data}
    assert found == {2: "invalid_json_line", 3: "missing_required_parameter", 4: "duplicate_custom_id",
                     5: "invalid_url", 6: "invalid_method", 7: "invalid_body"}
    assert all(f"line {e.line}" in e.message for e in failed.errors.data)

    mixed = wait(client, submit(client, [line("ok", max_tokens=2), line("bad", max_tokens="two")]).id)
    assert mixed.status == "completed" and (mixed.request_counts.completed, mixed.request_counts.failed) == (1, 1)
    [error] = lines_of(client, mixed.error_file_id)
    assert error["custom_id"] == "bad" and error["error"] is None and error["response"]["status_code"] == 400
    assert error["response"]["body"]["error"]["param"] == "max_tokens"
    assert [o["custom_id"] for o in lines_of(client, mixed.output_file_id)] == ["ok"]


def test_a_killed_server_resumes_its_batch_without_rerunning_answered_lines(tmp_path_factory):
    data = tmp_path_factory.mktemp("resume")
    lines = [line(f"r{i}", f"Name a color, {i}.", max_tokens=8, ignore_eos=True) for i in range(8)]
    url, handle = start_server(tmp_path_factory, "--data-dir", str(data), "--batch-concurrency", "2")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        engine_pid = httpx.get(f"{url}/health", timeout=10).json()["engine"]["pid"]
        batch = submit(client, lines)
        wait(client, batch.id, until=lambda b: b.request_counts.completed >= 2)
        handle[0].send_signal(signal.SIGKILL)
        handle[0].wait(timeout=10)
    finally:
        if handle[0].poll() is None:
            handle[0].kill()
    with sqlite3.connect(data / "batches.sqlite3") as db:
        before = dict(db.execute("SELECT custom_id, result FROM lines WHERE state = 'completed'").fetchall())
    assert 2 <= len(before) < len(lines), "kill the server mid-batch"

    url, handle = start_server(tmp_path_factory, "--data-dir", str(data), "--batch-concurrency", "2")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        done = wait(client, batch.id)
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    finally:
        stop_server(handle)
    wait_gone(engine_pid)                 # the killed server's engine left once its pipe closed
    assert done.status == "completed" and done.request_counts.completed == len(lines)
    output = client_free_lines(data, done.output_file_id)
    assert [json.loads(x)["custom_id"] for x in output] == [x["custom_id"] for x in lines]
    for text in output:                   # answered before the kill: the very same stored bytes
        custom_id = json.loads(text)["custom_id"]
        if custom_id in before:
            assert text == before[custom_id]
    ran_after = sum(float(m.rsplit(" ", 1)[1]) for m in metrics.splitlines()
                    if m.startswith("niyama:request_success_total{"))
    with sqlite3.connect(data / "batches.sqlite3") as db:
        attempts = dict(db.execute("SELECT custom_id, attempts FROM lines").fetchall())
    assert all(attempts[c] == 1 for c in before)
    in_flight_at_kill = sum(attempts.values()) - len(lines)    # submitted before the kill, answered after
    assert 0 <= in_flight_at_kill <= 2 and ran_after == len(lines) - len(before)


def client_free_lines(data, file_id: str) -> list[str]:
    return (data / "files" / file_id).read_text().splitlines()


def wait_gone(pid: int, limit_s: float = 30) -> None:
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    pytest.fail(f"the killed server's engine process {pid} was still running after {limit_s} s")


def test_freed_slots_go_to_the_batch_whose_window_ends_first():
    import asyncio

    from niyama.server.batch_runner import Slots

    async def run() -> tuple[list[str], Slots]:
        slots, order = Slots(2), []

        async def line(name: str, deadline: float):
            await slots.acquire(deadline)
            order.append(name)
            await asyncio.sleep(0.01)
            slots.release()

        lines = [asyncio.create_task(line(n, d)) for n, d in (("a", 9), ("b", 9), ("due late", 9), ("due soon", 1))]
        await asyncio.sleep(0)
        gone = asyncio.create_task(line("cancelled while waiting", 0))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.gather(*lines, gone, return_exceptions=True)
        return order, slots

    order, slots = asyncio.run(run())
    assert order == ["a", "b", "due soon", "due late"] and slots.free == 2 and not slots.waiting


def test_a_data_dir_has_one_owner(tmp_path):
    from niyama.server.batch_store import BatchStore, DataDirBusy

    owner = BatchStore(tmp_path)
    with pytest.raises(DataDirBusy) as busy:
        BatchStore(tmp_path)
    assert f"in use by another niyama process (pid {os.getpid()}); give this one its own --data-dir" in str(busy.value)
    owner.close()
    BatchStore(tmp_path).close()           # free again


def test_run_batch_offline(tmp_path):
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_bytes(jsonl([line("first", max_tokens=3), line("broken", max_tokens=-1), line("last", max_tokens=3)]))
    run = subprocess.run([sys.executable, "-m", "niyama.cli", "run-batch", str(source), "-o", str(output),
                          "--kv-tokens", str(KV_TOKENS)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    out = [json.loads(x) for x in output.read_text().splitlines()]
    assert [o["custom_id"] for o in out] == ["first", "broken", "last"]
    assert [o["response"]["status_code"] for o in out] == [200, 400, 200]
    assert out[0]["response"]["body"]["usage"]["completion_tokens"] == 3
    assert "3 requests: 2 answered, 1 failed" in run.stderr and "run-batch" in run.stderr    # the summary, the bar
