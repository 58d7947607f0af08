"""`niyama bench serve` stopped early (--max-duration, Ctrl-C) reports and saves the requests that finished, against
a tiny OpenAI-compatible server on 127.0.0.1 that streams one token every TOKEN_S seconds (no model, seconds-fast)."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("httpx")

TOKEN_S = 0.05


class Handler(BaseHTTPRequestHandler):
    """/v1/models names one model; /v1/completions streams `max_tokens` chunks, then usage and [DONE]."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        body = json.dumps({"data": [{"id": "fake", "owned_by": "test"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.posts += 1
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()           # HTTP/1.0: the body ends when the connection closes
        try:
            for _ in range(req["max_tokens"]):
                time.sleep(TOKEN_S)
                self.wfile.write(b'data: {"choices": [{"text": "x"}]}\n\n')
            usage = {"completion_tokens": req["max_tokens"], "prompt_tokens": len(req["prompt"])}
            self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())
        except (BrokenPipeError, ConnectionResetError):    # the client stopped
            pass


@pytest.fixture
def fake_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.posts = 0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def bench(server, out, *extra):
    return [sys.executable, "-m", "niyama.cli", "bench", "serve", "--url", f"http://127.0.0.1:{server.server_port}",
            "--dataset-name", "random", "--random-input-len", "8", "--random-output-len", "4", "--request-rate", "4",
            "--num-prompts", "40", "--out", str(out), "--quiet", *extra]


def check_partial(out, stopped_by: str):
    summary = json.loads((out / "summary.json").read_text())
    part = summary["partial"]
    assert part["stopped_by"] == stopped_by and part["planned"] == 40
    assert 0 < part["finished"] < 40 and part["finished"] + part["in_flight"] + part["not_sent"] == 40
    assert summary["num_requests"] == part["finished"] and summary["failed"] == 0
    assert len(list(csv.DictReader((out / "records.csv").open()))) == part["finished"]
    res = json.loads((out / "vllm_result.json").read_text())
    assert res["completed"] == part["finished"] and res["num_prompts"] == 40 and res["partial"] == part
    assert res["output_lens"] == [4] * part["finished"]
    return part


def test_max_duration_reports_and_saves_what_finished(fake_server, tmp_path):
    """40 requests at 4/s take ~10 s; stopped after 3 s, about a dozen have finished."""
    r = subprocess.run(bench(fake_server, tmp_path, "--max-duration", "3", "--save-result"), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    part = check_partial(tmp_path, "--max-duration 3 s")
    assert f"PARTIAL: stopped by --max-duration 3 s" in r.stdout
    assert f"{part['finished']} of 40 requests finished" in r.stdout and "(partial)" in r.stdout
    assert "Serving Benchmark Result" in r.stdout and "Traceback" not in r.stderr


def test_ctrl_c_reports_and_saves_what_finished(fake_server, tmp_path):
    # SIGINT as in a terminal: a shell without job control starts background jobs (and so this test, when run
    # in one) with SIGINT ignored, which a child would inherit
    proc = subprocess.Popen(bench(fake_server, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while fake_server.posts < 8 and time.monotonic() < deadline:     # a few requests sent (and so some done)
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    check_partial(tmp_path, "Ctrl-C")
    assert "PARTIAL: stopped by Ctrl-C" in out and "Traceback" not in err


def test_max_duration_must_be_positive(fake_server, tmp_path):
    r = subprocess.run(bench(fake_server, tmp_path, "--max-duration", "0"), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "--max-duration must be > 0" in r.stderr
