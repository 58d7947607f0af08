"""Typed values from KEY=VALUE text (command-line overrides of policy knobs
and experiment parameters). The type comes from the knob's default."""

from __future__ import annotations


def parse_assignments(items: list[str], defaults: dict[str, object], what: str, flag: str) -> dict[str, object]:
    """['alpha_s=0.004', 'relegation=false'] -> typed values, checked against `defaults`' keys."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"{flag} {item!r}: write KEY=VALUE")
        if key not in defaults:
            raise ValueError(f"{what} has no option {key!r}; it has {', '.join(defaults)}")
        out[key] = convert(key, text.strip(), defaults[key], flag)
    return out


def convert(key: str, text: str, default, flag: str = "--set"):
    """`text` as the type of `default`; tuples are comma-separated, typed by their first element."""
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if isinstance(default, tuple):
            kind = type(default[0]) if default else str
            return tuple(kind(x.strip()) for x in text.split(",") if x.strip())
        return type(default)(text)
    except ValueError:
        kind = "comma-separated list" if isinstance(default, tuple) else type(default).__name__
        raise ValueError(f"{flag} {key}={text!r}: expected a {kind}") from None
