"""`niyama run-batch`: an OpenAI Batch API input file through a model offline (like `vllm run-batch`): the
server's app with an in-process engine, its Batch API service in a directory of its own, no HTTP."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path

from . import serve
from .common import add_engine_options, check_policy, engine_config_from_args, parse_policy_options

EXAMPLES = """examples:
  niyama run-batch requests.jsonl -o results.jsonl          # the default model on CPU
  niyama run-batch requests.jsonl -o results.jsonl --model ~/models/Llama-3.1-8B-Instruct --device cuda

each input line (OpenAI's batch format; every line the same url, /v1/chat/completions or /v1/completions):
  {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
   "body": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}}
each output line, in input order: {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}
"""


def add_parser(sub) -> None:
    p = sub.add_parser("run-batch", help="run an OpenAI Batch API input file (JSONL) through a model offline",
                       description="Answer every request of a Batch API input file with a model, as `niyama serve`'s "
                                   "Batch API would (docs/batches.md), without a server; results in input order, "
                                   "failed lines included with their error.", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="INPUT", help="the requests: a JSONL file in OpenAI's batch input format")
    p.add_argument("-o", "--output", required=True, help="where to write the results (JSONL)")
    p.add_argument("--completion-window", default="24h", metavar="DURATION",
                   help="the lines' deadline, as a batch's completion_window: 24h, 2h, 10m, 30s; lines not answered "
                        "by then are written as batch_expired errors (default 24h)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("serving (as `niyama serve` takes them)")
    for add in (serve.add_name_option, serve.add_length_option, serve.add_scheduling_options, serve.add_seed_option):
        add(g)
    add_engine_options(p, chat=True)
    serve.add_batch_options(p, serving=False)
    p.set_defaults(run=run, model_arg=None)


def run(args) -> int:
    from ..qos import load_tiers
    from ..server.app import Limits, build_app
    from ..server.request_qos import QoSPolicy
    from ..server.start import start_engine
    from .serve import batch_config, check_tokenizer, model_from_args

    source = Path(args.input)
    if not source.is_file():
        raise FileNotFoundError(f"no such input file: {source}")
    args.model = model_from_args(args)
    check_policy(args.policy)
    options = parse_policy_options(args.policy, args.opt)
    config = engine_config_from_args(args, policy=args.policy, policy_options=options, profile=args.profile,
                                     max_num_seqs=args.max_num_seqs, seed=args.seed)
    if config.tokenizer or config.chat_template:
        check_tokenizer(config)
    tiers = load_tiers("default")
    engine = start_engine(config, tiers, in_process=True)
    name = args.served_model_name or engine.info["model_name"]
    print(engine.info["describe"], file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="niyama-run-batch-") as state:
        app = build_app(engine, name, QoSPolicy.build(tiers), Limits(max_model_len=args.max_model_len),
                        batch_config(args, Path(state)))
        batch = asyncio.run(run_file(app, source, Path(args.output), args.completion_window, not args.quiet))
    counts = batch["request_counts"]
    print(f"{counts['total']} requests: {counts['completed']} answered, {counts['failed']} failed ({batch['status']})"
          f" -> {args.output}", file=sys.stderr)
    return 0 if batch["status"] == "completed" else 1


async def run_file(app, source: Path, output: Path, window: str, progress: bool) -> dict:
    from tqdm import tqdm

    from ..server.errors import APIError

    async with app.router.lifespan_context(app):
        service = app.state.batches
        try:
            file = await service.add_file(source, source.name)
            batch = await service.create(file["id"], first_url(source), window)
        except APIError as e:
            raise ValueError(e.message) from None
        if batch["status"] == "failed":
            raise ValueError(f"{source} is not a valid batch input file:\n  " +
                             "\n  ".join(e["message"] for e in batch["errors"]["data"]))
        with tqdm(total=batch["request_counts"]["total"], unit="line", file=sys.stderr, disable=not progress,
                  desc="run-batch") as bar:
            while batch["status"] in ("in_progress", "finalizing", "cancelling"):
                await asyncio.sleep(0.25)
                batch = await service.batch(batch["id"])
                counts = batch["request_counts"]
                bar.update(counts["completed"] + counts["failed"] - bar.n)
        store = await service.store()
        order = await service.call(store.custom_ids, batch["id"])
        results = [store.file_path(batch[key]) for key in ("output_file_id", "error_file_id") if batch[key]]
        await asyncio.to_thread(merge, order, results, output)
    return batch


def first_url(source: Path) -> str:
    """The endpoint of a batch: the first line's url (the batch's checks hold every line to it)."""
    with open(source, "rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    url = json.loads(raw).get("url")
                except (ValueError, AttributeError):
                    break
                return url if isinstance(url, str) else "/v1/chat/completions"
    return "/v1/chat/completions"


def merge(order: list[str], results: list[Path], output: Path) -> None:
    """The output and error files (each in input order) as one file in input order, written whole or not at all."""
    files = [open(path) for path in results]
    try:
        heads = [next(f, None) for f in files]
        keys = [json.loads(h)["custom_id"] if h else None for h in heads]
        partial = output.with_name(output.name + ".part")
        with open(partial, "w") as out:
            for custom_id in order:
                k = keys.index(custom_id)
                out.write(heads[k])
                heads[k] = next(files[k], None)
                keys[k] = json.loads(heads[k])["custom_id"] if heads[k] else None
        os.replace(partial, output)
    finally:
        for f in files:
            f.close()
