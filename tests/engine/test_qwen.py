"""Qwen-2.5 (transformers' Qwen2ForCausalLM) on the engine, against transformers itself.

No model hub is reachable, so the checkpoint is a small random Qwen2 written by transformers
(`save_pretrained`), its Q/K/V biases redrawn large so that a dropped bias changes every token, with
SmolLM2's tokenizer (49,152 ids, ChatML's `<|im_start|>`/`<|im_end|>` among them) and a ChatML template of
our own in tokenizer_config.json, as Qwen's directories carry theirs. Checked: logits within float32
tolerance and greedy tokens identical to transformers' `generate`, for prompts of several lengths
prefilled in chunks beside running decodes, with a tied and an untied head; `niyama generate` and a chat
request to `niyama serve` over HTTP; the config errors.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
httpx = pytest.importorskip("httpx")

from niyama.engine import LLMEngine  # noqa: E402
from niyama.engine.config import SHAPES, ModelConfig  # noqa: E402
from niyama.engine.weights import resolve  # noqa: E402

from helpers import greedy_with_logits  # noqa: E402

NUM_TOKENS = 16
PROMPT_LENS = (21, 50, 77, 35)
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# ChatML, with Qwen's default system message when the chat brings none.
CHATML = r"""{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- else %}
    {{- '<|im_start|>system\nDEFAULT<|im_end|>\n' }}
{%- endif %}
{%- for m in messages %}
    {%- if m.role != 'system' or not loop.first %}
        {{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
""".replace("DEFAULT", DEFAULT_SYSTEM)
CHAT = [{"role": "user", "content": "Hello, who are you?"}]


def write_qwen(directory, tie: bool):
    """A random 2-layer Qwen2 checkpoint in `directory` as transformers writes it; returns the HF model."""
    tok_src = resolve(None)[1]        # the default model's converted directory: SmolLM2's tokenizer.json
    cfg = transformers.Qwen2Config(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
                                   max_position_embeddings=32768, tie_word_embeddings=tie, use_sliding_window=False,
                                   initializer_range=0.1, bos_token_id=0, eos_token_id=2)
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in hf.model.layers:
            assert layer.self_attn.o_proj.bias is None
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.5)
    hf.save_pretrained(directory, safe_serialization=True)
    shutil.copy(tok_src / "tokenizer.json", directory / "tokenizer.json")
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
         "pad_token": "<|endoftext|>", "add_bos_token": False, "chat_template": CHATML}))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))   # Qwen: im_end, endoftext
    return hf


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """tie -> (directory, HF model), each written once."""
    made = {}

    def get(tie: bool):
        if tie not in made:
            directory = tmp_path_factory.mktemp("qwen-tied" if tie else "qwen-untied")
            made[tie] = directory, write_qwen(directory, tie)
        return made[tie]
    return get


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def qwen(request, checkpoints):
    directory, hf = checkpoints(request.param)
    return directory, hf, LLMEngine(model=str(directory), policy="fcfs", kv_tokens=4096)


def hf_generate(hf, ids: list[int], n: int, eos=None) -> list[int]:
    out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_config_and_weights_are_qwen2(qwen):
    directory, hf, engine = qwen
    c = engine.model_config
    assert c.qkv_bias and c.architecture == "qwen2" and c.rope_theta == 1e6 and c.rms_norm_eps == 1e-6
    assert c.tie_embeddings == hf.config.tie_word_embeddings
    assert c.num_params == hf.num_parameters()
    assert torch.equal(engine.model.layers[1].qkv_bias, torch.cat([hf.model.layers[1].self_attn.q_proj.bias,
                                                                   hf.model.layers[1].self_attn.k_proj.bias,
                                                                   hf.model.layers[1].self_attn.v_proj.bias]))
    assert transformers.Qwen2Config(**c.to_hf()).to_dict()["layer_types"] == ["full_attention"] * 2
    assert ModelConfig.from_hf(c.to_hf()) == c


@pytest.mark.parametrize("chunk_size", [16, 4096], ids=["chunk16", "whole-prompt"])
def test_greedy_tokens_and_logits_match_transformers(qwen, chunk_size, capsys):
    """Four prompts at once; with 16-token chunks, prompts' chunks share batches with others' decodes."""
    _, hf, engine = qwen
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 49152, (n,), generator=g).tolist() for n in PROMPT_LENS]
    seqs, logits, shapes = greedy_with_logits(engine, prompts, NUM_TOKENS, chunk_size=chunk_size)
    if chunk_size == 16:
        assert any(p > 0 and d > 0 for p, d in shapes), shapes
    worst = 0.0
    with torch.inference_mode():
        for ids, seq, got in zip(prompts, seqs, logits):
            assert seq.output_ids == hf_generate(hf, ids, NUM_TOKENS)
            # one forward over prompt + output gives the reference logits of every step
            ref = hf(input_ids=torch.tensor([ids + seq.output_ids])).logits[0, len(ids) - 1:-1].float()
            worst = max(worst, float((got - ref).abs().max()))
    with capsys.disabled():
        print(f"\n[qwen2 vs transformers, chunk {chunk_size}] max |logit diff| = {worst:.2e}")
    assert worst < 1e-3
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_chat_template_from_tokenizer_config(qwen):
    directory, _, engine = qwen
    want = (f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\nHello, who are you?<|im_end|>\n"
            "<|im_start|>assistant\n")
    assert engine.chat_prompt(CHAT) == want
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(directory))
    for chat in (CHAT, [{"role": "system", "content": "Be brief."}] + CHAT):
        ours = engine.tokenizer.encode(engine.chat_prompt(chat))
        assert ours == hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False)
    assert ours[0] == 1                                   # <|im_start|>, no BOS before it
    assert 2 in engine.eos_token_ids and 0 in engine.eos_token_ids


def chat_reference(directory, hf, n: int) -> tuple[list[int], str]:
    """Prompt ids of CHAT and the text of transformers' greedy answer to it (ending at either EOS id)."""
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(directory))
    ids = hf_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    return ids, hf_tok.decode(hf_generate(hf, ids, n, eos=[2, 0]), skip_special_tokens=True)


def test_niyama_generate_cli(checkpoints):
    directory, hf = checkpoints(True)
    _, text = chat_reference(directory, hf, 12)
    r = subprocess.run([sys.executable, "-m", "niyama.cli", "generate", CHAT[0]["content"], "--model",
                        str(directory), "--max-tokens", "12"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "qwen2, 2 layers" in r.stderr
    assert r.stdout == text + "\n"


def test_chat_completion_over_http(checkpoints, tmp_path_factory):
    from test_server import start_server, stop_server

    directory, hf = checkpoints(True)
    ids, text = chat_reference(directory, hf, 12)
    url, handle = start_server(tmp_path_factory, "--model", str(directory))
    try:
        body = {"messages": CHAT, "max_tokens": 12, "temperature": 0}
        assert httpx.post(f"{url}/tokenize", json={"messages": CHAT}, timeout=30).json()["tokens"] == ids
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["usage"]["prompt_tokens"] == len(ids)
        assert out["choices"][0]["message"]["content"] == text
    finally:
        stop_server(handle)


def test_dummy_shapes_and_random_biases():
    from niyama.engine.engine import build_model

    assert round(SHAPES["qwen2.5-7b"].num_params / 1e9, 2) == 7.62        # the model card's 7.61B, embeddings 2x
    assert round(SHAPES["qwen2.5-0.5b"].num_params / 1e9, 2) == 0.49
    assert round(SHAPES["llama-3-70b"].num_params / 1e9, 1) == 70.6
    assert SHAPES["qwen2.5-0.5b"].tie_embeddings and not SHAPES["qwen2.5-7b"].tie_embeddings
    small = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16, qkv_bias=True)
    model = build_model(small, torch.float32, torch.device("cpu"))
    model.init_random(0)
    bias = model.layers[0].qkv_bias
    assert bias.shape == (16 * (4 + 2 * 2),) and 0 < bias.std() < 0.1           # random like weights, not unit
    assert sum(p.numel() for p in model.parameters()) == small.num_params
    assert build_model(SHAPES["tiny"], torch.float32, torch.device("meta")).layers[0].qkv_bias is None


QWEN_HF = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896,
           "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
           "rope_theta": 1000000.0, "rms_norm_eps": 1e-06, "tie_word_embeddings": True,
           "max_position_embeddings": 32768, "sliding_window": 32768, "max_window_layers": 21,
           "use_sliding_window": False, "bos_token_id": 151643, "eos_token_id": 151645}


def test_config_errors():
    c = ModelConfig.from_hf(QWEN_HF)           # Qwen2.5-0.5B-Instruct's config.json (sliding window off)
    assert c.qkv_bias and c.head_dim == 64 and c.tie_embeddings and c.max_position == 32768
    assert c.num_params == SHAPES["qwen2.5-0.5b"].num_params
    with pytest.raises(ValueError, match="sliding-window attention .* not supported"):
        ModelConfig.from_hf({**QWEN_HF, "use_sliding_window": True})
    with pytest.raises(ValueError, match="sliding-window"):
        ModelConfig.from_hf({**QWEN_HF, "layer_types": ["full_attention", "sliding_attention"]})
    with pytest.raises(ValueError, match="'MistralForCausalLM' is not supported; niyama runs LlamaForCausalLM .*"
                                         "Qwen2ForCausalLM"):
        ModelConfig.from_hf({**QWEN_HF, "architectures": ["MistralForCausalLM"], "model_type": "mistral"})
    with pytest.raises(ValueError, match="'qwen3' is not supported"):
        ModelConfig.from_hf({**QWEN_HF, "architectures": [], "model_type": "qwen3"})
    with pytest.raises(ValueError, match="rope scaling 'yarn'"):
        ModelConfig.from_hf({**QWEN_HF, "rope_scaling": {"type": "yarn", "factor": 4.0}})
    llama = {k: v for k, v in QWEN_HF.items() if k not in ("architectures", "model_type")}
    assert not ModelConfig.from_hf(llama).qkv_bias          # a bare config.json stays Llama, as before
    with pytest.raises(ValueError, match="attention_bias"):
        ModelConfig.from_hf({**llama, "attention_bias": True})


def test_sliding_window_refused_by_the_cli(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**QWEN_HF, "use_sliding_window": True}))
    r = subprocess.run([sys.executable, "-m", "niyama.cli", "generate", "hi", "--model", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "sliding-window attention" in r.stderr, r.stderr


def test_chat_template_jinja_file_wins(tmp_path):
    """Newer transformers save the template as chat_template.jinja beside tokenizer_config.json."""
    from niyama.engine.tokenizer import Tokenizer

    shutil.copy(resolve(None)[1] / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "old"}))
    (tmp_path / "chat_template.jinja").write_text(CHATML)
    assert Tokenizer(tmp_path).apply_chat_template(CHAT).startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM}")
