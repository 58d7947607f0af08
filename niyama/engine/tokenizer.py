"""Tokenizer and chat template, from the checkpoint unless given apart.

An HF directory gives `tokenizer.json` (+ `tokenizer_config.json` for the
chat template and special tokens; newer transformers write the template to
`chat_template.jinja` beside it); a GGUF file gives the same facts in its
metadata, which `gguf_convert` turns into those two files once. Encoding
uses the `tokenizers` library; chat templates are rendered with Jinja2.
`--tokenizer` and `--chat-template` (as in vLLM) replace the checkpoint's.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path


class Tokenizer:
    def __init__(self, path: "str | Path", eos_token_ids: tuple[int, ...] = (), chat_template: str | None = None):
        """`path`: a directory with tokenizer.json (and optionally tokenizer_config.json and
        generation_config.json) or a tokenizer.json file; `chat_template` replaces the one it has."""
        from tokenizers import Tokenizer as HFTokenizer

        self.path = str(path)
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"{file}: no such file (a tokenizer is a tokenizer.json or a directory with one)")
        self._tok = HFTokenizer.from_file(str(file))
        cfg = _read_json(file.parent / "tokenizer_config.json")
        template = cfg.get("chat_template")
        if isinstance(template, list):   # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        if (file.parent / "chat_template.jinja").is_file():   # newer transformers save it apart, and read it first
            template = (file.parent / "chat_template.jinja").read_text()
        self.chat_template: str | None = chat_template or template
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        self.add_bos = bool(cfg.get("add_bos_token", False))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        eos = set(eos_token_ids) | set(_id_list(_read_json(file.parent / "generation_config.json").get("eos_token_id")))
        if self.eos_token and self._tok.token_to_id(self.eos_token) is not None:
            eos.add(self._tok.token_to_id(self.eos_token))
        self.eos_token_ids = tuple(sorted(eos))

    def to_json(self) -> str:
        """The tokenizer as tokenizer.json text (llguidance builds its token table from it)."""
        return self._tok.to_str()

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def num_ids(self) -> int:
        """One past the largest token id (a vocabulary may have gaps, so not always `vocab_size`)."""
        return max(self._tok.get_vocab(with_added_tokens=True).values()) + 1

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids of `text`; special-token strings in it (e.g. `<|im_start|>`) map to their ids."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special and self.add_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, documents: list[dict] | None = None) -> str:
        """The prompt text for a chat, rendered with the checkpoint's own template in the same Jinja setting
        transformers' `apply_chat_template` uses (so real templates render the same)."""
        if not self.chat_template:
            raise ValueError("this model has no chat template; send a plain prompt instead")
        import jinja2

        for m in messages:
            if not isinstance(m, dict) or "role" not in m:
                raise ValueError(f"a chat message needs a 'role', got {m!r}")
        try:
            template = _template_env().from_string(self.chat_template)
            return template.render(messages=messages, tools=tools, documents=documents,
                                   add_generation_prompt=add_generation_prompt,
                                   bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template failed: {e}") from None


def load_tokenizer(model_dir: "Path | None", vocab_size: int, eos_token_ids: tuple[int, ...],
                   tokenizer: str | None = None, chat_template: str | None = None) -> Tokenizer | None:
    """The model's tokenizer: the one beside its weights (`model_dir`; None for dummy weights), or
    `tokenizer` instead. Refused if it has ids the model's `vocab_size` rows cannot embed."""
    if tokenizer is None and model_dir is None:
        if chat_template:
            raise ValueError("a chat template needs a tokenizer and dummy weights have none: add --tokenizer")
        return None
    tok = Tokenizer(Path(tokenizer).expanduser().absolute() if tokenizer else model_dir, eos_token_ids, chat_template)
    if tok.num_ids > vocab_size:
        raise ValueError(f"tokenizer {tok.path}: its ids go up to {tok.num_ids - 1} but the model has "
                         f"{vocab_size} token embeddings; pick a tokenizer of this model's vocabulary")
    return tok


def load_chat_template(value: str) -> str:
    """`--chat-template`: a Jinja file's path or the template itself, as vLLM reads it (inline text has its
    backslash escapes decoded, so a shell's '\\n' is a newline). Checked to parse; errors name the file."""
    path = Path(value).expanduser()
    if _is_file(path):
        text, origin = path.read_text(), str(path)
    elif any(c in value for c in "{}\n"):
        # latin-1 + backslashreplace first: unicode_escape alone would garble non-ASCII text
        text, origin = codecs.decode(value.encode("latin-1", "backslashreplace"), "unicode_escape"), "(inline)"
    else:
        raise ValueError(f"--chat-template {value}: no such file, nor an inline template (no Jinja braces in it)")
    import jinja2

    try:
        _template_env().from_string(text)     # compiled, so an unknown filter is caught here too
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"--chat-template {origin}: not a valid Jinja template: {e.message} (line {e.lineno})") \
            from None
    return text


def _template_env():
    """The Jinja environment chat templates are written for (transformers' conventions): sandboxed, blocks
    trimmed, `{% break %}` / `{% continue %}`, `{% generation %}` blocks (they mark assistant text for
    training; here they render their body), `tojson` keeping non-ASCII text, `raise_exception` and
    `strftime_now`; undefined names are falsy, not errors (`{% if tools %}` with no tools)."""
    global _ENV
    if _ENV is None:
        import datetime

        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class GenerationBlock(Extension):
            tags = {"generation"}

            def parse(self, parser):
                next(parser.stream)
                return parser.parse_statements(("name:endgeneration",), drop_needle=True)

        def raise_exception(message):
            raise ValueError(f"chat template: {message}")

        def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[GenerationBlock, loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        _ENV = env
    return _ENV


_ENV = None


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):      # an inline template is often too long for a file name
        return False


def _read_json(file: Path) -> dict:
    return json.loads(file.read_text()) if file.is_file() else {}


def _id_list(value) -> list[int]:
    """generation_config.json writes eos_token_id as an int or a list of them."""
    return [value] if isinstance(value, int) else list(value or [])


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Detokenizer:
    """Turns a growing list of token ids into text deltas. Tokens can end inside a
    multi-byte character, so text is emitted only once it no longer ends in U+FFFD;
    decoding restarts a few tokens back so merges across tokens come out right."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.text = ""
        self._prefix = 0     # ids[_prefix:_read] decode to the text already emitted after it
        self._read = 0

    def add(self, ids: list[int]) -> str:
        """Text newly completed by `ids` (all output ids so far)."""
        prefix_text = self.tokenizer.decode(ids[self._prefix:self._read])
        new_text = self.tokenizer.decode(ids[self._prefix:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        delta = new_text[len(prefix_text):]
        self._prefix, self._read = self._read, len(ids)
        self.text += delta
        return delta
