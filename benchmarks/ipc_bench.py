"""What the engine process's pipe costs per step: one "out" message of the engine core (one new token per
running request, and the step's stats) sent by a spawned process and received here, against the step
times it rides beside (an H100 decode step of Llama-3-8B is ~7-20 ms). Two layouts: flat lists of
request ids and tokens (what the engine core sends) and one `Output` object per request.

    python benchmarks/ipc_bench.py            # prints a table; saves benchmarks/results/ipc_bench.json

The time on the engine's side (building + pickling + writing the message) is what a step pays; the
latency (send -> received and unpickled here) is what a token's delivery pays.
"""

from __future__ import annotations

import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))

from niyama.server.engine_core import Output  # noqa: E402

ROUNDS = 400


def message(n: int, step: int, flat: bool) -> tuple:
    stats = {"time": time.monotonic(), "steps": [{"duration_s": 0.01, "budget": 512, "tokens": 512, "queue_s": [("Q1", 0.1)],
                                                  "relegated": [], "preempted": 0}],
             "kv_free": 100, "kv_blocks": 1000, "running": n, "waiting": 3, "degraded": None}
    if flat:
        return ("out", list(range(n)), [1000 + step] * n, [], stats, {})
    return ("out", [Output(rid, [1000 + step]) for rid in range(n)], stats)


def sender(conn, sizes, ack) -> None:
    for n, flat in sizes:
        for step in range(ROUNDS):
            t0 = time.perf_counter()
            msg = message(n, step, flat)
            conn.send((time.monotonic(), msg))
            conn.send(("cost", time.perf_counter() - t0))
            ack.recv()                       # one message in flight at a time, as in a step loop
    conn.close()


def main() -> int:
    sizes = [(n, flat) for flat in (True, False) for n in (1, 32, 128, 256, 512)]
    ctx = multiprocessing.get_context("spawn")
    out_read, out_write = ctx.Pipe(duplex=False)
    ack_read, ack_write = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=sender, args=(out_write, sizes, ack_read))
    proc.start()
    out_write.close()
    rows = []
    for n, flat in sizes:
        latency, cost = [], []
        for _ in range(ROUNDS):
            sent_at, _msg = out_read.recv()
            latency.append(time.monotonic() - sent_at)
            cost.append(out_read.recv()[1])
            ack_write.send(None)
        rows.append({"layout": "flat lists" if flat else "Output per request", "requests": n, "engine_side_us_median": 1e6 * statistics.median(cost),
                     "latency_us_median": 1e6 * statistics.median(latency),
                     "latency_us_p99": 1e6 * sorted(latency)[int(0.99 * len(latency))]})
        r = rows[-1]
        print(f"{r['layout']:>18}: {n:>4} requests/step: engine side {r['engine_side_us_median']:7.1f} us, delivered in "
              f"{r['latency_us_median']:7.1f} us (p99 {r['latency_us_p99']:7.1f} us)")
    proc.join()
    path = Path(__file__).parent / "results" / "ipc_bench.json"
    path.write_text(json.dumps({"rounds": ROUNDS, "rows": rows}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
