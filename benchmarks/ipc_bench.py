"""What the engine process's pipe costs per step: one step message of the engine core (one new token per
running request, and the step's stats) sent by a spawned process and received here, against the step
times it rides beside (an H100 decode step of Llama-3-8B is ~7-20 ms). Three layouts, in the same run:
- "typed (wire)": what the engine core sends now, `messages.StepOutputs` (flat lists of request ids and
  tokens, `EngineStats` with a `StepRecord`) in its plain-tuple wire form, pickled with the C pickler and
  rebuilt as typed objects on arrival;
- "typed (objects)": the same message pickled as NamedTuples (the cost the wire form avoids);
- "tuples": what it sent before the messages were typed, a string-tagged tuple with a stats dict of dicts;
- "Output per request": one `messages.Output` object per running request (why the tokens travel flat).

    python benchmarks/ipc_bench.py            # prints a table; saves benchmarks/results/ipc_bench.json

The time on the engine's side (building + pickling + writing the message) is what a step pays; the
latency (send -> received and unpickled here) is what a token's delivery pays.
"""

from __future__ import annotations

import json
import multiprocessing
import pickle
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))

from niyama.messages import EngineStats, Output, StepOutputs, StepRecord  # noqa: E402

ROUNDS = 1000
LAYOUTS = ("typed (wire)", "typed (objects)", "tuples", "Output per request")


def message(n: int, step: int, layout: str) -> tuple:
    if layout == "tuples":
        stats = {"time": time.monotonic(), "steps": [{"duration_s": 0.01, "predicted_s": 0.011, "budget": 512,
                                                      "tokens": 512, "queue_s": [("Q1", 0.1)], "relegated": [],
                                                      "preempted": 0}],
                 "kv_free": 100, "kv_blocks": 1000, "running": n, "waiting": 3, "degraded": None, "admitted": [],
                 "correction": None}
        return ("out", list(range(n)), [1000 + step] * n, [], stats, {})
    stats = EngineStats(time.monotonic(), 100, 1000, n, 3, None,
                        steps=[StepRecord(0.01, 0.011, 512, 512, [("Q1", 0.1)], [], 0)], admitted=[])
    if layout.startswith("typed"):
        return StepOutputs(list(range(n)), [1000 + step] * n, [], stats, {})
    return StepOutputs([], [], [Output(rid, [1000 + step]) for rid in range(n)], stats, {})


def sender(conn, sizes, ack) -> None:
    for n, layout in sizes:
        for step in range(ROUNDS):
            t0 = time.perf_counter()
            msg = message(n, step, layout)
            if layout == "typed (wire)":       # as engine_core.py sends it
                conn.send_bytes(pickle.dumps((time.monotonic(), msg.to_wire()), protocol=pickle.HIGHEST_PROTOCOL))
            else:
                conn.send((time.monotonic(), msg))
            conn.send(("cost", time.perf_counter() - t0))
            ack.recv()                       # one message in flight at a time, as in a step loop
    conn.close()


def main() -> int:
    sizes = [(n, layout) for n in (1, 32, 128, 256, 512) for layout in LAYOUTS]
    ctx = multiprocessing.get_context("spawn")
    out_read, out_write = ctx.Pipe(duplex=False)
    ack_read, ack_write = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=sender, args=(out_write, sizes, ack_read))
    proc.start()
    out_write.close()
    rows = []
    for n, layout in sizes:
        latency, cost = [], []
        for _ in range(ROUNDS):
            if layout == "typed (wire)":       # as engine_client.py receives it
                sent_at, wire = pickle.loads(out_read.recv_bytes())
                StepOutputs.from_wire(wire)
            else:
                sent_at, _msg = out_read.recv()
            latency.append(time.monotonic() - sent_at)
            cost.append(out_read.recv()[1])
            ack_write.send(None)
        rows.append({"layout": layout, "requests": n, "engine_side_us_median": 1e6 * statistics.median(cost),
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
