"""Sampling parameters: what a request asks of the sampler (sampler.py draws the tokens).

Penalties, then greedy argmax or temperature, top-k, top-p, min-p and a draw, in the order transformers'
`generate` applies them; a seed makes a request's draws reproducible; `logprobs` asks for each token's
log-probability and the most likely alternatives."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

# Below this a temperature turns float32 logits into inf and the softmax into NaN (a request sent 1e-40
# and failed the whole step); vLLM clamps to the same value. 0 means greedy.
MIN_TEMPERATURE = 0.01
MAX_OPENAI_PENALTY = 2.0          # presence and frequency penalties lie in [-2, 2] (OpenAI API)
MAX_TOP_LOGPROBS = 20             # OpenAI's bound on top_logprobs


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0        # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                  # 0 = off
    min_p: float = 0.0              # 0 = off; drop tokens below min_p x the top token's probability
    repetition_penalty: float = 1.0     # 1 = off; HF's: seen (prompt or output) logits /p if > 0, *p if < 0
    presence_penalty: float = 0.0       # OpenAI's: minus this once for each token already in the output
    frequency_penalty: float = 0.0      # OpenAI's: minus this times the token's count in the output
    seed: int | None = None         # per-request stream; None draws from the engine's seed
    stop: tuple[str, ...] = ()      # stop strings (not included in the text unless the next field says so)
    include_stop_str_in_output: bool = False    # vLLM's: the text ends with the stop string that ended it
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False        # keep going past EOS (trace replay: outputs follow the trace)
    logprobs: int | None = None     # None = off; else report each token's logprob and this many top ones
    grammar: str | None = None      # structured outputs: llguidance grammar text (grammar.py compiles it)

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        self._check_penalties()
        n = self.logprobs
        if n is not None and not (isinstance(n, int) and 0 <= n <= MAX_TOP_LOGPROBS):
            raise ValueError(f"logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}] (top alternatives per token), "
                             f"got {n!r}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    def _check_penalties(self):
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1] (0 = off), got {self.min_p!r}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1 = off), "
                             f"got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -MAX_OPENAI_PENALTY <= value <= MAX_OPENAI_PENALTY:
                raise ValueError(f"{name} must be in [-{MAX_OPENAI_PENALTY:g}, {MAX_OPENAI_PENALTY:g}] (0 = off), "
                                 f"got {value!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def plain_greedy(self) -> bool:
        """Greedy without penalties: the argmax of the model's logits, the cheapest draw."""
        return self.greedy and not self.penalized

    @property
    def penalized(self) -> bool:
        """Whether the row needs its token counts (a penalty slot in the sampler)."""
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


# Named sampling settings (`--sampling NAME`): what benchmarks and replays run besides greedy decoding.
# "chat" is what OpenAI's SDKs and most chat UIs send.
SAMPLING_PRESETS: dict[str, dict] = {
    "greedy": {"temperature": 0.0},
    "chat": {"temperature": 0.7, "top_p": 0.9},
    "top-k": {"temperature": 0.7, "top_k": 50},
    "chat-penalized": {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1},
}
# Named mixes: shares of the presets above. "serving" is what `niyama profile` times by default: most requests
# sample as chat clients do, some add a penalty, some are greedy (tools, evaluations, batch jobs).
SAMPLING_MIXES: dict[str, tuple[tuple[float, str], ...]] = {
    "serving": ((0.25, "greedy"), (0.60, "chat"), (0.15, "chat-penalized")),
}
MIX_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


@dataclass(frozen=True)
class SamplingMix:
    """Shares of sampling settings over a workload's requests: a preset's or a named mix's name, or a JSON file
    holding a list of {"share": w, "temperature": ..., "top_p": ..., ...} (shares are normalised; keys are
    SamplingParams')."""
    name: str
    shares: tuple[float, ...]
    settings: tuple[dict, ...]

    @classmethod
    def parse(cls, spec: str) -> "SamplingMix":
        if spec in SAMPLING_PRESETS:
            return cls(spec, (1.0,), (SAMPLING_PRESETS[spec],))
        if spec in SAMPLING_MIXES:
            shares, names = zip(*SAMPLING_MIXES[spec])
            return cls(spec, shares, tuple(SAMPLING_PRESETS[n] for n in names))
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"unknown sampling {spec!r}: use one of {', '.join([*SAMPLING_PRESETS, *SAMPLING_MIXES])} "
                             "or a JSON file "
                             'holding [{"share": 0.7, "temperature": 0.7, "top_p": 0.9}, ...]')
        try:
            entries = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{spec}: not JSON ({e})") from None
        if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
            raise ValueError(f"{spec}: expected a non-empty list of objects")
        shares, settings = [], []
        for i, entry in enumerate(entries):
            entry = dict(entry)
            share = entry.pop("share", 1.0)
            unknown = set(entry) - set(MIX_KEYS)
            if unknown:
                raise ValueError(f"{spec}: entry {i} has unknown keys {sorted(unknown)}; allowed: share, "
                                 f"{', '.join(MIX_KEYS)}")
            if not (isinstance(share, (int, float)) and share > 0):
                raise ValueError(f"{spec}: entry {i}'s share must be a number > 0")
            SamplingParams(**entry)                 # refuse bad values now, not mid-run
            shares.append(float(share))
            settings.append(entry)
        total = sum(shares)
        return cls(path.stem, tuple(s / total for s in shares), tuple(settings))

    def pick(self, rng) -> dict:
        """One request's settings (`rng`: a random.Random)."""
        if len(self.settings) == 1:
            return dict(self.settings[0])
        return dict(rng.choices(self.settings, weights=self.shares)[0])

    @property
    def sampled_share(self) -> float:
        """The share of requests that are not plain greedy (a sampled or penalized draw)."""
        return sum(w for w, s in zip(self.shares, self.settings) if not SamplingParams(**s).plain_greedy)
