"""OpenAI request bodies -> a validated `Generation`; results -> OpenAI response and stream-chunk bodies.

Types are checked by the pydantic models in schemas.py (a bad one is a 400 naming the field); this module
adds what a schema cannot say: the model's name, the fields niyama does not honour, the context length,
token ids in the vocabulary, the chat template, and the QoS fields (request_qos.py).
"""

from __future__ import annotations

import functools
import json
import re
import time
import uuid
from dataclasses import dataclass, field

from ..engine import grammar
from ..engine.sampling import MAX_TOP_LOGPROBS, SamplingParams
from ..qos import Priority, Tier
from . import tool_calls
from .errors import APIError
from .request_qos import TARGET_FIELDS, QoSPolicy, response_service_tier
from .schemas import (PROMPT, UNHONOURED, ChatCompletionRequest, ChatMessage, CompletionRequest, DetokenizeRequest,
                      GenerationRequest, StreamOptions, TokenizeRequest, validate)

QOS_FIELDS = ("tier", "service_tier", "priority", *TARGET_FIELDS)


@dataclass
class ModelInfo:
    name: str                 # the served model name
    context: int              # max prompt + output tokens
    kv_tokens: int            # the most tokens one request can ever hold in the KV cache
    vocab_size: int
    tokenizer: object | None  # niyama.engine.tokenizer.Tokenizer; None for dummy weights (token-id prompts only)
    sampling: dict = field(default_factory=lambda: {"temperature": 1.0, "top_p": 1.0, "top_k": 0})   # defaults
    max_chars: int | None = None   # the most characters one token covers (None: no bound known); set from the tokenizer

    def __post_init__(self):
        if self.max_chars is None and self.tokenizer is not None:
            self.max_chars = max_token_chars(self.tokenizer)


NORMALIZER_MARGIN = 4     # a normalizer (NFC, say) may merge a few characters into one before tokenizing
WHITESPACE_DROPPING = ("Whitespace", "WhitespaceSplit", "BertPreTokenizer")   # no bound: runs of spaces vanish


def max_token_chars(tokenizer) -> int | None:
    """The most characters of text one token can cover, from the vocabulary (once, at start-up): the longest
    token string (a byte-level token's string has a character per byte, so at least as many characters as
    the text it stands for; an added token is its text), times a margin when the tokenizer normalizes the
    text first. None when it cannot be bounded (no vocabulary to read, or a pre-tokenizer that drops text).
    A text longer than context x this cannot fit, so it is refused before it is tokenized (the tokenizer
    holds the GIL: a 16 MB prompt froze the HTTP process for 15 s and kept 3 GB)."""
    try:
        hf = tokenizer._tok
        longest = max(map(len, hf.get_vocab(with_added_tokens=True)), default=1)
        normalizer, pre = getattr(hf, "normalizer", None), getattr(hf, "pre_tokenizer", None)
    except Exception:          # not a tokenizers.Tokenizer underneath
        return None
    if pre is not None and type(pre).__name__ in WHITESPACE_DROPPING:
        return None
    return max(1, longest) * (1 if normalizer is None else NORMALIZER_MARGIN)


def precheck_text(body: dict, model: ModelInfo) -> None:
    """`check_text_fits` on the raw body's prompt or messages, before the schema validates them (pydantic
    copies a 16 MB string: 140 ms with the GIL held); a value of the wrong type is left to the schema."""
    prompt, messages = body.get("prompt"), body.get("messages")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if isinstance(prompt, str):
        check_text_fits(len(prompt), model, "prompt")
    if isinstance(messages, list):
        chars = 0
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, str):
                chars += len(content)
            elif isinstance(content, list):
                chars += sum(len(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
        check_text_fits(chars, model, "messages")


def check_text_fits(chars: int, model: ModelInfo, param: str) -> None:
    """400 (context length) for a text of `chars` characters that has more tokens than the context holds
    whatever it says: checked before tokenizing it."""
    if model.max_chars is None:
        return
    at_least = -(-chars // model.max_chars)
    if at_least > model.context:
        raise APIError(f"this model's maximum context length is {model.context} tokens, but the {param}'s {chars} "
                       f"characters are at least {at_least} tokens (a token covers at most {model.max_chars} "
                       f"characters); shorten the {param}", param=param, code="context_length_exceeded")


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
    continuous_usage: bool = False  # every stream chunk carries the usage so far (vLLM's continuous_usage_stats)
    echo: str = ""                  # completions' `echo`: the prompt's text, sent before the generated text
    n: int = 1                      # choices (choices.py runs each as its own engine request)
    tools: "tool_calls.ToolSpec | None" = None   # chat with tools: the answer is parsed into tool calls
    tool_family: str = "hermes"     # the model's tool-call format (tool_calls.py)


SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except RecursionError:
        raise APIError("the request body nests too deeply; send a flat JSON object") from None
    except ValueError as e:       # bad JSON, bad UTF-8, an integer of more digits than Python converts
        raise APIError(f"the request body is not valid JSON ({str(e)[:120]}); send a JSON object") from None
    if not isinstance(body, dict):
        raise APIError(f"the request body must be a JSON object, got {type(body).__name__}")
    if not SURROGATE_ESCAPE.search(raw):   # only an escape makes one (valid UTF-8 has none); 16 MB: 5 ms, not 50
        return body
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
    precheck_text(body, model)
    req = validate(ChatCompletionRequest if kind == "chat" else CompletionRequest, body)
    refuse_unhonoured(req)
    tools = _tools(req, kind)
    family = tool_calls.family_of(model.tokenizer.chat_template) if model.tokenizer else "hermes"
    prompt_ids = (_chat_prompt(req.messages, model, tools, family) if kind == "chat" else
                  _completion_prompt(req.prompt, model))
    room = model.context - len(prompt_ids)
    max_tokens = _max_tokens(req, kind, min(room, model.kv_tokens - len(prompt_ids)))
    if max_tokens > room:
        raise APIError(f"this model's maximum context length is {model.context} tokens, but you asked for "
                       f"{len(prompt_ids) + max_tokens} ({len(prompt_ids)} in the prompt, {max_tokens} to "
                       f"generate); shorten the prompt or lower max_tokens", param="max_tokens",
                       code="context_length_exceeded")
    _check_stop_token_ids(req.stop_token_ids, model)
    params = _sampling(req, max_tokens, model.sampling, _logprobs(req, kind), _constraint(req, model, tools, family))
    if req.stream_options is not None and not req.stream:      # as vLLM: not silently ignored
        raise APIError("stream_options is only allowed with stream true", param="stream_options")
    options = req.stream_options or StreamOptions()
    wanted = {key: getattr(req, key) for key in QOS_FIELDS}
    tier, priority = qos.resolve(wanted)
    return_ids = model.tokenizer is None if req.return_token_ids is None else req.return_token_ids
    return Generation(kind, prompt_ids, params, tier, priority, bool(req.stream), bool(options.include_usage),
                      model.name, return_ids, response_service_tier(wanted), bool(options.continuous_usage_stats),
                      _echo(req, kind, prompt_ids, params, model), req.n or 1, tools, family)


def _echo(req: GenerationRequest, kind: str, prompt_ids: list[int], params: SamplingParams, model: ModelInfo) -> str:
    """The prompt's text for completions' `echo` ("" without it): the prompt string as sent, or its token ids
    decoded."""
    if not req.echo:
        return ""
    if kind == "chat":
        raise APIError("echo is a /v1/completions field", param="echo")
    if params.logprobs is not None:
        raise APIError("echo with logprobs would need the prompt's log-probabilities, which niyama does not "
                       "compute; send one of them", param="echo")
    prompt = req.prompt[0] if isinstance(req.prompt, list) and len(req.prompt) == 1 else req.prompt
    if isinstance(prompt, str):
        return prompt
    if model.tokenizer is None:
        raise APIError("echo needs a tokenizer to turn the prompt's token ids into text; this model has none",
                       param="echo")
    return model.tokenizer.decode(prompt_ids)


HINTS = {"best_of": " (send n: N for N choices)"}


def refuse_unhonoured(req: GenerationRequest) -> None:
    for key, off in UNHONOURED.items():
        value = getattr(req, key)
        if value is not None and value not in off:
            raise APIError(f"{key}={value!r} is not supported by niyama{HINTS.get(key, '')}; leave it out", param=key)


def _check_stop_token_ids(ids: "list[int] | None", model: ModelInfo) -> None:
    bad = [t for t in ids or () if not 0 <= t < model.vocab_size]
    if bad:
        raise APIError(f"stop_token_ids must be token ids in [0, {model.vocab_size}); "
                       f"{', '.join(map(str, bad[:5]))}{' ...' if len(bad) > 5 else ''} are not",
                       param="stop_token_ids")


def _logprobs(req: GenerationRequest, kind: str) -> int | None:
    """How many top tokens to report with each token's log-probability, or None for no log-probabilities.
    Chat: `logprobs` true/false and `top_logprobs` N; completions: `logprobs` N (OpenAI's legacy field)."""
    lp, top = req.logprobs, req.top_logprobs
    if kind == "chat":
        if lp is not None and not isinstance(lp, bool):
            raise APIError("logprobs must be true or false on chat completions (top_logprobs says how many of the "
                           "most likely tokens to list)", param="logprobs")
        if top and not lp:
            raise APIError("top_logprobs needs logprobs: true", param="top_logprobs")
        return (top or 0) if lp else None
    if top:
        raise APIError("top_logprobs is a chat completions field; on /v1/completions send logprobs: N",
                       param="top_logprobs")
    if lp is None or lp is False:
        return None
    if isinstance(lp, bool) or not 0 <= lp <= MAX_TOP_LOGPROBS:
        raise APIError(f"logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}] on completions (the number of most "
                       "likely tokens to list beside each token's own)", param="logprobs")
    return lp


def prompt_ids(body: dict, model: ModelInfo) -> list[int]:
    """The token ids of a body's `messages` (chat template applied) or `prompt` (/tokenize)."""
    precheck_text(body, model)
    req = validate(TokenizeRequest, body)
    if req.messages is not None and req.prompt is not None:
        raise APIError("send one of prompt and messages, not both", param="prompt")
    if req.messages is not None:
        return _chat_prompt(req.messages, model)
    if req.prompt is None:
        raise APIError(f"prompt or messages is required: prompt is {PROMPT}", param="prompt")
    return _completion_prompt(req.prompt, model)


def detokenize_ids(body: dict, model: ModelInfo) -> str:
    """/detokenize: `tokens`, a list of token ids -> text."""
    tokens = validate(DetokenizeRequest, body).tokens
    if not all(0 <= t < model.vocab_size for t in tokens):
        raise APIError(f"tokens must be a list of token ids in [0, {model.vocab_size})", param="tokens")
    if model.tokenizer is None:
        raise APIError("this model has no tokenizer (dummy weights)", param="tokens")
    return model.tokenizer.decode(tokens, skip_special=False)


PENALTIES = ("min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


GUIDED = ("response_format", "guided_json", "guided_regex", "guided_choice")


def _tools(req: GenerationRequest, kind: str) -> "tool_calls.ToolSpec | None":
    if kind != "chat":
        for key in ("tools", "tool_choice", "parallel_tool_calls"):
            if getattr(req, key) is not None:
                raise APIError(f"{key} is a /v1/chat/completions field", param=key)
        return None
    return tool_calls.parse_tool_request(req.tools, req.tool_choice, req.parallel_tool_calls)


def _constraint(req: GenerationRequest, model: ModelInfo, tools: "tool_calls.ToolSpec | None",
                family: str) -> str | None:
    """The grammar text of the request's structured-output field (at most one), or of a forced tool call, or
    None."""
    given = [key for key in GUIDED if getattr(req, key) is not None]
    fmt = req.response_format
    if fmt is not None and fmt.get("type") == "text":
        given.remove("response_format")
    forced = tool_calls.tool_grammar(tools, family) if tools is not None else None
    if forced is not None:
        if given:
            raise APIError(f"tool_choice {tools.choice!r} forces a tool call's format; {given[0]} asks for another: "
                           "send one of them", param=given[0])
        return forced
    if not given:
        return None
    key = given[0]
    if len(given) > 1:
        raise APIError(f"send one output constraint; got {' and '.join(given)}", param=given[1])
    if model.tokenizer is None:
        raise APIError(f"{key} needs the model's tokenizer; this model has none (dummy weights)", param=key)
    try:
        if key == "response_format":
            return grammar.compile_json_schema(_format_schema(fmt))
        if key == "guided_json":
            value = req.guided_json
            return grammar.compile_json_schema(json.loads(value) if isinstance(value, str) else value)
        if key == "guided_regex":
            return grammar.compile_regex(req.guided_regex)
        return grammar.compile_choice(req.guided_choice)
    except ValueError as e:             # the library's own words on what it cannot compile
        raise APIError(str(e), param=key) from None


def _format_schema(fmt: dict) -> "dict | None":
    """OpenAI's response_format -> the JSON schema the output must follow (None: any JSON object)."""
    kind = fmt.get("type")
    if kind == "json_object":
        return None
    if kind != "json_schema":
        raise APIError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                       param="response_format")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise APIError("response_format.json_schema must be an object with the schema under 'schema'",
                       param="response_format")
    schema = spec.get("schema")
    if schema is not None and not isinstance(schema, dict):
        raise APIError("response_format.json_schema.schema must be a JSON schema object", param="response_format")
    return schema


def _sampling(req: GenerationRequest, max_tokens: int, default: dict, logprobs: int | None,
              constraint: str | None = None) -> SamplingParams:
    """The request's sampling parameters (the model's defaults where it gives none); SamplingParams checks
    the ranges."""
    def pick(key):
        value = getattr(req, key)
        return default[key] if value is None else value

    stop = () if req.stop is None else (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)
    top_k = pick("top_k")
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=float(pick("temperature")), top_p=float(pick("top_p")),
            top_k=0 if top_k == -1 else top_k, seed=req.seed, stop=stop,   # vLLM: top_k -1 = off
            stop_token_ids=tuple(req.stop_token_ids or ()), ignore_eos=bool(req.ignore_eos), logprobs=logprobs,
            include_stop_str_in_output=bool(req.include_stop_str_in_output), grammar=constraint,
            **{key: float(getattr(req, key)) for key in PENALTIES if getattr(req, key) is not None})
    except ValueError as e:           # its messages open with the field's name
        name = str(e).split()[0]
        raise APIError(str(e), param=name if name in type(req).model_fields else None) from None


def _max_tokens(req: GenerationRequest, kind: str, room: int) -> int:
    """The requested output length; by default OpenAI's 16 for completions, and for chat all the room the
    context and the KV cache leave."""
    n = getattr(req, "max_completion_tokens", None) or req.max_tokens
    if n is None:
        return 16 if kind == "completion" else max(room, 1)
    return n


def _completion_prompt(prompt: "str | list", model: ModelInfo) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]                    # a batch of one
    if isinstance(prompt, str):
        if model.tokenizer is None:
            raise APIError("this model has no tokenizer (dummy weights): send the prompt as a list of token ids",
                           param="prompt")
        check_text_fits(len(prompt), model, "prompt")
        ids = model.tokenizer.encode(prompt)
    elif isinstance(prompt[0], int):
        bad = [t for t in prompt if not 0 <= t < model.vocab_size]
        if bad:
            raise APIError(f"token ids must be in [0, {model.vocab_size}), got {bad[0]}", param="prompt")
        ids = list(prompt)
    else:
        raise APIError("send one prompt per request (a string or a list of token ids)", param="prompt")
    if not ids:
        raise APIError("the prompt is empty", param="prompt")
    return ids


def _chat_prompt(messages: list[ChatMessage], model: ModelInfo, tools: "tool_calls.ToolSpec | None" = None,
                 family: str = "hermes") -> list[int]:
    """The prompt's token ids; with `tools` (or tool messages in the history) in the model `family`'s format."""
    if model.tokenizer is None:
        raise APIError("this model has no tokenizer or chat template (dummy weights): use /v1/completions with "
                       "token ids", param="messages")
    for i, m in enumerate(messages):
        if m.content is None and not (m.role == "assistant" and m.tool_calls):
            raise APIError(f"messages[{i}].content is required (null only for an assistant message with "
                           "tool_calls)", param=f"messages[{i}].content")
        if m.role == "tool" and not m.tool_call_id:
            raise APIError(f"messages[{i}].tool_call_id is required in a tool message: the id of the call it "
                           "answers", param=f"messages[{i}].tool_call_id")
    check_text_fits(sum(len(_text(m.content)) for m in messages if m.content is not None), model, "messages")
    template, tools_arg = model.tokenizer.chat_template, None
    if tools is None and not any(m.role == "tool" or m.tool_calls for m in messages):
        clean = [{"role": "system" if m.role == "developer" else m.role, "content": _text(m.content)}
                 for m in messages]
    else:       # tools or a tool exchange in the history: the template renders them, or tool_calls.py does
        dicts = [m.model_dump(exclude_none=True) for m in messages]
        if tool_calls.template_renders_tools(template):
            clean, tools_arg = tool_calls.messages_for_template(dicts), tools and tools.template_tools()
        else:
            clean = tool_calls.render_without_template_support(dicts, tools.tools if tools else (), family, template)
    try:
        text = model.tokenizer.apply_chat_template(clean, tools=tools_arg)
    except Exception as e:                      # the template's own raise_exception (e.g. role order)
        raise APIError(f"the chat template rejected the messages: {e}", param="messages") from None
    check_text_fits(len(text), model, "messages")
    return model.tokenizer.encode(text)


def _text(content) -> str:
    return content if isinstance(content, str) else "".join(p.text for p in content)


# --- responses ---------------------------------------------------------------

@dataclass
class Answer:
    """One choice's whole output, as a non-streamed response reports it."""
    text: str = ""
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    num_tokens: int = 0


class ResponseWriter:
    """Builds the JSON bodies of one request's response or stream chunks."""

    def __init__(self, gen: Generation, tokenizer=None):
        """`tokenizer`: names the tokens of log-probabilities (without one, a token is 'token_id:N', as vLLM
        writes it)."""
        self.gen = gen
        self.chat = gen.kind == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.object = "chat.completion" if self.chat else "text_completion"
        self.tokenizer = tokenizer
        self.text_offset = [0] * gen.n  # per choice, completions' logprobs: where the next token's text starts
        # per choice, with tools: what of the streamed text is content, what is held back as a call
        self.tool_streams = ([tool_calls.ToolCallStream(gen.tool_family, gen.tools.names) for _ in range(gen.n)]
                             if gen.tools is not None else None)

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.gen.model,
                "service_tier": self.gen.service_tier}

    def full(self, choices: "list[Answer]", usage: dict, qos: dict) -> dict:
        return {**self._base(self.object), "choices": [self._choice(i, a) for i, a in enumerate(choices)],
                "usage": usage, "niyama": qos}

    def _choice(self, index: int, a: "Answer") -> dict:
        choice = {"index": index, "logprobs": self.logprobs(a.token_ids, a.logprobs, index),
                  "finish_reason": a.finish_reason}
        if self.gen.return_token_ids:
            choice["token_ids"] = a.token_ids
        if not self.chat:
            choice["text"] = a.text
        elif self.gen.tools is None:
            choice["message"] = {"role": "assistant", "content": a.text}
        else:
            content, calls = tool_calls.parse(a.text, self.gen.tool_family, self.gen.tools.names)
            choice["message"] = {"role": "assistant", "content": content}
            if calls:
                choice["message"]["tool_calls"] = tool_calls.message_tool_calls(calls)
                choice["finish_reason"] = tool_calls.finish_reason(a.finish_reason, calls)
        return choice

    def content(self, index: int, text: str) -> str:
        """Streaming: the part of a choice's new `text` that can go out now (with tools, text that may begin a
        tool call is held back until it is known)."""
        return text if self.tool_streams is None else self.tool_streams[index].feed(text)

    def tool_call_end(self, index: int, finish_reason: str, first: bool) -> tuple[list[dict], str]:
        """Streaming, at a choice's end: the chunks of its held-back content and of its tool calls (each whole),
        and its finish reason (OpenAI's "tool_calls" when it ended in calls)."""
        if self.tool_streams is None:
            return [], finish_reason
        rest, calls = self.tool_streams[index].finish()
        chunks = []
        if rest:
            chunks.append(self.chunk(rest, first=first, index=index))
        if calls:
            chunks.append(self.chunk("", first=first and not rest, index=index,
                                     calls=tool_calls.tool_call_deltas(calls)))
        return chunks, tool_calls.finish_reason(finish_reason, calls)

    def chunk(self, text: str, finish_reason: str | None = None, first: bool = False, qos: dict | None = None,
              token_ids: list[int] | None = None, num_tokens: int | None = None, logprobs: list | None = None,
              index: int = 0, calls: list[dict] | None = None) -> dict:
        """A dict matching schemas.CompletionChunk / ChatCompletionChunk (no model here: this is per token).
        `num_tokens`: tokens generated so far, reported with continuous usage stats; `logprobs`: the engine's
        entries for `token_ids`; `index`: the choice; `calls`: tool-call deltas (the delta holds only them)."""
        choice = {"index": index, "logprobs": self.logprobs(token_ids or [], logprobs, index),
                  "finish_reason": finish_reason}
        if self.gen.return_token_ids and token_ids is not None:
            choice["token_ids"] = token_ids
        if calls:
            choice["delta"] = {"role": "assistant", "tool_calls": calls} if first else {"tool_calls": calls}
        elif self.chat:
            choice["delta"] = ({"role": "assistant", "content": text} if first else
                               {"content": text} if text or finish_reason is None else {})
        else:
            choice["text"] = text
        out = {**self._base(self.object + ".chunk" if self.chat else self.object), "choices": [choice]}
        if qos is not None:
            out["niyama"] = qos
        if self.gen.continuous_usage and num_tokens is not None:
            out["usage"] = usage(len(self.gen.prompt_ids), num_tokens)
        return out

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._base(self.object + ".chunk" if self.chat else self.object), "choices": [], "usage": usage}

    def logprobs(self, token_ids: list[int], entries: list | None, index: int = 0) -> dict | None:
        """OpenAI's `logprobs` object for these tokens from the engine's entries ((logprob, [(token id,
        logprob), ...]) per token), or None when the request asked for none."""
        if self.gen.params.logprobs is None or entries is None:
            return None
        if self.chat:
            return {"content": [{**self._token(t, lp), "top_logprobs": [self._token(i, x) for i, x in top]}
                                for t, (lp, top) in zip(token_ids, entries)], "refusal": None}
        tokens, offsets, tops = [], [], []
        for t, (lp, top) in zip(token_ids, entries):
            text = self.token_text(t)
            tokens.append(text)
            offsets.append(self.text_offset[index])
            self.text_offset[index] += len(text)
            # OpenAI's legacy shape: the N most likely tokens and the sampled one, by their text
            tops.append({**{self.token_text(i): x for i, x in top}, text: lp})
        return {"tokens": tokens, "token_logprobs": [lp for lp, _ in entries], "top_logprobs": tops,
                "text_offset": offsets}

    def _token(self, token_id: int, logprob: float) -> dict:
        text = self.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", errors="replace"))}

    def token_text(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return _decoded(self.tokenizer, token_id)


@functools.lru_cache(maxsize=1 << 16)
def _decoded(tokenizer, token_id: int) -> str:
    """One token's text (a token that ends inside a character decodes to U+FFFD, as in vLLM)."""
    return tokenizer.decode([token_id], skip_special=False)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


