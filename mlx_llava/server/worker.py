"""The generation worker: the one thread that owns the model.

Requests wait in a bounded queue and join the running batch between decoding steps
(`mlx_llava.batch.BatchEngine`); each leaves at its EOS, stop string or token limit, or when its
client cancels it (within one step). Finished answers leave their KV cache in an LRU of prompt
caches (mlx-lm's `LRUPromptCache`, a trie over position keys: token ids, and picture digests for
image positions), so a request that begins like an earlier one (the next turn of a chat, a new
question about a picture already seen) computes only what follows the longest cached prefix.

Everything MLX runs in this thread; callers hand over plain data (a prompt string and decoded
pictures) and get events back through a callback, from this thread.

Split across the ranks of `mlx.launch` (a model loaded with `load(..., pipeline=True)`), every
rank runs this worker in lockstep: rank 0, the one that serves HTTP, decides each turn of the
loop (which requests stop, which start, with their token ids, picture digests and sampling) and
broadcasts it as a `Turn`; then every rank does the same turn on its own layers (the same
cache lookups, batch changes and decoding step), so that their sends and receives pair up.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.cache import LRUPromptCache, trim_prompt_cache

from .. import distributed
from ..decoding import BatchEngine, Row, make_row
from ..model import Model
from ..processor import Processor
from ..prompt import EncodedPrompt, UncachedPrompt, embed_prompts, position_keys
from ..sampling import SamplingParams

log = logging.getLogger("mlx_llava.server")

_CACHE_KEY = "model"  # the LRU is keyed by model too; the worker serves one
IDLE_TURN_S = 0.1  # pipeline: an idle rank 0 shares an empty turn this often (see `_follow`)


@dataclass
class GenerationRequest:
    """A prompt tokenized and its pictures preprocessed (off the worker thread, see
    `prompt.encode_on_host`), and how to answer it (validated already)."""

    encoded: EncodedPrompt
    sampling: SamplingParams


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
    logprobs: list = field(default_factory=list)  # text: `TokenLogprob`s of its tokens, if asked


@dataclass
class Admission:
    """A request as every rank starts it, encoded on rank 0.

    Attributes:
        number: the request's number (`Job.number`), the same on every rank.
        input_ids: the prompt's token ids [L] (each `<image>` expanded).
        digests: the pictures' digests (`generate.image_digests`): with the ids, the
            prompt's position keys.
        sampling: how to answer.
        pixel_values: [n, H, W, 3] on rank 0 (None without pictures; LLaVA-NeXT: every
            picture's tiles); the other ranks get them, of `pixel_shape`, only when the vision
            tower has to see them.
        image_sizes: the pictures' (height, width) for LLaVA-NeXT (see `encode_prompt`), else
            None.
        video_pixels: the videos' frames [V, F, H, W, 3] on rank 0 (OneVision, NeXT-Video), or
            None; video_digests: their digests, which key the videos' positions; the other
            ranks get the frames, of `video_shape`, as they get pictures.
    """

    number: int
    input_ids: list[int]
    digests: list[str]
    sampling: SamplingParams
    pixel_values: Optional[mx.array] = None
    pixel_shape: Optional[list[int]] = None
    image_sizes: Optional[list[tuple[int, int]]] = None
    video_pixels: Optional[mx.array] = None
    video_digests: list[str] = field(default_factory=list)
    video_shape: Optional[list[int]] = None

    def to_json(self) -> dict:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["sampling"] = self.sampling.to_json()
        fields["pixel_values"] = fields["video_pixels"] = None
        return fields

    @classmethod
    def from_json(cls, fields: dict) -> "Admission":
        sizes = fields["image_sizes"]
        sizes = None if sizes is None else [tuple(size) for size in sizes]
        sampling = SamplingParams.from_json(fields["sampling"])
        return cls(**{**fields, "sampling": sampling, "image_sizes": sizes})


@dataclass
class Turn:
    """One turn of the worker loop, decided by rank 0 and done by every rank: stop the
    cancelled requests (by number), start the admitted ones, then one decoding step of the
    batch if it is not empty; or stop (`close`)."""

    cancels: list[int] = field(default_factory=list)
    admissions: list[Admission] = field(default_factory=list)
    close: bool = False

    def to_json(self) -> dict:
        return {
            "cancels": self.cancels,
            "admissions": [a.to_json() for a in self.admissions],
            "close": self.close,
        }

    @classmethod
    def from_json(cls, fields: dict) -> "Turn":
        admissions = [Admission.from_json(a) for a in fields["admissions"]]
        return cls(fields["cancels"], admissions, fields["close"])


class QueueFull(RuntimeError):
    """The request queue is full."""


def _ignore(event: Event) -> None:
    """The event callback of a request on the ranks other than 0 (no client there)."""


class Job:
    """A submitted request. `cancel()` may be called from any thread, any number of times."""

    def __init__(
        self,
        worker: "Worker",
        request: Optional[GenerationRequest],
        on_event: Callable,
        number: int,
    ):
        self.worker = worker
        self.request = request
        self.on_event = on_event
        self.number = number
        self.row: Optional[Row] = None
        self.stats = Stats()
        self.submitted = time.perf_counter()
        self.admitted = self.first_token = 0.0
        self.cancelled = False
        self.finished = False
        self.logprobs_sent = 0  # of `row.logprobs`

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
        cache_entries, cache_bytes: bounds of the LRU of prompt caches (`cache_bytes` for the
            whole model: split across ranks, each rank keeps its layers' share of it).
        prefill_step_size: prompt positions per prefill chunk.

    With a model split across ranks (`Model.pipeline`), every rank makes a worker with the same
    settings and calls `start`: rank 0's takes requests and decides, the others follow it (see
    the module's docstring). A rank that fails stops the pipeline: `failure` then says why
    and `on_failure` (if set) is called, from the worker thread.
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
        lm = model.language_model
        self.group = distributed.world() if lm.pipeline_size > 1 else None
        self.rank = lm.pipeline_rank
        self.ranks = self._gather(self._stage())  # for /health
        self.parameters = sum(r["parameters"] for r in self.ranks)
        self.quantization_bits = (model.config.quantization or {}).get("bits")
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_prefill = max_prefill
        self.engine = BatchEngine(model, prefill_step_size, keep_caches=True)
        # The same count and share of the bytes on every rank: their LRUs evict alike.
        share = len(model.layers) / model.config.text_config.num_hidden_layers
        self.prompt_cache = LRUPromptCache(cache_entries, int(cache_bytes * share))
        self.failure: Optional[str] = None
        self.on_failure: Optional[Callable[[], None]] = None
        self._numbers = itertools.count()
        self._queue: collections.deque[Job] = collections.deque()
        self._cancels: list[Job] = []
        self._encoded: dict[int, Job] = {}  # rank 0: number -> job, until it starts
        self._running: dict[int, Job] = {}  # id(row) -> job
        self._wakeup = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="mlx-llava-worker", daemon=True)
        self._observers: list[Callable[[str, dict], None]] = []
        self._started = False

    def _gather(self, value) -> list:
        """Every rank's `value` (JSON), in rank order: [value] for one process."""
        return [value] if self.group is None else distributed.gather(value, self.group)

    def _stage(self) -> dict:
        """This rank's part of the model: its decoder layers [first, last], whether it holds
        the vision tower, and the parameters it alone holds (the token embeddings, final norm
        and lm_head, which every rank keeps, are counted on rank 0)."""
        held = self.model.language_model.layer_range
        parameters = sum(
            v.size
            for name, v in tree_flatten(self.model.parameters())
            if self.rank == 0 or ".layers." in name or not name.startswith("language_model.")
        )
        return {
            "rank": self.rank,
            "layers": [held.start, held.stop - 1],
            "vision_tower": self.model.vision_tower is not None,
            "parameters": parameters,
        }

    # Any thread ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread: rank 0 serves requests, the other ranks follow it."""
        self._started = True
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread (rank 0: and the other ranks' workers); requests still queued or
        running get an error event."""
        with self._wakeup:
            self._closing = True
            self._wakeup.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the thread to end; True once it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def observe(self, callback: Callable[[str, dict], None]) -> Callable[[], None]:
        """Call `callback(moment, details)` from the worker thread at each of its moments:
        "admitted" (a request joined the batch: `number`), "step" (a decoding step ended:
        `rows` in the batch after it, `joined` rows that joined at it), "finished" (a request
        ended: `number`, `reason`). What tests wait on, rather than the clock; a callback that
        blocks holds the worker there. Returns a function that stops the calls."""
        self._observers.append(callback)
        return lambda: self._observers.remove(callback)

    def _notify(self, moment: str, **details) -> None:
        for callback in self._observers:
            callback(moment, details)

    def submit(self, request: GenerationRequest, on_event: Callable[[Event], None]) -> Job:
        """Queue a request; `on_event` is called from the worker thread.

        Raises:
            QueueFull: `max_queue` requests are already waiting.
        """
        job = Job(self, request, on_event, next(self._numbers))
        with self._wakeup:
            if self._closing or self.failure:
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
        """What /health reports: requests generating and waiting, the prompt-cache LRU (this
        rank's share), and the ranks that serve with the layers of each."""
        with self._wakeup:
            return {
                "alive": self._thread.is_alive() or not self._started,
                "failure": self.failure,
                "active": len(self._running),
                "queued": len(self._queue),
                "max_batch": self.max_batch,
                "prompt_cache": {
                    "entries": len(self.prompt_cache),
                    "bytes": self.prompt_cache.nbytes,
                },
                "ranks": [
                    {k: r[k] for k in ("rank", "layers", "vision_tower")} for r in self.ranks
                ],
            }

    # The worker thread --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._serve()
        finally:
            # This thread's MLX streams and compiled functions go now, while Python runs: left
            # to the thread's exit, they may be freed as the interpreter finalizes (the process
            # ends as soon as this thread is joined), and freeing a compiled Python function
            # then aborts the process ("terminate called without an active exception").
            mx.clear_streams()

    def _serve(self) -> None:
        try:
            self._lead() if self.rank == 0 else self._follow()
        except Exception as e:  # noqa: BLE001 - pipeline only: the ranks may be out of step
            self.failure = f"the pipeline of ranks failed: {str(e).strip() or type(e).__name__}"
            if self.rank == 0:  # (the others' command line reports it)
                log.error(self.failure, exc_info=log.isEnabledFor(logging.DEBUG))
            self._fail_all("the pipeline of ranks failed; the server is stopping", 503)
            if self.on_failure is not None:
                self.on_failure()
            return
        self._fail_all("the server is shutting down", 503)

    def _lead(self) -> None:
        """Rank 0 (or one process): take the cancels and waiting requests, encode those that
        join, and do the turn; while idle in a pipeline, share an empty turn every
        `IDLE_TURN_S`."""
        idle_wait = None if self.group is None else IDLE_TURN_S
        while True:
            with self._wakeup:
                while not (self._queue or self._cancels or self.engine or self._closing):
                    if not self._wakeup.wait(idle_wait):
                        break
                closing = self._closing
                cancels, self._cancels = self._cancels, []
                room = 0 if closing else min(self.max_batch - len(self._running), self.max_prefill)
                admitted = self._take(room)
            admissions = [a for a in map(self._encode, admitted) if a is not None]
            if not self._turn(Turn([job.number for job in cancels], admissions, closing)):
                return

    def _take(self, room: int) -> list[Job]:
        """Up to `room` waiting requests, in order. One that shows a picture (or video) another
        request taken now shows too waits a turn: it then starts from that request's prompt,
        in the prompt cache as soon as it is prefilled, rather than encode and prefill the
        picture again."""
        taken, pictures = [], set()
        for job in self._queue:
            if len(taken) == room:
                break
            encoded = job.request.encoded
            digests = set(encoded.digests) | set(encoded.video_digests)
            if digests & pictures:
                continue
            pictures |= digests
            taken.append(job)
        for job in taken:
            self._queue.remove(job)
        return taken

    def _follow(self) -> None:
        """The ranks other than 0: do rank 0's turns until it closes. Between idle turns they
        sleep, rather than wait inside a collective (which spins: a core per idle rank)."""
        while self._turn(None):
            if not self.engine:
                time.sleep(IDLE_TURN_S)

    def _turn(self, turn: Optional[Turn]) -> bool:
        """Share rank 0's `turn` (the other ranks pass None) and do it; False once closed."""
        if self.group is not None:
            shared = distributed.broadcast(turn.to_json() if turn else None, self.group)
            turn = turn or Turn.from_json(shared)
        if turn.close:
            return False
        try:
            for number in turn.cancels:
                self._stop(number)
            if turn.admissions:
                self._start(turn.admissions)
            if self.engine:
                for row in self.engine.step():
                    self._emit(row)
                self._keep_prompts(self.engine.joined)
                self._notify("step", rows=len(self.engine.rows), joined=len(self.engine.joined))
        except Exception:  # noqa: BLE001 - fail the batch, keep serving
            if self.group is not None:
                raise  # a rank's failure may be its own: the ranks could part ways
            log.exception("generation failed")
            self._fail_all("generation failed; see the server log", 500)
        return True

    def _encode(self, job: Job) -> Optional[Admission]:
        """Rank 0: a request as every rank starts it (tokenized and preprocessed already, off
        this thread)."""
        if job.cancelled:
            return None
        job.admitted = time.perf_counter()
        encoded = job.request.encoded
        pixels, videos = encoded.pixel_values, encoded.video_pixels
        self._encoded[job.number] = job
        return Admission(
            job.number,
            encoded.input_ids,
            encoded.digests,
            job.request.sampling,
            None if pixels is None else mx.array(pixels),
            None if pixels is None else list(pixels.shape),
            encoded.image_sizes,
            None if videos is None else mx.array(videos),
            encoded.video_digests,
            None if videos is None else list(videos.shape),
        )

    def _start(self, admissions: list[Admission]) -> None:
        """Every rank: find each prompt's longest cached prefix, encode the pictures they
        still need in one tower call, and add the requests to the batch (rank 0 then tells
        their clients). A failure fails its request alone: a 400 for its own fault, a 500 for
        anything else (split across ranks, an unexpected failure may leave the ranks out of
        step: it stops the pipeline)."""
        joining = []  # (job, row, cache, what is to embed)
        for admission in admissions:
            job = self._encoded.pop(admission.number, None)
            if job is None:  # a rank other than 0: nobody to tell
                job = Job(self, None, _ignore, admission.number)
            try:
                joining.append((job, *self._admit(admission)))
            except Exception as e:  # noqa: BLE001 - the request fails, the others go on
                self._refuse(job, e)
        try:
            embeddings = embed_prompts(self.model, [uncached for *_, uncached in joining])
        except Exception as e:  # noqa: BLE001 - ours: the requests of this step fail
            for job, *_ in joining:
                self._refuse(job, e if isinstance(e, ValueError) else RuntimeError(e))
            return
        for (job, row, cache, uncached), embedded in zip(joining, embeddings):
            self.engine.add(row, embedded, cache)
            job.row = row
            job.stats.prompt_tokens, job.stats.cached_tokens = len(row.keys), uncached.start
            job.stats.queued_s = job.admitted - job.submitted
            with self._wakeup:
                self._running[id(row)] = job
            job.emit(Event("start", stats=job.stats))
            self._notify("admitted", number=job.number)

    def _refuse(self, job: Job, error: Exception) -> None:
        """End a request that could not join: 400 for a ValueError (its own fault), else 500."""
        if not isinstance(error, ValueError):
            if self.group is not None:
                raise error
            log.error("a request failed as it joined the batch", exc_info=error)
        job.finished = True
        if isinstance(error, ValueError):
            job.emit(Event("error", error=str(error), status=400))
        else:
            job.emit(Event("error", error="the request failed; see the server log", status=500))

    def _admit(self, admission: Admission) -> tuple[Row, Optional[list], UncachedPrompt]:
        """The request's row, the KV cache of its longest cached prefix, and what of its
        prompt is still to be embedded."""
        s = admission.sampling
        if s.seed is not None:
            mx.random.seed(s.seed)
        config = self.model.config
        image_token = config.image_token_index
        input_ids = mx.array([admission.input_ids])
        keys = position_keys(
            admission.input_ids,
            admission.digests,
            image_token,
            admission.video_digests,
            config.video_token_index,
        )
        row = make_row(self.model, self.processor, input_ids[0], s, keys)
        cache, start = self._cached_prefix(keys)
        pixel_values, video_pixels = admission.pixel_values, admission.video_pixels
        if self.group is not None:
            pixel_values, video_pixels = self._share_pixels(admission, start)
        uncached = UncachedPrompt(
            input_ids, pixel_values, start, admission.image_sizes, video_pixels
        )
        return row, cache, uncached

    def _keep_prompts(self, rows: list[Row]) -> None:
        """Put the prompts just prefilled into the prompt cache now, not when their answers
        end: a request that arrives meanwhile with the same picture starts from them."""
        for row in rows:
            if row.finish_reason is None and row.keys:
                cache = self.engine.row_cache(row)
                self.prompt_cache.insert_cache(_CACHE_KEY, row.keys, cache)

    def _cached_prefix(self, keys: list) -> tuple[Optional[list], int]:
        """The KV cache of the longest cached prefix of `keys` (or None) and its length, at
        least one position short of the whole prompt (its logits are needed). Split across
        ranks, every rank takes the shortest of the ranks' prefixes."""
        cache, rest = self.prompt_cache.fetch_nearest_cache(_CACHE_KEY, keys)
        if cache is not None and not rest:  # all cached: recompute the last position
            trim_prompt_cache(cache, 1)
            rest = keys[-1:]
        start = len(keys) - len(rest)
        agreed = min(self._gather(start))
        if agreed < start:
            trim_prompt_cache(cache, start - agreed)
        return (cache if agreed > 0 else None), agreed

    def _share_pixels(
        self, admission: Admission, start: int
    ) -> tuple[Optional[mx.array], Optional[mx.array]]:
        """Rank 0's pictures and videos on every rank (the last one runs the vision tower),
        those whose tokens lie after the cached prefix's `start` (None for the others)."""
        config, uncached = self.model.config, admission.input_ids[start:]
        wanted = {}
        if config.image_token_index in uncached:
            wanted["pixel_values"] = (admission.pixel_values, admission.pixel_shape)
        if config.has_video and config.video_token_index in uncached:
            wanted["video_pixels"] = (admission.video_pixels, admission.video_shape)
        arrays = {
            name: mx.zeros(shape, dtype=mx.float32) if pixels is None else pixels
            for name, (pixels, shape) in wanted.items()
        }
        shared = distributed.broadcast_arrays(arrays, self.group) if arrays else {}
        return shared.get("pixel_values"), shared.get("video_pixels")

    def _emit(self, row: Row) -> None:
        job = self._running.get(id(row))
        if job is None:
            return
        if not job.first_token:
            job.first_token = time.perf_counter()
        fresh = row.logprobs[job.logprobs_sent :]
        job.logprobs_sent = len(row.logprobs)
        if row.segment or fresh:
            job.emit(Event("text", text=row.segment, logprobs=fresh))
        if row.finish_reason is not None:
            self._done(job, row.finish_reason)

    def _stop(self, number: int) -> None:
        job = next((j for j in self._running.values() if j.number == number), None)
        if job is not None:
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
        self._notify("finished", number=job.number, reason=reason)

    def _fail_all(self, message: str, status: int) -> None:
        """Give every request an error and start from an empty batch."""
        with self._wakeup:
            jobs = list(self._running.values()) + list(self._encoded.values())
            jobs += list(self._queue)
            self._running.clear()
            self._encoded.clear()
            self._queue.clear()
        self.engine = BatchEngine(self.model, self.engine.prefill_step_size, keep_caches=True)
        for job in jobs:
            job.finished = True
            job.emit(Event("error", error=message, status=status))
