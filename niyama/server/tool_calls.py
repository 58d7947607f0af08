"""OpenAI tool calling: the request's `tools` / `tool_choice` checked, the tools put in the prompt, the model's
text parsed back into `tool_calls` (whole or streamed), and the grammar that forces a call.

A model calls tools in the text format it was trained on; two families cover the models niyama runs:
- "hermes" (Qwen-2.5, Hermes, any ChatML model): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
  one block per call, possibly after some text;
- "llama3_json" (Llama-3.x): the whole answer is `{"name": ..., "parameters": {...}}`, several joined by "; ".
A chat template that renders tools itself (Qwen-2.5's, Llama-3.1's) gets them as `tools=` (transformers'
convention); one that does not (SmolLM2's, Llama-3.0's) gets a system message describing them instead, and its
history's tool calls and results rewritten as plain text.

With `tool_choice` "required" or a named function, `tool_grammar` gives an llguidance grammar that admits only
the family's call syntax with arguments valid against the tool's schema; with "auto" the model is free and the
text is parsed afterwards (malformed calls stay plain content, never an error).

HTTP side only: no torch; llguidance is imported only to build a grammar.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from ..engine import grammar as grammars
from .errors import APIError, shown

FAMILIES = ("hermes", "llama3_json")
NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")          # OpenAI's rule for function names
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"                       # Llama-3.1's "a tool call follows" token
# JSON of a forced call on one line with Python's separators, as the templates' `tojson` writes tool calls: free
# whitespace would let a weak model spend its budget on newlines. A tool's own "x-guidance" options win.
JSON_LAYOUT = {**grammars.JSON_LAYOUT,
               "lenient": True}    # keywords llguidance lacks are ignored rather than refusing the request


# --- the request --------------------------------------------------------------

@dataclass(frozen=True)
class Tool:
    name: str
    description: str | None = None
    parameters: dict | None = None      # a JSON schema of the arguments object; None: any object

    def as_openai(self) -> dict:
        """The tool as OpenAI's dict (what a chat template's `tools` holds)."""
        function = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        if self.parameters is not None:
            function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolSpec:
    """A request's tools, what it lets the model do with them, and whether several calls may come at once."""
    tools: tuple[Tool, ...]
    choice: str                 # "auto" | "required" | "named"
    named: str | None = None    # the function a named tool_choice forces
    parallel: bool = True

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tools)

    def allowed(self) -> tuple[Tool, ...]:
        """The tools the model may call: the named one, or all."""
        return tuple(t for t in self.tools if self.named is None or t.name == self.named)

    def template_tools(self) -> list[dict]:
        """`tools=` for a chat template that renders them (OpenAI's dicts, `strict` and unknown keys left out)."""
        return [t.as_openai() for t in self.tools]


def parse_tool_request(tools, tool_choice=None, parallel_tool_calls=None) -> ToolSpec | None:
    """The request's `tools`, `tool_choice` and `parallel_tool_calls`, checked (a 400 naming the field if bad);
    None when the request uses no tools. With tool_choice "none" the tools are checked but also give None: the
    prompt then leaves them out (the model cannot call them, so describing them would only invite a call that
    would come back as plain text)."""
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise APIError(f"parallel_tool_calls must be true or false, got {shown(parallel_tool_calls)}",
                       param="parallel_tool_calls")
    parsed = _tools(tools) if tools is not None else ()
    if tool_choice is None:
        choice, named = ("auto" if parsed else "none"), None
    else:
        choice, named = _choice(tool_choice, parsed)
    if choice == "none":
        return None
    if not parsed:
        raise APIError(f"tool_choice {shown(tool_choice)} needs tools: send the functions the model may call "
                       "in tools", param="tool_choice")
    return ToolSpec(parsed, choice, named, True if parallel_tool_calls is None else parallel_tool_calls)


def _tools(tools) -> tuple[Tool, ...]:
    if not isinstance(tools, list):
        raise APIError(f"tools must be a list of {{'type': 'function', 'function': {{...}}}}, got "
                       f"{type(tools).__name__}", param="tools")
    out, seen = [], set()
    for i, entry in enumerate(tools):
        tool = _tool(entry, f"tools[{i}]")
        if tool.name in seen:
            raise APIError(f"tools[{i}].function.name {tool.name!r} is given twice; function names must be unique",
                           param=f"tools[{i}].function.name")
        seen.add(tool.name)
        out.append(tool)
    return tuple(out)


def _tool(entry, where: str) -> Tool:
    if not isinstance(entry, dict) or entry.get("type") != "function":
        got = entry.get("type") if isinstance(entry, dict) else type(entry).__name__
        raise APIError(f"{where} must be {{'type': 'function', 'function': {{...}}}} (niyama supports function "
                       f"tools only), got {shown(got)}", param=f"{where}.type")
    function = entry.get("function")
    if not isinstance(function, dict):
        raise APIError(f"{where}.function must be an object with a name (and optionally description and "
                       "parameters)", param=f"{where}.function")
    name = function.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise APIError(f"{where}.function.name must be 1 to 64 letters, digits, '_' or '-', got {shown(name)}",
                       param=f"{where}.function.name")
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise APIError(f"{where}.function.description must be a string", param=f"{where}.function.description")
    strict = function.get("strict")
    if strict is not None and not isinstance(strict, bool):   # accepted; a forced call always follows the schema
        raise APIError(f"{where}.function.strict must be true or false", param=f"{where}.function.strict")
    return Tool(name, description, _parameters(function.get("parameters"), f"{where}.function.parameters"))


def _parameters(schema, where: str) -> dict | None:
    if schema is None:
        return None
    if not isinstance(schema, dict):
        raise APIError(f"{where} must be a JSON schema object, got {type(schema).__name__}", param=where)
    kind = schema.get("type", "object")
    if kind != "object":    # arguments are always a JSON object
        raise APIError(f"{where} must describe an object (type 'object'), got type {shown(kind)}", param=where)
    return schema


def _choice(tool_choice, tools: tuple[Tool, ...]) -> tuple[str, str | None]:
    if tool_choice in ("none", "auto", "required"):
        return tool_choice, None
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise APIError("tool_choice {'type': 'function', 'function': {'name': ...}} needs the function's name",
                           param="tool_choice.function.name")
        if tools and name not in {t.name for t in tools}:
            raise APIError(f"tool_choice names the function {name!r}, which is not in tools (it has "
                           f"{', '.join(repr(t.name) for t in tools)})", param="tool_choice.function.name")
        return "named", name
    raise APIError(f"tool_choice must be 'none', 'auto', 'required' or {{'type': 'function', 'function': "
                   f"{{'name': ...}}}}, got {shown(tool_choice)}", param="tool_choice")


# --- the model's family ---------------------------------------------------------

def family_of(chat_template: str | None, model_type: str | None = None, override: str | None = None) -> str:
    """The tool-call format a model was trained on: `override` (a name from FAMILIES) if given, else read off its
    chat template: Llama-3's header tokens -> "llama3_json"; ChatML and anything else -> "hermes". `model_type`
    cannot decide it (SmolLM2 is a "llama" with a ChatML template); it is only named in the error."""
    if override is not None:
        if override not in FAMILIES:
            raise ValueError(f"tool-call format {override!r} is unknown; choose from {', '.join(FAMILIES)}"
                             + (f" (model type {model_type})" if model_type else ""))
        return override
    template = chat_template or ""
    if "<|im_start|>" not in template and ("<|start_header_id|>" in template or "<|eot_id|>" in template):
        return "llama3_json"
    return "hermes"


def template_renders_tools(chat_template: str | None) -> bool:
    """Whether a chat template uses its `tools` variable (then it gets the tools as `tools=`)."""
    return bool(chat_template) and re.search(r"\btools\b", chat_template) is not None


# --- the prompt -----------------------------------------------------------------

def messages_for_template(messages: Sequence[dict]) -> list[dict]:
    """OpenAI chat messages -> what chat templates expect (transformers' convention): developer -> system, text
    parts joined, null content -> "", a tool call's arguments as a dict (not a JSON string), a tool result with
    its function's `name` (found by its tool_call_id)."""
    out, names = [], {}
    for i, m in enumerate(messages):
        role = "system" if m.get("role") == "developer" else m.get("role")
        msg = {"role": role, "content": _text(m.get("content"))}
        if m.get("name") is not None:
            msg["name"] = m["name"]
        if role == "assistant" and m.get("tool_calls"):
            msg["tool_calls"] = [_history_call(c, f"messages[{i}].tool_calls[{j}]")
                                 for j, c in enumerate(m["tool_calls"])]
            names.update((c["id"], c["function"]["name"]) for c in msg["tool_calls"] if c.get("id"))
        if role == "tool":
            msg["tool_call_id"] = m.get("tool_call_id")
            if "name" not in msg and m.get("tool_call_id") in names:
                msg["name"] = names[m["tool_call_id"]]
        out.append(msg)
    return out


def _text(content) -> str:
    if content is None:          # an assistant message that only calls tools
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") if isinstance(p, dict) else getattr(p, "text", "") for p in content)


def _history_call(call, where: str) -> dict:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise APIError(f"{where} must be {{'id': ..., 'type': 'function', 'function': {{'name': ..., 'arguments': "
                       f"...}}}}", param=where)
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            arguments = None
    if not isinstance(arguments, dict):
        raise APIError(f"{where}.function.arguments must be a JSON object encoded as a string, got "
                       f"{shown(function.get('arguments'))}", param=f"{where}.function.arguments")
    out = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
    if call.get("id") is not None:
        out["id"] = call["id"]
    return out


def render_without_template_support(messages: Sequence[dict], tools: Sequence[Tool], family: str,
                                    chat_template: str | None = None) -> list[dict]:
    """Messages a template that knows nothing of tools renders right: the tools and the call format in the system
    message (after the request's own system text), assistant tool calls as the family's text, tool results as
    user text (hermes: `<tool_response>` blocks, consecutive results in one message; llama3_json: role `ipython`
    where `chat_template` knows it, else a user message). `tools` may be empty (history only)."""
    msgs = messages_for_template(messages)
    out: list[dict] = []
    ipython = "ipython" in (chat_template or "")
    for i, m in enumerate(msgs):
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = calls_text([(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"]],
                               family)
            out.append({"role": "assistant", "content": f"{m['content']}\n{calls}" if m["content"] else calls})
        elif m["role"] == "tool" and family == "hermes":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if i and msgs[i - 1]["role"] == "tool":      # the results of one turn's calls share a user message
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
        elif m["role"] == "tool":
            out.append({"role": "ipython", "content": m["content"]} if ipython else
                       {"role": "user", "content": f"Result of {m.get('name') or 'the function'}:\n{m['content']}"})
        else:
            out.append({k: v for k, v in m.items() if k in ("role", "content", "name")})
    if tools:
        text = tools_system_text(tools, family)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{text}" if out[0]["content"] else text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def calls_text(calls: Iterable[tuple[str, dict]], family: str) -> str:
    """(name, arguments) pairs as the family writes them."""
    if family == "hermes":
        return "\n".join(f"{CALL_OPEN}\n{json.dumps({'name': n, 'arguments': a}, ensure_ascii=False)}\n{CALL_CLOSE}"
                         for n, a in calls)
    return "; ".join(json.dumps({"name": n, "parameters": a}, ensure_ascii=False) for n, a in calls)


def tools_system_text(tools: Sequence[Tool], family: str) -> str:
    """The system text that describes `tools` and how to call them."""
    listed = "\n".join(json.dumps(t.as_openai(), ensure_ascii=False) for t in tools)
    if family == "hermes":
        return ("# Tools\n\nYou may call functions to help answer the user. They are described below as JSON "
                f"objects within <tools></tools> tags:\n<tools>\n{listed}\n</tools>\n\nTo call a function, "
                "answer with a JSON object of its name and arguments within <tool_call></tool_call> tags, one "
                "block per call:\n<tool_call>\n{\"name\": <function name>, \"arguments\": <arguments as a JSON "
                "object>}\n</tool_call>")
    return ("You may call functions to help answer the user. To call one, answer with nothing but a JSON object "
            "of the form {\"name\": <function name>, \"parameters\": <arguments as a JSON object>}; to call "
            "several, separate their objects with \"; \". Use literal values, not variables. The functions:\n"
            f"{listed}")


# --- the model's answer ---------------------------------------------------------

def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str              # a JSON object, as OpenAI sends it: a string
    id: str = field(default_factory=new_call_id)


def parse(text: str, family: str, tool_names: Iterable[str]) -> tuple[str | None, list[ToolCall]]:
    """The model's `text` -> (content, tool calls). Without calls, content is the text untouched; with them, the
    text around the calls, stripped (None if there is none). A malformed call or an unknown function name makes
    the whole text plain content: half a set of calls would be worse than none."""
    names = set(tool_names)
    found = _hermes(text, names) if family == "hermes" else _llama3(text, names)
    return (text, []) if found is None else found


def _hermes(text: str, names: set[str]) -> tuple[str | None, list[ToolCall]] | None:
    start = text.find(CALL_OPEN)
    if start < 0:
        return None
    pieces, calls, pos = [text[:start].rstrip()], [], start
    while (start := text.find(CALL_OPEN, pos)) >= 0:
        pieces.append(text[pos:start].strip())
        # the JSON is read whole first: its strings may hold "</tool_call>"
        try:
            obj, end = _DECODER.raw_decode(text, _skip_space(text, start + len(CALL_OPEN)))
        except ValueError:
            return None
        call = _call_object(obj, names, ("arguments", "parameters"))
        end = _skip_space(text, end)
        if call is None or not (text.startswith(CALL_CLOSE, end) or end == len(text)):
            return None      # (a last block the model ended without its closing tag still counts)
        calls.append(call)
        pos = min(end + len(CALL_CLOSE), len(text))
    pieces.append(text[pos:].strip())
    return "\n".join(p for p in pieces if p) or None, calls


def _skip_space(text: str, pos: int) -> int:
    return len(text) - len(text[pos:].lstrip())


def _not_json(constant: str):
    raise ValueError(f"{constant} is not JSON")    # Python reads NaN and Infinity; arguments must stay JSON


_DECODER = json.JSONDecoder(parse_constant=_not_json)


def _llama3(text: str, names: set[str]) -> tuple[None, list[ToolCall]] | None:
    body = text.strip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG):].lstrip()
    if not body.startswith("{"):
        return None
    calls, pos = [], 0
    while True:     # objects separated by ";" (a ";" inside a string must not split them, so no str.split)
        try:
            obj, pos = _DECODER.raw_decode(body, pos)
        except ValueError:
            return None
        call = _call_object(obj, names, ("parameters", "arguments"))
        if call is None:
            return None
        calls.append(call)
        pos = _skip_space(body, pos)
        if body.startswith(";", pos):
            pos = _skip_space(body, pos + 1)
        elif pos < len(body):
            return None
        if pos == len(body):         # (a trailing ";" is harmless)
            return None, calls


def _call_object(obj, names: set[str], keys: tuple[str, ...]) -> ToolCall | None:
    """{"name": ..., keys[0] or keys[1]: {...}} naming a known function -> a ToolCall; no arguments means {}."""
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    arguments = next((obj[k] for k in keys if k in obj), {})
    if not isinstance(arguments, dict):
        return None
    return ToolCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


class ToolCallStream:
    """A streamed answer's content and calls: `feed` each text delta and send back what it returns (content that
    cannot be part of a call); `finish` gives the rest of the content and the calls, which go out at the end.
    Everything `feed` returned plus `finish`'s content equals `parse`'s content (or the whole text)."""

    def __init__(self, family: str, tool_names: Iterable[str]):
        self.family = family
        self.names = tuple(tool_names)
        self.text = ""
        self.sent = 0               # text[:sent] went out as content
        self.held = False           # a call may have begun: nothing more goes out until the end

    def feed(self, delta: str) -> str:
        self.text += delta
        if self.held:
            return ""
        end = self._hermes_end() if self.family == "hermes" else self._llama3_end()
        out, self.sent = self.text[self.sent:end], max(end, self.sent)
        return out

    def _hermes_end(self) -> int:
        """Content ends before a `<tool_call>` or a partial one at the end of the text, and the whitespace before
        it (dropped if a call follows)."""
        start = self.text.find(CALL_OPEN, self.sent)
        if start >= 0:
            self.held = True
        else:
            start = len(self.text) - _partial_suffix(self.text, CALL_OPEN)
        return max(len(self.text[:start].rstrip()), self.sent)

    def _llama3_end(self) -> int:
        """A call is the whole answer: held while the start could still be `{` or `<|python_tag|>`."""
        if self.sent:
            return len(self.text)
        head = self.text.lstrip()
        if head.startswith("{") or head.startswith(PYTHON_TAG):
            self.held = True
            return 0
        return 0 if PYTHON_TAG.startswith(head) else len(self.text)

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content not yet sent, calls)."""
        content, calls = parse(self.text, self.family, self.names)
        if not calls:
            return self.text[self.sent:], []
        sent = self.text[:self.sent]
        content = content or ""
        assert content.startswith(sent), "streamed content must begin the parsed content"
        return content[len(sent):], calls


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that begins `marker` (0 if none)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def message_tool_calls(calls: Sequence[ToolCall]) -> list[dict]:
    """A response message's `tool_calls`."""
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def tool_call_deltas(calls: Sequence[ToolCall]) -> list[dict]:
    """A stream chunk's `delta.tool_calls`: each call whole in one delta (clients join deltas by `index`)."""
    return [{"index": i, **call} for i, call in enumerate(message_tool_calls(calls))]


def finish_reason(reason: str, calls: Sequence[ToolCall]) -> str:
    """OpenAI's "tool_calls" for an answer that ended by itself in calls; a cut-off one keeps "length"."""
    return "tool_calls" if calls and reason == "stop" else reason


# --- forcing a call -------------------------------------------------------------

def tool_grammar(spec: ToolSpec | None, family: str) -> str | None:
    """An llguidance grammar (for `LLMatcher(tokenizer, grammar)`) that admits exactly the family's calls of
    the allowed tools, each with arguments valid against its schema: one call, or one or more with
    parallel_tool_calls. None with tool_choice "auto" (the model decides). A schema llguidance cannot compile is
    a 400 naming the tool."""
    if spec is None or spec.choice == "auto":
        return None
    from llguidance import LLMatcher

    tools = spec.allowed()
    for tool in tools:     # each schema alone first, so an error names its tool
        error = LLMatcher.validate_grammar(LLMatcher.grammar_from_json_schema(_arguments_schema(tool)))
        if error:
            i = spec.tools.index(tool)
            raise APIError(f"tools[{i}].function.parameters (of {tool.name!r}) cannot be enforced: "
                           f"{error.strip().splitlines()[0]}", param=f"tools[{i}].function.parameters")
    # a failure here is not the request's fault but the lines below: a ValueError, not a 400
    return grammars.compile_lark("\n".join(_grammar_lines(tools, family, spec.parallel)) + "\n")


def _grammar_lines(tools: Sequence[Tool], family: str, parallel: bool) -> list[str]:
    """Lark: each tool its own rule with the envelope as literal text and the arguments as `%json` with the
    tool's schema at its root (so the schema's own `$ref`s resolve), its name fixed by the rule."""
    alternatives = " | ".join(f"fn_{i}" for i in range(len(tools)))
    if family == "hermes":
        key, separator = "arguments", "\n"
        call = f"call: {_lit(CALL_OPEN + separator)} ({alternatives}) {_lit(separator + CALL_CLOSE)}"
    else:
        key, separator, call = "parameters", "; ", f"call: {alternatives}"
    lines = [f"start: call ({_lit(separator)} call)*" if parallel else "start: call", call]
    for i, tool in enumerate(tools):
        head = '{"name": "%s", "%s": ' % (tool.name, key)
        lines.append(f"fn_{i}: {_lit(head)} args_{i} {_lit('}')}")
        lines.append(f"args_{i}: %json {json.dumps(_arguments_schema(tool))}")
    return lines


def _lit(text: str) -> str:
    """A Lark string literal (JSON's escapes; names are ASCII, so no \\u escapes arise)."""
    return json.dumps(text)


def _arguments_schema(tool: Tool) -> dict:
    schema = dict(tool.parameters or {})
    schema.setdefault("type", "object")
    schema["x-guidance"] = {**JSON_LAYOUT, **schema.get("x-guidance", {})}
    return schema
