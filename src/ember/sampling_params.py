"""SamplingParams: vLLM's names, defaults and semantics, validated on construction.

Every bad value raises `InvalidRequestError` naming the field, the value and the allowed range,
so the server can answer 400 with a message the client can act on.
"""

from __future__ import annotations

import enum
import numbers
from dataclasses import dataclass
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
class SamplingParams:
    MAX_LOGPROBS: ClassVar[int] = 20
    MAX_STOP: ClassVar[int] = 64  # stop strings, and stop token ids: each is checked per token
    # Upper bounds: beyond them float32 logits overflow to inf and sampling degenerates
    # (1e39 is inf), and a long stop string holds back that much streamed text.
    MAX_TEMPERATURE: ClassVar[float] = 100.0
    MAX_REPETITION_PENALTY: ClassVar[float] = 100.0
    MAX_STOP_CHARS: ClassVar[int] = 1024

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

    def __post_init__(self) -> None:
        self._check_int("n", lo=1)
        self._check_float("presence_penalty", -2.0, 2.0)
        self._check_float("frequency_penalty", -2.0, 2.0)
        self._check_float("repetition_penalty", 0.0, self.MAX_REPETITION_PENALTY, lo_open=True)
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

    # ---- derived ------------------------------------------------------------------------
    @property
    def is_greedy(self) -> bool:
        return self.temperature < _SAMPLING_EPS

    @property
    def sampling_type(self) -> SamplingType:
        if self.is_greedy:
            return SamplingType.GREEDY
        return SamplingType.RANDOM if self.seed is None else SamplingType.RANDOM_SEED
