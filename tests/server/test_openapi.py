"""The OpenAI types of schemas.py against a real server on 127.0.0.1 (default model, CPU): /openapi.json
carries every endpoint's request and response schemas, real responses validate against the models and
the openai client's types, bad types are a 400 naming the field, and continuous usage stats stream."""

from __future__ import annotations

import json

import pytest

httpx = pytest.importorskip("httpx")
openai_types = pytest.importorskip("openai.types")

from openai.types.chat import ChatCompletion as OpenAIChatCompletion  # noqa: E402
from openai.types.chat import ChatCompletionChunk as OpenAIChatCompletionChunk  # noqa: E402
from pydantic import BaseModel  # noqa: E402
from test_server import start_server, stop_server  # noqa: E402

from niyama.server import schemas  # noqa: E402
from niyama.server.errors import APIError  # noqa: E402

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    url, handle = start_server(tmp_path_factory)
    yield url
    stop_server(handle)


def resolve(spec: dict, node: dict) -> dict:
    ref = node.get("$ref")
    return resolve(spec, spec["components"]["schemas"][ref.rsplit("/", 1)[1]]) if ref else node


def test_openapi_has_request_and_response_schemas_for_every_endpoint(server):
    spec = httpx.get(f"{server}/openapi.json", timeout=30).json()
    paths = spec["paths"]
    for path, needed in (("/v1/chat/completions", {"messages", "max_completion_tokens"}),
                         ("/v1/completions", {"prompt"})):
        op = paths[path]["post"]
        body = resolve(spec, op["requestBody"]["content"]["application/json"]["schema"])
        assert needed | {"max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "tier",
                         "service_tier", "ttft_ms", "tbt_ms", "ttlt_ms", "priority", "min_p", "presence_penalty",
                         "n", "logprobs"} <= set(body["properties"]), path
        assert needed & set(body["required"])
        options = resolve(spec, body["properties"]["stream_options"]["anyOf"][0])
        assert {"include_usage", "continuous_usage_stats"} <= set(options["properties"])
        content = op["responses"]["200"]["content"]
        assert resolve(spec, content["application/json"]["schema"])["properties"]["usage"]
        chunk = resolve(spec, content["text/event-stream"]["schema"])
        assert {"choices", "usage", "niyama", "service_tier"} <= set(chunk["properties"])
        error = resolve(spec, op["responses"]["400"]["content"]["application/json"]["schema"])
        assert set(resolve(spec, error["properties"]["error"])["properties"]) == {"message", "type", "param", "code"}
    messages = body_of(spec, "/v1/chat/completions")["properties"]["messages"]
    assert resolve(spec, messages["items"])["properties"]["role"]["enum"] == ["system", "developer", "user",
                                                                               "assistant", "tool"]
    assert body_of(spec, "/v1/completions")["properties"]["max_tokens"]["anyOf"][0] == {"minimum": 1,
                                                                                       "type": "integer"}
    assert set(body_of(spec, "/tokenize")["properties"]) >= {"prompt", "messages"}
    assert body_of(spec, "/detokenize")["required"] == ["tokens"]
    for path, operations in paths.items():
        for method, op in operations.items():
            ok = op["responses"]["200"]
            assert ok["content"] and all(c.get("schema") for c in ok["content"].values()), (path, method)
            assert "422" not in op["responses"], (path, method)      # bad input is a 400 here
    models = resolve(spec, paths["/v1/models"]["get"]["responses"]["200"]["content"]["application/json"]["schema"])
    assert resolve(spec, models["properties"]["data"]["items"])["properties"]["max_model_len"]
    tier = resolve(spec, paths["/v1/completions"]["post"]["responses"]["200"]["content"]["application/json"]
                   ["schema"])["properties"]["service_tier"]
    assert tier["enum"] == ["auto", "default", "flex", "scale", "priority"]


def body_of(spec: dict, path: str) -> dict:
    return resolve(spec, spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"])


def exact(model: type[BaseModel], body: dict) -> BaseModel:
    """`body` as `model`, with no field the model lacks (the schema tells the whole response)."""
    parsed = model.model_validate(body)
    assert not parsed.model_extra, (model.__name__, parsed.model_extra)
    return parsed


def sse(client: httpx.Client, path: str, body: dict) -> list[dict]:
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        return [json.loads(x[5:]) for x in r.iter_lines() if x.startswith("data:") and x != "data: [DONE]"]


def test_real_responses_validate_against_the_models_and_openais_types(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        chat = c.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 8, "temperature": 0,
                                                    "service_tier": "flex", "return_token_ids": True}).json()
        exact(schemas.ChatCompletion, chat)
        assert len(chat["choices"][0]["token_ids"]) == chat["usage"]["completion_tokens"]
        typed = OpenAIChatCompletion.model_validate(chat)
        assert typed.service_tier == "flex" and chat["niyama"]["tier"] == "Q3"
        plain = c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3}).json()
        assert "token_ids" not in plain["choices"][0]            # only when asked for
        exact(schemas.Completion, plain)
        openai_types.Completion.model_validate(plain)
        for event in sse(c, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 5, "stream": True,
                                                     "stream_options": {"include_usage": True}}):
            exact(schemas.ChatCompletionChunk, event)
            OpenAIChatCompletionChunk.model_validate(event)
        for event in sse(c, "/v1/completions", {"prompt": "Hello", "max_tokens": 3, "stream": True,
                                                "return_token_ids": True}):
            exact(schemas.CompletionChunk, event)
        for path, model in (("/v1/models", schemas.ModelList), (f"/v1/models/{plain['model']}", schemas.ModelCard),
                            ("/version", schemas.Version), ("/health", schemas.Health)):
            exact(model, c.get(path).json())
        tokens = exact(schemas.TokenizeResponse, c.post("/tokenize", json={"messages": CHAT}).json())
        exact(schemas.DetokenizeResponse, c.post("/detokenize", json={"tokens": tokens.tokens}).json())
        exact(schemas.ErrorResponse, c.post("/v1/completions", json={"prompt": "hi", "top_k": "x"}).json())


BAD_TYPES = [   # (path, body, param, words the message must contain)
    ("/v1/completions", {"prompt": "hi", "max_tokens": "5"}, "max_tokens", "max_tokens must be an integer"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": True}, "max_tokens", "max_tokens must be an integer"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 5.0}, "max_tokens", "max_tokens must be an integer"),
    ("/v1/completions", {"prompt": "hi", "top_k": False}, "top_k", "top_k must be an integer"),
    ("/v1/completions", {"prompt": "hi", "temperature": "0.5"}, "temperature", "temperature must be a number"),
    ("/v1/completions", {"prompt": "hi", "ignore_eos": 1}, "ignore_eos", "ignore_eos must be true or false"),
    ("/v1/completions", {"prompt": {"text": "hi"}}, "prompt", "prompt must be a non-empty string or a list of token"),
    ("/v1/completions", {"prompt": [1, "a"]}, "prompt", "prompt must be a non-empty string or a list of token"),
    ("/v1/completions", {}, "prompt", "prompt is required"),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, "stop",
     "stop must be a non-empty string of at most 256 characters or a list"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [1, "2"]}, "stop_token_ids[1]", "must be an integer"),
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": "yes"}},
     "stream_options.include_usage", "stream_options.include_usage must be true or false"),
    ("/v1/completions", {"prompt": "hi", "stream_options": [True]}, "stream_options", "must be an object"),
    ("/v1/completions", {"prompt": "hi", "tier": 1}, "tier", "tier must be a string"),
    ("/v1/completions", {"prompt": "hi", "ttlt_ms": "60000"}, "ttlt_ms", "ttlt_ms must be a number"),
    ("/v1/completions", {"prompt": "hi", "ttft_ms": float("inf"), "tbt_ms": 5}, "ttft_ms", "finite number"),
    ("/v1/completions", {"prompt": "hi", "priority": [1]}, "priority", "'important', 'low' or an integer"),
    ("/v1/completions", {"prompt": "hi", "seed": 2**63}, "seed", "seed must be an integer in [0, 2^63)"),
    ("/v1/completions", {"prompt": "hi", "top_p": 3}, "top_p", "top_p must be in (0, 1]"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": "high"}, "presence_penalty",
     "presence_penalty must be a number"),
    ("/v1/completions", {"prompt": "hi", "min_p": -0.1}, "min_p", "min_p must be in [0, 1]"),
    ("/v1/completions", {"prompt": "hi", "min_tokens": 4}, "min_tokens", "not supported"),
    ("/v1/completions", {"prompt": "hi", "include_stop_str_in_output": "yes"}, "include_stop_str_in_output",
     "include_stop_str_in_output must be true or false"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content", "messages[0].content must be a string or a list of text parts"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role",
     "messages[0].role 'wizard' is not supported; use 'system'"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id",
     "messages[0].tool_call_id is required"),
    ("/v1/chat/completions", {"messages": [CHAT[0], "hi"]}, "messages[1]", "messages[1] must be an object"),
    ("/v1/chat/completions", {"messages": []}, "messages", "messages must be a non-empty list of {role, content}"),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 0}, "max_completion_tokens",
     "max_completion_tokens must be at least 1"),
    ("/tokenize", {"prompt": 5}, "prompt", "prompt must be a non-empty string"),
    ("/tokenize", {}, "prompt", "prompt or messages is required"),
    ("/detokenize", {"tokens": "1 2"}, "tokens", "tokens must be a list"),
    ("/detokenize", {}, "tokens", "tokens is required"),
]


@pytest.mark.parametrize("path,body,param,words", BAD_TYPES, ids=[f"{b[0]}:{b[2]}" for b in BAD_TYPES])
def test_a_bad_type_is_a_400_naming_the_field(server, path, body, param, words):
    r = httpx.post(f"{server}{path}", content=json.dumps(body), headers={"Content-Type": "application/json"},
                   timeout=30)   # json.dumps: Infinity too
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["type"]) == (param, "invalid_request_error") and words in err["message"], err


def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        for path, body in (("/v1/completions", {"prompt": "Count to twenty:", "ignore_eos": True}),
                           ("/v1/chat/completions", {"messages": CHAT})):
            body = {**body, "max_tokens": 12, "temperature": 0}
            whole = c.post(path, json=body).json()["usage"]
            events = sse(c, path, {**body, "stream": True, "stream_options": {"continuous_usage_stats": True}})
            counts = [e["usage"]["completion_tokens"] for e in events]
            assert all(e["usage"]["prompt_tokens"] == whole["prompt_tokens"] for e in events)
            assert all(e["usage"]["total_tokens"] == e["usage"]["prompt_tokens"] + n for e, n in zip(events, counts))
            tokens = counts[:-1]                               # the last chunk carries the finish_reason
            assert tokens == sorted(set(tokens)) and tokens[0] >= 1, counts     # strictly increasing
            assert counts[-1] == whole["completion_tokens"] and events[-1]["choices"][0]["finish_reason"]
            both = sse(c, path, {**body, "stream": True,
                                 "stream_options": {"continuous_usage_stats": True, "include_usage": True}})
            assert both[-1]["choices"] == [] and both[-1]["usage"] == whole       # include_usage's last chunk
            assert all("usage" in e for e in both)
            assert all("usage" not in e for e in sse(c, path, {**body, "stream": True}))


def test_every_unhonoured_field_is_declared_and_the_penalties_are_numbers():
    fields = schemas.GenerationRequest.model_fields
    assert set(schemas.UNHONOURED) <= set(fields)
    for name in ("min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        assert fields[name].default is None
        assert schemas.CompletionRequest.model_validate({"prompt": "x", name: 1}).model_dump()[name] == 1.0


def test_strict_types_hold_in_nested_objects_given_as_dicts():
    """Strict mode still takes JSON objects for nested models (a dict from json.loads), yet no coercion."""
    req = schemas.ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
         "stream_options": {"include_usage": True}, "unknown": {"ignored": 1}})
    assert req.messages[0].content[0].text == "hi" and req.stream_options.include_usage is True
    assert "unknown" not in req.model_dump()
    for bad in ({"include_usage": 1}, {"include_usage": "true"}):
        with pytest.raises(APIError, match="stream_options.include_usage must be true or false"):
            schemas.validate(schemas.CompletionRequest, {"prompt": "x", "stream_options": bad})
