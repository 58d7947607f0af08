"""The Batch API's file formats: the completion window, the input JSONL (checked line by line the way OpenAI
checks it: each problem becomes an entry of the batch's `errors` with its line number), and the output and
error lines."""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path

from .errors import APIError
from .protocol import parse_body

ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}   # endpoint -> respond()'s kind
MAX_WINDOW_S = 24 * 3600
UNITS = {"s": 1, "m": 60, "h": 3600}
MAX_REPORTED_ERRORS = 100         # a failed batch lists this many problems; the last entry counts the rest
EXPIRED = {"code": "batch_expired",
           "message": "This request could not be executed before the completion window expired."}
CANCELLED = {"code": "batch_cancelled", "message": "This request was not executed: the batch was cancelled."}


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def parse_duration(text: str) -> float | None:
    """"24h", "30m", "45s" -> seconds; None if it is not <integer><s|m|h>."""
    m = re.fullmatch(r"\s*(\d{1,9})\s*([smh])\s*", text) if isinstance(text, str) else None
    return int(m[1]) * UNITS[m[2]] if m else None


def format_duration(seconds: float) -> str:
    for unit in ("h", "m", "s"):
        if seconds >= UNITS[unit] and seconds % UNITS[unit] == 0:
            return f"{int(seconds // UNITS[unit])}{unit}"
    return f"{seconds:g}s"


def parse_window(text, min_s: float) -> float:
    """A batch's completion_window in seconds: OpenAI's "24h", or a shorter "<N>h" / "<N>m" (/ "<N>s"), no
    shorter than `min_s` (the server's --batch-min-window)."""
    seconds = parse_duration(text)
    if seconds is None or not min_s <= seconds <= MAX_WINDOW_S:
        raise APIError(f"completion_window {text!r} is not supported: use '24h' or a shorter window such as '1h' or "
                       f"'30m', from {format_duration(min_s)} to 24h", param="completion_window",
                       code="invalid_completion_window")
    return float(seconds)


class InvalidInput(Exception):
    """The input file has bad lines: the batch fails validation with these `errors`."""

    def __init__(self, errors: list[dict]):
        super().__init__(f"{len(errors)} invalid lines")
        self.errors = errors


def problem(code: str, message: str, line: int | None = None, param: str | None = None) -> dict:
    return {"code": code, "message": message, "param": param, "line": line}


def input_lines(path: Path, endpoint: str, max_lines: int):
    """Yield (line number, custom_id, body as JSON text) for each request line of a batch input file; raise
    InvalidInput at the end if any line was bad (the caller's transaction then rolls back), APIError (400) at
    once beyond `max_lines` requests. Blank lines are skipped."""
    errors: list[dict] = []
    seen: set[str] = set()
    count = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            count += 1
            if count > max_lines:
                raise APIError(f"the input file holds more than {max_lines} requests, this server's limit per batch "
                               f"(--batch-max-lines); split it into several batches", param="input_file_id",
                               code="too_many_requests_in_batch")
            try:
                line = check_line(raw, number, endpoint, seen)
            except InvalidInput as e:
                errors.extend(e.errors)
                continue
            yield line
    if not count:
        raise APIError("the input file holds no requests: give one JSON object per line, e.g. "
                       '{"custom_id": "1", "method": "POST", "url": "' + endpoint + '", "body": {...}}',
                       param="input_file_id", code="empty_file")
    if errors:
        shown = errors[:MAX_REPORTED_ERRORS]
        if len(errors) > len(shown):
            shown.append(problem("too_many_errors", f"{len(errors) - len(shown)} more invalid lines not listed"))
        raise InvalidInput(shown)


def check_line(raw: bytes, number: int, endpoint: str, seen: set[str]) -> tuple[int, str, str]:
    def bad(code: str, message: str, param: str | None = None):
        return InvalidInput([problem(code, f"line {number}: {message}", number, param)])

    try:
        obj = parse_body(raw)
    except APIError as e:
        raise bad("invalid_json_line", e.message.replace("the request body", "the line")) from None
    for field in ("custom_id", "method", "url", "body"):
        if obj.get(field) is None:
            raise bad("missing_required_parameter", f"{field} is required (each line: custom_id, method, url, "
                                                    "body)", field)
    custom_id = obj["custom_id"]
    if not isinstance(custom_id, str) or not custom_id:
        raise bad("invalid_custom_id", f"custom_id must be a non-empty string, got {json.dumps(custom_id)[:60]}",
                  "custom_id")
    if custom_id in seen:
        raise bad("duplicate_custom_id", f"custom_id {custom_id[:60]!r} is used by an earlier line; each line "
                                         "needs its own", "custom_id")
    seen.add(custom_id)
    if obj["method"] != "POST":
        raise bad("invalid_method", f"method must be 'POST', got {json.dumps(obj['method'])[:60]}", "method")
    if obj["url"] != endpoint:
        raise bad("invalid_url", f"url {json.dumps(obj['url'])[:60]} differs from the batch's endpoint {endpoint!r}; "
                                 "every line must use the batch's endpoint", "url")
    if not isinstance(obj["body"], dict):
        raise bad("invalid_body", f"body must be a JSON object, got {type(obj['body']).__name__}", "body")
    return number, custom_id, json.dumps(obj["body"], ensure_ascii=False, separators=(",", ":"))


def answered_line(custom_id: str, status: int, body: dict) -> str:
    """A line of the output (status 200) or error file (an API error's status and body), as OpenAI writes it."""
    request_id = body.get("id") if status == 200 and isinstance(body.get("id"), str) else new_id("req_")
    return json.dumps({"id": new_id("batch_req_"), "custom_id": custom_id,
                       "response": {"status_code": status, "request_id": request_id, "body": body}, "error": None},
                      ensure_ascii=False, separators=(",", ":"))


def unanswered_line(custom_id: str, error: dict) -> str:
    """An error-file line of a request that never ran (the batch expired or was cancelled)."""
    return json.dumps({"id": new_id("batch_req_"), "custom_id": custom_id, "response": None, "error": error},
                      ensure_ascii=False, separators=(",", ":"))
