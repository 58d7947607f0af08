"""Request-length traces shipped with the package, or a user's CSV.

A trace CSV has `num_prefill_tokens` and `num_decode_tokens` columns, and
optionally `arrived_at` (seconds). The shipped ones, in
`niyama/workload/data/`, copied from public traces:
Azure LLM inference 2023 code and conversation (with arrival times), and
the artifact's ShareGPT file (lengths only).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class TraceInfo:
    file: str
    output_len_pred: int     # L_pred for non-interactive deadlines (artifact: 15; 150 for Conv/ShareGPT)
    tiers: str               # tier preset (ShareGPT runs used a 55 ms Q1 TBT)


TRACES: dict[str, TraceInfo] = {
    "azure-code": TraceInfo("azure_code_2023.csv", 15, "default"),
    "azure-conv": TraceInfo("azure_conv_2023.csv", 150, "default"),
    "sharegpt": TraceInfo("sharegpt_8k.csv", 150, "sharegpt"),
}


@dataclass(frozen=True)
class Trace:
    name: str
    prompt_tokens: np.ndarray      # int64
    output_tokens: np.ndarray      # int64
    arrivals_s: np.ndarray | None  # float64, starting at 0, or None
    output_len_pred: int = 15
    tiers: str = "default"

    def __len__(self) -> int:
        return len(self.prompt_tokens)

    @property
    def long_prompt_threshold(self) -> int:
        """Prompts at or above the 90th percentile count as long."""
        return int(np.percentile(self.prompt_tokens, 90))


def load_trace(spec: str) -> Trace:
    """A shipped trace name (see TRACES) or a path to a CSV with the same columns."""
    if spec in TRACES:
        info = TRACES[spec]
        with resources.files(__package__).joinpath("data", info.file).open() as f:
            return _parse(spec, f, info.output_len_pred, info.tiers)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"unknown trace {spec!r}: use one of {', '.join(TRACES)} or a CSV path")
    with path.open(newline="") as f:
        return _parse(path.stem, f, 15, "default")


def _parse(name: str, f, output_len_pred: int, tiers: str) -> Trace:
    reader = csv.DictReader(f)
    cols = set(reader.fieldnames or [])
    missing = {"num_prefill_tokens", "num_decode_tokens"} - cols
    if missing:
        raise ValueError(f"trace {name}: missing column(s) {sorted(missing)}; found {sorted(cols)}")
    prompts, outputs, arrivals = [], [], []
    for line, row in enumerate(reader, start=2):
        try:
            p, o = int(float(row["num_prefill_tokens"])), int(float(row["num_decode_tokens"]))
            if "arrived_at" in cols:
                arrivals.append(float(row["arrived_at"]))
        except (TypeError, ValueError):
            raise ValueError(f"trace {name}, line {line}: not a number in {row}") from None
        if p < 1 or o < 1:
            raise ValueError(f"trace {name}, line {line}: token counts must be >= 1, got {p}, {o}")
        prompts.append(p)
        outputs.append(o)
    if not prompts:
        raise ValueError(f"trace {name}: no rows")
    arr = None
    if arrivals:
        arr = np.asarray(arrivals, dtype=np.float64)
        if np.any(np.diff(arr) < 0):
            raise ValueError(f"trace {name}: arrived_at must be non-decreasing")
        arr = arr - arr[0]
    return Trace(name, np.asarray(prompts, dtype=np.int64), np.asarray(outputs, dtype=np.int64), arr,
                 output_len_pred, tiers)
