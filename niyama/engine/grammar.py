"""Structured outputs: grammars (a JSON schema, a regex, a choice of strings, a Lark grammar) that decide which
tokens a request may sample next, through llguidance.

Why llguidance rather than xgrammar: it is one Rust wheel with no dependencies (xgrammar needs transformers,
triton and its own FFI package, and our engine imports neither), compiles a schema lazily (no whole-grammar
precompute per request, so a new schema costs nothing up front), and fills a batch's masks on its own thread
pool with the GIL released. Its per-token mask cost is measured in benchmarks/grammar_bench.py.

Two sides use this module:
- the HTTP side compiles a request's constraint to llguidance's grammar text and validates it (`compile_*`;
  a grammar the library cannot build is a ValueError naming the problem, which the server answers with a
  400). That needs no tokenizer and no torch.
- the engine keeps an `LLMatcher` per constrained sequence (`Grammars`): before each sampling step it fills
  the rows' bitmasks on the host (while the GPU runs the forward pass), the sampler turns disallowed logits
  to -inf, and after the draw each matcher consumes its token. Rows without a grammar are not touched.
"""

from __future__ import annotations

import re

import numpy as np

# tokens are 32 to a mask word (llguidance's layout: bit i of word w allows token 32 w + i)
MASK_BITS = 32
# JSON on one line with Python's separators: free whitespace would let a weak model spend its whole budget on
# newlines (a random-weight model does), and it costs tokens. A schema's own "x-guidance" options win.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise ValueError("structured outputs need the llguidance package: pip install llguidance") from None
    return llguidance


def _checked(grammar: str, what: str) -> str:
    error = _llguidance().LLMatcher.validate_grammar(grammar)
    if error:
        raise ValueError(f"{what} cannot be compiled: {error}")
    return grammar


def compile_json_schema(schema: "dict | bool | None") -> str:
    """A JSON schema (None: any JSON object, OpenAI's json_object mode) -> llguidance grammar text."""
    if schema is None:
        schema = {"type": "object"}
    if not isinstance(schema, (dict, bool)):
        raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
    try:
        grammar = _llguidance().LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
    except ValueError as e:
        raise ValueError(f"the JSON schema cannot be compiled: {e}") from None
    return _checked(grammar, "the JSON schema")


def compile_regex(pattern: str) -> str:
    return _checked(_llguidance().LLMatcher.grammar_from_regex(pattern), "the regular expression")


def compile_choice(choices: list[str]) -> str:
    """Exactly one of `choices` (vLLM's guided_choice)."""
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise ValueError("a choice must be a non-empty list of non-empty strings")
    return compile_regex("(" + "|".join(re.escape(c) for c in choices) + ")")


def compile_lark(source: str) -> str:
    return _checked(_llguidance().LLMatcher.grammar_from_lark(source), "the grammar")


class Grammars:
    """The engine's constrained sequences: an LLMatcher each (`seq.matcher`), their step's masks, and their
    tokens. The tokenizer's vocabulary table is built at the first constrained request (~0.3 s for 49K
    tokens), so an engine that never sees one pays nothing."""

    def __init__(self, tokenizer_json: str | None, vocab_size: int, eos_token_ids: tuple[int, ...]):
        self.tokenizer_json = tokenizer_json
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.words = (vocab_size + MASK_BITS - 1) // MASK_BITS
        self._tokenizer = None
        self._executor = None
        self._host = np.zeros((0, self.words), dtype=np.int32)

    def matcher(self, grammar: str):
        """A matcher at the start of `grammar`; ValueError when it cannot be built (the request's 400)."""
        ll = _llguidance()
        if self._tokenizer is None:
            if self.tokenizer_json is None:
                raise ValueError("structured outputs need the model's tokenizer; this engine has none")
            self._tokenizer = ll.LLTokenizer(self.tokenizer_json, n_vocab=self.vocab_size,
                                             eos_token=self.eos_token_ids or None)
            self._executor = ll.LLExecutor()
        matcher = ll.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"the grammar cannot be used: {matcher.get_error()}")
        return matcher

    def masks(self, seqs: list) -> "tuple[list[int], np.ndarray] | None":
        """The rows of `seqs` with a matcher and their bitmasks `[rows, words]` int32, filled on llguidance's
        threads; None when no row is constrained (the common case, which costs one pass over the rows)."""
        rows = [i for i, seq in enumerate(seqs) if seq.matcher is not None]
        if not rows:
            return None
        if self._host.shape[0] < len(rows):
            self._host = np.zeros((max(len(rows), 2 * self._host.shape[0]), self.words), dtype=np.int32)
        host = self._host[:len(rows)]
        self._executor.unsafe_compute_mask_ptr([(seqs[i].matcher, k) for k, i in enumerate(rows)],
                                               host.ctypes.data, self.words * 4, len(rows))
        return rows, host

    @staticmethod
    def advance(seq, token: int) -> None:
        """`seq` sampled `token` under its mask. A matcher that refuses it (it cannot, unless the model's EOS is
        not the grammar's end) leaves the sequence to end by its stop token or length."""
        if not seq.matcher.consume_token(token):
            seq.matcher = None

