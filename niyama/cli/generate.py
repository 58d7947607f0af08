"""`niyama generate`: stream one answer from a model (default: SmolLM2-135M-Instruct on CPU)."""

from __future__ import annotations

import argparse
import sys
import time

from .common import add_engine_options, engine_config_from_args

EXAMPLES = """examples:
  niyama generate "What is the capital of France?"
  niyama generate "Write a haiku about GPUs" --temperature 0.8 --seed 1
  niyama generate "Once upon a time" --no-chat --max-tokens 64 --stop "."
  niyama generate "Hi" --model ~/models/Llama-3.1-8B-Instruct --device cuda
  niyama generate "Hi" --model ~/models/Llama-3.1-8B-Instruct --device cuda --tensor-parallel-size 2
  niyama generate "Hi" --chat-template '{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:'
"""


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="stream a chat answer from a model on this machine",
                       description="Generate text with the niyama engine and stream it to stdout; load and speed "
                                   "figures go to stderr.", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", help="the user message (or, with --no-chat, the raw prompt)")
    p.add_argument("--system", default=None, help="a system message (chat mode)")
    p.add_argument("--no-chat", action="store_true", help="send the prompt as is, without the chat template")
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default 0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: off)")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (default 0: off)")
    g.add_argument("--seed", type=int, default=None, help="seed for sampling (default: random)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-turn token")
    add_engine_options(p, cpu_kv_tokens=GENERATE_CPU_KV_TOKENS, chat=True)
    p.set_defaults(run=run)


GENERATE_CPU_KV_TOKENS = 8192     # one conversation: the default model's whole context, and a quick start


def torch_has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run(args) -> int:
    from ..engine import LLMEngine, SamplingParams
    from ..engine.cpu_threads import THREADS_ENV, set_cpu_threads

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos)
    if args.no_chat and args.chat_template:
        raise ValueError("--chat-template with --no-chat: the prompt is sent as is, no template applies")
    if args.kv_tokens is None and args.device in (None, "cpu") and not torch_has_cuda():
        args.kv_tokens = GENERATE_CPU_KV_TOKENS
    # the engine's device, as it will choose it; nothing runs beside this engine, so no core is held back
    threads = set_cpu_threads(args.device or ("cuda" if torch_has_cuda() else "cpu"), reserve=0)
    engine = LLMEngine(engine_config_from_args(args, policy="fcfs"))
    print(engine.describe(), file=sys.stderr)
    if threads:
        print(f"cpu: {threads[0]} torch thread{'s' * (threads[0] > 1)} ({threads[1]}; {THREADS_ENV} sets it)",
              file=sys.stderr)
    if args.no_chat:
        prompt = args.prompt
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": args.prompt}]
        prompt = engine.chat_prompt(messages)
    t0 = time.perf_counter()
    seq = engine.add_request(prompt, params)
    first = None
    while not seq.finished:
        engine.step()
        text = seq.take_text()
        if text:
            first = first or time.perf_counter()
            sys.stdout.write(text)
            sys.stdout.flush()
    sys.stdout.write(seq.take_text() + "\n")
    elapsed = time.perf_counter() - t0
    n = len(seq.output_ids)
    ttft = (first - t0) * 1000 if first else float("nan")
    print(f"[{n} tokens in {elapsed:.2f} s, first text after {ttft:.0f} ms, {n / elapsed:.1f} tok/s, "
          f"stopped: {seq.finish_reason}]", file=sys.stderr)
    return 0
