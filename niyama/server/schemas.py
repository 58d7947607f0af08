"""The OpenAI types: request and response bodies of every endpoint (pydantic), and the OpenAPI schema.

Request models are strict, so a string "5" or `true` is no integer (a 400 that names the field), and ignore
unknown fields, as vLLM does. Fields niyama does not honour are declared (so the schema shows them) and
refused unless they hold their "off" value: `UNHONOURED`, checked by protocol.py. The routes read their
bodies themselves (the API key, the queue bound and the size limit come first), so FastAPI never sees the
request models: `openapi()` adds them. Stream chunks are built as plain dicts on the hot path; tests hold
them to the chunk models.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WrapValidator
from pydantic.json_schema import models_json_schema
from pydantic_core import PydanticCustomError

from .errors import from_validation


def expect(hint: str, shallow: bool = False) -> WrapValidator:
    """Any error in the value becomes one error at the field: "must be <hint>" (a union would otherwise
    report one error per member). `shallow`: only errors of the value itself (a list's items keep theirs)."""
    def check(value, handler):
        try:
            return handler(value)
        except ValidationError as e:
            if shallow and any(err["loc"] for err in e.errors()):
                raise
            raise PydanticCustomError("expected", "must be {hint}", {"hint": hint}) from None
    return WrapValidator(check)


PROMPT = "a non-empty string or a list of token ids (one prompt per request)"
MESSAGES = "a non-empty list of {role, content} objects"
CONTENT = 'a string or a list of text parts ({"type": "text", "text": ...})'


def non_empty(kind):
    return Annotated[kind, Field(min_length=1)]


Number = Annotated[float, Field(allow_inf_nan=False)]
MIN_TARGET_MS, MAX_TARGET_MS = 1, 30 * 86400 * 1000      # request_qos.py checks them too
Millis = Annotated[float, Field(ge=MIN_TARGET_MS, le=MAX_TARGET_MS, allow_inf_nan=False)]
TokenId = Annotated[int, Field(ge=0)]      # < the vocabulary size too, checked by protocol.py
TokenIds = non_empty(list[TokenId])
BatchOfOne = Field(min_length=1, max_length=1)   # OpenAI's batch forms, of one prompt only (a request per prompt)
Prompt = Annotated[non_empty(str) | TokenIds | Annotated[list[non_empty(str)], BatchOfOne]
                   | Annotated[list[TokenIds], BatchOfOne],
                   expect(PROMPT)]
MAX_STOP_STRINGS = 16       # OpenAI allows 4, vLLM any number: each is searched for after every token
MAX_STOP_CHARS = 256
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
STOP = (f"a non-empty string of at most {MAX_STOP_CHARS} characters or a list of at most {MAX_STOP_STRINGS} of "
        "them")
Stop = Annotated[StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)], expect(STOP)]


MAX_CHOICES = 16         # `n`: a request's choices each hold their own KV blocks and queue slot


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(Strict):
    include_usage: bool | None = Field(None, description="a last chunk (no choices) with the request's usage")
    continuous_usage_stats: bool | None = Field(None, description="vLLM's: every chunk carries the usage so far")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[str | list[TextPart], expect(CONTENT)] | None = Field(
        None, description=CONTENT + " (null only for an assistant message with tool_calls)")
    tool_calls: list[dict] | None = Field(None, description="assistant: the tool calls it made, as OpenAI returns them")
    tool_call_id: str | None = Field(None, description="tool: the id of the call this message answers")
    name: str | None = Field(None, description="tool: the function's name (optional)")


Messages = Annotated[list[ChatMessage], Field(min_length=1), expect(MESSAGES, shallow=True)]


# field -> the values that mean "off": anything else is refused with a 400 naming the field (null is off)
UNHONOURED = {
    "best_of": (1,),
    "functions": ([],), "function_call": ("none",), "logit_bias": ({},), "suffix": ("",),
    "length_penalty": (1,), "min_tokens": (0,),
    "use_beam_search": (False,), "prompt_logprobs": (0,),
    "guided_grammar": (), "structured_outputs": (), "modalities": (["text"],), "audio": (), "prediction": (),
    "reasoning_effort": (), "web_search_options": (), "store": (False,),
    "truncate_prompt_tokens": (), "allowed_token_ids": (), "bad_words": ([],), "logits_processors": (),
    "chat_template": (), "chat_template_kwargs": ({},), "add_generation_prompt": (True,),
    "continue_final_message": (False,),
}


def unhonoured():
    """A field niyama refuses unless it is left out or holds its "off" value (`UNHONOURED`)."""
    return Field(None, description="not supported: leave it out (or send its off value)")


def only_off_values(schema: dict, model) -> None:
    """The schema of an `UNHONOURED` field allows only its off values and null (what the server accepts)."""
    for key, off in UNHONOURED.items():
        if key in schema.get("properties", {}):
            schema["properties"][key]["enum"] = [*off, None]


class GenerationRequest(Strict):
    """The fields /v1/completions and /v1/chat/completions share."""
    model_config = ConfigDict(strict=True, extra="ignore", json_schema_extra=only_off_values)
    model: str | None = Field(None, description="the served model's name, or leave it out")
    max_tokens: int | None = Field(None, ge=1, description="default: 16 for completions; for chat, the room left")
    temperature: Number | None = Field(None, description="0 = greedy, else at least 0.01; default: the model's")
    top_p: Number | None = Field(None, description="in (0, 1]; default: the model's")
    top_k: int | None = Field(None, ge=-1, description="0 or -1 = off; default: the model's")
    seed: Annotated[int, Field(ge=0, lt=2**63), expect("an integer in [0, 2^63)")] | None = Field(
        None, description="this request's own random stream (default: drawn from the server's seed)")
    stop: Stop | None = Field(None, description=f"stop strings, not included in the text: at most {MAX_STOP_STRINGS} "
                              f"of at most {MAX_STOP_CHARS} characters each")
    include_stop_str_in_output: bool | None = Field(
        None, description="vLLM's: the text keeps the stop string that ended it (default false)")
    stop_token_ids: list[TokenId] | None = Field(None, description="token ids (in the vocabulary) that end the "
                                                 "text; not included in it")
    ignore_eos: bool | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = Field(None, description="only with stream: true")
    return_token_ids: bool | None = Field(None, description="put the generated token ids in each choice")
    # QoS: one of tier, service_tier, explicit targets (ttft_ms + tbt_ms, or ttlt_ms); priority beside any
    tier: str | None = Field(None, description="a tier of this server (GET /v1/models lists them)")
    service_tier: str | None = Field(None, description="OpenAI's auto/default/flex/scale/priority, or a tier name")
    ttft_ms: Millis | None = Field(None, description="time to first token target, 1 ms to 30 days; needs tbt_ms")
    tbt_ms: Millis | None = Field(None, description="time between tokens target, 1 ms to 30 days; needs ttft_ms")
    ttlt_ms: Millis | None = Field(None, description="time to last token target (a batch request), 1 ms to 30 "
                                   "days")
    priority: Annotated[str | int, expect("'important', 'low' or an integer")] | None = Field(
        None, description="'important' (default) or 'low'; or vLLM's integer (lower runs first; > 0 is low)")
    min_p: Number | None = Field(None, description="in [0, 1]: drop tokens less likely than min_p x the top one; "
                                 "0 = off")
    repetition_penalty: Number | None = Field(None, description="> 0: a token seen in the prompt or the output "
                                              "has its logit divided (if positive) or multiplied by it; 1 = off")
    presence_penalty: Number | None = Field(None, description="in [-2, 2]: subtracted once from the logit of "
                                            "every token already in the output; 0 = off")
    frequency_penalty: Number | None = Field(None, description="in [-2, 2]: subtracted from a token's logit "
                                             "once per time it is in the output; 0 = off")
    logprobs: Annotated[bool | int, expect("true/false (chat) or an integer in [0, 20] (completions)")] | None = Field(
        None, description="chat: true for each token's log-probability; completions: an integer N in [0, 20], "
                          "each token's log-probability and the N most likely tokens' (the model's raw "
                          "distribution, before penalties, temperature and filters, as vLLM reports it)")
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = Field(
        None, description="chat, with logprobs true: the N most likely tokens at each position, N in [0, 20]")
    # OpenAI and vLLM fields niyama does not honour: refused unless off
    n: int | None = Field(None, ge=1, le=MAX_CHOICES, description=f"choices to generate, 1 to {MAX_CHOICES} "
                          "(each its own draw; with a seed, choice i uses seed + i)")
    best_of: int | None = unhonoured()
    echo: bool | None = Field(None, description="completions: the text starts with the prompt (not with "
                                                "logprobs: niyama does not compute the prompt's)")
    logit_bias: dict | None = unhonoured()
    suffix: str | None = unhonoured()
    tools: list | None = Field(None, description="chat: functions the model may call ({'type': 'function', "
                               "'function': {'name', 'description', 'parameters'}})")
    tool_choice: Any = Field(None, description="chat: 'auto' (default with tools), 'none', 'required', or "
                             "{'type': 'function', 'function': {'name': ...}}; required and named are enforced by "
                             "a grammar")
    parallel_tool_calls: bool | None = Field(None, description="chat: several calls in one answer (default true)")
    functions: list | None = unhonoured()
    function_call: Any = unhonoured()
    response_format: dict | None = Field(None, description="{'type': 'json_object'} or {'type': 'json_schema', "
                                         "'json_schema': {'name': ..., 'schema': {...}}}: the output is JSON (valid "
                                         "against the schema), enforced token by token")
    length_penalty: Number | None = unhonoured()
    min_tokens: int | None = unhonoured()
    use_beam_search: bool | None = unhonoured()
    prompt_logprobs: int | None = unhonoured()
    guided_json: Any = Field(None, description="vLLM's: a JSON schema the output follows")
    guided_regex: str | None = Field(None, description="vLLM's: a regular expression the output matches")
    guided_choice: list[str] | None = Field(None, description="vLLM's: the output is one of these strings")
    guided_grammar: Any = unhonoured()
    structured_outputs: Any = unhonoured()
    modalities: list | None = unhonoured()
    audio: Any = unhonoured()
    prediction: Any = unhonoured()
    reasoning_effort: Any = unhonoured()
    web_search_options: Any = unhonoured()
    store: bool | None = unhonoured()
    truncate_prompt_tokens: Any = unhonoured()
    allowed_token_ids: Any = unhonoured()
    bad_words: list | None = unhonoured()
    logits_processors: Any = unhonoured()
    chat_template: Any = unhonoured()
    chat_template_kwargs: dict | None = unhonoured()
    add_generation_prompt: bool | None = unhonoured()
    continue_final_message: bool | None = unhonoured()


class CompletionRequest(GenerationRequest):
    prompt: Prompt = Field(description=PROMPT + "; a batch of one ([prompt]) is accepted")


class ChatCompletionRequest(GenerationRequest):
    messages: Messages = Field(description=MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens")


class TokenizeRequest(Strict):
    model: str | None = None
    prompt: Prompt | None = Field(None, description=PROMPT + "; or send messages (not both)")
    messages: Messages | None = Field(None, description=MESSAGES + ", rendered with the chat template; or send "
                                      "prompt (not both)")


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[TokenId] = Field(description="token ids (in the vocabulary)")


def validate(model: type[Strict], body: dict) -> Strict:
    """`body` as a `model`; a ValidationError becomes a 400 that names the field."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise from_validation(e.errors(include_url=False), model.model_fields) from None


# --- responses ----------------------------------------------------------------

ServiceTier = Literal["auto", "default", "flex", "scale", "priority"]   # OpenAI's; typed clients parse an enum


class Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class Usage(Body):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class QoS(Body):
    """The `niyama` object: the tier that served the request and whether it was relegated."""
    tier: str
    priority: Literal["important", "low"]
    relegated: bool


class TopLogprob(Body):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Body):
    """OpenAI's chat `logprobs`: one entry per generated token."""
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class CompletionLogprobs(Body):
    """OpenAI's legacy completions `logprobs`: parallel lists over the generated tokens."""
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(Body):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = Field(description="stop, length (abort: the request was cancelled)")
    token_ids: list[int] | None = Field(None, description="with return_token_ids")


class Completion(Body):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    service_tier: ServiceTier
    choices: list[CompletionChoice]
    usage: Usage
    niyama: QoS


CHUNK_USAGE = "in the last chunk with include_usage; in every chunk with continuous_usage_stats (so far)"
CHUNK_QOS = "in the chunk with the finish_reason"


class CompletionChunk(Completion):
    """One server-sent event of a streamed completion."""
    usage: Usage | None = Field(None, description=CHUNK_USAGE)
    niyama: QoS | None = Field(None, description=CHUNK_QOS)


class ToolCallFunction(Body):
    name: str
    arguments: str = Field(description="a JSON object, as text")


class ToolCallBody(Body):
    id: str
    type: Literal["function"]
    function: ToolCallFunction


class ToolCallDelta(ToolCallBody):
    index: int


class AssistantMessage(Body):
    role: Literal["assistant"]
    content: str | None = Field(description="null when the answer is only tool calls")
    tool_calls: list[ToolCallBody] | None = None


class ChatChoice(Body):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None
    token_ids: list[int] | None = None


class ChatCompletion(Body):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    service_tier: ServiceTier
    choices: list[ChatChoice]
    usage: Usage
    niyama: QoS


class Delta(Body):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = Field(None, description="each call whole, in the choice's last chunks")


class ChatChunkChoice(Body):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None
    token_ids: list[int] | None = None


class ChatCompletionChunk(ChatCompletion):
    """One server-sent event of a streamed chat completion."""
    object: Literal["chat.completion.chunk"]
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(None, description=CHUNK_USAGE)
    niyama: QoS | None = Field(None, description=CHUNK_QOS)


class ModelCard(Body):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int
    vocab_size: int
    default_sampling: dict[str, float | int]
    tiers: list[str]
    default_tier: str


class ModelList(Body):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(Body):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(Body):
    prompt: str


class Version(Body):
    version: str


class EngineState(Body):
    mode: str
    pid: int | None


class Health(Body):
    status: Literal["ok", "degraded"]
    reason: str | None = None
    model: str
    kv_blocks_free: int
    kv_blocks: int
    kv_blocks_cached: int = Field(description="blocks holding reusable prompt prefixes (prefix cache), in use or idle")
    engine: EngineState


class ErrorDetail(Body):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(Body):
    error: ErrorDetail


# --- OpenAPI --------------------------------------------------------------------

REF = "#/components/schemas/{model}"
ERRORS = {400: "invalid request (error.param names the field)", 401: "missing or wrong API key",
          404: "no such model", 413: "body too large", 415: "not JSON", 429: "queue full or deadline infeasible",
          503: "the engine stopped"}
GENERATION_ERRORS = (400, 401, 404, 413, 415, 429, 503)


def route(response: type[Body], request: type[Strict] | None = None, chunk: type[Body] | None = None,
          errors: tuple[int, ...] = ()) -> dict:
    """A route's arguments: its response model (FastAPI validates and serializes through it) and, for the
    schema, its request body, its stream chunks and its error statuses."""
    responses = {code: {"model": ErrorResponse, "description": ERRORS[code]} for code in errors}
    if chunk is not None:
        responses[200] = {"content": {"text/event-stream": {"schema": {"$ref": REF.format(model=chunk.__name__)}}},
                          "description": "JSON, or with stream: true server-sent events, one chunk each"}
    extra = {} if request is None else {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": REF.format(model=request.__name__)}}}}}
    return {"response_model": response, "response_model_exclude_unset": True, "responses": responses,
            "openapi_extra": extra}


def openapi(app) -> dict:
    """FastAPI's schema plus the request and chunk models the routes refer to, without FastAPI's 422 (bad
    input is a 400 here)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        _, defs = models_json_schema(
            [(m, "validation") for m in (CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest)]
            + [(m, "serialization") for m in (CompletionChunk, ChatCompletionChunk)], ref_template=REF)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        components.update(defs["$defs"])
        for operations in schema["paths"].values():
            for operation in operations.values():
                operation["responses"].pop("422", None)
        app.openapi_schema = schema
    return app.openapi_schema

