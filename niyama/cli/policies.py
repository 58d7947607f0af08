"""`niyama policies`: list the policies and every knob with its default."""

from __future__ import annotations

from .common import describe_policies


def add_parser(sub) -> None:
    p = sub.add_parser("policies", help="list scheduling policies and their options",
                       description="List scheduling policies and their knobs (override with --opt KEY=VALUE).")
    p.set_defaults(run=run)


def run(args) -> int:
    print(describe_policies())
    return 0
