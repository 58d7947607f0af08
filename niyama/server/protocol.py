"""OpenAI request bodies -> a validated `Generation`; results -> OpenAI response and stream-chunk bodies.

Validation is by hand rather than by pydantic models so that every bad input gets a 400 with a message
naming the field and what to send instead (OpenAI clients show `error.message` to the user).
Unknown fields are ignored, as vLLM does; OpenAI and vLLM fields we cannot honour (n > 1, logprobs, tools,
echo, penalties, response_format, min_p, ...) are refused with a 400 that names them, unless they hold
their "off" value, rather than silently dropped.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from ..engine.sampling import SamplingParams
from ..qos import Priority, Tier
from .errors import APIError
from .qos import QoSPolicy, response_service_tier

UNSUPPORTED = {   # field -> values that mean "off" (anything else is refused; null is always off)
    "n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (False, 0), "top_logprobs": (0,), "tools": ([],),
    "functions": ([],), "tool_choice": ("none",), "function_call": ("none",), "presence_penalty": (0,),
    "frequency_penalty": (0,), "logit_bias": ({},), "suffix": ("",), "response_format": ({"type": "text"},),
    "min_p": (0,), "repetition_penalty": (1,), "length_penalty": (1,), "min_tokens": (0,),
    "use_beam_search": (False,), "prompt_logprobs": (0,), "guided_json": (), "guided_regex": (), "guided_choice": (),
    "guided_grammar": (), "structured_outputs": (), "modalities": (["text"],), "audio": (), "prediction": (),
    "reasoning_effort": (), "web_search_options": (), "store": (False,),
}


@dataclass
class ModelInfo:
    name: str                 # the served model name
    context: int              # max prompt + output tokens
    kv_tokens: int            # the most tokens one request can ever hold in the KV cache
    vocab_size: int
    tokenizer: object | None  # niyama.engine.tokenizer.Tokenizer; None for dummy weights (token-id prompts only)
    sampling: dict = field(default_factory=lambda: {"temperature": 1.0, "top_p": 1.0, "top_k": 0})   # defaults


@dataclass
class Generation:
    kind: str                 # "chat" | "completion"
    prompt_ids: list[int]
    params: SamplingParams
    tier: Tier
    priority: Priority
    stream: bool
    include_usage: bool
    model: str
    return_token_ids: bool    # put generated token ids in the response (always without a tokenizer)
    service_tier: str = "default"   # what the response reports, in OpenAI's values


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except RecursionError:
        raise APIError("the request body nests too deeply; send a flat JSON object") from None
    except ValueError as e:       # bad JSON, bad UTF-8, an integer of more digits than Python converts
        raise APIError(f"the request body is not valid JSON ({str(e)[:120]}); send a JSON object") from None
    if not isinstance(body, dict):
        raise APIError(f"the request body must be a JSON object, got {type(body).__name__}")
    try:      # a lone surrogate ("\ud800") is valid JSON but no text: the tokenizer would fail on it
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise APIError("the request body contains invalid Unicode (a lone surrogate such as \\ud800)") from None
    except RecursionError:
        raise APIError("the request body nests too deeply; send a flat JSON object") from None
    return body


def check_model(body: dict, model: ModelInfo) -> None:
    """A body may name the served model or none; another name is a 404."""
    name = body.get("model")
    if name is not None and name != model.name:
        raise APIError(f"the model {name!r} does not exist; this server serves {model.name!r}", status=404,
                       param="model", code="model_not_found", type="not_found_error")


def parse_generation(body: dict, kind: str, model: ModelInfo, qos: QoSPolicy) -> Generation:
    check_model(body, model)
    for key, off in UNSUPPORTED.items():
        value = body.get(key)
        if value is not None and value not in off:
            raise APIError(f"{key}={value!r} is not supported by niyama; leave it out", param=key)
    prompt_ids = _chat_prompt(body, model) if kind == "chat" else _completion_prompt(body, model)
    room = model.context - len(prompt_ids)
    max_tokens = _max_tokens(body, kind, min(room, model.kv_tokens - len(prompt_ids)))
    if max_tokens > room:
        raise APIError(f"this model's maximum context length is {model.context} tokens, but you asked for "
                       f"{len(prompt_ids) + max_tokens} ({len(prompt_ids)} in the prompt, {max_tokens} to "
                       f"generate); shorten the prompt or lower max_tokens", param="max_tokens",
                       code="context_length_exceeded")
    stop = body.get("stop")
    stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise APIError("stop must be a non-empty string or a list of them", param="stop")
    stop_ids = _field(body, "stop_token_ids", list, [])
    if not all(_is_int(t) for t in stop_ids):
        raise APIError("stop_token_ids must be a list of integers", param="stop_token_ids")
    seed = _field(body, "seed", int, None)
    if seed is not None and not 0 <= seed < 2**63:
        raise APIError(f"seed must be in [0, 2^63), got {seed}", param="seed")
    default = model.sampling
    try:
        params = SamplingParams(
            max_tokens=max_tokens, temperature=float(_field(body, "temperature", float, default["temperature"])),
            top_p=float(_field(body, "top_p", float, default["top_p"])), top_k=_top_k(body, default["top_k"]),
            seed=seed, stop=tuple(stop), stop_token_ids=tuple(stop_ids),
            ignore_eos=_field(body, "ignore_eos", bool, False))
    except ValueError as e:
        raise APIError(str(e)) from None
    stream = _field(body, "stream", bool, False)
    options = _field(body, "stream_options", dict, {})
    include_usage = bool(options.get("include_usage", False))
    return_ids = _field(body, "return_token_ids", bool, model.tokenizer is None)
    tier, priority = qos.resolve(body)
    return Generation(kind, prompt_ids, params, tier, priority, stream, include_usage, model.name, return_ids,
                      response_service_tier(body))


def prompt_ids(body: dict, model: ModelInfo) -> list[int]:
    """The token ids of a body's `messages` (chat template applied) or `prompt` (/tokenize)."""
    return _chat_prompt(body, model) if "messages" in body else _completion_prompt(body, model)


def detokenize_ids(body: dict, model: ModelInfo) -> str:
    """/detokenize: `tokens`, a list of token ids -> text."""
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(_is_int(t) and 0 <= t < model.vocab_size for t in tokens):
        raise APIError(f"tokens must be a list of token ids in [0, {model.vocab_size})", param="tokens")
    if model.tokenizer is None:
        raise APIError("this model has no tokenizer (dummy weights)", param="tokens")
    return model.tokenizer.decode(tokens, skip_special=False)


def _field(body: dict, key: str, kind: type, default):
    """body[key] checked against `kind` (int excludes bool; float accepts int); null means the default."""
    value = body.get(key)
    if value is None:
        return default
    ok = {int: _is_int(value), float: isinstance(value, (int, float)) and not isinstance(value, bool)}.get(
        kind, isinstance(value, kind))
    if not ok:
        names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
                 dict: "an object"}
        raise APIError(f"{key} must be {names[kind]}, got {json.dumps(value)[:60]}", param=key)
    return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _top_k(body: dict, default: int) -> int:
    k = _field(body, "top_k", int, default)
    return 0 if k == -1 else k           # vLLM: -1 = off


def _max_tokens(body: dict, kind: str, room: int) -> int:
    """The requested output length; by default OpenAI's 16 for completions, and for chat all the room the
    context and the KV cache leave."""
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    default = 16 if kind == "completion" else max(room, 1)
    n = _field(body, key, int, default)
    if n < 1:
        raise APIError(f"{key} must be at least 1, got {n}", param=key)
    return n


def _completion_prompt(body: dict, model: ModelInfo) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]                    # a batch of one
    if isinstance(prompt, str):
        if model.tokenizer is None:
            raise APIError("this model has no tokenizer (dummy weights): send the prompt as a list of token ids",
                           param="prompt")
        ids = model.tokenizer.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < model.vocab_size]
        if bad:
            raise APIError(f"token ids must be in [0, {model.vocab_size}), got {bad[0]}", param="prompt")
        ids = list(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise APIError("send one prompt per request (a string or a list of token ids)", param="prompt")
    else:
        raise APIError("prompt is required: a non-empty string or a list of token ids", param="prompt")
    if not ids:
        raise APIError("the prompt is empty", param="prompt")
    return ids


def _chat_prompt(body: dict, model: ModelInfo) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError("messages is required: a non-empty list of {role, content} objects", param="messages")
    clean = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(f"messages[{k}] must be an object with a string role", param="messages")
        if m["role"] not in ("system", "developer", "user", "assistant"):
            raise APIError(f"messages[{k}].role {m['role']!r} is not supported; use system, user or assistant",
                           param="messages")
        clean.append({"role": "system" if m["role"] == "developer" else m["role"],
                      "content": _message_text(m.get("content"), k)})
    if model.tokenizer is None:
        raise APIError("this model has no tokenizer or chat template (dummy weights): use /v1/completions with "
                       "token ids", param="messages")
    try:
        text = model.tokenizer.apply_chat_template(clean)
    except Exception as e:                      # the template's own raise_exception (e.g. role order)
        raise APIError(f"the chat template rejected the messages: {e}", param="messages") from None
    return model.tokenizer.encode(text)


def _message_text(content, k: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):       # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise APIError(f"messages[{k}].content: only text parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)
    raise APIError(f"messages[{k}].content must be a string or a list of text parts", param="messages")


# --- responses ---------------------------------------------------------------

class ResponseWriter:
    """Builds the JSON bodies of one request's response or stream chunks."""

    def __init__(self, gen: Generation):
        self.gen = gen
        self.chat = gen.kind == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.object = "chat.completion" if self.chat else "text_completion"

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.gen.model,
                "service_tier": self.gen.service_tier}

    def full(self, text: str, finish_reason: str, usage: dict, qos: dict, token_ids: list[int]) -> dict:
        choice = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
        if self.gen.return_token_ids:
            choice["token_ids"] = token_ids
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {**self._base(self.object), "choices": [choice], "usage": usage, "niyama": qos}

    def chunk(self, text: str, finish_reason: str | None = None, first: bool = False, qos: dict | None = None,
              token_ids: list[int] | None = None) -> dict:
        choice = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
        if self.gen.return_token_ids and token_ids is not None:
            choice["token_ids"] = token_ids
        if self.chat:
            choice["delta"] = ({"role": "assistant", "content": text} if first else
                               {"content": text} if text or finish_reason is None else {})
        else:
            choice["text"] = text
        out = {**self._base(self.object + ".chunk" if self.chat else self.object), "choices": [choice]}
        if qos is not None:
            out["niyama"] = qos
        return out

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._base(self.object + ".chunk" if self.chat else self.object), "choices": [], "usage": usage}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


