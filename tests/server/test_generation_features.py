"""Structured outputs over real HTTP: a real server on 127.0.0.1 with the default model (SmolLM2-135M, CPU) and
the official `openai` client. Every output is parsed and validated with `jsonschema`."""

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
