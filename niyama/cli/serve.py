"""`niyama serve`: the OpenAI-compatible HTTP server with per-request QoS."""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import sys
from pathlib import Path

from ..routing import ROUTERS
from .common import (add_admission_option, add_engine_options, add_profile_option, check_policy, engine_config_from_args,
                     parse_policy_options)

EXAMPLES = """examples:
  niyama serve                                          # SmolLM2-135M-Instruct on CPU, port 8000
  niyama serve ~/models/Llama-3.1-8B-Instruct --device cuda   # the model as vLLM takes it (or --model)
  niyama serve --port 8001 --default-tier Q2 --tiers my-tiers.json
  niyama serve --profile measure                        # plan with batch times measured on this machine
  niyama serve --chat-template my-template.jinja        # a chat template other than the model's
  niyama serve --model llama-3-8b --load-format dummy --tokenizer ~/models/Llama-3-8B-Instruct --device cuda
  niyama serve --model llama-3-70b --load-format dummy --device cuda -tp 2   # one engine over 2 GPUs
  niyama serve --replicas 2                             # two engines on a local Ray instance, one endpoint
  niyama serve --replicas 8 --address auto --device cuda --router qos   # on this node's Ray cluster

then:
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"messages": [{"role": "user", "content": "Hi"}], "tier": "Q1", "priority": "important"}'
"""


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API with per-request QoS",
                       description="OpenAI-compatible server (/v1/completions, /v1/chat/completions, /v1/models, "
                                   "/tokenize, /detokenize, /version, /health, /metrics). Requests may name a QoS tier, explicit targets and a "
                                   "priority; see docs/serving.md, 'QoS per request'.", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_arg", nargs="?", default=None, metavar="MODEL",
                   help="the model, as `vllm serve MODEL` takes it: the same as --model (see there)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    add_name_option(p)
    g = p.add_argument_group("access and limits")
    g.add_argument("--api-key", default=os.environ.get("NIYAMA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (/health and /metrics stay open) "
                        "(default: $NIYAMA_API_KEY, else none)")
    g.add_argument("--max-request-bytes", type=int, default=16 * 2**20,
                   help="largest request body; larger ones get 413 (default 16 MiB)")
    add_length_option(g)
    g.add_argument("--max-queued", type=int, default=1024,
                   help="most requests in flight (being read, waiting or running; n choices count n); beyond, "
                        "429 with Retry-After (default 1024)")
    g.add_argument("--max-connections", type=int, default=2048,
                   help="most open HTTP connections and requests at once; beyond, 503 (default 2048; the open-file "
                        "limit is raised to its hard limit at start-up)")
    g.add_argument("--keep-alive-timeout", type=float, default=5.0, metavar="S",
                   help="close a connection idle this long after a response, or one that sends no request this "
                        "long after connecting (default 5)")
    g.add_argument("--shutdown-grace", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, stop accepting and give requests in flight this long to finish; then streams "
                        "end with an error event and [DONE], other requests get 503 (default 30)")
    q = p.add_argument_group("QoS")
    q.add_argument("--tiers", default="default",
                   help="tier set: 'default' (Q1 TTFT 6 s + TBT 50 ms, Q2 TTLT 600 s, Q3 TTLT 1800 s), "
                        "'sharegpt', 'slo-variants' or a JSON file")
    q.add_argument("--default-tier", default=None, help="tier of requests that name none (default: the first)")
    add_admission_option(q)
    q.add_argument("--service-tier-map", default=None, metavar="NAME=TIER,...",
                   help="map OpenAI service_tier values to tiers (default auto,default=the default tier, "
                        "priority,scale=the first interactive tier, flex=the last tier)")
    add_scheduling_options(p.add_argument_group("scheduling"))
    add_engine_options(p, chat=True)
    add_seed_option(p)
    p.add_argument("--in-process-engine", action="store_true",
                   help="run the engine on a thread of the HTTP process instead of its own process (debugging; "
                        "HTTP work then slows the engine's steps)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="uvicorn log level (default info)")
    add_batch_options(p)
    r = p.add_argument_group("several replicas on Ray Serve (needs the cluster extra: pip install 'niyama[cluster]')")
    r.add_argument("--replicas", type=int, default=None, metavar="N",
                   help="serve N engine replicas as a Ray Serve deployment behind this one endpoint (default: one "
                        "engine, no Ray)")
    r.add_argument("--router", default="qos", choices=ROUTERS,
                   help="how a request picks its replica: round-robin, least-loaded (least outstanding tokens) or "
                        "qos (its tier's predicted first token and deadline; see docs/fleets.md) (default qos)")
    r.add_argument("--address", default=None,
                   help="an existing Ray cluster: 'auto' (this node's), or ray://HOST:10001 (default: start a local "
                        "Ray instance)")
    r.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica (default 1)")
    r.add_argument("--replica-gpus", type=float, default=None,
                   help="GPUs per replica (default 1 when the device is CUDA, else 0)")
    p.set_defaults(run=run)


# --- options `niyama run-batch` takes too (it answers requests as this server does) ---
def add_name_option(p) -> None:
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients send (default: the model as given, or smollm2-135m-instruct)")


def add_length_option(p) -> None:
    p.add_argument("--max-model-len", type=int, default=None,
                   help="most prompt + output tokens per request (default: the model's context)")


def add_scheduling_options(p) -> None:
    p.add_argument("--policy", default="niyama", help="scheduling policy, see `niyama policies` (default niyama)")
    add_profile_option(p)
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="override a policy knob")
    p.add_argument("--max-num-seqs", type=int, default=256, help="most requests holding KV at once (default 256)")


def add_seed_option(p) -> None:
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random streams of requests that give no seed (default 0)")


def default_data_dir() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "niyama"


def add_batch_options(p, serving: bool = True) -> None:
    """The Batch API's options; `serving`: all of them (`niyama serve`), else those of `niyama run-batch`."""
    b = p.add_argument_group("Batch API (/v1/files, /v1/batches: docs/batches.md)")
    if serving:
        b.add_argument("--data-dir", default=None,
                       help="where the Batch API keeps its state (SQLite) and files; a batch in progress resumes "
                            f"from there after a restart (default $XDG_DATA_HOME/niyama, else "
                            f"~/.local/share/niyama: here {default_data_dir()}); created on first use")
        b.add_argument("--batch-max-file-bytes", type=int, default=200_000_000,
                       help="largest uploaded file; larger ones get 413 (default 200000000, OpenAI's 200 MB)")
        b.add_argument("--batch-max-lines", type=int, default=50_000,
                       help="most requests in a batch; more: 400 (default 50000, OpenAI's)")
        b.add_argument("--batch-max-active", type=int, default=100,
                       help="most batches in progress at once; beyond, 429 (default 100)")
        b.add_argument("--batch-max-storage-bytes", type=int, default=10 ** 10,
                       help="most bytes of uploaded files kept (at most 10000 files); beyond, 400 until files are "
                            "deleted (default 10000000000)")
        b.add_argument("--batch-min-window", default="1m", metavar="DURATION",
                       help="shortest completion_window a batch may ask for, e.g. 1m or 30s (default 1m; OpenAI's "
                            "only window is 24h, the longest here; windows of seconds are for tests)")
    b.add_argument("--batch-concurrency", type=int, default=256,
                   help="most batch lines in flight at once, over all batches (default 256)")


def batch_config(args, data_dir: Path | None = None):
    """A BatchConfig from the options of add_batch_options; `data_dir` (`niyama run-batch`): a directory of
    its own instead of --data-dir, no limits but --batch-concurrency, windows from 1 s."""
    from ..server.batch_api import BatchConfig
    from ..server.batch_input import parse_duration

    if data_dir is not None:
        return BatchConfig(data_dir=data_dir, max_file_bytes=2 ** 62, max_lines=2 ** 62, max_storage_bytes=2 ** 62,
                           concurrency=args.batch_concurrency, min_window_s=1)
    min_window = parse_duration(args.batch_min_window)
    if not min_window:
        raise ValueError(f"--batch-min-window: expected e.g. 1m, 30s or 2h, got {args.batch_min_window!r}")
    return BatchConfig(data_dir=Path(args.data_dir or default_data_dir()).expanduser(),
                       max_file_bytes=args.batch_max_file_bytes, max_lines=args.batch_max_lines,
                       max_active=args.batch_max_active, max_storage_bytes=args.batch_max_storage_bytes,
                       concurrency=args.batch_concurrency, min_window_s=min_window)


SERVER_CPU_RESERVE = 1      # cores a CPU engine leaves to the HTTP process (engine/cpu_threads.py)


def parse_service_tier_map(text: str | None) -> dict[str, str]:
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"--service-tier-map: expected NAME=TIER, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port") from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def model_from_args(args) -> str | None:
    """MODEL or --model: either will do, both only if they agree."""
    if args.model_arg is not None and args.model is not None and args.model_arg != args.model:
        raise ValueError(f"the model is given twice and differs: MODEL {args.model_arg!r} and --model "
                         f"{args.model!r}; give one of them")
    return args.model if args.model is not None else args.model_arg


def run(args) -> int:
    import uvicorn    # noqa: F401 (a missing server dependency: the CLI says which extra to install)

    from ..engine.cpu_threads import RESERVE_ENV
    from ..qos import ON_INFEASIBLE, load_tiers, with_admission
    from ..server.app import Limits, build_app
    from ..server.request_qos import QoSPolicy
    from ..server.start import serve_http, start_engine

    args.model = model_from_args(args)
    from ..engine.weights import DEFAULT_MODEL
    if (args.load_format != "dummy" and args.address is None and args.model not in (None, "", "default", DEFAULT_MODEL)
            and not Path(args.model).expanduser().exists()):   # one line now, not two tracebacks after 20 s
        raise FileNotFoundError(f"model {args.model!r}: no such file or directory")
    check_policy(args.policy)
    options = parse_policy_options(args.policy, args.opt)
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if args.address is None:                   # (on a Ray cluster the port is its proxies', not this machine's)
        check_port_free(args.host, args.port)  # before a model load that can take minutes
    if args.max_connections < 1 or args.keep_alive_timeout <= 0 or args.shutdown_grace < 0:
        raise ValueError("--max-connections must be >= 1, --keep-alive-timeout > 0 and --shutdown-grace >= 0")
    limits = Limits(args.max_request_bytes, args.max_queued, args.api_key or None, args.max_model_len,
                    loopback_only=is_loopback(args.host))
    batches = batch_config(args)
    if not limits.api_key and not is_loopback(args.host):
        print(f"warning: serving on {args.host} without an API key: anyone who reaches this address can use "
              f"the model; set --api-key or NIYAMA_API_KEY", file=sys.stderr)
    tiers = with_admission(load_tiers(args.tiers), args.on_infeasible)
    qos = QoSPolicy.build(tiers, args.default_tier, parse_service_tier_map(args.service_tier_map),
                          custom_on_infeasible=args.on_infeasible if args.on_infeasible in ON_INFEASIBLE else None)
    config = engine_config_from_args(args, policy=args.policy, policy_options=options, profile=args.profile,
                                     max_num_seqs=args.max_num_seqs, seed=args.seed)
    if config.tokenizer or config.chat_template:
        check_tokenizer(config)
    if args.replicas is not None or args.address is not None:
        args.replicas = 1 if args.replicas is None else args.replicas
        if config.tensor_parallel_size > 1:
            raise ValueError("--tensor-parallel-size with --replicas (Ray Serve) is not supported yet: run one "
                             "tensor-parallel engine per `niyama serve`")
        if args.replicas < 1 or args.replica_cpus < 0 or (args.replica_gpus or 0) < 0:
            raise ValueError("--replicas must be >= 1 and --replica-cpus / --replica-gpus >= 0")
        from ..server import ray_serve     # Ray only on this path (ImportError: the CLI names the extra)

        if args.data_dir is not None:
            print("warning: the Batch API is not served with --replicas; --data-dir is ignored", file=sys.stderr)

        return ray_serve.run(args, config, tiers, qos, limits)
    # the HTTP side (event loop, the engine client's reader and sender threads) keeps a core from a CPU engine
    os.environ.setdefault(RESERVE_ENV, str(SERVER_CPU_RESERVE))
    # the tiers read once above are the engine's and what the QoS policy resolves to
    runner = start_engine(config, tiers, args.in_process_engine)
    name = args.served_model_name or runner.info["model_name"]
    print(runner.info["describe"], file=sys.stderr)
    where = "a thread of this process" if args.in_process_engine else f"process {runner.info['pid']}"
    print(f"engine: {where}; requests that set no sampling get {runner.info['sampling_defaults']}", file=sys.stderr)
    rejecting = [t.name for t in tiers if t.rejects_infeasible]
    print(f"tiers: {'; '.join(t.describe() for t in tiers)} (default {qos.default_tier}); infeasible requests "
          f"{'rejected (429) in ' + ', '.join(rejecting) + ', ' if rejecting else ''}"
          f"{'relegated elsewhere' if rejecting else 'relegated'}", file=sys.stderr)
    print(f"serving {name!r} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    # uvicorn shuts down gracefully on SIGTERM / SIGINT and then re-raises the signal with the handler that was
    # there before it; this one turns that into a clean exit (0, not 143) once the shutdown is done
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    raise_open_file_limit()
    serve_http(build_app(runner, name, qos, limits, batches), args.host, args.port, args.log_level,
               args.keep_alive_timeout, args.max_connections, args.shutdown_grace)
    return 0


def raise_open_file_limit() -> None:
    """The soft limit on open files up to the hard one: each connection holds a descriptor, and a soft limit
    of 1024 would refuse connections long before --max-connections."""
    try:
        import resource
    except ImportError:        # not on POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 2**20 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass


def check_tokenizer(config) -> None:
    """--tokenizer against the model's vocabulary (and --chat-template against dummy weights with no
    tokenizer) here rather than in the engine process: a refusal then reads as this command's error, not as
    an engine that failed to start. Reads no weights."""
    from ..engine.config import ModelConfig
    from ..engine.tokenizer import load_tokenizer
    from ..engine.weights import resolve

    kind, source = resolve(config.model, config.load_format)
    model_config = source if kind == "dummy" else ModelConfig.from_file(source / "config.json")
    load_tokenizer(None if kind == "dummy" else source, model_config.vocab_size, (), config.tokenizer,
                   config.chat_template)

