"""The HTTP side: a FastAPI app whose routes parse, validate and hand requests to the worker.

`create_app(model, processor, config)` serves the OpenAI routes (`/v1/chat/completions`,
`/v1/models`), the Ollama routes (see `ollama.py`), `/health` and the chat page at `/`. No MLX
code runs here: requests become plain data (a rendered prompt and decoded pictures) for the
`Worker`, whose events come back through an asyncio queue.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import functools
import hmac
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Optional, Sequence

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..image_processor import DEFAULT_MAX_IMAGE_PIXELS
from ..model import Model
from ..processor import Processor
from ..prompt import EncodedPrompt, encode_on_host
from ..sampling import ResponseFormat, SamplingError, SamplingParams
from ..structured import token_bytes, token_text
from ..video_io import DEFAULT_NUM_FRAMES
from .messages import ImagePolicy, Message, render_conversation
from .ollama import ollama_router
from .schemas import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionTokenLogprob,
    ChatMessage,
    Choice,
    ChoiceDelta,
    ChoiceLogprobs,
    ChunkChoice,
    ErrorDetail,
    ErrorResponse,
    ModelList,
    PromptTokensDetails,
    RequestError,
    ResponseFormatRequest,
    Schema,
    TopLogprob,
    Usage,
    parse_body,
)
from .schemas import Model as ModelCard
from .worker import Event, GenerationRequest, QueueFull, Stats, Worker

log = logging.getLogger("mlx_llava.server")
STATIC = Path(__file__).parent / "static"
PUBLIC_PATHS = ("/", "/health", "/favicon.ico")  # and /static/: the page holds no data


@dataclass
class ServerConfig:
    """The server's settings (the command line's flags)."""

    model_id: str = "default"
    api_key: Optional[str] = None
    cors_origins: Sequence[str] = ()
    allow_remote_images: bool = False
    allow_private_image_hosts: bool = False
    image_dir: Optional[str] = None
    image_timeout: float = 10.0
    max_image_mb: float = 20.0
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_body_mb: float = 50.0
    header_timeout: float = 10.0  # seconds for a request's headers to arrive
    body_timeout: float = 30.0  # seconds for its body, from the end of the headers
    keep_alive_timeout: float = 5.0  # an idle kept-alive connection is closed after this
    max_connections: int = 256  # open connections; more are answered 503
    max_batch: int = 8
    max_queue: int = 32
    max_prefill: int = 1
    prompt_cache_size: int = 16
    prompt_cache_mb: float = 2048.0
    prefill_step_size: int = 2048
    max_prompt_chars: Optional[int] = None  # None: 32 characters per position of the context
    prepare_threads: int = 2  # tokenizing and picture preprocessing, off the model's thread
    num_frames: int = DEFAULT_NUM_FRAMES  # sampled uniformly over each video of a request
    defaults: SamplingParams = field(  # for fields a request leaves out
        default_factory=lambda: SamplingParams(max_tokens=512)
    )


def make_worker(model: Model, processor: Processor, config: ServerConfig) -> Worker:
    """The generation worker for these settings (every rank of a pipeline makes one)."""
    return Worker(
        model,
        processor,
        max_batch=config.max_batch,
        max_queue=config.max_queue,
        max_prefill=config.max_prefill,
        cache_entries=config.prompt_cache_size,
        cache_bytes=int(config.prompt_cache_mb * (1 << 20)),
        prefill_step_size=config.prefill_step_size,
    )


class Generation:
    """A submitted request seen from the event loop: the worker's events, in order."""

    def __init__(self, worker: Worker, request: GenerationRequest):
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        try:
            self.job = worker.submit(request, self._put)
        except QueueFull as e:
            raise RequestError(f"{e}; retry later", code="queue_full", status=503) from e
        self.stats = Stats()
        self.logprobs: list = []  # `collect`: the answer's `TokenLogprob`s, if asked for

    def _put(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    async def start(self, request: Request) -> None:
        """Wait until the worker has taken the request (or refused it: RequestError); a client
        that goes away meanwhile takes its request out of the queue."""
        watcher = asyncio.create_task(self.watch(request))
        try:
            event = await self.events.get()
        finally:
            watcher.cancel()
        if event.kind == "error":
            raise RequestError(event.error, status=event.status)
        self.stats = event.stats

    async def watch(self, request: Request) -> None:
        """Cancel the request when its client disconnects (polled twice a second)."""
        while not await request.is_disconnected():
            await asyncio.sleep(0.5)
        self.job.cancel()

    async def stream(self) -> AsyncIterator[Event]:
        """The "text" events, then the "done" one; the request is cancelled if the caller
        stops early (the client went away)."""
        try:
            while True:
                event = await self.events.get()
                if event.kind == "error":
                    raise RequestError(event.error, status=event.status)
                yield event
                if event.kind == "done":
                    self.stats = event.stats
                    return
        finally:
            self.job.cancel()

    async def collect(self, request: Request) -> tuple[str, Event]:
        """The whole answer and the "done" event; cancelled if the client disconnects."""
        watcher = asyncio.create_task(self.watch(request))
        text = ""
        try:
            async for event in self.stream():
                text += event.text
                self.logprobs.extend(event.logprobs)
                if event.kind == "done":
                    return text, event
        finally:
            watcher.cancel()
        raise RequestError("the generation ended without an answer", status=500)


class Service:
    """What the routes share: the worker, the settings and the picture policy."""

    def __init__(self, model: Model, processor: Processor, config: ServerConfig):
        # Its own image processor: what preprocessing may allocate for a picture (after
        # padding and resizing) is bounded like what is sent, for this server only.
        image_processor = dataclasses.replace(
            processor.image_processor, max_pixels=config.max_image_pixels
        )
        self.processor = copy.copy(processor)
        self.processor.image_processor = image_processor
        self.config = config
        self.model_id = config.model_id
        self.created = int(time.time())
        self.policy = ImagePolicy(
            allow_remote=config.allow_remote_images,
            allow_private_hosts=config.allow_private_image_hosts,
            image_dir=Path(config.image_dir) if config.image_dir else None,
            timeout=config.image_timeout,
            max_bytes=int(config.max_image_mb * (1 << 20)),
            max_pixels=config.max_image_pixels,
        )
        self.worker = make_worker(model, processor, config)
        self.model = model
        self.max_body = int(config.max_body_mb * (1 << 20))
        # What a request's messages may hold (for clients such as the page).
        self.inputs = ["text", "image"] + (["video"] if model.config.has_video else [])
        self.context_length = model.config.text_config.max_position_embeddings
        self.max_prompt_chars = config.max_prompt_chars or 32 * self.context_length
        self.pool = ThreadPoolExecutor(config.prepare_threads, "mlx-llava-prepare")

    def load_video(self, source: str, param: str):
        """A video part's frames (`ImagePolicy.load_video`), for a model that sees videos."""
        if not self.model.config.has_video:
            raise RequestError(
                f"{self.model.config.model_type} does not see videos: send pictures",
                param,
                "invalid_video",
            )
        return self.policy.load_video(source, param, self.config.num_frames)

    def check_model(self, name: Optional[str], param: str = "model") -> None:
        """Requests name the served model (or leave it out)."""
        if name is None or name in (self.model_id, f"{self.model_id}:latest"):
            return
        raise RequestError(
            f"the model '{name}' does not exist: this server serves '{self.model_id}'",
            param,
            "model_not_found",
            404,
        )

    async def parse(self, schema: type[Schema], request: Request) -> Schema:
        """The request's body as `schema` (parsed in a thread: a body may be megabytes)."""
        return await run_in_threadpool(parse_body, schema, await request.body())

    def check_length(self, texts: Sequence[str], param: str = "messages") -> None:
        """Refuse text longer than the prompt may be, before any work is done on it."""
        length = sum(len(t) for t in texts)
        if length > self.max_prompt_chars:
            raise RequestError(
                f"the prompt is {length:,} characters, more than the limit of "
                f"{self.max_prompt_chars:,} (the model's context is "
                f"{self.context_length:,} tokens)",
                param,
                "context_length_exceeded",
            )

    async def prompt(self, messages: list[Message], param: str = "messages") -> tuple[str, list]:
        self.check_length([m.text for m in messages], param)
        return await run_in_threadpool(render_conversation, self.processor, messages, param)

    async def generate(
        self,
        request: Request,
        prompt: str,
        pictures: list,
        sampling: SamplingParams,
        videos: Sequence = (),
    ) -> Generation:
        """Tokenize and preprocess (in the preparation pool), submit, and wait until the
        worker has taken the request (RequestError otherwise)."""
        encoded = await self.encode(prompt, pictures, videos)
        generation = Generation(self.worker, GenerationRequest(encoded, sampling))
        await generation.start(request)
        return generation

    async def encode(self, prompt: str, pictures: list, videos: Sequence = ()) -> EncodedPrompt:
        """The prompt's token ids and pixels, computed by the small preparation pool so that a
        big request delays nobody's decoding. A request at fault gets a 400; anything else
        that fails here (ours) a 500 for this request alone."""
        loop = asyncio.get_running_loop()
        work = functools.partial(
            encode_on_host,
            self.model,
            self.processor,
            prompt,
            pictures,
            self.max_prompt_chars,
            videos,
        )
        try:
            return await loop.run_in_executor(self.pool, work)
        except ValueError as e:
            raise RequestError(str(e), code="invalid_prompt") from None
        except Exception as e:  # noqa: BLE001 - the request fails, the server goes on
            log.exception("preparing a request failed")
            raise RequestError(
                "the request could not be prepared; see the server log", status=500
            ) from e

    def logprob_entries(self, entries: list) -> list[ChatCompletionTokenLogprob]:
        """`TokenLogprob`s as OpenAI's objects: each token as text and bytes, with its top
        alternatives (Ollama's have the same fields)."""

        def piece(token: int, logprob: float) -> dict:
            data = token_bytes(self.processor.tokenizer, token)
            return {"token": token_text(data), "logprob": logprob, "bytes": list(data)}

        return [
            ChatCompletionTokenLogprob(
                **piece(e.token, e.logprob), top_logprobs=[TopLogprob(**piece(*t)) for t in e.top]
            )
            for e in entries
        ]

    async def sampling(self, names: dict[str, str], **fields) -> SamplingParams:
        """The request's sampling fields over the server's defaults (those left out: None);
        `names` maps a `SamplingParams` field to the request's name for it. Made in a thread:
        a response format's schema is compiled then."""

        def make() -> SamplingParams:
            try:
                return self.config.defaults.replace(**fields)
            except SamplingError as e:
                param = names.get(e.field, e.field)
                raise RequestError(f"{param} {e.reason}", param, "invalid_value") from None

        return await run_in_threadpool(make)


# OpenAI ----------------------------------------------------------------------------------------


async def openai_messages(service: Service, messages: list[ChatMessage]) -> list[Message]:
    """OpenAI messages -> ours, pictures fetched and decoded (in a thread: may block)."""

    def convert() -> list[Message]:
        out = []
        for i, m in enumerate(messages):
            role = "system" if m.role == "developer" else m.role
            if m.content is None or isinstance(m.content, str):
                out.append(Message(role, m.content or ""))
                continue
            texts, pictures, videos = [], [], []
            for j, part in enumerate(m.content):
                param = f"messages[{i}].content[{j}]"
                if part.type == "text":
                    texts.append(part.text)
                elif part.type == "video_url":
                    videos.append(service.load_video(part.url, param))
                else:
                    pictures.append(service.policy.load(part.url, param))
            out.append(Message(role, "\n".join(texts), pictures, videos))
        return out

    return await run_in_threadpool(convert)


def usage_of(stats: Stats) -> Usage:
    return Usage(
        prompt_tokens=stats.prompt_tokens,
        completion_tokens=stats.completion_tokens,
        total_tokens=stats.prompt_tokens + stats.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=stats.cached_tokens),
    )


def finish_reason(reason: Optional[str]) -> Optional[str]:
    return "stop" if reason == "cancelled" else reason


def response_format(spec: Optional[ResponseFormatRequest]) -> Optional[ResponseFormat]:
    """OpenAI's `response_format` (type text: None); an unknown type is refused, never
    ignored."""
    if spec is None or spec.type == "text":
        return None
    if spec.type == "json_object":
        return ResponseFormat.json_object()
    if spec.type == "json_schema":
        if spec.json_schema is None or spec.json_schema.schema_ is None:
            param = "response_format.json_schema.schema"
            raise RequestError(f"{param} is required for type json_schema", param, "invalid_value")
        return ResponseFormat.json_schema(spec.json_schema.schema_)
    raise RequestError(
        f"response_format.type must be text, json_object or json_schema, got {spec.type!r}",
        "response_format.type",
        "invalid_value",
    )


def top_logprobs(logprobs: Optional[bool], top: Optional[int]) -> Optional[int]:
    """OpenAI's `logprobs` and `top_logprobs` as `SamplingParams.logprobs` (None: off)."""
    if top is not None and not logprobs:
        raise RequestError("top_logprobs needs logprobs: true", "top_logprobs", "invalid_value")
    return (top or 0) if logprobs else None


LOGPROB_NAMES = {"logprobs": "top_logprobs", "response_format": "response_format"}


def chat_routes(app: FastAPI, service: Service) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await service.parse(ChatCompletionRequest, request)
        service.check_model(body.model)
        service.check_length([text for m in body.messages for text in m.texts()])
        max_tokens = body.max_completion_tokens
        sampling = await service.sampling(
            {
                "max_tokens": "max_completion_tokens" if max_tokens is not None else "max_tokens",
                **LOGPROB_NAMES,
            },
            max_tokens=max_tokens if max_tokens is not None else body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            min_p=body.min_p,
            repetition_penalty=body.repetition_penalty,
            seed=body.seed,
            stop=body.stop,
            response_format=response_format(body.response_format),
            logprobs=top_logprobs(body.logprobs, body.top_logprobs),
        )
        messages = await openai_messages(service, body.messages)
        prompt, pictures = await service.prompt(messages)
        videos = [v for m in messages if m.role == "user" for v in m.videos]
        generation = await service.generate(request, prompt, pictures, sampling, videos)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = sse_chunks(
                generation, ident, created, service.model_id, include_usage, service
            )
            return StreamingResponse(
                chunks,
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        text, done = await generation.collect(request)
        return ChatCompletion(
            id=ident,
            created=created,
            model=service.model_id,
            choices=[
                Choice(
                    message=ChatCompletionMessage(content=text),
                    finish_reason=finish_reason(done.finish_reason),
                    logprobs=(
                        ChoiceLogprobs(content=service.logprob_entries(generation.logprobs))
                        if sampling.logprobs is not None
                        else None
                    ),
                )
            ],
            usage=usage_of(done.stats),
        )

    @app.get("/v1/models")
    async def models():
        return ModelList(data=[ModelCard(id=service.model_id, created=service.created)])


async def sse_chunks(
    generation: Generation,
    ident: str,
    created: int,
    model: str,
    include_usage: bool,
    service: Optional[Service] = None,
) -> AsyncIterator[str]:
    """Server-Sent Events of `chat.completion.chunk` objects, then `data: [DONE]` (with
    log-probabilities, each text chunk carries its tokens')."""

    def chunk(delta: Optional[ChoiceDelta] = None, reason=None, usage=None, logprobs=None) -> str:
        choices = []
        if delta is not None:
            choices.append(ChunkChoice(delta=delta, finish_reason=reason, logprobs=logprobs))
        body = ChatCompletionChunk(
            id=ident, created=created, model=model, choices=choices, usage=usage
        ).model_dump()
        for choice in body["choices"]:  # as OpenAI: a delta holds only what it sets
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        return f"data: {json.dumps(body)}\n\n"

    yield chunk(ChoiceDelta(role="assistant", content=""))
    try:
        async for event in generation.stream():
            if event.kind == "text":
                logprobs = None
                if event.logprobs and service is not None:
                    logprobs = ChoiceLogprobs(content=service.logprob_entries(event.logprobs))
                yield chunk(ChoiceDelta(content=event.text), logprobs=logprobs)
                continue
            yield chunk(ChoiceDelta(), finish_reason(event.finish_reason))
            if include_usage:
                yield chunk(usage=usage_of(event.stats))
    except RequestError as e:  # the worker failed after the stream began
        yield f"data: {error_body(e).model_dump_json()}\n\n"
    finally:
        generation.job.cancel()  # a no-op unless the client went away mid-answer
    yield "data: [DONE]\n\n"


# Errors, authentication, body size -------------------------------------------------------------


def error_body(e: RequestError) -> ErrorResponse:
    kind = "invalid_request_error" if e.status < 500 else "server_error"
    if e.status == 401:
        kind = "authentication_error"
    return ErrorResponse(
        error=ErrorDetail(message=e.message, type=kind, param=e.param, code=e.code)
    )


def error_response(path: str, e: RequestError) -> JSONResponse:
    """OpenAI's error object, or Ollama's `{"error": "..."}` on its routes."""
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    if e.status == 503:
        headers = {"Retry-After": "1"}
    if path.startswith("/api/"):
        return JSONResponse({"error": e.message}, e.status, headers=headers)
    return JSONResponse(error_body(e).model_dump(), e.status, headers=headers)


class BodyTooLarge(RequestError):
    pass


class Guard:
    """ASGI middleware run before any route: the API key, the body-size limit and the body's
    deadline (`body_timeout` seconds from the end of the headers: 408, and the connection is
    closed). Once the body is in, `receive` is not bounded: it waits for a streaming answer's
    client to go away."""

    def __init__(self, app, api_key: Optional[str], max_body: int, body_timeout: float = 30.0):
        self.app = app
        self.api_key = api_key
        self.max_body = max_body
        self.body_timeout = body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = dict(scope["headers"])
        public = path in PUBLIC_PATHS or path.startswith("/static/")
        if self.api_key and not public and scope["method"] != "OPTIONS":
            # RFC 7235: the scheme is case-insensitive ("bearer KEY" is as good).
            scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
            valid = scheme.lower() == b"bearer" and hmac.compare_digest(
                given.strip(), self.api_key.encode()
            )
            if not valid:
                error = RequestError(
                    "a valid API key is needed: send the header 'Authorization: Bearer KEY'",
                    code="invalid_api_key",
                    status=401,
                )
                return await error_response(path, error)(scope, receive, send)
        too_large = BodyTooLarge(
            f"the request body is over the limit of {self.max_body} bytes (--max-body-mb)",
            code="body_too_large",
            status=413,
        )
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await error_response(path, too_large)(scope, receive, send)
        late = RequestError(
            f"the request body did not arrive within {self.body_timeout:g} s (--body-timeout)",
            code="body_timeout",
            status=408,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        received, complete, timed_out = 0, False, False

        async def counted():
            nonlocal received, complete, timed_out
            if complete:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                timed_out = True
                raise late from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise too_large
            return message

        async def closing(message):
            if timed_out and message["type"] == "http.response.start":
                close = (b"connection", b"close")
                message = {**message, "headers": [*message.get("headers", []), close]}
            await send(message)

        return await self.app(scope, counted, closing)


def create_app(model: Model, processor: Processor, config: ServerConfig) -> FastAPI:
    """The server for one model. The worker thread starts and stops with the app."""
    service = Service(model, processor, config)

    async def lifespan(_app):
        service.worker.start()
        yield
        await run_in_threadpool(service.worker.close)
        service.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="mlx-llava", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service

    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError):
        return error_response(request.url.path, e)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        message = {404: "no such route", 405: "method not allowed"}.get(e.status_code, e.detail)
        return error_response(request.url.path, RequestError(str(message), status=e.status_code))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("unexpected error")
        error = RequestError("internal server error; see the server log", status=500)
        return error_response(request.url.path, error)

    @app.get("/health")
    async def health():
        """200 and "ok" while the worker serves; 503 and "error" (with why) once it stopped.
        With the model's name, what its messages may hold (`inputs`: "text", "image", and
        "video" for a model that sees videos) and the request body's limit (--max-body-mb)."""
        state = service.worker.state()
        model = {
            "model": service.model_id,
            "inputs": service.inputs,
            "max_body_bytes": service.max_body,
        }
        if state["failure"] is None and state["alive"]:
            return {"status": "ok", **model, **state}
        return JSONResponse({"status": "error", **model, **state}, 503)

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html")

    chat_routes(app, service)
    app.include_router(ollama_router(service))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    if config.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(
        Guard,
        api_key=config.api_key,
        max_body=service.max_body,
        body_timeout=config.body_timeout,
    )
    return app
