"""The Ollama API on the same worker: `/api/chat`, `/api/generate`, `/api/tags`, `/api/version`.

Ollama clients send base64 `images` beside the text, `options` for sampling, `format` ("json" or
a JSON schema) for structured output, `logprobs` / `top_logprobs` for log-probabilities, and read
NDJSON (streaming is the default) whose last object has `done: true` and the timings in
nanoseconds; with log-probabilities each object carries its tokens' (`logprobs`: token, logprob,
bytes, top_logprobs). Errors are `{"error": "..."}`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from datetime import datetime, timezone
from typing import AsyncIterator, Callable

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..sampling import ResponseFormat, SamplingParams
from .messages import Message
from .schemas import (
    OllamaChatRequest,
    OllamaGenerateRequest,
    OllamaModel,
    OllamaModelDetails,
    OllamaOptions,
    OllamaTags,
    OllamaTimings,
    RequestError,
)
from .worker import Event

OLLAMA_VERSION = "0.5.0"  # the API generation the routes follow


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


OPTION_NAMES = {
    "max_tokens": "options.num_predict",
    "repetition_penalty": "options.repeat_penalty",
    "repetition_context_size": "options.repeat_last_n",
    "response_format": "format",
    "logprobs": "top_logprobs",
}


def _format(spec) -> ResponseFormat | None:
    """Ollama's `format`: "json", a JSON schema, or nothing."""
    if spec is None or spec == "":
        return None
    if spec == "json":
        return ResponseFormat.json_object()
    if isinstance(spec, dict):
        return ResponseFormat.json_schema(spec)
    raise RequestError(f'format must be "json" or a JSON schema, got {spec!r}', "format")


def _logprobs(body) -> int | None:
    if body.top_logprobs is not None and not body.logprobs:
        raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
    return (body.top_logprobs or 0) if body.logprobs else None


async def _sampling(service, body) -> SamplingParams:
    """The request's options, format and logprobs -> `SamplingParams` (num_predict < 0: as
    long as the context allows; repeat_last_n 0: no repetition penalty, -1: the whole
    context)."""
    o = body.options or OllamaOptions()
    if o.num_predict == 0:
        raise RequestError("options.num_predict must not be 0", "options.num_predict")
    last_n = o.repeat_last_n
    if last_n is not None and last_n < -1:
        raise RequestError(
            f"options.repeat_last_n must be >= -1, got {last_n}", "options.repeat_last_n"
        )
    if last_n == 0:
        last_n = None
    elif last_n == -1:
        last_n = service.context_length
    names = {f: OPTION_NAMES.get(f, f"options.{f}") for f in SamplingParams.__dataclass_fields__}
    sampling = await service.sampling(
        names,
        max_tokens=o.num_predict if o.num_predict is not None and o.num_predict > 0 else None,
        temperature=o.temperature,
        top_p=o.top_p,
        top_k=o.top_k,
        min_p=o.min_p,
        repetition_penalty=o.repeat_penalty,
        repetition_context_size=last_n,
        seed=o.seed,
        stop=o.stop,
        response_format=_format(body.format),
        logprobs=_logprobs(body),
    )
    if o.num_predict is not None and o.num_predict < 0:
        sampling = sampling.replace(max_tokens=service.context_length)
    if o.repeat_last_n == 0:
        sampling = dataclasses.replace(sampling, repetition_penalty=None)
    return sampling


def _timings(event: Event) -> dict:
    s = event.stats
    ns = 1_000_000_000
    return OllamaTimings(
        done_reason="stop" if event.finish_reason == "cancelled" else event.finish_reason,
        total_duration=int(s.total_s * ns),
        load_duration=0,
        prompt_eval_count=s.prompt_tokens - s.cached_tokens,
        prompt_eval_duration=int(s.prompt_s * ns),
        eval_count=s.completion_tokens,
        eval_duration=int(s.decode_s * ns),
    ).model_dump()


async def _answer(
    request: Request, generation, stream: bool, piece: Callable[[str], dict], service, sampling
):
    """NDJSON lines of `piece(text)` objects and the closing one, or one object (with
    log-probabilities when asked for)."""
    model = service.model_id

    def logprobs(entries: list) -> dict:
        if sampling.logprobs is None:
            return {}
        return {"logprobs": [e.model_dump() for e in service.logprob_entries(entries)]}

    if not stream:
        text, done = await generation.collect(request)
        body = {
            "model": model,
            "created_at": _now(),
            **piece(text),
            **logprobs(generation.logprobs),
        }
        return {**body, "done": True, **_timings(done)}

    async def lines() -> AsyncIterator[str]:
        try:
            async for event in generation.stream():
                body = {"model": model, "created_at": _now(), **piece(event.text)}
                body.update(logprobs(event.logprobs))
                if event.kind == "done":
                    body.update(done=True, **_timings(event))
                else:
                    body["done"] = False
                yield json.dumps(body) + "\n"
        except RequestError as e:
            yield json.dumps({"error": e.message}) + "\n"
        finally:
            generation.job.cancel()

    return StreamingResponse(lines(), media_type="application/x-ndjson")


def ollama_router(service) -> APIRouter:
    """The routes, on a `Service` (see app.py) that holds the worker and the settings."""
    router = APIRouter()

    async def pictures(images, param: str) -> list:
        def decode():
            return [service.policy.load_base64(b, f"{param}[{i}]") for i, b in enumerate(images)]

        return await run_in_threadpool(decode) if images else []

    @router.post("/api/chat")
    async def chat(request: Request):
        body = await service.parse(OllamaChatRequest, request)
        service.check_model(body.model)
        if not body.messages:  # Ollama answers an empty chat by loading the model
            return {
                "model": service.model_id,
                "created_at": _now(),
                "done": True,
                "done_reason": "load",
                "message": {"role": "assistant", "content": ""},
            }
        service.check_length([m.content for m in body.messages])
        sampling = await _sampling(service, body)
        messages = [
            Message(m.role, m.content, await pictures(m.images, f"messages[{i}].images"))
            for i, m in enumerate(body.messages)
        ]
        prompt, images = await service.prompt(messages)
        generation = await service.generate(request, prompt, images, sampling)

        def piece(text: str) -> dict:
            return {"message": {"role": "assistant", "content": text}}

        return await _answer(request, generation, body.stream, piece, service, sampling)

    @router.post("/api/generate")
    async def generate(request: Request):
        body = await service.parse(OllamaGenerateRequest, request)
        service.check_model(body.model)
        if not body.prompt and not body.images:
            return {
                "model": service.model_id,
                "created_at": _now(),
                "response": "",
                "done": True,
                "done_reason": "load",
            }
        service.check_length([body.prompt, body.system or ""], "prompt")
        sampling = await _sampling(service, body)
        messages = [Message("system", body.system)] if body.system else []
        messages.append(Message("user", body.prompt, await pictures(body.images, "images")))
        prompt, images = await service.prompt(messages, "prompt")
        generation = await service.generate(request, prompt, images, sampling)
        return await _answer(
            request, generation, body.stream, lambda text: {"response": text}, service, sampling
        )

    @router.get("/api/tags")
    async def tags():
        bits = service.worker.quantization_bits
        model = OllamaModel(
            name=service.model_id,
            model=service.model_id,
            modified_at=datetime.fromtimestamp(service.created, timezone.utc).isoformat(),
            size=int(service.worker.parameters * (bits / 8 if bits else 2)),
            digest=hashlib.sha256(service.model_id.encode()).hexdigest(),
            details=OllamaModelDetails(
                parameter_size=f"{service.worker.parameters / 1e9:.2f}B",
                quantization_level=f"Q{bits}" if bits else "F16",
            ),
        )
        return OllamaTags(models=[model])

    @router.get("/api/version")
    async def version():
        return {"version": OLLAMA_VERSION}

    return router
