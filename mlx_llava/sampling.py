"""How to answer: `SamplingParams`, the one type for sampling settings, validated in one place.

The command lines, the OpenAI and the Ollama schemas are thin adapters onto it: each builds a
`SamplingParams` and turns a `SamplingError` (which names the field) into its own error (a
one-line message naming the flag, a 400 naming the JSON field). A `SamplingParams` that exists
is valid, so nothing a request asks for can fail the decoding step it shares with others.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors

MAX_TEMPERATURE = 2.0  # OpenAI's bound; beyond it sampling is noise
MAX_REPETITION_CONTEXT = 1 << 20
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1000
SEED_LIMIT = 1 << 64  # mx.random.seed takes an unsigned 64-bit seed
RANDOM_SEED = -1  # what Ollama and llama.cpp clients send for "random": the same as no seed
MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs
RESPONSE_FORMATS = ("json_object", "json_schema")


class SamplingError(ValueError):
    """A sampling setting out of range; `field` names it (a `SamplingParams` field)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field} {message}")
        self.field = field
        self.reason = message


def _number(name: str, value: Any, low: float, high: float, integer: bool = False) -> None:
    kind = "an integer" if integer else "a number"
    valid = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not valid:
        raise SamplingError(name, f"must be {kind}, got {value!r}")
    if not math.isfinite(value) or not low <= value <= high:
        bounds = f"in [{low:g}, {high:g}]" if math.isfinite(high) else f">= {low:g}"
        raise SamplingError(name, f"must be {bounds}, got {value!r}")


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SamplingError(name, f"must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise SamplingError(name, f"must be > 0, got {value!r}")


def _seed(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SamplingError("seed", f"must be an integer, got {value!r}")
    if not RANDOM_SEED <= value < SEED_LIMIT:
        raise SamplingError("seed", f"must be in [0, 2**64) or -1 for random, got {value}")


@dataclass(frozen=True)
class ResponseFormat:
    """What an answer must be: any JSON object ("json_object") or JSON that validates against
    a JSON schema ("json_schema"). The schema is kept as compact JSON text, so that the params
    stay hashable and travel as JSON (pipeline ranks); `structured.py` compiles it.

    Attributes:
        kind: "json_object" or "json_schema".
        schema: the JSON schema as JSON text (json_schema only).
    """

    kind: str
    schema: Optional[str] = None

    @classmethod
    def json_schema(cls, schema: Union[dict, str, bool]) -> "ResponseFormat":
        """The format of a schema (a dict, or JSON text); SamplingError if it is not JSON."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise SamplingError("response_format", f"schema is not JSON: {e}") from None
        return cls("json_schema", json.dumps(schema, separators=(",", ":"), ensure_ascii=False))

    @classmethod
    def json_object(cls) -> "ResponseFormat":
        return cls("json_object")


@dataclass(frozen=True)
class SamplingParams:
    """How to answer one prompt.

    Attributes:
        max_tokens: the most tokens to generate (>= 1; capped by the model's context).
        temperature: in [0, 2]; 0 is greedy.
        top_p: nucleus sampling in [0, 1] (0: off).
        min_p: min-p sampling in [0, 1] (0: off).
        top_k: top-k sampling (>= 0; 0: off).
        repetition_penalty: mlx-lm's repetition penalty (> 0; None: off).
        repetition_context_size: tokens the penalty looks back on (>= 1).
        seed: seed MLX's generator first, in [0, 2**64) (None or -1: unseeded).
        stop: strings that end the answer (not included in it); at most 16 of at most 1000
            characters; empty strings are dropped.
        response_format: constrain the answer to JSON (a `ResponseFormat`, or its fields as a
            dict); the schema is compiled by llguidance here, so one it cannot take fails now.
        logprobs: record each answer token's log-probability and this many top alternatives
            (0 to 20; None: none), from the model's own distribution (see `decoding`).
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 0.0
    min_p: float = 0.0
    top_k: int = 0
    repetition_penalty: Optional[float] = None
    repetition_context_size: int = 20
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    response_format: Optional[ResponseFormat] = None
    logprobs: Optional[int] = None

    def __post_init__(self):
        _number("max_tokens", self.max_tokens, 1, math.inf, integer=True)
        _number("temperature", self.temperature, 0.0, MAX_TEMPERATURE)
        _number("top_p", self.top_p, 0.0, 1.0)
        _number("min_p", self.min_p, 0.0, 1.0)
        _number("top_k", self.top_k, 0, math.inf, integer=True)
        if self.repetition_penalty is not None:
            _positive("repetition_penalty", self.repetition_penalty)
        _number(
            "repetition_context_size", self.repetition_context_size, 1, MAX_REPETITION_CONTEXT, True
        )
        if self.seed is not None:
            _seed(self.seed)
            if self.seed == RANDOM_SEED:
                object.__setattr__(self, "seed", None)
        object.__setattr__(self, "stop", _stop_strings(self.stop))
        if self.logprobs is not None:
            _number("logprobs", self.logprobs, 0, MAX_TOP_LOGPROBS, integer=True)
        if self.response_format is not None:
            object.__setattr__(self, "response_format", _response_format(self.response_format))

    def replace(self, **changes) -> "SamplingParams":
        """A copy with the `changes` that are not None (a request's fields over defaults).

        Raises:
            SamplingError: a value out of range.
            TypeError: an unknown field.
        """
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "stop": list(self.stop)}

    @classmethod
    def from_json(cls, fields: dict) -> "SamplingParams":
        return cls(**fields)  # response_format comes as a dict: __post_init__ takes it


def _response_format(value: Any) -> ResponseFormat:
    """A checked `ResponseFormat` (from one, or from its fields as a dict): its kind known and
    its schema one llguidance compiles (SamplingError with llguidance's reason otherwise)."""
    if isinstance(value, dict):
        try:
            value = ResponseFormat(**value)
        except TypeError:
            message = f"must be a ResponseFormat, got {value!r}"
            raise SamplingError("response_format", message) from None
    if not isinstance(value, ResponseFormat):
        raise SamplingError("response_format", f"must be a ResponseFormat, got {value!r}")
    if value.kind not in RESPONSE_FORMATS:
        kinds = " or ".join(RESPONSE_FORMATS)
        raise SamplingError("response_format", f"type must be {kinds}, got {value.kind!r}")
    if value.kind == "json_schema" and not isinstance(value.schema, str):
        raise SamplingError("response_format", "json_schema needs a schema")
    from .structured import grammar  # llguidance is optional: imported when asked for

    try:
        grammar(value)
    except ValueError as e:
        raise SamplingError("response_format", str(e)) from None
    return value


def _stop_strings(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, Sequence) or not all(isinstance(s, str) for s in stop):
        raise SamplingError("stop", "must be a string or a list of strings")
    stop = tuple(s for s in stop if s)
    if len(stop) > MAX_STOP_STRINGS:
        raise SamplingError("stop", f"takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise SamplingError("stop", f"strings must be at most {MAX_STOP_CHARS} characters")
    return stop


class BatchSampler:
    """Draws the next token of every row of a batch in one call, each row with its own
    settings: log-probabilities [B, V] -> tokens [B].

    The filters are mlx-lm's (`sample_utils`: top-p, then min-p, then top-k, then a draw at the
    row's temperature), written over per-row arrays so that rows of different settings share
    one draw; a row whose temperature is 0 takes the argmax. A filter no row uses is skipped.
    """

    def __init__(self, params: Sequence[SamplingParams], vocab_size: int):
        temperatures = [p.temperature for p in params]
        self.greedy = all(t == 0 for t in temperatures)
        self.any_greedy = any(t == 0 for t in temperatures)
        self.temperature = _column([t or 1.0 for t in temperatures])
        self.is_greedy = mx.array([t == 0 for t in temperatures])
        top_p = [p.top_p if 0 < p.top_p < 1 else 1.0 for p in params]
        self.top_p = _column(top_p) if any(p < 1 for p in top_p) else None
        min_p = [p.min_p for p in params]
        self.log_min_p = mx.log(_column(min_p)) if any(min_p) else None
        top_k = [p.top_k if 0 < p.top_k < vocab_size else 0 for p in params]
        self.top_k = mx.array(top_k)[:, None] if any(top_k) else None

    def __call__(self, logprobs: mx.array) -> mx.array:
        if self.greedy:
            return mx.argmax(logprobs, axis=-1)
        x = logprobs
        if self.top_p is not None:  # as mlx-lm's apply_top_p, per row
            sorted_x = mx.sort(x, axis=-1)
            sorted_probs = mx.exp(sorted_x.astype(mx.float32))
            mass_above = mx.cumsum(sorted_probs, axis=-1, reverse=True, inclusive=False)
            total = mass_above[..., :1] + sorted_probs[..., :1]
            dropped = (mass_above >= self.top_p * total).sum(axis=-1, keepdims=True)
            threshold = mx.take_along_axis(sorted_x, dropped, axis=-1)
            x = mx.where((self.top_p < 1) & (x < threshold), -mx.inf, x)
        if self.log_min_p is not None:  # as apply_min_p (keeping at least one token)
            x = mx.where(x < x.max(axis=-1, keepdims=True) + self.log_min_p, -mx.inf, x)
        if self.top_k is not None:  # the k-th largest per row; k = 0 keeps every token
            kth = mx.take_along_axis(-mx.sort(-x, axis=-1), mx.maximum(self.top_k - 1, 0), -1)
            x = mx.where((self.top_k > 0) & (x < kth), -mx.inf, x)
        tokens = mx.random.categorical(x * (1 / self.temperature))
        if self.any_greedy:
            tokens = mx.where(self.is_greedy, mx.argmax(logprobs, axis=-1), tokens)
        return tokens


def _column(values: list) -> mx.array:
    """Per-row values as a float32 column [B, 1]."""
    return mx.array(values, dtype=mx.float32)[:, None]


def logits_processors(params: SamplingParams) -> list:
    """mlx-lm's logits processors for `params` (the repetition penalty), each called with
    the row's history (prompt and answer so far) and its logits [1, V]."""
    return make_logits_processors(
        repetition_penalty=params.repetition_penalty,
        repetition_context_size=params.repetition_context_size,
    )


def sampling_of(
    sampling: Optional[SamplingParams] = None, json_schema: Any = None, **settings
) -> SamplingParams:
    """`sampling` when given, else the `SamplingParams` of the keyword settings that
    `stream_generate` and `batch_generate` take (`json_schema`: a dict or JSON text, answered
    as a `json_schema` response format)."""
    if sampling is not None:
        return sampling
    if json_schema is not None:
        settings["response_format"] = ResponseFormat.json_schema(json_schema)
    return SamplingParams(**settings)
