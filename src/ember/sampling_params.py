"""SamplingParams: vLLM's names, defaults and semantics, validated on construction.

Every bad value raises `InvalidRequestError` naming the field, the value and the allowed range,
so the server can answer 400 with a message the client can act on.
"""

from __future__ import annotations

import enum
import json
import numbers
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from ember.errors import InvalidRequestError

_SAMPLING_EPS = 1e-5  # temperatures below this are greedy (as in vLLM)


class SamplingType(enum.Enum):
    GREEDY = "greedy"
    RANDOM = "random"
    RANDOM_SEED = "random_seed"


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but `n=True` is a client bug, not a count.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass
class StructuredOutputsParams:
    """What the output must match (vLLM's `StructuredOutputsParams`): exactly one of a JSON
    schema (a dict or its JSON text), a regular expression, a list of choices, a grammar
    (Lark, as llguidance extends it, or llama.cpp's GBNF), or any JSON object."""

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        set_ = [f.name for f in fields(self) if getattr(self, f.name) not in (None, False)]
        if len(set_) != 1:
            raise InvalidRequestError(
                "structured outputs need exactly one of json, regex, choice, grammar, "
                f"json_object; got {', '.join(set_) or 'none'}")
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except ValueError as e:
                raise InvalidRequestError(f"invalid JSON schema: not JSON ({e})") from None
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise InvalidRequestError(
                f"invalid JSON schema: a schema is an object, got {type(self.json).__name__}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise InvalidRequestError(f"structured outputs' {name} must be a non-empty string")
        if self.choice is not None and (
                not isinstance(self.choice, (list, tuple)) or not self.choice
                or not all(isinstance(c, str) and c for c in self.choice)):
            raise InvalidRequestError(
                "structured outputs' choice must be a non-empty list of non-empty strings")
        if self.json_object is not None and not isinstance(self.json_object, bool):
            raise InvalidRequestError("structured outputs' json_object must be a boolean")

    @property
    def kind(self) -> str:
        return next(f.name for f in fields(self) if getattr(self, f.name) not in (None, False))

    def cache_key(self) -> str:
        """One string per distinct constraint: compiled grammars are cached under it."""
        value = getattr(self, self.kind)
        return self.kind + ":" + json.dumps(value, sort_keys=True, separators=(",", ":"))


@dataclass
class SamplingParams:
    MAX_LOGPROBS: ClassVar[int] = 20
    MAX_STOP: ClassVar[int] = 64  # stop strings, and stop token ids: each is checked per token
    # Bounds: beyond them float32 logits overflow to inf and sampling degenerates (1e39 is
    # inf; a repetition penalty below float32's range is 0, and a masked -inf logit times 0
    # is NaN), and a long stop string holds back that much streamed text.
    MAX_TEMPERATURE: ClassVar[float] = 100.0
    MIN_REPETITION_PENALTY: ClassVar[float] = 0.01
    MAX_REPETITION_PENALTY: ClassVar[float] = 100.0
    MAX_STOP_CHARS: ClassVar[int] = 1024
    MAX_LOGIT_BIAS: ClassVar[int] = 300  # OpenAI's limit

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled (normalised to 0)
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None  # normalised to list[str]
    stop_token_ids: list[int] | None = None  # normalised to list[int]
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to the end of the context
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        self._check_int("n", lo=1)
        self._check_float("presence_penalty", -2.0, 2.0)
        self._check_float("frequency_penalty", -2.0, 2.0)
        self._check_float("repetition_penalty", self.MIN_REPETITION_PENALTY,
                          self.MAX_REPETITION_PENALTY)
        self._check_float("temperature", 0.0, self.MAX_TEMPERATURE)
        self._check_float("top_p", 0.0, 1.0, lo_open=True)
        self._check_int("top_k", lo=-1)
        self.top_k = max(self.top_k, 0)
        self._check_float("min_p", 0.0, 1.0)
        if self.seed is not None:
            self._check_int("seed")
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequestError(
                    f"{name} must be a boolean, got {getattr(self, name)!r}"
                )
        if self.max_tokens is not None:
            self._check_int("max_tokens", lo=1)
        self._check_int("min_tokens", lo=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequestError(
                f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}"
            )
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                self._check_int(name, lo=0, hi=self.MAX_LOGPROBS)
        self.stop = self._normalise_stop(self.stop)
        self.stop_token_ids = self._normalise_stop_token_ids(self.stop_token_ids)
        self.logit_bias = self._normalise_logit_bias(self.logit_bias)
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                raise InvalidRequestError(
                    "structured_outputs must be a StructuredOutputsParams, got "
                    f"{type(self.structured_outputs).__name__}")
            if self.min_tokens:
                # The grammar decides where the output ends: a ban on EOS could leave no token.
                raise InvalidRequestError("min_tokens cannot be combined with structured outputs")
        if self.is_greedy:
            # As in vLLM: the filters cannot change an argmax, so drop them (and their cost).
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    # ---- validation helpers -------------------------------------------------------------
    def _check_int(self, name: str, lo: int | None = None, hi: int | None = None) -> None:
        value = getattr(self, name)
        if not _is_int(value):
            raise InvalidRequestError(f"{name} must be an integer, got {value!r}")
        value = int(value)
        if hi is not None and lo is not None and not lo <= value <= hi:
            raise InvalidRequestError(f"{name} must be in [{lo}, {hi}], got {value}")
        elif lo is not None and value < lo:
            raise InvalidRequestError(f"{name} must be >= {lo}, got {value}")
        setattr(self, name, value)

    def _check_float(
        self, name: str, lo: float, hi: float | None, lo_open: bool = False
    ) -> None:
        value = getattr(self, name)
        if not _is_real(value):
            raise InvalidRequestError(f"{name} must be a number, got {value!r}")
        value = float(value)
        # Written as "not in range" so that NaN is rejected too.
        ok = (lo < value if lo_open else lo <= value) and (hi is None or value <= hi)
        if not ok:
            if hi is None:
                rng = f"> {lo:g}" if lo_open else f">= {lo:g}"
            else:
                rng = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
            raise InvalidRequestError(f"{name} must be {rng}, got {value!r}")
        setattr(self, name, value)

    @staticmethod
    def _normalise_stop(stop: Any) -> list[str]:
        if stop is None:
            return []
        items = [stop] if isinstance(stop, str) else stop
        if not isinstance(items, (list, tuple)):
            raise InvalidRequestError(f"stop must be a string or a list of strings, got {stop!r}")
        SamplingParams._check_count("stop", items)
        for s in items:
            if not isinstance(s, str) or not s:
                raise InvalidRequestError(f"stop strings must be non-empty strings, got {s!r}")
            if len(s) > SamplingParams.MAX_STOP_CHARS:
                raise InvalidRequestError(
                    f"stop strings must be at most {SamplingParams.MAX_STOP_CHARS} characters, "
                    f"got one of {len(s)}")
        return list(items)

    @staticmethod
    def _check_count(name: str, items: list | tuple) -> None:
        if len(items) > SamplingParams.MAX_STOP:
            raise InvalidRequestError(
                f"{name} has {len(items)} entries; at most {SamplingParams.MAX_STOP} are allowed")

    @staticmethod
    def _normalise_stop_token_ids(ids: Any) -> list[int]:
        if ids is None:
            return []
        if not isinstance(ids, (list, tuple)):
            raise InvalidRequestError(f"stop_token_ids must be a list of integers, got {ids!r}")
        SamplingParams._check_count("stop_token_ids", ids)
        for t in ids:
            if not _is_int(t) or t < 0:
                raise InvalidRequestError(
                    f"stop_token_ids must be non-negative integers, got {t!r}"
                )
        return [int(t) for t in ids]

    @staticmethod
    def _normalise_logit_bias(bias: Any) -> dict[int, float] | None:
        if not bias:
            return None
        if not isinstance(bias, dict):
            raise InvalidRequestError(f"logit_bias must map token ids to numbers, got {bias!r}")
        if len(bias) > SamplingParams.MAX_LOGIT_BIAS:
            raise InvalidRequestError(f"logit_bias has {len(bias)} entries; at most "
                                      f"{SamplingParams.MAX_LOGIT_BIAS} are allowed")
        out = {}
        for key, value in bias.items():
            try:
                token = int(key)  # JSON object keys are strings
            except (TypeError, ValueError):
                token = -1
            if token < 0 or (isinstance(key, str) and not key.isdigit()) or isinstance(key, bool):
                raise InvalidRequestError(f"logit_bias keys must be token ids, got {key!r}")
            if not _is_real(value) or not -100.0 <= float(value) <= 100.0:
                raise InvalidRequestError(
                    f"logit_bias values must be numbers in [-100, 100], got {value!r}")
            out[token] = float(value)
        return out

    # ---- derived ------------------------------------------------------------------------
    @property
    def is_greedy(self) -> bool:
        return self.temperature < _SAMPLING_EPS

    @property
    def sampling_type(self) -> SamplingType:
        if self.is_greedy:
            return SamplingType.GREEDY
        return SamplingType.RANDOM if self.seed is None else SamplingType.RANDOM_SEED
