"""Structured outputs, tool calls and n choices over real HTTP: a real server on 127.0.0.1 with the default model
(SmolLM2-135M, CPU) and the official `openai` client. Every JSON output is parsed and validated with
`jsonschema`."""

from __future__ import annotations

import json
import re

import pytest

from test_server import MODEL, chat, start_server, stop_server, wait_all_blocks_free

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pydantic = pytest.importorskip("pydantic")

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "colors"],
          "properties": {"name": {"type": "string", "maxLength": 24},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "colors": {"type": "array", "maxItems": 3,
                                    "items": {"type": "string", "enum": ["red", "green", "blue"]}}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    url, proc = start_server(tmp_path_factory)
    yield url
    stop_server(proc)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


def test_the_openai_clients_parse_with_a_pydantic_model(client):
    class Person(pydantic.BaseModel):
        name: str
        age: int
        city: str

    r = client.beta.chat.completions.parse(
        model=MODEL, messages=chat("Invent a person: name, age and city."), response_format=Person,
        temperature=0.7, top_p=0.9, max_tokens=80)
    person = r.choices[0].message.parsed
    assert isinstance(person, Person) and r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), Person.model_json_schema())


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_output_validates_sampled_and_streamed(client, stream):
    for seed in range(3):
        kwargs = dict(model=MODEL, messages=chat("Describe a person as JSON."), max_tokens=120, seed=seed,
                      temperature=1.0, response_format=json_schema_format(PERSON))
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in
                           client.chat.completions.create(stream=True, **kwargs) if c.choices)
        else:
            text = client.chat.completions.create(**kwargs).choices[0].message.content
        jsonschema.validate(json.loads(text), PERSON)


def test_json_object_mode_and_completions_with_guided_fields(client, server):
    r = client.chat.completions.create(model=MODEL, messages=chat("What is the capital of France? Answer in JSON."),
                                       max_tokens=100, response_format={"type": "json_object"}, temperature=0)
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.completions.create(model=MODEL, prompt="The answer is", max_tokens=10,
                                  extra_body={"guided_choice": ["yes", "no", "maybe"]})
    assert r.choices[0].text in ("yes", "no", "maybe")
    r = client.completions.create(model=MODEL, prompt="A date:", max_tokens=20,
                                  extra_body={"guided_regex": r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"})
    assert re.fullmatch(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", r.choices[0].text)
    r = client.completions.create(model=MODEL, prompt="Person:", max_tokens=120, extra_body={"guided_json": PERSON})
    jsonschema.validate(json.loads(r.choices[0].text), PERSON)


@pytest.mark.parametrize("body, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "nonsense"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "json_schema"),
    ({"guided_regex": "(unclosed"}, "regular expression"),
    ({"guided_choice": []}, "non-empty"),
    ({"guided_regex": "a+", "guided_choice": ["a"]}, "one output constraint"),
])
def test_a_constraint_that_cannot_compile_is_a_400_naming_it(server, body, words):
    r = httpx.post(f"{server}/v1/chat/completions", json={"messages": chat("hi"), "max_tokens": 4, **body},
                   timeout=60)
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]["message"], r.text
    health, _ = wait_all_blocks_free(server)
    assert health["kv_blocks_free"] == health["kv_blocks"]


# --- n choices ------------------------------------------------------------------------------------------------

def test_n_choices_streamed_and_not_match_their_seeds(client, server):
    """Choice i with seed s is the answer of a single request with seed s + i; streamed chunks carry each
    choice's index; usage counts the prompt once and every choice's tokens."""
    kwargs = dict(model=MODEL, messages=chat("Name a fruit."), max_tokens=12, temperature=1.0, seed=40)
    r = client.chat.completions.create(n=3, **kwargs)
    assert [c.index for c in r.choices] == [0, 1, 2]
    solo = [client.chat.completions.create(**{**kwargs, "seed": 40 + i}).choices[0].message.content
            for i in range(3)]
    assert [c.message.content for c in r.choices] == solo
    assert len(set(solo)) > 1, solo               # distinct draws, not one answer three times
    one = client.chat.completions.create(**kwargs)
    assert r.usage.prompt_tokens == one.usage.prompt_tokens
    assert r.usage.completion_tokens == sum(client.chat.completions.create(**{**kwargs, "seed": 40 + i})
                                            .usage.completion_tokens for i in range(3))
    texts, finished, usage = ["", "", ""], set(), None
    for c in client.chat.completions.create(n=3, stream=True, stream_options={"include_usage": True}, **kwargs):
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finished.add(ch.index)
        usage = c.usage or usage
    assert texts == solo and finished == {0, 1, 2}
    assert usage.completion_tokens == r.usage.completion_tokens
    r = client.completions.create(model=MODEL, prompt="One, two,", max_tokens=5, n=2, echo=True, temperature=0)
    assert [c.text for c in r.choices][0] == r.choices[1].text and r.choices[0].text.startswith("One, two,")
    health, _ = wait_all_blocks_free(server)
    assert health["kv_blocks_free"] == health["kv_blocks"]


def test_n_choices_share_the_prompts_cached_blocks(server):
    """Choices after the first start from the first's cached prompt: a long prompt's n=4 request queries the
    prefix cache for all 4 and hits for the last 3."""
    def counters():
        text = httpx.get(f"{server}/metrics", timeout=10).text
        get = lambda name: sum(float(line.split()[-1]) for line in text.splitlines()
                               if line.startswith(name + "{"))
        return get("niyama:prefix_cache_queries_total"), get("niyama:prefix_cache_hits_total")

    q0, h0 = counters()
    prompt = "Tell me about the weather in a city you choose. " * 20 + " Unique tail 7361."
    r = httpx.post(f"{server}/v1/completions", json={"prompt": prompt, "max_tokens": 4, "n": 4, "temperature": 1},
                   timeout=120)
    assert r.status_code == 200 and len(r.json()["choices"]) == 4
    q1, h1 = counters()
    n_prompt = r.json()["usage"]["prompt_tokens"]
    cached = (n_prompt - 1) // 16 * 16          # full blocks, less the last token (its logits are needed)
    assert q1 - q0 == 4 * n_prompt and h1 - h0 == 3 * cached, (q1 - q0, h1 - h0, n_prompt)


# --- tool calls -----------------------------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 30},
                                  "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 30}}}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


def check_calls(calls, names=("get_weather", "get_time")):
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_tool_choice_required_and_named_always_give_valid_calls(client):
    ask = chat("What is the weather in Paris, and what time is it there?")
    for seed in range(2):
        r = client.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER, TIME], tool_choice="required",
                                           max_tokens=150, temperature=1.0, seed=seed)
        assert r.choices[0].finish_reason == "tool_calls"
        check_calls(r.choices[0].message.tool_calls)
    r = client.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER, TIME], max_tokens=150,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}},
                                       parallel_tool_calls=False)
    calls = r.choices[0].message.tool_calls
    assert len(calls) == 1 and r.choices[0].message.content is None
    check_calls(calls, names=("get_time",))


def test_streamed_tool_calls_come_as_openai_deltas(client):
    calls, reasons, roles = {}, [], []
    for c in client.chat.completions.create(model=MODEL, messages=chat("Weather in Oslo?"), tools=[WEATHER],
                                            tool_choice="required", max_tokens=150, stream=True):
        for ch in c.choices:
            roles.append(ch.delta.role)
            for d in ch.delta.tool_calls or ():
                entry = calls.setdefault(d.index, {"id": d.id, "name": d.function.name, "arguments": ""})
                entry["arguments"] += d.function.arguments or ""
            reasons.append(ch.finish_reason)
    assert reasons[-1] == "tool_calls" and roles[0] == "assistant" and calls
    for call in calls.values():
        assert call["name"] == "get_weather" and call["id"].startswith("call_")
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS["get_weather"])


def test_a_multi_turn_exchange_with_a_tool_result(client, server):
    """The assistant's tool call and the tool's answer go back in; the model answers in text (tool_choice
    none), and the prompt holds both the call and the result."""
    messages = chat("What is the weather in Paris?")
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="required",
                                       max_tokens=150, temperature=0)
    call = r.choices[0].message.tool_calls[0]
    messages += [r.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 21, "sky": "sunny"})}]
    r2 = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none",
                                        max_tokens=40, temperature=0)
    assert r2.choices[0].message.content and not r2.choices[0].message.tool_calls
    assert r2.choices[0].finish_reason in ("stop", "length")
    ids = httpx.post(f"{server}/tokenize", json={"messages": messages}, timeout=30).json()["tokens"]
    assert len(ids) == r2.usage.prompt_tokens
    prompt = httpx.post(f"{server}/detokenize", json={"tokens": ids}, timeout=30).json()["prompt"]
    assert '"name": "get_weather"' in prompt and "sunny" in prompt and call.function.arguments in prompt
    r3 = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=40)  # auto
    assert r3.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("body, words", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "send one of them"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
])
def test_bad_tool_requests_are_400s(server, body, words):
    r = httpx.post(f"{server}/v1/chat/completions", json={"messages": chat("hi"), "max_tokens": 4, **body},
                   timeout=60)
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]["message"] + str(r.json()["error"]["param"]), r.text
    r = httpx.post(f"{server}/v1/completions", json={"prompt": "hi", "max_tokens": 4, "tools": [WEATHER]}, timeout=60)
    assert r.status_code == 400 and "chat" in r.json()["error"]["message"]
