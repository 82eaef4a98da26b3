"""The generation worker: the one thread that owns the model.

Requests wait in a bounded queue and join the running batch between decoding steps
(`mlx_llava.batch.BatchEngine`); each leaves at its EOS, stop string or token limit, or when its
client cancels it (within one step). Finished answers leave their KV cache in an LRU of prompt
caches (mlx-lm's `LRUPromptCache`, a trie over position keys: token ids, and picture digests for
image positions), so a request that begins like an earlier one (the next turn of a chat, a new
question about a picture already seen) computes only what follows the longest cached prefix.

Everything MLX runs in this thread; callers hand over plain data (a prompt string and decoded
pictures) and get events back through a callback, from this thread.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.cache import LRUPromptCache, trim_prompt_cache

from ..batch import BatchEngine, Row
from ..generate import context_room, encode_prompt, make_sampling, prompt_embeddings
from ..model import Model
from ..processor import Processor

log = logging.getLogger("mlx_llava.server")

_CACHE_KEY = "model"  # the LRU is keyed by model too; the worker serves one


@dataclass
class Sampling:
    """How to answer: mlx-lm's sampling settings, a token limit and stop strings."""

    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 0.0
    min_p: float = 0.0
    top_k: int = 0
    repetition_penalty: Optional[float] = None
    repetition_context_size: int = 20
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)


@dataclass
class GenerationRequest:
    """A rendered prompt (one `<image>` per picture), its decoded pictures, and the sampling."""

    prompt: str
    pictures: list
    sampling: Sampling


@dataclass
class Stats:
    """Token counts and times (seconds) of one request."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    queued_s: float = 0.0  # submitted -> admitted
    prompt_s: float = 0.0  # admitted -> first token
    decode_s: float = 0.0  # first token -> last
    total_s: float = 0.0  # submitted -> last


@dataclass
class Event:
    """What a request's callback receives, in order: one "start" (or one "error"), "text"
    events, then one "done"."""

    kind: str  # "start", "text", "done" or "error"
    text: str = ""
    finish_reason: Optional[str] = None  # done: "stop", "length" or "cancelled"
    stats: Optional[Stats] = None  # start (prompt counts) and done (everything)
    error: str = ""  # error: a message for the client
    status: int = 400  # error: 4xx for a bad request, 5xx for a failure of ours


class QueueFull(RuntimeError):
    """The request queue is full."""


class Job:
    """A submitted request. `cancel()` may be called from any thread, any number of times."""

    def __init__(self, worker: "Worker", request: GenerationRequest, on_event: Callable):
        self.worker = worker
        self.request = request
        self.on_event = on_event
        self.row: Optional[Row] = None
        self.stats = Stats()
        self.submitted = time.perf_counter()
        self.admitted = self.first_token = 0.0
        self.cancelled = False
        self.finished = False

    def cancel(self) -> None:
        self.worker.cancel(self)

    def emit(self, event: Event) -> None:
        try:
            self.on_event(event)
        except Exception:  # noqa: BLE001 - the receiver is gone (its event loop closed)
            self.cancelled = True


class Worker:
    """Continuous batching over one model in a thread of its own.

    Args:
        max_batch: the most requests generating at once; more wait in the queue.
        max_queue: the most requests waiting; `submit` raises QueueFull beyond.
        max_prefill: the most waiting requests that join the batch at one step (their prompts
            are computed together, and the running answers pause meanwhile). With 1, a request's
            first token waits for its own prompt and those queued before it, one per step, and
            the running answers go on between them.
        cache_entries, cache_bytes: bounds of the LRU of prompt caches.
        prefill_step_size: prompt positions per prefill chunk.
    """

    def __init__(
        self,
        model: Model,
        processor: Processor,
        max_batch: int = 8,
        max_queue: int = 32,
        max_prefill: int = 1,
        cache_entries: int = 16,
        cache_bytes: int = 2 << 30,
        prefill_step_size: int = 2048,
    ):
        self.model = model
        self.processor = processor
        self.parameters = sum(v.size for _, v in tree_flatten(model.parameters()))
        self.quantization_bits = (model.config.quantization or {}).get("bits")
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_prefill = max_prefill
        self.engine = BatchEngine(model, prefill_step_size, keep_caches=True)
        self.prompt_cache = LRUPromptCache(max_size=cache_entries, max_bytes=cache_bytes)
        self._queue: collections.deque[Job] = collections.deque()
        self._cancels: list[Job] = []
        self._running: dict[int, Job] = {}  # id(row) -> job
        self._wakeup = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="mlx-llava-worker", daemon=True)

    # Any thread ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread; requests still queued or running get an error event."""
        with self._wakeup:
            self._closing = True
            self._wakeup.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, request: GenerationRequest, on_event: Callable[[Event], None]) -> Job:
        """Queue a request; `on_event` is called from the worker thread.

        Raises:
            QueueFull: `max_queue` requests are already waiting.
        """
        job = Job(self, request, on_event)
        with self._wakeup:
            if self._closing:
                raise QueueFull("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the server is busy: {len(self._queue)} requests are waiting")
            self._queue.append(job)
            self._wakeup.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Stop a request (its client went away): it leaves the batch at the next step."""
        with self._wakeup:
            if job.finished or job.cancelled:
                return
            job.cancelled = True
            queued = job in self._queue
            if queued:
                self._queue.remove(job)
                job.finished = True
            else:
                self._cancels.append(job)
                self._wakeup.notify()
        if queued:  # it never started: nothing else will be said about it
            job.emit(Event("error", error="the request was cancelled", status=499))

    def state(self) -> dict:
        """What /health reports: requests generating and waiting, the prompt-cache LRU."""
        with self._wakeup:
            return {
                "active": len(self._running),
                "queued": len(self._queue),
                "max_batch": self.max_batch,
                "prompt_cache": {
                    "entries": len(self.prompt_cache),
                    "bytes": self.prompt_cache.nbytes,
                },
            }

    # The worker thread --------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wakeup:
                while not (self._queue or self._cancels or self.engine or self._closing):
                    self._wakeup.wait()
                if self._closing:
                    break
                cancels, self._cancels = self._cancels, []
                room = min(self.max_batch - len(self._running), self.max_prefill)
                admitted = [self._queue.popleft() for _ in range(min(room, len(self._queue)))]
            try:
                for job in cancels:
                    self._stop(job)
                for job in admitted:
                    self._admit(job)
                if self.engine:
                    for row in self.engine.step():
                        self._emit(row)
            except Exception:  # noqa: BLE001 - fail the batch, keep serving
                log.exception("generation failed")
                self._fail_all("generation failed; see the server log", 500)
        self._fail_all("the server is shutting down", 503)

    def _admit(self, job: Job) -> None:
        """Encode a request's prompt, find its longest cached prefix, and add it to the batch."""
        if job.cancelled:
            return
        job.admitted = time.perf_counter()
        request, s = job.request, job.request.sampling
        try:
            if s.seed is not None:
                mx.random.seed(s.seed)
            input_ids, pixel_values, keys, image_sizes = encode_prompt(
                self.model, self.processor, request.prompt, request.pictures
            )
            room = context_room(self.model, len(keys))  # (encode_prompt checked it is > 0)
            cache, rest = self.prompt_cache.fetch_nearest_cache(_CACHE_KEY, keys)
            if cache is not None and not rest:  # all cached: recompute the last position
                trim_prompt_cache(cache, 1)
                rest = keys[-1:]
            start = len(keys) - len(rest)
            embeddings = prompt_embeddings(self.model, input_ids, pixel_values, start, image_sizes)
            history = mx.where(input_ids[0] == self.model.config.image_token_index, 0, input_ids[0])
            sampler, processors = make_sampling(
                s.temperature,
                s.top_p,
                s.min_p,
                s.top_k,
                s.repetition_penalty,
                s.repetition_context_size,
            )
            max_tokens = min(s.max_tokens, room)
            row = Row(self.processor, max_tokens, sampler, processors, s.stop, history, keys)
            self.engine.add(row, embeddings, cache)
        except ValueError as e:  # the request's fault: placeholders, context length
            job.finished = True
            job.emit(Event("error", error=str(e), status=400))
            return
        job.row = row
        job.stats.prompt_tokens, job.stats.cached_tokens = len(keys), start
        job.stats.queued_s = job.admitted - job.submitted
        with self._wakeup:
            self._running[id(row)] = job
        job.emit(Event("start", stats=job.stats))

    def _emit(self, row: Row) -> None:
        job = self._running.get(id(row))
        if job is None:
            return
        if not job.first_token:
            job.first_token = time.perf_counter()
        if row.segment:
            job.emit(Event("text", text=row.segment))
        if row.finish_reason is not None:
            self._done(job, row.finish_reason)

    def _stop(self, job: Job) -> None:
        if job.row is not None and id(job.row) in self._running:
            self.engine.remove(job.row)
            self._done(job, "cancelled")

    def _done(self, job: Job, reason: str) -> None:
        row = job.row
        if row.cache is not None and row.cache_keys:
            self.prompt_cache.insert_cache(_CACHE_KEY, row.cache_keys, row.cache)
            row.cache = None
        now = time.perf_counter()
        stats = job.stats
        stats.completion_tokens = len(row.tokens)
        stats.prompt_s = (job.first_token or now) - job.admitted
        stats.decode_s = now - (job.first_token or now)
        stats.total_s = now - job.submitted
        with self._wakeup:
            self._running.pop(id(row), None)
            job.finished = True
        job.emit(Event("done", finish_reason=reason, stats=stats))

    def _fail_all(self, message: str, status: int) -> None:
        """Give every request an error and start from an empty batch."""
        with self._wakeup:
            jobs = list(self._running.values()) + list(self._queue)
            self._running.clear()
            self._queue.clear()
        self.engine = BatchEngine(self.model, self.engine.prefill_step_size, keep_caches=True)
        for job in jobs:
            job.finished = True
            job.emit(Event("error", error=message, status=status))
