"""AsyncLLMEngine: an LLMEngine driven by one background thread, consumed from asyncio.

The engine is not thread-safe, so one thread owns it: it loads the model, then loops
`drain commands -> step -> deliver outputs`. Callers never touch it directly; they enqueue
add/abort commands on a thread-safe queue, which the loop drains before every step (and
blocks on when there is nothing to do). Outputs go back to each request's asyncio.Queue
through `loop.call_soon_threadsafe`.

Validation (tokenization, context length, queue limit) runs on the caller's side, so a bad
or refused request fails at once instead of after the current step.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from ember.config import EngineConfig
from ember.engine.llm_engine import EngineStats, LLMEngine
from ember.errors import EmberError, InvalidRequestError, QueueFullError
from ember.loading.tokenizer import Tokenizer
from ember.outputs import RequestOutput
from ember.sampling_params import SamplingParams
from ember.structured_output import GrammarCompiler

logger = logging.getLogger("ember")


class EngineUnavailableError(RuntimeError):
    """The engine is loading, has failed, or is shutting down (HTTP 503)."""


class RequestFailedError(RuntimeError):
    """The engine failed this one request (a bug; logged); the others go on (HTTP 500)."""


@dataclass
class _Stream:
    """Where one request's outputs go, and what the engine thread knows of its progress.

    Outputs are cumulative, so the stream keeps only the latest: a consumer that falls behind
    (a client that stops reading) holds one output, never a growing queue, and never slows
    the engine thread. An exception is final: nothing replaces it.
    """

    loop: asyncio.AbstractEventLoop
    num_tokens: int = 0  # generated so far, over all n sequences
    _latest: RequestOutput | BaseException | None = None
    _ready: asyncio.Event = field(default_factory=asyncio.Event)

    def put(self, item: RequestOutput | BaseException) -> None:
        """From the engine thread."""
        try:
            self.loop.call_soon_threadsafe(self._set, item)
        except RuntimeError:  # the caller's loop is closed: nobody is listening any more
            pass

    def _set(self, item: RequestOutput | BaseException) -> None:
        if not isinstance(self._latest, BaseException):
            self._latest = item
            self._ready.set()

    async def get(self) -> RequestOutput | BaseException:
        await self._ready.wait()
        self._ready.clear()
        item, self._latest = self._latest, None
        assert item is not None
        return item


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass
class _Abort:
    request_id: str


class _Stop:
    pass


class AsyncLLMEngine:
    def __init__(
        self,
        engine_factory: Callable[[], LLMEngine],
        log_stats_interval: float = 5.0,
        freeze_gc: bool = False,
    ) -> None:
        """`freeze_gc`: once the model is loaded, move every object alive then out of the
        cyclic garbage collector's sight (`gc.freeze`, as vLLM's engine does at start-up),
        for a process that serves this engine for the rest of its life: a full collection
        then walks only what requests create, not the ~400k objects of torch, the model and
        the tokenizer (tens of ms, landing in some request's inter-token latency)."""
        self._factory = engine_factory
        self._log_interval = log_stats_interval
        self._freeze_gc = freeze_gc
        self.engine: LLMEngine | None = None  # set on the engine thread once loaded
        self._commands: queue.SimpleQueue[_Add | _Abort | _Stop] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards the fields below
        self._streams: dict[str, _Stream] = {}
        self._pending_seqs = 0  # sequences of adds not yet drained by the engine thread
        self._stats: EngineStats | None = None  # refreshed by the engine thread
        self._error: str | None = None  # why the engine is dead
        self._closing = False
        self._ready = threading.Event()
        self._idle = threading.Event()  # no request in flight (for shutdown's grace period)
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="ember-engine", daemon=True)

    @classmethod
    def from_config(cls, config: EngineConfig, **kwargs) -> "AsyncLLMEngine":
        return cls(lambda: LLMEngine(config), **kwargs)

    # ---- state ---------------------------------------------------------------------------
    def start(self) -> None:
        """Load the model and start the loop, both on the engine thread (idempotent)."""
        if not self._thread.is_alive() and not self._ready.is_set():
            self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    @property
    def is_ready(self) -> bool:
        return self._ready.is_set() and self._error is None and not self._closing

    @property
    def is_healthy(self) -> bool:
        return self._error is None

    @property
    def error(self) -> str | None:
        return self._error

    @property
    def load_failed(self) -> bool:
        return self._error is not None and self.engine is None

    def stats(self) -> EngineStats | None:
        return self._stats

    @property
    def num_in_flight(self) -> int:
        """Requests admitted and not finished, failed or aborted yet."""
        with self._lock:
            return len(self._streams)

    def _check_available(self) -> LLMEngine:
        if self._error is not None:
            raise EngineUnavailableError(f"the engine is not running: {self._error}")
        if self._closing:
            raise EngineUnavailableError("the server is shutting down")
        if self.engine is None or not self._ready.is_set():
            raise EngineUnavailableError("the model is still loading")
        return self.engine

    @property
    def tokenizer(self) -> Tokenizer:
        return self._check_available().tokenizer

    @property
    def grammars(self) -> GrammarCompiler:
        """Structured outputs' compiler (thread-safe: the server compiles off the loop)."""
        return self._check_available().grammars

    @property
    def max_model_len(self) -> int:
        return self._check_available().max_model_len

    @property
    def vocab_size(self) -> int:
        """Token ids below this are valid for both the model and its tokenizer."""
        engine = self._check_available()
        return min(engine.model_config.vocab_size, engine.tokenizer.vocab_size)

    # ---- requests ------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        engine = self._check_available()
        return engine.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    async def generate(
        self, request_id: str, prompt: str | list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's cumulative output after every step that advanced it.

        Bad input and a full queue raise before the first yield; a consumer that stops
        iterating (or is cancelled) aborts the request.
        """
        engine = self._check_available()
        ids = self.tokenize(prompt)
        engine.validate_prompt(ids, params)
        stream = _Stream(asyncio.get_running_loop())
        limit = engine.config.max_queued_requests
        with self._lock:
            self._check_available()  # it may have died or closed meanwhile
            if request_id in self._streams:
                raise InvalidRequestError(f"request id {request_id!r} is already in use")
            waiting = (self._stats.num_waiting if self._stats else 0) + self._pending_seqs
            if limit is not None and waiting + params.n > limit:
                raise QueueFullError(
                    f"the server is busy: {waiting} sequences are waiting to start "
                    f"(max_queued_requests={limit}); retry later"
                )
            self._streams[request_id] = stream
            self._pending_seqs += params.n
            self._idle.clear()
        self._commands.put(_Add(request_id, ids, params))
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine has already dropped it
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        if self._pop_stream(request_id) is None:
            return  # finished, failed or already aborted
        self._commands.put(_Abort(request_id))

    def _pop_stream(self, request_id: str) -> _Stream | None:
        with self._lock:
            stream = self._streams.pop(request_id, None)
            if not self._streams:
                self._idle.set()
        return stream

    def shutdown(self, grace_s: float = 0.0) -> None:
        """Refuse new requests, give in-flight ones `grace_s` seconds, abort the rest, stop.

        Blocking: call it from a thread other than the event loop's.
        """
        with self._lock:
            self._closing = True
        if self._thread.is_alive() and self._ready.is_set():
            if not self._idle.wait(grace_s):
                logger.warning("shutdown: aborting requests still running after %.1f s", grace_s)
            self._commands.put(_Stop())
            self._thread.join(timeout=30 if self._error is None else 5)

    # ---- the engine thread ---------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.engine = self._factory()
        except Exception as e:
            if isinstance(e, EmberError):
                logger.error("model load failed: %s", e)
            else:
                logger.exception("the engine failed to load")
            self._error = f"model load failed: {e}"
            self._ready.set()
            return
        self._stats = self.engine.get_stats()
        self.engine.on_failure(self._engine_died)
        if self._freeze_gc:
            gc.collect()
            gc.freeze()
        self._ready.set()
        try:
            if self._closing:  # shut down while loading
                return
            self._loop(self.engine)
        except Exception as e:
            logger.exception("engine step failed; the engine is dead")
            self._fail_all(EngineUnavailableError(f"engine failure: {e!r}"), error=repr(e))
        else:
            self._fail_all(EngineUnavailableError("the server is shutting down"))
        finally:
            self.engine.shutdown()

    def _engine_died(self, reason: str) -> None:
        """A tensor-parallel rank died (called from the engine's watchdog thread): fail every
        request now, even if the engine thread is stuck in a collective, and stop the loop."""
        self._fail_all(EngineUnavailableError(f"engine failure: {reason}"), error=reason)
        self._commands.put(_Stop())

    def _loop(self, engine: LLMEngine) -> None:
        window = _StatsWindow()
        while True:
            busy = engine.has_unfinished_requests()
            # Block only when idle: a busy loop just picks up what has arrived.
            commands = [] if busy else [self._commands.get()]
            if not busy:
                window.reset()
            while True:
                try:
                    commands.append(self._commands.get_nowait())
                except queue.Empty:
                    break
            for cmd in commands:
                if isinstance(cmd, _Stop):
                    return
                self._apply(engine, cmd)
            with self._lock:
                self._stats = engine.get_stats()
            if not engine.has_unfinished_requests():
                continue
            outputs = engine.step()
            self._deliver(outputs, window)
            with self._lock:
                self._stats = engine.get_stats()
            if window.elapsed() >= self._log_interval:
                window.log(self._stats)

    def _apply(self, engine: LLMEngine, cmd: _Add | _Abort) -> None:
        if isinstance(cmd, _Abort):
            engine.abort_request(cmd.request_id)
            return
        with self._lock:
            self._pending_seqs -= cmd.params.n
            stream = self._streams.get(cmd.request_id)
        if stream is None:
            return  # aborted before it reached the engine
        try:
            engine.add_request(cmd.request_id, cmd.prompt_token_ids, cmd.params)
        except Exception as e:  # EmberError (e.g. a queue-full race) or a bug: this request only
            if not isinstance(e, EmberError):
                logger.exception("add_request failed for %s", cmd.request_id)
            self._pop_stream(cmd.request_id)
            stream.put(e)

    def _deliver(self, outputs: list[RequestOutput], window: "_StatsWindow") -> None:
        for out in outputs:
            if out.finished:
                stream = self._pop_stream(out.request_id)
            else:
                with self._lock:
                    stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # aborted during this step; the abort command will clean up
            if out.error is not None:  # the engine failed this request alone (and logged it)
                stream.put(RequestFailedError(f"request {out.request_id} failed: {out.error}"))
                continue
            num_tokens = sum(len(c.token_ids) for c in out.outputs)
            if stream.num_tokens == 0:
                window.prompt_tokens += len(out.prompt_token_ids) - out.num_cached_tokens
            window.generation_tokens += num_tokens - stream.num_tokens
            stream.num_tokens = num_tokens
            stream.put(out)

    def _fail_all(self, exc: EngineUnavailableError, error: str | None = None) -> None:
        with self._lock:
            if error is not None:
                self._error = error
            self._closing = self._closing or error is None
            streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            stream.put(exc)
        self._idle.set()


class _StatsWindow:
    """Throughput since the last periodic log line."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.monotonic()
        self.prompt_tokens = 0
        self.generation_tokens = 0

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def log(self, stats: EngineStats) -> None:
        dt = self.elapsed()
        logger.info(
            "Engine: running: %d reqs, waiting: %d reqs, prompt throughput: %.1f tokens/s, "
            "generation throughput: %.1f tokens/s, KV cache usage: %.1f%%, "
            "prefix cache hit rate: %.1f%%",
            stats.num_running, stats.num_waiting, self.prompt_tokens / dt,
            self.generation_tokens / dt, 100 * stats.kv_cache_usage,
            100 * stats.prefix_cache_hit_rate,
        )
        self.reset()
