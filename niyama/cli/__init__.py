"""The `niyama` command: one command, thin verbs. Each verb module adds its
parser and calls library functions; errors are formatted once, here."""

from __future__ import annotations

import argparse
import sys

from . import bench, capacity, experiment, generate, policies, replay, serve, simulate

VERBS = (simulate, capacity, experiment, policies, generate, replay, serve, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="niyama", description="Deadline-aware LLM serving: scheduler, simulator, capacity studies, a model engine and an "
                    "OpenAI-compatible server.",
        epilog="Run `niyama VERB --help` for a verb's options and examples.")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb in VERBS:
        verb.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"niyama {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"niyama {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
