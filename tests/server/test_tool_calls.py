"""niyama/server/tool_calls.py without a server: the request's tools checked, the prompt with tools (rendered
through real chat templates), the two families' parsers (whole and streamed), and the forcing grammar run for
real in llguidance over the default model's tokenizer: valid calls accepted, invalid ones refused, and random
sampling under its masks always parsing into calls whose arguments satisfy their schemas."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from niyama.server.errors import APIError
from niyama.server.tool_calls import (Tool, ToolCallStream, ToolSpec, calls_text, family_of, finish_reason,
                                      message_tool_calls, messages_for_template, parse, parse_tool_request,
                                      render_without_template_support, template_renders_tools, tool_call_deltas,
                                      tool_grammar, tools_system_text)

llguidance = pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

TEMPLATES = Path(__file__).parent.parent / "data" / "chat_templates"
QWEN = (TEMPLATES / "qwen-2.5-instruct.jinja").read_text()
LLAMA3 = (TEMPLATES / "llama-3-instruct.jinja").read_text()
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>"
           "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
           "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "minLength": 1, "maxLength": 8},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
BOOK = {"type": "object", "properties": {
    "guests": {"type": "integer", "minimum": 1, "maximum": 12},
    "names": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 1, "maxItems": 3},
    "when": {"type": "object", "properties": {"day": {"type": "integer", "minimum": 1, "maximum": 31},
                                              "slot": {"enum": ["lunch", "dinner", "{late}"]}},
             "required": ["day", "slot"], "additionalProperties": False}},
    "required": ["guests", "when"], "additionalProperties": False}
POINT = {"type": "object", "$defs": {"coord": {"type": "number", "minimum": -90, "maximum": 90}},
         "properties": {"lat": {"$ref": "#/$defs/coord"}, "lon": {"$ref": "#/$defs/coord"},
                        "exact": {"type": "boolean"}},
         "required": ["lat", "lon", "exact"], "additionalProperties": False}
SCHEMAS = {"get_weather": WEATHER, "book_table": BOOK, "find-place_2": POINT}
TOOLS = [{"type": "function", "function": {"name": name, "description": f"the {name} tool", "parameters": schema}}
         for name, schema in SCHEMAS.items()]
FAMILIES = ("hermes", "llama3_json")


def spec(choice="required", parallel=True, tools=TOOLS) -> ToolSpec:
    return parse_tool_request(tools, choice, parallel)


# --- the request -----------------------------------------------------------------

def test_no_tools_and_tool_choice_none_mean_no_tool_calling():
    assert parse_tool_request(None) is None
    assert parse_tool_request([], None) is None
    assert parse_tool_request(None, "none") is None
    assert parse_tool_request(TOOLS, "none") is None


def test_a_valid_request():
    got = parse_tool_request(TOOLS)
    assert got.choice == "auto" and got.parallel and got.named is None
    assert got.names == ("get_weather", "book_table", "find-place_2")
    assert got.allowed() == got.tools
    assert got.template_tools() == TOOLS
    named = parse_tool_request(TOOLS, {"type": "function", "function": {"name": "book_table"}}, False)
    assert (named.choice, named.named, named.parallel) == ("named", "book_table", False)
    assert [t.name for t in named.allowed()] == ["book_table"]
    assert parse_tool_request(TOOLS, "required").choice == "required"
    bare = parse_tool_request([{"type": "function", "function": {"name": "now", "strict": True}}])
    assert bare.tools == (Tool("now"),) and bare.template_tools() == [{"type": "function", "function": {"name": "now"}}]


def fn(**function):
    return [{"type": "function", "function": function}]


BAD = [   # (tools, tool_choice, parallel_tool_calls, param, words in the message)
    ({"type": "function"}, None, None, "tools", "must be a list"),
    ([{"type": "retrieval"}], None, None, "tools[0].type", "function tools only"),
    (["get_weather"], None, None, "tools[0].type", "function tools only"),
    ([{"type": "function"}], None, None, "tools[0].function", "must be an object with a name"),
    (fn(description="no name"), None, None, "tools[0].function.name", "1 to 64 letters"),
    (fn(name="get weather"), None, None, "tools[0].function.name", "'get weather'"),
    (fn(name="x" * 65), None, None, "tools[0].function.name", "1 to 64"),
    (fn(name="wetter_für"), None, None, "tools[0].function.name", "letters, digits"),
    (TOOLS + fn(name="get_weather"), None, None, "tools[3].function.name", "given twice"),
    (fn(name="f", parameters=["a"]), None, None, "tools[0].function.parameters", "JSON schema object"),
    (fn(name="f", parameters={"type": "string"}), None, None, "tools[0].function.parameters", "type 'object'"),
    (fn(name="f", description=3), None, None, "tools[0].function.description", "a string"),
    (fn(name="f", strict="yes"), None, None, "tools[0].function.strict", "true or false"),
    (TOOLS, "sometimes", None, "tool_choice", "'required'"),
    (TOOLS, {"type": "function", "function": {"name": "get_time"}}, None, "tool_choice.function.name",
     "'get_time', which is not in tools"),
    (TOOLS, {"type": "function", "function": {}}, None, "tool_choice.function.name", "needs the function's name"),
    (TOOLS, {"type": "function", "name": "get_weather"}, None, "tool_choice.function.name", "needs"),
    (None, "required", None, "tool_choice", "needs tools"),
    ([], "auto", None, "tool_choice", "needs tools"),
    (None, {"type": "function", "function": {"name": "get_weather"}}, None, "tool_choice", "needs tools"),
    (TOOLS, "auto", "yes", "parallel_tool_calls", "true or false"),
    (fn(name="get weather"), "none", None, "tools[0].function.name", "letters"),   # checked even when unused
]


@pytest.mark.parametrize("tools, choice, parallel, param, words", BAD)
def test_bad_requests_are_400s_naming_the_field(tools, choice, parallel, param, words):
    with pytest.raises(APIError) as e:
        parse_tool_request(tools, choice, parallel)
    assert e.value.status == 400 and e.value.param == param
    assert words in e.value.message


# --- family and prompt ------------------------------------------------------------

def test_family_from_the_chat_template():
    assert family_of(SMOLLM2, "llama") == "hermes"          # a "llama" with ChatML: the template decides
    assert family_of(QWEN, "qwen2") == "hermes"
    assert family_of(LLAMA3, "llama") == "llama3_json"
    assert family_of(None) == family_of("{{ messages }}") == "hermes"
    assert family_of(SMOLLM2, override="llama3_json") == "llama3_json"
    with pytest.raises(ValueError, match="unknown; choose from hermes, llama3_json"):
        family_of(QWEN, override="mistral")
    assert template_renders_tools(QWEN)
    assert not template_renders_tools(SMOLLM2) and not template_renders_tools(LLAMA3)
    assert not template_renders_tools(None)


CHAT = [
    {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
    {"role": "user", "content": "Weather in Köln and Paris? Book 2 for dinner."},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Köln", "unit": "celsius"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    {"role": "tool", "tool_call_id": "call_2", "content": '{"temp": 25}'},
    {"role": "assistant", "content": "21 and 25 °C.", "tool_calls": [
        {"id": "call_3", "type": "function", "function": {"name": "book_table", "arguments": ""}}]},
    {"role": "tool", "tool_call_id": "call_3", "content": "booked"},
    {"role": "user", "content": "Thanks"},
]


def test_messages_for_templates_that_render_tools():
    got = messages_for_template(CHAT)
    assert got[0] == {"role": "system", "content": "Be brief."}
    assert got[2]["content"] == "" and got[2]["tool_calls"][1] == {
        "id": "call_2", "type": "function", "function": {"name": "get_weather",
                                                         "arguments": {"city": "Paris", "unit": "celsius"}}}
    assert got[4] == {"role": "tool", "content": '{"temp": 25}', "tool_call_id": "call_2", "name": "get_weather"}
    assert got[5]["tool_calls"][0]["function"]["arguments"] == {}       # "" arguments: none
    assert CHAT[2]["tool_calls"][0]["function"]["arguments"].startswith("{")   # the request is not changed


@pytest.mark.parametrize("arguments", ['{"city": ', '["Paris"]', 7])
def test_history_arguments_must_be_a_json_object(arguments):
    chat = [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]}]
    with pytest.raises(APIError) as e:
        messages_for_template(chat)
    assert e.value.param == "messages[0].tool_calls[0].function.arguments"
    with pytest.raises(APIError, match=r"messages\[0\].tool_calls\[0\] must be"):
        messages_for_template([{"role": "assistant", "tool_calls": [{"id": "c"}]}])


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("gguf")
    from niyama.engine.tokenizer import Tokenizer
    from niyama.engine.weights import resolve

    return Tokenizer(resolve(None)[1])


def render(tokenizer, template, messages, tools=None):
    tokenizer.chat_template = template
    return tokenizer.apply_chat_template(messages, tools=tools)


def test_hermes_prompt_through_smollm2s_own_template(tokenizer):
    tools = spec("auto").tools
    messages = render_without_template_support(CHAT, tools, "hermes")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user", "user"]
    assert messages[0]["content"] == "Be brief.\n\n" + tools_system_text(tools, "hermes")
    prompt = render(tokenizer, SMOLLM2, messages)
    assert prompt.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert '\n{"type": "function", "function": {"name": "get_weather", "description": "the get_weather tool", ' \
           '"parameters": {"type": "object", "properties": {"city": ' in prompt
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Köln", "unit": '
            '"celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": '
            '"celsius"}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response>'
            '\n<tool_response>\n{"temp": 25}\n</tool_response><|im_end|>\n<|im_start|>assistant\n21 and 25 °C.\n'
            '<tool_call>\n{"name": "book_table", "arguments": {}}\n</tool_call><|im_end|>\n<|im_start|>user\n'
            '<tool_response>\nbooked\n</tool_response><|im_end|>\n<|im_start|>user\nThanks<|im_end|>\n'
            '<|im_start|>assistant\n') in prompt
    # no system message of its own: one is made (replacing the template's default); no tools: history only
    assert render_without_template_support(CHAT[1:2], tools, "hermes")[0] == {
        "role": "system", "content": tools_system_text(tools, "hermes")}
    assert render_without_template_support(CHAT[1:], [], "hermes")[0]["role"] == "user"


def test_hermes_text_is_what_qwens_template_writes(tokenizer):
    """The text form of a call is the one a template that renders tools writes (so the prompt of a model whose
    template lacks tools looks like one whose template has them), and it parses back to the same call."""
    prompt = render(tokenizer, QWEN, messages_for_template(CHAT), spec("auto").template_tools())
    block = calls_text([("get_weather", {"city": "Köln", "unit": "celsius"}),
                        ("get_weather", {"city": "Paris", "unit": "celsius"})], "hermes")
    assert "<|im_start|>assistant\n" + block + "<|im_end|>" in prompt
    assert '{"name": "get_weather", "description": "the get_weather tool"' in prompt
    assert "<tool_response>\n{\"temp\": 21}\n</tool_response>\n<tool_response>\n{\"temp\": 25}" in prompt
    _, calls = parse(block, "hermes", SCHEMAS)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Köln", "unit": "celsius"}), ("get_weather", {"city": "Paris", "unit": "celsius"})]


def test_llama3_prompt(tokenizer):
    tools = spec("auto").tools
    messages = render_without_template_support(CHAT, tools, "llama3_json", LLAMA3)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "user", "assistant", "user",
                                             "user"]
    assert messages[2]["content"] == ('{"name": "get_weather", "parameters": {"city": "Köln", "unit": "celsius"}}; '
                                      '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}')
    assert messages[3]["content"] == 'Result of get_weather:\n{"temp": 21}'
    assert messages[5]["content"] == '21 and 25 °C.\n{"name": "book_table", "parameters": {}}'
    prompt = render(tokenizer, LLAMA3, messages)
    assert "<|start_header_id|>system<|end_header_id|>\n\nBe brief.\n\nYou may call functions" in prompt
    assert '"parameters": <arguments as a JSON object>}' in prompt
    # a template that knows Llama-3.1's ipython role gets tool results under it
    with_ipython = render_without_template_support(CHAT, tools, "llama3_json", LLAMA3 + "{# ipython #}")
    assert with_ipython[3] == {"role": "ipython", "content": '{"temp": 21}'}
    _, calls = parse(messages[2]["content"], "llama3_json", SCHEMAS)
    assert [c.name for c in calls] == ["get_weather", "get_weather"]


# --- parsing ---------------------------------------------------------------------

def call(name, **arguments):
    return name, arguments


def calls_of(text, family):
    content, calls = parse(text, family, SCHEMAS)
    return content, [(c.name, json.loads(c.arguments)) for c in calls]


W = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
PARSED = [   # (text, family, content, calls)
    (f"<tool_call>\n{W}\n</tool_call>", "hermes", None, [call("get_weather", city="Paris", unit="celsius")]),
    (f"Let me check.\n<tool_call>\n{W}\n</tool_call>\n<tool_call>{W}</tool_call>", "hermes", "Let me check.",
     [call("get_weather", city="Paris", unit="celsius")] * 2),
    (f"  Checking. <tool_call>{W}</tool_call> between <tool_call>{W}</tool_call>\nafter\n", "hermes",
     "  Checking.\nbetween\nafter", [call("get_weather", city="Paris", unit="celsius")] * 2),
    (f"<tool_call>\n{W}", "hermes", None, [call("get_weather", city="Paris", unit="celsius")]),   # unclosed, whole
    ('<tool_call>{"name": "book_table", "parameters": {"guests": 2}}</tool_call>', "hermes", None,
     [call("book_table", guests=2)]),
    ('<tool_call>{"name": "book_table"}</tool_call>', "hermes", None, [call("book_table")]),
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "東京 \\"x\\""}}</tool_call>', "hermes", None,
     [call("get_weather", city='東京 "x"')]),
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "</tool_call> <tool_call>"}}</tool_call>', "hermes",
     None, [call("get_weather", city="</tool_call> <tool_call>")]),
    ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', "llama3_json", None,
     [call("get_weather", city="Paris", unit="celsius")]),
    ('<|python_tag|>{"name": "book_table", "arguments": {"guests": 3}}', "llama3_json", None,
     [call("book_table", guests=3)]),
    ('\n {"name": "book_table", "parameters": {"note": "a; b"}} ;{"name": "find-place_2", "parameters": {}};\n',
     "llama3_json", None, [call("book_table", note="a; b"), call("find-place_2")]),
]
PLAIN = [   # (text, family): stays content, untouched
    ("The weather is fine.", "hermes"), ("", "hermes"), ("<tool_call>", "hermes"),
    ("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": </tool_call>", "hermes"),   # bad JSON
    (f"<tool_call>{W}</tool_call><tool_call>{{\"name\": \"get_time\"}}</tool_call>", "hermes"),  # unknown name
    ('<tool_call>{"name": "get_weather", "arguments": "Paris"}</tool_call>', "hermes"),   # arguments not an object
    ('<tool_call>["get_weather"]</tool_call>', "hermes"),
    ('<tool_call>{"name": "get_weather", "arguments": {"t": NaN}}</tool_call>', "hermes"),
    (f"<tool_call>{W}\nand then some", "hermes"),
    ('{"name": "get_weather", "parameters": {}} and more', "llama3_json"),
    ('{"name": "get_weather", "parameters": {}} {"name": "get_weather", "parameters": {}}', "llama3_json"),
    ('{"name": "get_time", "parameters": {}}', "llama3_json"),
    ('{"city": "Paris"}', "llama3_json"), ('{"name": "get_weather", ', "llama3_json"),
    ('Sure: {"name": "get_weather", "parameters": {}}', "llama3_json"), ("<|python_tag|>", "llama3_json"),
    ("", "llama3_json"),
]


@pytest.mark.parametrize("text, family, content, calls", PARSED)
def test_parse_calls(text, family, content, calls):
    assert calls_of(text, family) == (content, calls)


@pytest.mark.parametrize("text, family", PLAIN)
def test_malformed_or_no_calls_are_plain_content(text, family):
    assert parse(text, family, SCHEMAS) == (text, [])


def test_response_shapes():
    _, calls = parse(f"<tool_call>{W}</tool_call>\n<tool_call>{W}</tool_call>", "hermes", SCHEMAS)
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", c.id) for c in calls) and calls[0].id != calls[1].id
    arguments = '{"city": "Paris", "unit": "celsius"}'
    assert message_tool_calls(calls) == [
        {"id": c.id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}} for c in calls]
    assert tool_call_deltas(calls) == [
        {"index": i, "id": c.id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
        for i, c in enumerate(calls)]
    assert finish_reason("stop", calls) == "tool_calls"
    assert finish_reason("length", calls) == "length" and finish_reason("stop", []) == "stop"


# --- streaming -------------------------------------------------------------------

def stream(text, family, cuts):
    """(what feed returned at each cut, finish's content, calls)."""
    s = ToolCallStream(family, SCHEMAS)
    sent, last = [], 0
    for cut in [*cuts, len(text)]:
        sent.append(s.feed(text[last:cut]))
        last = cut
    rest, calls = s.finish()
    return sent, rest, [(c.name, json.loads(c.arguments)) for c in calls]


STREAMED = [(t, f) for t, f, _, _ in PARSED] + PLAIN + [
    ("Hello <tool", "hermes"), ("Hello <toolbox> and <tool_call", "hermes"), ("a\n\n", "hermes"),
    ("<|python_tag", "llama3_json"), ("  {not json", "llama3_json"), ("<|pyt and text", "llama3_json")]


@pytest.mark.parametrize("text, family", STREAMED)
def test_streamed_content_is_parses_content(text, family):
    """However the text is cut into deltas, the content sent along the way plus finish's is parse's content (the
    text itself when there are no calls), the calls are parse's, and nothing of a call went out before the end."""
    content, calls = calls_of(text, family)
    cutss = [list(range(len(text)))] + [sorted(random.Random(seed).sample(range(len(text) + 1), min(len(text), 4)))
                                        for seed in range(20)]
    for cuts in cutss:
        sent, rest, got = stream(text, family, cuts)
        assert "".join(sent) + rest == (content or "") and got == calls
        if calls:
            early = "".join(sent)
            assert "<tool_call" not in early and "{" not in early


def test_stream_holds_only_what_could_begin_a_call():
    s = ToolCallStream("hermes", SCHEMAS)
    assert [s.feed(d) for d in ("Hel", "lo ", "<too", "lbox>", " ok\n", "<tool_call>", '{"na')] == [
        "Hel", "lo", "", " <toolbox>", " ok", "", ""]
    s = ToolCallStream("llama3_json", SCHEMAS)
    assert [s.feed(d) for d in (" ", "<|py", "thon", "_tag|>", "{")] == ["", "", "", "", ""]
    s = ToolCallStream("llama3_json", SCHEMAS)
    assert [s.feed(d) for d in ("\n", "It", " is", " {")] == ["", "\nIt", " is", " {"]


# --- the grammar -----------------------------------------------------------------

@pytest.fixture(scope="module")
def lltok(tokenizer):
    from tokenizers import Tokenizer

    text = Tokenizer.from_file(str(Path(tokenizer.path) / "tokenizer.json")).to_str()
    return llguidance.LLTokenizer(text, n_vocab=tokenizer.num_ids, eos_token=list(tokenizer.eos_token_ids))


def matcher(lltok, grammar):
    m = llguidance.LLMatcher(lltok, grammar, log_level=0)
    assert not m.is_error(), m.get_error()
    return m


def accepts(lltok, grammar, text) -> bool:
    """The whole of `text`, then EOS, under `grammar`."""
    m = matcher(lltok, grammar)
    return m.consume_tokens(lltok.tokenize_str(text)) and m.is_accepting() and m.consume_token(lltok.eos_token)


def test_auto_has_no_grammar():
    assert tool_grammar(None, "hermes") is None
    assert tool_grammar(spec("auto"), "hermes") is None


def test_an_unenforceable_schema_is_a_400_naming_its_tool():
    tools = TOOLS + fn(name="f", parameters={"type": "object", "properties": {"a": {"type": "text"}}})
    with pytest.raises(APIError) as e:
        tool_grammar(spec(tools=tools), "hermes")
    assert e.value.param == "tools[3].function.parameters" and "'f'" in e.value.message
    assert "Invalid type: text" in e.value.message
    # a tool the choice leaves out is not compiled
    assert tool_grammar(spec({"type": "function", "function": {"name": "get_weather"}}, tools=tools), "hermes")


GOOD = {"get_weather": {"city": "Köln", "unit": "fahrenheit"},
        "book_table": {"guests": 12, "names": ["Ann", "Bo"], "when": {"day": 31, "slot": "{late}"}},
        "find-place_2": {"lat": -12.5, "lon": 90, "exact": False}}
WRONG = [   # arguments that break each schema
    ("get_weather", {"city": "Köln", "unit": "kelvin"}), ("get_weather", {"city": "Köln"}),
    ("get_weather", {"city": "Amsterdam", "unit": "celsius"}), ("get_weather", {"city": "", "unit": "celsius"}),
    ("book_table", {"guests": 0, "when": {"day": 1, "slot": "lunch"}}),
    ("book_table", {"guests": 2.5, "when": {"day": 1, "slot": "lunch"}}),
    ("book_table", {"guests": 2, "names": [], "when": {"day": 1, "slot": "lunch"}}),
    ("book_table", {"guests": 2, "when": {"day": 1}}),
    ("book_table", {"guests": 2, "when": {"day": 1, "slot": "lunch"}, "extra": 1}),
    ("find-place_2", {"lat": 91, "lon": 0, "exact": True}), ("get_time", {}),
]


@pytest.mark.parametrize("family", FAMILIES)
def test_grammar_accepts_valid_calls_and_refuses_the_rest(lltok, family):
    every = tool_grammar(spec(parallel=True), family)
    one = tool_grammar(spec(parallel=False), family)
    for name, arguments in GOOD.items():
        assert jsonschema.validate(arguments, SCHEMAS[name]) is None
        text = calls_text([(name, arguments)], family)
        assert accepts(lltok, every, text) and accepts(lltok, one, text), text
    both = calls_text(list(GOOD.items())[:2], family)
    assert accepts(lltok, every, both) and not accepts(lltok, one, both)
    for name, arguments in WRONG:
        text = calls_text([(name, arguments)], family)
        assert not accepts(lltok, every, text), text
    first = calls_text([("get_weather", GOOD["get_weather"])], family)
    assert not accepts(lltok, every, "Sure. " + first)           # no text before the call
    assert not accepts(lltok, every, first[:-1])                  # cut short (hermes: the closing tag)
    assert not accepts(lltok, every, "")
    assert not accepts(lltok, every, first.replace('": ', '":'))  # the layout the prompt shows, only
    named = tool_grammar(spec({"type": "function", "function": {"name": "book_table"}}), family)
    assert accepts(lltok, named, calls_text([("book_table", GOOD["book_table"])] * 2, family))
    assert not accepts(lltok, named, first)


def test_a_tool_without_parameters_takes_any_object(lltok):
    grammar = tool_grammar(parse_tool_request(fn(name="now"), "required"), "hermes")
    assert accepts(lltok, grammar, calls_text([("now", {})], "hermes"))
    assert accepts(lltok, grammar, calls_text([("now", {"tz": ["UTC", 1, None]})], "hermes"))
    tricky = calls_text([("now", {"note": "</tool_call>\n<tool_call>"})], "hermes")    # the tags inside a string
    assert accepts(lltok, grammar, tricky)
    assert [(c.name, json.loads(c.arguments)) for c in parse(tricky, "hermes", ["now"])[1]] == [
        ("now", {"note": "</tool_call>\n<tool_call>"})]
    assert not accepts(lltok, grammar, '<tool_call>\n{"name": "now", "arguments": []}\n</tool_call>')


def sample(lltok, tokenizer, grammar, rng, cap=400) -> str:
    """Text drawn token by token, uniformly among the tokens the grammar allows, until EOS (taken half the time
    it is allowed: uniformly, the many tokens that begin another call would almost always win)."""
    from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

    m = matcher(lltok, grammar)
    mask = allocate_token_bitmask(1, lltok.vocab_size)
    ids = []
    for _ in range(cap):
        fill_next_token_bitmask(m, mask)
        allowed = np.flatnonzero(np.unpackbits(mask[0].view(np.uint8), bitorder="little"))
        eos = [t for t in tokenizer.eos_token_ids if mask[0, t // 32] >> (t % 32) & 1]
        token = eos[0] if eos and rng.random() < 0.5 else int(rng.choice(allowed))
        assert m.consume_token(token), m.get_error()
        if token in tokenizer.eos_token_ids:
            assert m.is_stopped()
            return tokenizer.decode(ids)
        ids.append(token)
    raise AssertionError(f"no end after {cap} tokens: {tokenizer.decode(ids)!r}")


CHOICES = [("required", True), ("required", False), ({"type": "function", "function": {"name": "book_table"}}, True),
           ({"type": "function", "function": {"name": "find-place_2"}}, False)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", range(len(CHOICES)))
def test_random_sampling_under_the_grammar_always_parses_into_valid_calls(lltok, tokenizer, family, case):
    """The real test: whatever a model samples under the masks is a call the parser reads back, of an allowed
    tool, with arguments valid against its schema (the streamed path agrees)."""
    choice, parallel = CHOICES[case]
    s = spec(choice, parallel)
    grammar = tool_grammar(s, family)
    rng = np.random.default_rng([case, FAMILIES.index(family)])
    names = {t.name for t in s.allowed()}
    for _ in range(6):
        text = sample(lltok, tokenizer, grammar, rng)
        content, calls = parse(text, family, s.names)
        assert content is None and calls, text
        assert parallel or len(calls) == 1
        for c in calls:
            assert c.name in names
            jsonschema.validate(json.loads(c.arguments), SCHEMAS[c.name])
        s2 = ToolCallStream(family, s.names)
        assert s2.feed(text) == "" and [(c.name, c.arguments) for c in s2.finish()[1]] == [
            (c.name, c.arguments) for c in calls]
