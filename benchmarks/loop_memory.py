"""Does the server's engine loop keep anything that grows? Run it for a long time and watch its memory.

The server's engine is `EngineCore` over an `LLMEngine` (by default the `tiny` dummy shape on the CPU, so that
the loop runs at the pace of a GPU server's, >= 50 steps/s; `--model default` takes SmolLM2-135M), fed over its
pipes exactly as the HTTP process feeds it (`AddRequest` in, `StepOutputs` out); here a driver thread keeps
`--inflight` requests in it, adding one whenever one ends, and the core runs on a thread of this process so
that one resident set size (RSS, /proc/self/status) covers both. Every `--sample-s` the RSS, the steps run
and the requests finished are written down; the verdict is the RSS growth from the end of the warm-up to the
end, which must stay under 5 MB (a loop that kept one float per step would not notice over a run this
short; one that kept every finished request or every step's record would).

    OMP_NUM_THREADS=1 python benchmarks/loop_memory.py                   # 30 minutes; prints and saves
    python benchmarks/loop_memory.py --minutes 2 --warmup-minutes 0.5    # a quick look

Saves benchmarks/results/loop_memory.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))

from niyama.engine import EngineConfig, LLMEngine  # noqa: E402
from niyama.engine.sampling import SamplingParams  # noqa: E402
from niyama.messages import AddRequest, Shutdown, StepOutputs  # noqa: E402
from niyama.qos import DeadlineRule, Priority, load_tiers  # noqa: E402
from niyama.replica import Recorder  # noqa: E402
from niyama.server.engine_core import EngineCore  # noqa: E402


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="a dummy shape (default tiny: the loop, not the model, is "
                    "under test, and SmolLM2-135M steps at ~10/s on 2 cores) or 'default' for SmolLM2-135M")
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--warmup-minutes", type=float, default=3.0, help="growth is measured from here")
    ap.add_argument("--inflight", type=int, default=8, help="requests kept in the engine")
    ap.add_argument("--prompt-tokens", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--sample-s", type=float, default=10.0)
    ap.add_argument("--attach-recorder", action="store_true",
                    help="attach the simulator's Recorder, as a server must not: shows what this benchmark catches")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "loop_memory.json"))
    args = ap.parse_args()

    engine = LLMEngine(EngineConfig() if args.model == "default" else
                       EngineConfig(model=args.model, load_format="dummy"))
    tiers = load_tiers("default")
    engine.set_tiers(tiers, DeadlineRule())
    if args.attach_recorder:
        engine.replica.recorder = Recorder(engine.replica.iteration)
    cmd_read, cmd_write = multiprocessing.Pipe(duplex=False)
    out_read, out_write = multiprocessing.Pipe(duplex=False)
    core = EngineCore(engine, cmd_read, out_write)
    runner = threading.Thread(target=core.run, name="engine-core", daemon=True)
    runner.start()

    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    next_rid = 0
    counts = {"steps": 0, "finished": 0, "tokens": 0, "errors": 0}

    def add() -> None:
        nonlocal next_rid
        ids = [rng.randrange(vocab) for _ in range(args.prompt_tokens)]
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.7, top_p=0.9, ignore_eos=True)
        cmd_write.send(AddRequest(next_rid, ids, params, tiers[0], Priority.IMPORTANT, time.monotonic()))
        next_rid += 1

    for _ in range(args.inflight):
        add()
    t0 = time.monotonic()
    end = t0 + args.minutes * 60
    samples = []
    next_sample = t0
    while True:
        now = time.monotonic()
        if now >= next_sample:
            samples.append({"t_s": now - t0, "rss_mb": rss_mb(), **counts,
                            "python_objects": len(gc.get_objects())})
            s = samples[-1]
            print(f"{s['t_s']:7.0f} s  rss {s['rss_mb']:7.1f} MB  steps {s['steps']:>8}  finished "
                  f"{s['finished']:>6}  objects {s['python_objects']:>8}", flush=True)
            next_sample += args.sample_s
            if now >= end:
                break
        if not out_read.poll(0.5):
            continue
        msg = StepOutputs.from_wire(out_read.recv())      # as the HTTP side reads it (engine_client.py)
        counts["steps"] += len(msg.stats.steps)
        counts["tokens"] += len(msg.rids)
        for o in msg.ends:
            counts["finished"] += 1
            counts["errors"] += o.error is not None
            add()
    cmd_write.send(Shutdown())
    runner.join(30)

    warm = next(s for s in samples if s["t_s"] >= args.warmup_minutes * 60)
    last = samples[-1]
    span = last["t_s"] - warm["t_s"]
    result = {
        "model": engine.model_name, "recorder_attached": args.attach_recorder, "inflight": args.inflight, "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens, "sampling": "temperature 0.7, top_p 0.9", "minutes": args.minutes,
        "warmup_minutes": args.warmup_minutes,
        "steps_per_s": (last["steps"] - warm["steps"]) / span,
        "rss_growth_after_warmup_mb": last["rss_mb"] - warm["rss_mb"],
        "rss_mb_warm": warm["rss_mb"], "rss_mb_end": last["rss_mb"], "rss_mb_max_after_warmup":
            max(s["rss_mb"] for s in samples if s["t_s"] >= warm["t_s"]),
        "objects_growth_after_warmup": last["python_objects"] - warm["python_objects"],
        "steps": last["steps"], "finished": last["finished"], "errors": last["errors"],
        "samples": samples}
    print(f"\n{result['steps']} steps ({result['steps_per_s']:.1f}/s after warm-up), {result['finished']} requests "
          f"finished, {result['errors']} errors; RSS {warm['rss_mb']:.1f} MB at {warm['t_s']:.0f} s -> "
          f"{last['rss_mb']:.1f} MB at {last['t_s']:.0f} s: growth {result['rss_growth_after_warmup_mb']:+.2f} MB "
          f"(Python objects {result['objects_growth_after_warmup']:+d})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
