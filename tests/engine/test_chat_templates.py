"""Chat templates render exactly as transformers' `apply_chat_template` renders them: the shipped model's
own template, a Llama-3 one and a Qwen-2.5 one with tools (tests/data/chat_templates/), and the Jinja
features real templates use (`{% break %}`, `strftime_now`, `tojson` of non-ASCII text, `{% generation %}`,
an undefined `tools`)."""

from __future__ import annotations

from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from niyama.engine.tokenizer import Tokenizer  # noqa: E402
from niyama.engine.weights import default_gguf_path, resolve  # noqa: E402

TEMPLATES = Path(__file__).parent.parent / "data" / "chat_templates"
CHAT = [{"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Grüße aus München! What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "  And 東京's population?  "}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Wetter für eine Stadt (°C)",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "description": "z. B. Köln"}},
                                                "required": ["city"]}}}]
TOOL_CHAT = [{"role": "user", "content": "Weather in Köln?"},
             {"role": "assistant", "content": "", "tool_calls": [
                 {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Köln"}}}]},
             {"role": "tool", "content": "{\"temp_c\": 21}"},
             {"role": "tool", "content": "{\"rain\": false}"},
             {"role": "assistant", "content": "21 °C, dry."},
             {"role": "user", "content": "Thanks"}]
FEATURES = ("{%- for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}[{{ m.role }}]"
            "{% generation %}{{ m.content | tojson }}{% endgeneration %}{% endfor %}"
            "{% if tools %}TOOLS{% endif %}|{{ strftime_now('%Y-%m-%d') }}|{{ bos_token }}")


@pytest.fixture(scope="module")
def pair():
    path = default_gguf_path()
    hf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ours = Tokenizer(resolve(None)[1])
    return ours, hf


def render_both(pair, template, messages, tools=None, add_generation_prompt=True):
    ours, hf = pair
    want = hf.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=False,
                                  add_generation_prompt=add_generation_prompt)
    ours.chat_template = template
    return ours.apply_chat_template(messages, add_generation_prompt, tools=tools), want


def test_the_shipped_models_template(pair):
    own = pair[0].chat_template
    for messages in (CHAT, CHAT[1:2]):
        got, want = render_both(pair, own, messages)
        assert got == want
    got, want = render_both(pair, own, CHAT, add_generation_prompt=False)
    assert got == want


@pytest.mark.parametrize("name", ["llama-3-instruct", "qwen-2.5-instruct"])
def test_real_templates_render_like_transformers(pair, name):
    template = (TEMPLATES / f"{name}.jinja").read_text()
    got, want = render_both(pair, template, CHAT)
    assert got == want and "東京" in got
    if "tools" in template:
        got, want = render_both(pair, template, TOOL_CHAT, tools=TOOLS)
        assert got == want
        assert "Wetter für eine Stadt (°C)" in got and '"city": "Köln"' in got     # tojson keeps non-ASCII
        assert got.count("<tool_response>") == 2 and got.count("<|im_start|>user") == 3


def test_jinja_features_real_templates_use(pair):
    got, want = render_both(pair, FEATURES, CHAT)
    assert got == want
    assert got.startswith('[system]"You answer briefly."[user]"Grüße aus München! What is 2+2?"|')
    got, want = render_both(pair, FEATURES, CHAT, tools=TOOLS)
    assert got == want and "TOOLS" in got
