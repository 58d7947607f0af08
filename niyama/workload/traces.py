"""Request-length traces shipped with the package, or a user's file.

A trace CSV has `num_prefill_tokens` and `num_decode_tokens` columns, and
optionally `arrived_at` (seconds). A JSONL trace (Mooncake's format, plain
or gzipped) has one object a line: `timestamp` (ms), `input_length`,
`output_length` and optionally `hash_ids`, one id per 512-token block of the
prompt, equal ids for equal content (and equal everything before it): the
prefix reuse a KV cache can exploit. The shipped ones, in
`niyama/workload/data/`, copied from public traces: Azure LLM inference 2023
code and conversation (with arrival times), the artifact's ShareGPT file
(lengths only), and Mooncake's conversation trace (FAST'25, Apache-2.0:
one hour of real arrivals with prefix block ids).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
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
    "mooncake": TraceInfo("mooncake_conversation.jsonl.gz", 150, "long-context"),
}

# what "every trace" means to the capacity verbs: the paper's three (Mooncake's hour of 12K-token prompts takes
# minutes a simulation; name it to run it)
PAPER_TRACES = ("azure-code", "azure-conv", "sharegpt")

MOONCAKE_BLOCK_TOKENS = 512     # tokens per `hash_ids` entry


@dataclass(frozen=True)
class Trace:
    name: str
    prompt_tokens: np.ndarray      # int64
    output_tokens: np.ndarray      # int64
    arrivals_s: np.ndarray | None  # float64, starting at 0, or None
    output_len_pred: int = 15
    tiers: str = "default"
    block_ids: "list[tuple[int, ...]] | None" = None    # per row, its prompt's prefix block ids, or None
    block_tokens: int = MOONCAKE_BLOCK_TOKENS           # prompt tokens per block id

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
        with resources.files(__package__).joinpath("data", info.file).open("rb") as f:
            return _read(spec, info.file, f, info.output_len_pred, info.tiers)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"unknown trace {spec!r}: use one of {', '.join(TRACES)} or a CSV or JSONL path")
    with path.open("rb") as f:
        return _read(path.name.split(".")[0], path.name, f, 15, "default")


def _read(name: str, filename: str, f, output_len_pred: int, tiers: str) -> Trace:
    if filename.endswith(".gz"):
        f = gzip.open(f)
    text = io.TextIOWrapper(f, encoding="utf-8", newline="")
    if ".jsonl" in filename:
        return _parse_jsonl(name, text, output_len_pred, tiers)
    return _parse(name, text, output_len_pred, tiers)


def _parse_jsonl(name: str, f, output_len_pred: int, tiers: str) -> Trace:
    """Mooncake's format: `timestamp` (ms), `input_length`, `output_length`, optional `hash_ids`."""
    prompts, outputs, arrivals, blocks = [], [], [], []
    for line_no, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            p, o, t = int(row["input_length"]), int(row["output_length"]), float(row["timestamp"]) / 1000
            ids = tuple(int(h) for h in row.get("hash_ids", ()))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"trace {name}, line {line_no}: {type(e).__name__}: {e} in {line[:120]!r}") from None
        if p < 1 or o < 1:
            raise ValueError(f"trace {name}, line {line_no}: token counts must be >= 1, got {p}, {o}")
        if ids and len(ids) * MOONCAKE_BLOCK_TOKENS < p:
            raise ValueError(f"trace {name}, line {line_no}: {len(ids)} block ids cover {len(ids) * 512} tokens, "
                             f"the prompt has {p}")
        prompts.append(p)
        outputs.append(o)
        arrivals.append(t)
        blocks.append(ids)
    if not prompts:
        raise ValueError(f"trace {name}: no rows")
    arr = np.asarray(arrivals, dtype=np.float64)
    if np.any(np.diff(arr) < 0):
        raise ValueError(f"trace {name}: timestamps must be non-decreasing")
    return Trace(name, np.asarray(prompts, dtype=np.int64), np.asarray(outputs, dtype=np.int64), arr - arr[0],
                 output_len_pred, tiers, blocks if any(blocks) else None)


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
