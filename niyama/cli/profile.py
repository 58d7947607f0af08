"""`niyama profile` (time engine steps over a grid of batch shapes) and `niyama fit-predictor` (fit
batch-time models to those times, score them on held-out shapes, write the chosen one as a profile)."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from .common import add_engine_options, engine_config_from_args

PROFILE_EXAMPLES = """examples:
  niyama profile --quick                                    # the default model on this CPU, ~1 min
  OMP_NUM_THREADS=1 niyama profile --shapes 120 --repeats 3 # the CPU run docs/profiling.md reports
  niyama profile --model llama-3-8b --load-format dummy --device cuda --out results/profile/h100.csv
  niyama fit-predictor results/profile/profile.csv

Each shape is one prefill chunk (after cached context) beside decodes of one context; the sample covers
decode-only, prefill-only and mixed steps over the scheduler's budgets (see niyama/engine/profiling.py).
Columns: kind, prefill_tokens, prefill_context, decodes, decode_context (sum over the decodes),
total_tokens, sampled (rows drawn with temperature or penalties), wall_s (median whole-step time), gpu_s
(median CUDA-event span; empty off CUDA), wall_min_s, repeats. KV blocks are scattered and, on GPU
backends, a shape's decode contexts spread around its mean, as in serving. Device, model, dtype and versions go to a sidecar PROFILE.meta.json.
"""

FIT_EXAMPLES = """examples:
  niyama fit-predictor results/profile/profile.csv
  niyama fit-predictor h100.csv --name h100-llama3-8b --out niyama/predictor/data/h100-llama3-8b.json
  niyama fit-predictor profile.csv --model linear --test-share 0.3 --seed 1
  niyama fit-predictor h100.csv results/replay/steps.csv --score-on other-run/steps.csv

Models: linear, the two-regime linear model of the paper's artifact (split at 512 total tokens); spline,
a linear spline in total tokens (knots at powers of two) plus decode count, decode context, prefill
context C, a chunk's attention pairs P * C and P * P / 2, and rows drawn with temperature or penalties,
fitted to relative error. Both are fitted on the training shapes and scored on held-out shapes; the
chosen one is refitted on every row. A replay's steps.csv (the steps of a serving run) can be fitted
beside or instead of a profile CSV; --score-on scores the result on runs it never saw.
"""

QUICK = dict(shapes=20, repeats=2, max_total=256, max_context=1024)


def add_parser(sub) -> None:
    p = sub.add_parser("profile", help="time engine steps over a grid of batch shapes; write a CSV",
                       description="Time whole engine steps (and their GPU span on CUDA) over a seeded sample of "
                                   "batch shapes through the real executor, for `niyama fit-predictor`.",
                       epilog=PROFILE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", type=int, default=600, metavar="N", help="shapes to sample (default 600)")
    p.add_argument("--repeats", type=int, default=5, metavar="K",
                   help="timed runs per shape, the median is kept (default 5; a step over 0.5 s runs twice in all, "
                        "its warm-up counted)")
    p.add_argument("--warmup", type=int, default=1, metavar="W", help="untimed runs per shape first (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shape sample and the token ids (default 0)")
    p.add_argument("--sampling", default="serving", metavar="MIX",
                   help="how the steps' rows draw their tokens: serving (25%% greedy, 60%% chat: temperature 0.7, "
                        "top_p 0.9, 15%% chat + repetition_penalty 1.1), greedy, chat, top-k, chat-penalized, or a "
                        "JSON mix file (default serving)")
    p.add_argument("--quick", action="store_true",
                   help=f"a smoke run: {QUICK['shapes']} shapes of up to {QUICK['max_total']} tokens and "
                        f"{QUICK['max_context']} tokens of context, {QUICK['repeats']} repeats (overrides --shapes "
                        "and --repeats)")
    p.add_argument("--out", default="results/profile/profile.csv", help="the CSV (default results/profile/profile.csv)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_engine_options(p)
    p.set_defaults(run=run_profile)

    f = sub.add_parser("fit-predictor", help="fit batch-time models to a `niyama profile` CSV; write a profile",
                       description="Fit the two-regime linear model and a linear spline to measured step times, "
                                   "report their errors on held-out shapes, and write the chosen model as a "
                                   "profile JSON for --profile.",
                       epilog=FIT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("csv", nargs="+", help="CSVs written by `niyama profile` and/or `niyama replay` (steps.csv), "
                                          "fitted together")
    f.add_argument("--score-on", nargs="+", default=[], metavar="CSV",
                   help="step logs of other runs (replay's steps.csv) to score the chosen profile on, unseen")
    f.add_argument("--out", default=None, help="profile JSON to write (default: beside the CSV, <name>.json)")
    f.add_argument("--name", default=None,
                   help="the profile's name, e.g. h100-llama3-8b (default: measured-<model>-<device>)")
    f.add_argument("--model", default="best", choices=("linear", "spline", "best"),
                   help="model to write: best = lowest held-out mean error (default best)")
    f.add_argument("--time", default="wall", choices=("wall", "wall_min", "gpu"),
                   help="what to fit: wall, the median whole-step time (what the scheduler waits for); wall_min, "
                        "the fastest run (steadier on a machine shared with other work); gpu, the median GPU "
                        "span (default wall)")
    f.add_argument("--test-share", type=float, default=0.25, help="share of shapes held out (default 0.25)")
    f.add_argument("--seed", type=int, default=0, help="seed of the held-out split (default 0)")
    f.set_defaults(run=run_fit)


def run_profile(args) -> int:
    from tqdm import tqdm

    from ..engine import LLMEngine
    from ..engine.profiling import SyntheticSteps, engine_facts, profile, sample_shapes, write_csv
    from ..engine.sampling import SamplingMix
    from ..predictor import DEFAULT_PROFILE
    from ..predictor.fit import meta_path

    shapes_n, repeats = (QUICK["shapes"], QUICK["repeats"]) if args.quick else (args.shapes, args.repeats)
    if shapes_n < 1 or repeats < 1 or args.warmup < 0:
        raise ValueError("--shapes and --repeats must be >= 1, --warmup >= 0")
    t0 = time.perf_counter()
    # The engine's own scheduler plans nothing here: any profile will do, and a warning that the shipped
    # one is of other hardware would only confuse.
    quiet_engine = logging.getLogger("niyama.engine")
    level = quiet_engine.level
    quiet_engine.setLevel(logging.ERROR)
    try:
        engine = LLMEngine(engine_config_from_args(args, profile=DEFAULT_PROFILE, seed=args.seed))
    finally:
        quiet_engine.setLevel(level)
    print(engine.describe())
    mc = engine.model_config
    sampling = SamplingMix.parse(args.sampling)
    steps = SyntheticSteps(engine.executor, engine.allocator, mc.max_position, mc.vocab_size, seed=args.seed,
                           sampling=sampling)
    limits = {"max_total": QUICK["max_total"], "max_context": QUICK["max_context"]} if args.quick else {}
    shapes, skipped = sample_shapes(shapes_n, steps, engine.config.max_num_seqs, seed=args.seed, **limits)
    for kind, lost in skipped.items():
        for why in sorted({why for _, why in lost}):
            same = [shape for shape, w in lost if w == why]
            example = _shape_text(min(same, key=lambda s: s.kv_tokens))
            print(f"skipped {len(same)} {kind} shapes of the grid: {why}; e.g. {example}")
    counts = {k: sum(s.kind == k for s in shapes) for k in ("decode", "prefill", "mixed")}
    print(f"profiling {len(shapes)} shapes ({', '.join(f'{n} {k}' for k, n in counts.items())}), "
          f"{args.warmup} warm-up + {repeats} timed runs each")
    busy_note(engine.device)
    out, rows = Path(args.out), []
    try:
        with tqdm(total=len(shapes), unit="shape", desc="profile", disable=args.quiet, dynamic_ncols=True) as bar:
            for row in profile(steps, shapes, warmup=args.warmup, repeats=repeats, max_shape_s=0.5):
                rows.append(row)
                bar.update(1)
    finally:            # an interrupted or failed run keeps what it measured
        write_csv(rows, out)
        meta = {**engine_facts(engine), "shapes": len(rows), "planned_shapes": len(shapes), "repeats": repeats,
                "warmup": args.warmup, "seed": args.seed, "quick": args.quick, "sampling": sampling.name,
                "skipped": {k: len(v) for k, v in skipped.items()}, "seconds": round(time.perf_counter() - t0, 1)}
        meta_path(out).write_text(json.dumps(meta, indent=1))
    busy = sum(r.wall_s * r.repeats for r in rows)
    print(f"{len(rows)} shapes in {meta['seconds']:.0f} s ({busy:.0f} s of timed steps); wrote {out} and "
          f"{meta_path(out)}")
    print(f"next: niyama fit-predictor {out}")
    return 0


def busy_note(device) -> None:
    """CPU times are only as good as the machine is quiet: say so when other work shares its cores."""
    from ..engine.cpu_threads import busy

    note = busy(0.5) if device.type == "cpu" else None
    if note:
        print(f"note: {note}: other work shares this CPU, step times are noisy")


def _shape_text(s) -> str:
    parts = []
    if s.prefill_tokens:
        parts.append(f"a {s.prefill_tokens}-token chunk after {s.prefill_context} cached")
    if s.num_decodes:
        parts.append(f"{s.num_decodes} decodes x {s.decode_context}")
    return " + ".join(parts)


def run_fit(args) -> int:
    from ..predictor.fit import error_summary, fit_spline, fit_two_regime, meta_path, read_steps, split_by_shape
    from ..predictor.profiles import DATA_DIR

    paths = [Path(p) for p in args.csv]
    for path in paths + [Path(p) for p in args.score_on]:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
    rows = [r for path in paths for r in read_steps(path, f"{args.time}_s")]
    path = paths[0]
    meta = json.loads(meta_path(path).read_text()) if meta_path(path).is_file() else {}
    name = args.name or f"measured-{meta.get('model', path.stem)}-{meta.get('device_type', 'unknown')}"
    fitters = {"linear": fit_two_regime, "spline": fit_spline}
    train, test = split_by_shape(rows, args.test_share, args.seed)
    print(f"{len(rows)} measured steps from {', '.join(map(str, paths))}: {len(train)} to fit, {len(test)} held out "
          f"(seed {args.seed})" + (f"; {meta['model']} on {meta['device']} ({meta['dtype']})" if meta else ""))
    scores = {}
    for model, fit in fitters.items():
        scores[model] = error_summary(fit(train, name=name), test)
    print(format_scores(scores))
    chosen = args.model if args.model != "best" else min(scores, key=lambda m: scores[m]["all"]["mape"])
    profile = fitters[chosen](rows, name=name)
    scored = {}
    for other in args.score_on:           # runs the fit never saw: how the chosen profile predicts them
        scored[other] = error_summary(profile, read_steps(Path(other)))
        print(f"the chosen profile on {other}:\n" + format_scores({chosen: scored[other]}))
    out = Path(args.out) if args.out else path.with_name(f"{name}.json")
    data = profile.to_dict()
    if meta:
        data["measured_on"] = {k: meta[k] for k in ("device", "model", "dtype", "torch", "attention", "cuda_graphs")
                               if k in meta}
    data["held_out"] = {"mape": scores[chosen]["all"]["mape"], "p95": scores[chosen]["all"]["p95"],
                        "shapes": scores[chosen]["all"]["rows"], "time": args.time}
    data["fitted_on"] = [p.name for p in paths]
    if scored:
        data["scored_on"] = {Path(k).name: {"mape": v["all"]["mape"], "p95": v["all"]["p95"], "steps": v["all"]["rows"]}
                             for k, v in scored.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))
    print(f"chose {chosen} ({'lowest held-out mean error' if args.model == 'best' else 'asked for'}), refitted on "
          f"all {len(rows)} shapes; wrote {out}")
    if out.parent.resolve() == DATA_DIR.resolve():
        print(f"shipped by name: --profile {out.stem} (serve, replay, generate, simulate, experiment)")
    else:
        print(f"use it: --profile {out} (serve, replay, generate, simulate, experiment); to ship it by name, "
              f"copy it to niyama/predictor/data/{name}.json")
    return 0


def format_scores(scores: dict) -> str:
    """A table of held-out relative errors: a row per model and kind of step."""
    lines = [f"{'model':<8} {'steps':<8} {'shapes':>6} {'MAPE':>7} {'p95':>7} {'max':>7}"]
    for model, by_kind in scores.items():
        for kind, s in by_kind.items():
            lines.append(f"{model:<8} {kind:<8} {s['rows']:>6} {100 * s['mape']:>6.1f}% {100 * s['p95']:>6.1f}% "
                         f"{100 * s['max']:>6.1f}%")
    return "\n".join(lines)
