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


def turn(step: int) -> tuple:
    """The layouts in round `step`'s order: they take turns round by round, and each goes first as often as the
    others (the first message after a pause pays the other process's wake-up: ~4 us here, a bias otherwise)."""
    k = step % len(LAYOUTS)
    return LAYOUTS[k:] + LAYOUTS[:k]


def message(n: int, step: int, layout: str) -> tuple:
    if layout == "tuples":
        stats = {"time": time.monotonic(), "steps": [{"duration_s": 0.01, "predicted_s": 0.011, "budget": 512,
                                                      "tokens": 512, "queue_s": [("Q1", 0.1)], "relegated": [],
                                                      "preempted": 0}],
                 "kv_free": 100, "kv_blocks": 1000, "running": n, "waiting": 3, "degraded": None, "admitted": [],
                 "correction": None}
        return ("out", list(range(n)), [1000 + step] * n, [], stats, {})
    stats = EngineStats(time.monotonic(), 100, 1000, n, 3, None,                  # as LLMEngine.stats makes it
                        [StepRecord(0.01, 0.011, 512, 512, [("Q1", 0.1)], [], 0)], None, [], None)
    if layout.startswith("typed"):
        return StepOutputs(list(range(n)), [1000 + step] * n, [], stats, {})
    return StepOutputs([], [], [Output(rid, [1000 + step]) for rid in range(n)], stats, {})


SIZES = (1, 32, 128, 256, 512)


def send(conn, n: int, step: int, layout: str) -> None:
    t0 = time.perf_counter()
    msg = message(n, step, layout)
    if layout == "typed (wire)":       # as engine_core.py sends it
        conn.send_bytes(pickle.dumps((time.monotonic(), msg.to_wire()), protocol=pickle.HIGHEST_PROTOCOL))
    else:
        conn.send((time.monotonic(), msg))
    conn.send(("cost", time.perf_counter() - t0))


def receive(conn, layout: str) -> tuple[float, float]:
    """(latency, the sender's cost) of the next message."""
    if layout == "typed (wire)":       # as engine_client.py receives it
        sent_at, wire = pickle.loads(conn.recv_bytes())
        StepOutputs.from_wire(wire)
    else:
        sent_at, _msg = conn.recv()
    latency = time.monotonic() - sent_at
    return latency, conn.recv()[1]


def sender(conn, ack) -> None:
    # the layouts take turns round by round, so that a machine's drift (this one's is large) hits them alike
    for n in SIZES:
        for step in range(ROUNDS):
            for layout in turn(step):
                send(conn, n, step, layout)
                ack.recv()                       # one message in flight at a time, as in a step loop
    conn.close()


def main() -> int:
    ctx = multiprocessing.get_context("spawn")
    out_read, out_write = ctx.Pipe(duplex=False)
    ack_read, ack_write = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=sender, args=(out_write, ack_read))
    proc.start()
    out_write.close()
    rows = []
    for n in SIZES:
        got = {layout: ([], []) for layout in LAYOUTS}
        for step in range(ROUNDS):
            for layout in turn(step):
                latency, cost = receive(out_read, layout)
                got[layout][0].append(latency)
                got[layout][1].append(cost)
                ack_write.send(None)
        for layout, (latency, cost) in got.items():
            rows.append({"layout": layout, "requests": n, "engine_side_us_median": 1e6 * statistics.median(cost),
                         "latency_us_median": 1e6 * statistics.median(latency),
                         "latency_us_p99": 1e6 * sorted(latency)[int(0.99 * len(latency))]})
            r = rows[-1]
            print(f"{r['layout']:>18}: {n:>4} requests/step: engine side {r['engine_side_us_median']:7.1f} us, "
                  f"delivered in {r['latency_us_median']:7.1f} us (p99 {r['latency_us_p99']:7.1f} us)")
    proc.join()
    path = Path(__file__).parent / "results" / "ipc_bench.json"
    path.write_text(json.dumps({"rounds": ROUNDS, "rows": rows}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
