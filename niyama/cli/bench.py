"""`niyama bench serve`: replay a trace workload against an OpenAI-compatible server over HTTP."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import time
from dataclasses import asdict
from pathlib import Path

from ..metrics import format_report, summarize, write_records_csv
from ..workload import make_workload
from .common import add_output_options, add_workload_options, trace_help

EXAMPLES = """examples, CPU-sized (the default model, `niyama serve` on a 2-core CPU: one to two minutes each):
  niyama bench serve --dataset-name random --random-input-len 128 --random-output-len 32 --num-prompts 20 \\
      --request-rate 0.5
  niyama bench serve --trace azure-conv --qps 0.5 --requests 20 --max-prompt-tokens 256 --max-output-tokens 32
  niyama bench serve --trace sharegpt --qps 0.25 --requests 40 --max-prompt-tokens 256 --max-output-tokens 32 \\
      --max-duration 120                             # at most 2 minutes: a partial report of what finished

examples, GPU-sized:
  niyama bench serve --url http://127.0.0.1:8000 --trace azure-conv --qps 2 --requests 200
  niyama bench serve --base-url http://127.0.0.1:8000 --request-rate 1 --num-prompts 20 \\
      --endpoint /v1/chat/completions --goodput ttft:2000          # vLLM's flags; vllm_result.json
  niyama bench serve --url http://gpu-box:8000 --model meta-llama/Llama-3.1-8B-Instruct --qos off
  niyama bench serve --backend vllm --host 127.0.0.1 --port 8000 --dataset-name random --random-input-len 1024 \\
      --random-output-len 128 --num-prompts 100 --request-rate 4 --temperature 0.7 --top-p 0.9 --save-result \\
      --result-dir results/                                         # as typed for `vllm bench serve`

Prompts are random token ids of the trace's lengths sent to /v1/completions; outputs are asked for at
the trace's length (ignore_eos). Requests are greedy unless the sampling options say otherwise (chat
clients send --temperature 0.7 --top-p 0.9). TTFT, TBT and TTLT are measured here, on the client. A
niyama server also gets each request's tier and priority (--qos). `vllm bench serve`'s flag names work
too, and vllm_result.json holds its result keys (request_throughput, output_throughput, p99_ttft_ms, ...),
so the same run can be pointed at a vLLM server and at niyama. Without --qps / --request-rate every
request is sent at once (vLLM's default, inf).
"""


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="load-test a running server (`niyama bench serve`)",
                       description="Benchmarks against running servers.")
    bench = p.add_subparsers(dest="bench", required=True, metavar="WHAT")
    s = bench.add_parser("serve", help="replay a workload against an OpenAI-compatible server",
                         description="Replay a trace workload against an OpenAI-compatible server with streaming; "
                                     "print the per-tier report of `niyama simulate`, measured on the client.",
                         epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--url", "--base-url", dest="url", default=None,
                   help="server base URL (default http://HOST:PORT, http://127.0.0.1:8000)")
    s.add_argument("--model", default=None, help="model id to request (default: the first in /v1/models)")
    s.add_argument("--trace", default="azure-conv", help=trace_help() + " (default azure-conv)")
    s.add_argument("--qps", "--request-rate", dest="qps", type=float, default=float("inf"),
                   help="mean arrival rate in requests/s; inf sends all at once (default inf)")
    s.add_argument("--requests", "--num-prompts", dest="requests", type=int, default=200,
                   help="number of requests (default 200)")
    v = s.add_argument_group("vLLM's benchmark options (`vllm bench serve`)")
    v.add_argument("--endpoint", default="/v1/completions", choices=("/v1/completions", "/v1/chat/completions"),
                   help="completions: random token-id prompts of the trace's exact lengths; chat: English text "
                        "of about those lengths (the server's usage gives the exact count) (default completions)")
    v.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the gaps between arrivals: 1 = Poisson, below 1 burstier (default 1)")
    v.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight (default: no limit)")
    v.add_argument("--goodput", nargs="+", default=[], metavar="KEY:MS",
                   help="SLOs a request must meet to count as goodput: ttft:MS tpot:MS e2el:MS")
    v.add_argument("--percentile-metrics", default="ttft,tpot,itl",
                   help="metrics to report percentiles of: ttft, tpot, itl, e2el (default ttft,tpot,itl)")
    v.add_argument("--metric-percentiles", default="99", help="percentiles to report, e.g. 50,90,99 (default 99)")
    v.add_argument("--header", action="append", default=[], metavar="KEY=VALUE", help="an HTTP header (repeatable)")
    v.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="sent as 'Authorization: Bearer KEY' (default: $OPENAI_API_KEY)")
    v.add_argument("--backend", default=None, choices=("vllm", "openai", "openai-chat"),
                   help="vllm / openai: /v1/completions; openai-chat: /v1/chat/completions (default: --endpoint's)")
    v.add_argument("--host", default="127.0.0.1", help="server host, when --base-url is not given (default 127.0.0.1)")
    v.add_argument("--port", type=int, default=8000, help="server port, when --base-url is not given (default 8000)")
    v.add_argument("--dataset-name", default=None, metavar="NAME",
                   help="random: every prompt --random-input-len tokens, every output --random-output-len; a trace "
                        "name (sharegpt, azure-code, azure-conv): as --trace")
    v.add_argument("--random-input-len", type=int, default=1024, help="random dataset: prompt tokens (default 1024)")
    v.add_argument("--random-output-len", type=int, default=128, help="random dataset: output tokens (default 128)")
    v.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="random dataset: lengths drawn uniformly within +- this share of the above (default 0)")
    v.add_argument("--ignore-eos", action="store_true",
                   help="accepted: niyama always asks for each request's exact output length (ignore_eos)")
    v.add_argument("--save-result", action="store_true", help="accepted: the results are always saved (--result-dir)")
    v.add_argument("--result-dir", default=None, help="folder for the results (the same as --out)")
    v.add_argument("--result-filename", default="vllm_result.json", help="name of the vLLM-style result JSON "
                                                                        "(default vllm_result.json)")
    g = s.add_argument_group("sampling (sent in every request; default: greedy)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default 0)")
    for flag, what in (("--top-p", "in (0, 1]"), ("--top-k", "0 or -1 = off"), ("--min-p", "in [0, 1]"),
                       ("--repetition-penalty", "> 0, 1 = off"), ("--presence-penalty", "in [-2, 2]"),
                       ("--frequency-penalty", "in [-2, 2]")):
        g.add_argument(flag, type=int if flag == "--top-k" else float, default=None, help=f"{what} (default: not sent)")
    s.add_argument("--max-prompt-tokens", type=int, default=None, metavar="N",
                   help="clip prompts to N tokens (default: only to the server's max_model_len)")
    s.add_argument("--max-output-tokens", type=int, default=None, metavar="N", help="clip outputs to N tokens")
    s.add_argument("--qos", default="auto", choices=("auto", "tier", "targets", "off"),
                   help="QoS fields to send: tier names, explicit ms targets, or none (default auto: tier names "
                        "to a niyama server that has the workload's tiers, targets to another niyama, off otherwise)")
    s.add_argument("--token-id-range", default="1000,30000", metavar="LO,HI",
                   help="random prompt token ids are drawn from [LO, HI) (default 1000,30000: inside any "
                        "Llama-family vocabulary)")
    s.add_argument("--timeout", type=float, default=3600.0, help="per-request timeout in seconds (default 3600)")
    s.add_argument("--max-duration", type=float, default=None, metavar="S",
                   help="stop the run after S seconds and report the requests that finished by then, as Ctrl-C "
                        "does (default: run until every request is done)")
    add_workload_options(s, admission=False)
    add_output_options(s, "results/bench-serve", "records.csv and summary.json")
    s.set_defaults(run=run)


def run(args) -> int:
    try:
        import httpx
    except ImportError:
        raise ImportError("httpx is missing: `pip install httpx` (or 'niyama[serve]')") from None
    from tqdm import tqdm

    from ..loadgen import (chat_bodies, discover, format_vllm_result, parse_goodput, request_bodies, run_load,
                           to_result, vllm_arrivals, vllm_result)

    if args.requests < 1:
        raise ValueError("--requests must be >= 1")
    if args.max_duration is not None and not args.max_duration > 0:
        raise ValueError("--max-duration must be > 0")
    sampling = {key: getattr(args, key) for key in SAMPLING_FIELDS if getattr(args, key) is not None}
    if args.backend == "openai-chat":
        args.endpoint = "/v1/chat/completions"
    if args.result_dir:
        args.out = args.result_dir
    if args.dataset_name not in (None, "random"):
        args.trace = args.dataset_name
    if not args.qps > 0 or args.burstiness <= 0:
        raise ValueError("--qps / --request-rate and --burstiness must be > 0")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("--max-concurrency must be >= 1")
    goodput = parse_goodput(args.goodput)
    metrics = [m for m in args.percentile_metrics.split(",") if m]
    if not set(metrics) <= {"ttft", "tpot", "itl", "e2el"}:
        raise ValueError(f"--percentile-metrics: choose from ttft, tpot, itl, e2el, got {args.percentile_metrics!r}")
    try:
        percentiles = [float(p) for p in args.metric_percentiles.split(",") if p]
    except ValueError:
        raise ValueError(f"--metric-percentiles: expected numbers, got {args.metric_percentiles!r}") from None
    headers = {}
    for item in args.header:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--header: expected KEY=VALUE, got {item!r}")
        headers[key] = value
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    lo, _, hi = args.token_id_range.partition(",")
    try:
        vocab = (int(lo), int(hi))
    except ValueError:
        raise ValueError(f"--token-id-range: expected LO,HI, got {args.token_id_range!r}") from None
    if not 0 <= vocab[0] < vocab[1]:
        raise ValueError("--token-id-range: need 0 <= LO < HI")
    url = (args.url or f"http://{args.host}:{args.port}").rstrip("/").removesuffix("/v1")
    finite = args.qps != float("inf")
    wl = make_workload(args.trace, args.qps if finite else 1.0, num_requests=args.requests, seed=args.seed,
                       tiers=args.tiers, tier_mix=args.tier_mix, low_priority_fraction=args.low_priority)
    if args.dataset_name == "random":
        wl = random_lengths(wl, args.random_input_len, args.random_output_len, args.random_range_ratio, args.seed)
    arrivals = [s.arrival_s for s in wl.specs]       # Poisson: vLLM's burstiness 1
    if args.burstiness != 1 or not finite:
        arrivals = vllm_arrivals(len(wl), args.qps, args.burstiness, args.seed)

    async def probe():
        async with httpx.AsyncClient(headers=headers) as client:
            return await discover(client, url, args.model)

    target = asyncio.run(probe())
    bodies, clipped = request_bodies(wl, target, args.qos, args.seed, vocab, args.max_prompt_tokens,
                                     args.max_output_tokens, sampling)
    if args.endpoint == "/v1/chat/completions":
        bodies = chat_bodies(bodies, args.seed)
    qos_sent = next((k for k in ("tier", "ttft_ms", "ttlt_ms") if k in bodies[0]), None)
    print(f"{url}: model {target.model!r} ({'niyama' if target.is_niyama else 'not niyama'}); "
          f"{len(wl)} requests at {args.qps:g} QPS from {wl.name}; QoS fields: "
          f"{'tier names' if qos_sent == 'tier' else 'explicit targets' if qos_sent else 'none'}")
    finished = []
    with tqdm(total=len(wl), unit="req", desc=f"bench {wl.name}", disable=args.quiet, dynamic_ncols=True) as bar:
        def progress(outcome):
            bar.update(1)
            finished.append(outcome)

        async def load():
            run = run_load(target, bodies, arrivals, args.timeout, progress, args.endpoint, headers,
                           args.max_concurrency)
            return await (asyncio.wait_for(run, args.max_duration) if args.max_duration else run)

        t0 = time.monotonic()
        stopped = None
        try:
            outcomes = asyncio.run(load())
        except (TimeoutError, asyncio.TimeoutError):
            stopped = f"--max-duration {args.max_duration:g} s"
        except KeyboardInterrupt:
            stopped = "Ctrl-C"
        duration = time.monotonic() - t0
    planned = len(wl)
    partial = None
    if stopped:      # report what finished; the requests still in flight were dropped with the connections
        sent = sum(a <= duration for a in arrivals) - len(finished)      # due and unfinished
        in_flight = min(sent, args.max_concurrency or sent)
        partial = {"stopped_by": stopped, "after_s": round(duration, 2), "planned": planned,
                   "finished": len(finished), "in_flight": in_flight, "not_sent": planned - len(finished) - in_flight}
        print(f"PARTIAL: stopped by {stopped} after {duration:.1f} s: {len(finished)} of {planned} requests "
              f"finished, {in_flight} in flight dropped, {partial['not_sent']} never sent; "
              + ("the report covers the finished ones" if finished else "no report"))
        if not finished:
            return 130 if stopped == "Ctrl-C" else 1
        wl, bodies, outcomes = finished_only(wl, bodies, finished)
    failures = [o for o in outcomes if o.error]
    if clipped:
        print(f"note: {clipped} of {planned} requests had their lengths clipped (max_model_len or --max-*-tokens)")
    rejected = sum(o.rejected for o in failures)
    if rejected:
        print(f"{rejected} of {len(wl)} requests were rejected at arrival (429: deadline infeasible); the report "
              "counts them apart")
    if len(failures) > rejected:
        first = next(o for o in failures if not o.rejected)
        print(f"{len(failures) - rejected} of {len(wl)} requests FAILED; first: {first.error}")
    if len(failures) == len(wl):
        return 1
    result = to_result(wl, outcomes, bodies, f"http:{target.model}")
    summary, records = summarize(result)
    print(format_report(summary))
    dest = Path(args.out)
    write_records_csv(records, dest / "records.csv")
    (dest / "summary.json").write_text(json.dumps({**asdict(summary), "failed": len(failures) - rejected,
                                                   "url": url, "model": target.model, "partial": partial}, indent=1))
    vres = vllm_result(outcomes, bodies, duration, goodput, metrics, percentiles)
    print("\n" + format_vllm_result(vres, metrics, percentiles))
    vres.update({"backend": "openai-chat" if args.endpoint.endswith("chat/completions") else "openai",
                 "model_id": target.model, "base_url": url, "endpoint": args.endpoint, "num_prompts": planned,
                 "request_rate": args.qps, "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
                 "goodput": {k: v * 1000 for k, v in goodput.items()}, "date": time.strftime("%Y%m%d-%H%M%S")})
    vres.update(sampling)
    if partial:
        vres["partial"] = partial
    (dest / args.result_filename).write_text(json.dumps(vres, indent=1))
    print(f"wrote {dest / 'records.csv'}, {dest / 'summary.json'} and {dest / args.result_filename}"
          + (" (partial)" if partial else ""))
    return 130 if stopped == "Ctrl-C" else 0


def finished_only(wl, bodies: list[dict], finished: list):
    """The workload, bodies and outcomes of the requests that finished, renumbered: a stopped run is reported
    as the smaller run it was."""
    keep = sorted(finished, key=lambda o: o.index)
    return (dataclasses.replace(wl, specs=[wl.specs[o.index] for o in keep]), [bodies[o.index] for o in keep],
            [dataclasses.replace(o, index=j) for j, o in enumerate(keep)])


# SamplingParams' sampling fields (engine/sampling.py's MIX_KEYS; not imported: the engine package needs torch,
# the load generator only httpx)
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                   "frequency_penalty")


def random_lengths(wl, input_len: int, output_len: int, range_ratio: float, seed: int):
    """vLLM's random dataset: each request's lengths drawn uniformly within +- `range_ratio` of the given ones
    (exactly them at 0); arrivals and tiers stay the workload's."""
    if input_len < 1 or output_len < 1 or not 0 <= range_ratio < 1:
        raise ValueError("--random-input-len and --random-output-len must be >= 1, --random-range-ratio in [0, 1)")
    rng = random.Random(seed)

    def draw(n: int) -> int:
        return max(1, rng.randint(round(n * (1 - range_ratio)), round(n * (1 + range_ratio))))

    specs = [dataclasses.replace(s, num_prompt_tokens=draw(input_len), num_output_tokens=draw(output_len))
             for s in wl.specs]
    return dataclasses.replace(wl, name=f"random-{input_len}-{output_len}", specs=specs)
