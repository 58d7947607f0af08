"""`--tokenizer` and `--chat-template` as vLLM users pass them: real servers on 127.0.0.1 over HTTP (the default
model with another chat template; random weights of a tiny shape speaking text through SmolLM2's tokenizer),
refusals at start-up, and `niyama generate`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")
pytest.importorskip("gguf")

from test_server import chat, free_port, start_server, stop_server  # noqa: E402

from niyama.engine.tokenizer import Tokenizer, load_tokenizer  # noqa: E402
from niyama.engine.weights import resolve  # noqa: E402

# Recognisably not SmolLM2's ChatML: role names in angle brackets, no special tokens.
FILE_TEMPLATE = ("{% for m in messages %}<<{{ m.role | upper }}>> {{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<<ASSISTANT>>{% endif %}")
# Inline, as a shell passes it: the backslash-n is two characters until the server decodes it.
INLINE_TEMPLATE = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\\n{% endfor %}[assistant]"


def niyama(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "niyama.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """The default model's own tokenizer, for the expected ids."""
    return Tokenizer(resolve(None)[1])


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """SmolLM2's tokenizer files on their own, as a downloaded tokenizer would be (with a
    generation_config.json naming a second end token)."""
    src = resolve(None)[1]
    out = tmp_path_factory.mktemp("tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, out / name)
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return out


@pytest.fixture(scope="module")
def template_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("templates") / "angle.jinja"
    path.write_text(FILE_TEMPLATE)
    return path


@pytest.fixture(scope="module")
def templated(tmp_path_factory, template_file):
    url, handle = start_server(tmp_path_factory, "--kv-tokens", "1024", "--chat-template", str(template_file))
    yield url
    stop_server(handle)


@pytest.fixture(scope="module")
def dummy_with_tokenizer(tmp_path_factory, tokenizer_dir):
    url, handle = start_server(tmp_path_factory, "--load-format", "dummy", "--model", "tiny-49k",
                               "--tokenizer", str(tokenizer_dir), "--kv-tokens", "512",
                               "--chat-template", INLINE_TEMPLATE)
    yield url
    stop_server(handle)


def test_a_chat_template_file_replaces_the_models_for_tokenize_and_chat(templated, smollm2_tokenizer):
    messages = chat("Hello world")
    want = smollm2_tokenizer.encode("<<USER>> Hello world\n<<ASSISTANT>>")
    assert want != smollm2_tokenizer.encode(smollm2_tokenizer.apply_chat_template(messages))   # a real change
    with httpx.Client(timeout=60) as c:
        tok = c.post(f"{templated}/tokenize", json={"messages": messages}).json()
        assert tok["tokens"] == want
        r = c.post(f"{templated}/v1/chat/completions", json={"messages": messages, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["prompt_tokens"] == len(want)          # the model saw that rendering
    assert body["usage"]["completion_tokens"] >= 1 and body["choices"][0]["finish_reason"] in ("stop", "length")


def test_dummy_weights_with_a_tokenizer_serve_text_and_an_inline_template(dummy_with_tokenizer, smollm2_tokenizer):
    url = dummy_with_tokenizer
    with httpx.Client(timeout=60) as c:
        assert c.get(f"{url}/v1/models").json()["data"][0]["id"] == "dummy-tiny-49k"
        done = c.post(f"{url}/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 5,
                                                     "temperature": 0, "ignore_eos": True, "return_token_ids": True})
        assert done.status_code == 200, done.text
        choice = done.json()["choices"][0]
        ids = choice["token_ids"]
        assert len(ids) == 5 and choice["text"] == smollm2_tokenizer.decode(ids)    # text, via the tokenizer
        assert done.json()["usage"]["prompt_tokens"] == len(smollm2_tokenizer.encode("The capital of France is"))
        tok = c.post(f"{url}/tokenize", json={"messages": chat("Hi")}).json()
        assert tok["tokens"] == smollm2_tokenizer.encode("[user] Hi\n[assistant]")   # escape decoded to a newline
        r = c.post(f"{url}/v1/chat/completions", json={"messages": chat("Hi"), "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(tok["tokens"])


def test_a_tokenizer_dir_or_its_file_brings_its_generation_configs_end_tokens(tokenizer_dir, smollm2_tokenizer):
    for path in (tokenizer_dir, tokenizer_dir / "tokenizer.json"):
        tok = load_tokenizer(None, 49152, (), str(path))
        assert tok.eos_token_ids == (0, 2)      # <|im_end|> from tokenizer_config.json, 0 from generation_config.json
        assert tok.encode("Grüße, 東京") == smollm2_tokenizer.encode("Grüße, 東京")
        assert tok.chat_template == smollm2_tokenizer.chat_template


@pytest.mark.parametrize("case", ["broken-template", "tokenizer-too-large", "template-without-tokenizer"])
def test_serve_refuses_bad_tokenizer_flags_at_start_up(case, tmp_path, tokenizer_dir):
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content }}")        # no endfor
    args, words = {
        "broken-template": (["--chat-template", str(broken)], [str(broken), "not a valid Jinja template", "endfor"]),
        "tokenizer-too-large": (["--load-format", "dummy", "--model", "tiny", "--tokenizer", str(tokenizer_dir)],
                                [str(tokenizer_dir), "49151", "512 token embeddings"]),
        "template-without-tokenizer": (["--load-format", "dummy", "--model", "tiny", "--chat-template", "{{ x }}"],
                                       ["needs a tokenizer", "--tokenizer"]),
    }[case]
    r = niyama("serve", "--port", str(free_port()), *args, timeout=120)
    assert r.returncode == 2, r.stderr
    assert all(w in r.stderr for w in words), r.stderr
    assert "Traceback" not in r.stderr and "loaded in" not in r.stderr


def test_generate_renders_its_chat_prompt_with_the_given_template(tmp_path):
    """The template ignores the message and asks about France: the answer can only come from the template."""
    template = tmp_path / "france.jinja"
    template.write_text("{% for m in messages %}{% endfor %}<|im_start|>user\nWhat is the capital of France?"
                        "<|im_end|>\n<|im_start|>assistant\n")
    r = niyama("generate", "Hi", "--chat-template", str(template), "--max-tokens", "16")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    r = niyama("generate", "Hi", "--no-chat", "--chat-template", str(template))
    assert r.returncode == 2 and "--no-chat" in r.stderr
