"""The `niyama` command: one command, thin verbs. Each verb module adds its
parser and calls library functions; errors are formatted once, here."""

from __future__ import annotations

import argparse
import importlib.metadata
import sys

from . import bench, bound, capacity, experiment, generate, plan, policies, profile, replay, run_batch, serve, simulate
from .common import check_files

VERBS = (simulate, capacity, bound, plan, experiment, policies, generate, replay, serve, run_batch, bench, profile)
EXTRAS = {"torch": "engine", "tokenizers": "engine", "safetensors": "engine", "jinja2": "engine", "gguf": "engine",
          "fastapi": "serve", "uvicorn": "serve", "prometheus_client": "serve", "httpx": "serve",
          "ray": "cluster"}
TORCH_CPU = ("pip install torch --index-url https://download.pytorch.org/whl/cpu (a CPU-only build, ~200 MB; "
             "a plain `pip install torch` pulls the CUDA stack, GBs)")


def import_hint(e: ImportError) -> str:
    """What to install for a missing module, in words a user can act on."""
    top = (e.name or "").split(".")[0]
    if top == "torch":
        return f"PyTorch is missing: install it first, e.g. {TORCH_CPU}, then pip install 'niyama[engine]'"
    if top in EXTRAS:
        return f"{top} is missing: pip install 'niyama[{EXTRAS[top]}]'"
    return str(e)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="niyama", description="Deadline-aware LLM serving: scheduler, simulator, capacity studies, a model engine and an "
                    "OpenAI-compatible server.",
        epilog="Run `niyama VERB --help` for a verb's options and examples.")
    parser.add_argument("--version", action="version", version=f"niyama {version()}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb in VERBS:
        verb.add_parser(sub)
    return parser


def version() -> str:
    try:
        return importlib.metadata.version("niyama")
    except importlib.metadata.PackageNotFoundError:      # run from a checkout that is not installed
        return "unknown (not installed)"


def verb_parser(parser: argparse.ArgumentParser, args) -> argparse.ArgumentParser:
    """The (sub)parser of the verb that was chosen, e.g. `niyama bench serve`'s."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or getattr(args, subs[0].dest, None) not in subs[0].choices:
            return parser
        parser = subs[0].choices[getattr(args, subs[0].dest)]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:      # the verb's own usage and error, not the top-level `niyama VERB ...`
        verb_parser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        check_files(args)
        return args.run(args) or 0
    except ImportError as e:
        print(f"niyama {args.verb}: error: {import_hint(e)}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        print(f"niyama {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"niyama {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
