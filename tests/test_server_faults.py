"""Fault injection and a soak against a live server (uvicorn on 127.0.0.1, in this process).

Each case sends what once broke the server (a lone UTF-16 surrogate, a seed MLX cannot take, a
picture of 1 x 100,000 pixels, megabytes of prompt, JSON nested 10,000 deep, numbers JSON
cannot hold, options out of range, a lower-case `bearer`, a URL of this machine), or injects an
unexpected exception (MemoryError, TypeError, RuntimeError) into one request's preparation, and
checks the answer (a 4xx or a 500 with a JSON body, for that request alone) and then that the
server still serves: a normal request answers as before, the worker thread is alive, /health
says ok. The soak mixes a few hundred good, bad and dropped requests from 8 clients.

Answers that must not be disturbed are held in the batch while a case runs (`HeldSteps`: a
decoding step waits until a request is submitted or the hold is released), so that "they were
generating meanwhile" is an ordering, not a timing. Every loop is bounded in count and time.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import json
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Optional

import httpx
import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

import mlx_llava.server.worker as worker_module
from llava_testing.pictures import make_picture
from llava_testing.serving import data_url, serving, user, wait_until
from mlx_llava import image_processor, load

DATA = Path(__file__).parent / "fixtures" / "data"
OPENAI, CHAT, GENERATE = "/v1/chat/completions", "/api/chat", "/api/generate"
NORMAL = {"messages": [user("Hello there, how are you?")], "max_tokens": 6}
MARKER = "xyzzyfault"  # a prompt holding it fails where a case injects a fault
HOLD_S = 10.0  # the longest a held step or tokenization waits (a broken server: then it goes on)
LONG_TEXT = "word " * 1_000_000  # 5 MB: far over the prompt limit, far under the body limit
SURROGATE = "\ud800"
SOAK_CLIENTS, SOAK_REQUESTS, SOAK_DEADLINE_S = 8, 240, 120.0


# Fixtures and helpers -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return load(DATA / "hf-hub", dtype="float32")


class Servers:
    """The module's server (`max_batch=8`, `max_queue=64`), started anew when a case has
    killed its worker, so that one broken case does not fail the others."""

    def __init__(self, tiny):
        self.tiny = tiny
        self.context: Optional[contextlib.AbstractContextManager] = None
        self.server = None
        self.restarts = 0

    def get(self):
        if self.server is not None and not self.server.worker._thread.is_alive():
            self.close()
            self.restarts += 1
        if self.server is None:
            self.context = serving(self.tiny, model_id="tiny", max_batch=8, max_queue=64)
            self.server = self.context.__enter__()
        return self.server

    def close(self) -> None:
        if self.context is not None:
            self.context.__exit__(None, None, None)
        self.context = self.server = None


@pytest.fixture(scope="module")
def servers(tiny):
    holder = Servers(tiny)
    yield holder
    holder.close()


@pytest.fixture
def server(servers):
    return servers.get()


@pytest.fixture(scope="module")
def normal_answer(servers) -> str:
    """The answer to `NORMAL` of a server that nothing has disturbed yet (greedy)."""
    response = send(servers.get(), OPENAI, NORMAL)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def send(server, path: str, body, headers: Optional[dict] = None, timeout: float = 30.0):
    """POST `body` (a dict, sent as ASCII JSON: a lone surrogate travels as `\\ud800`; or the
    raw bytes)."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **(headers or {})}
    return httpx.post(server.url + path, content=content, headers=headers, timeout=timeout)


def raw(base: dict, **fields: str) -> bytes:
    """`base` as JSON with `fields` appended as raw JSON text (numbers JSON cannot hold)."""
    extra = "".join(f', "{name}": {text}' for name, text in fields.items())
    return (json.dumps(base)[:-1] + extra + "}").encode()


def error_text(response: httpx.Response, path: str, status: int) -> str:
    """Check that `response` is the API's JSON error with `status`; its param and message."""
    assert response.status_code == status, response.text[:500]
    assert "Traceback" not in response.text
    body = response.json()
    if path.startswith("/api/"):
        assert list(body) == ["error"] and isinstance(body["error"], str) and body["error"]
        return body["error"]
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    kinds = {401: "authentication_error"}
    kind = kinds.get(status, "invalid_request_error" if status < 500 else "server_error")
    assert error["message"] and error["type"] == kind, error
    return f"{error['param']} {error['message']}"


def assert_serving(server, normal_answer: str) -> None:
    """The server kept serving: a normal request answers as before, the worker lives."""
    response = send(server, OPENAI, NORMAL)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == normal_answer
    health = httpx.get(server.url + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert server.worker._thread.is_alive() and server.worker.failure is None


def picture(size: tuple[int, int], seed: int = 0) -> Image.Image:
    return make_picture(seed, size)


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def sse_text(lines: Iterator[str], limit: int = 2000) -> str:
    """The content of an OpenAI stream up to `data: [DONE]`; fails on an error object."""
    text, finished = "", False
    for _, line in zip(range(limit), lines):
        if not line:
            continue
        assert line.startswith("data: "), line
        if line == "data: [DONE]":
            assert finished, "the stream ended without a finish_reason"
            return text
        chunk = json.loads(line[len("data: ") :])
        assert "error" not in chunk, chunk
        for choice in chunk["choices"]:
            text += choice["delta"].get("content") or ""
            finished = finished or choice["finish_reason"] is not None
    raise AssertionError("the stream did not end")


def ndjson_text(lines: Iterator[str], key: str, limit: int = 2000) -> str:
    """The text of an Ollama NDJSON stream up to its `done` object; fails on an error."""
    text = ""
    for _, line in zip(range(limit), lines):
        if not line:
            continue
        item = json.loads(line)
        assert "error" not in item, item
        text += item["message"]["content"] if key == "message" else item["response"]
        if item["done"]:
            return text
    raise AssertionError("the stream did not end")


class HeldSteps:
    """Hold `worker` after each decoding step (`Worker.observe`) until a request is submitted
    (then it goes on: the worker still takes requests, one step per submission) or the hold is
    released, so that the answers in the batch cannot finish while a case runs. A step is held
    `HOLD_S` at most (`timeouts` counts those), so a broken case cannot hang the server."""

    def __init__(self, worker, monkeypatch):
        self.released = threading.Event()
        self.wake = threading.Event()
        self.timeouts = 0
        submit = worker.submit

        def submitted(*args, **kwargs):
            job = submit(*args, **kwargs)
            self.wake.set()
            return job

        monkeypatch.setattr(worker, "submit", submitted)
        worker.observe(self._observe)  # (observers stay: released, this one does nothing)

    def _observe(self, moment: str, details: dict) -> None:
        if moment == "step" and not self.released.is_set():
            if not self.wake.wait(HOLD_S):
                self.timeouts += 1
            self.wake.clear()

    def release(self) -> None:
        self.released.set()
        self.wake.set()


CONCURRENT = [  # greedy answers that run to max_tokens (the tiny model never says EOS here)
    {"messages": [user("Describe a cat.")], "max_tokens": 12},
    {"messages": [user("What is this?", data_url(picture((40, 30), 1)))], "max_tokens": 12},
    {"messages": [user("Count to ten.")], "max_tokens": 12},
]


@contextlib.contextmanager
def generating(server, monkeypatch, bodies: list[dict]):
    """Start `bodies` as streams held in the batch (`HeldSteps`); yields the hold and a
    function that releases it and returns their texts."""
    held = HeldSteps(server.worker, monkeypatch)
    with contextlib.ExitStack() as stack:
        lines = []
        for body in bodies:
            response = stack.enter_context(
                httpx.stream("POST", server.url + OPENAI, json={**body, "stream": True}, timeout=60)
            )
            assert response.status_code == 200  # headers come once the worker has taken it
            lines.append(response.iter_lines())

        def finish() -> list[str]:
            held.release()
            return [sse_text(line) for line in lines]

        yield held, finish
        held.release()


def answers(server, bodies: list[dict]) -> list[str]:
    """The answers to `bodies`, one at a time."""
    out = []
    for body in bodies:
        response = send(server, OPENAI, body)
        assert response.status_code == 200, response.text
        out.append(response.json()["choices"][0]["message"]["content"])
    return out


# Lone surrogates --------------------------------------------------------------------------------

S = SURROGATE
SURROGATES = [
    ("openai text", OPENAI, {"messages": [{"role": "user", "content": f"hi {S} there"}]}),
    ("openai text part", OPENAI, {"messages": [user(f"hi {S}")]}),
    ("openai low half", OPENAI, {"messages": [user("hi \udfff")]}),
    (
        "openai system",
        OPENAI,
        {"messages": [{"role": "system", "content": S}, user("Hi")]},
    ),
    ("openai stop", OPENAI, {"messages": [user("Hi")], "stop": [f"a{S}"]}),
    ("openai stop string", OPENAI, {"messages": [user("Hi")], "stop": S}),
    ("openai model", OPENAI, {"model": f"tiny{S}", "messages": [user("Hi")]}),
    ("ollama chat", CHAT, {"messages": [{"role": "user", "content": f"hi {S}"}]}),
    (
        "ollama chat stop",
        CHAT,
        {"messages": [{"role": "user", "content": "hi"}], "options": {"stop": [S]}},
    ),
    ("ollama chat model", CHAT, {"model": S, "messages": [{"role": "user", "content": "hi"}]}),
    ("ollama generate", GENERATE, {"prompt": f"hi {S}"}),
    ("ollama generate system", GENERATE, {"prompt": "hi", "system": S}),
    ("ollama generate model", GENERATE, {"model": f"{S}x", "prompt": "hi"}),
]


@pytest.mark.parametrize("name, path, body", SURROGATES, ids=[c[0] for c in SURROGATES])
def test_lone_surrogates_get_a_400(server, normal_answer, name, path, body):
    """JSON may hold `"\\ud800"`; it is no Unicode text: a 400, streamed or not."""
    for stream in (False, True):
        response = send(server, path, {**body, "max_tokens": 4, "stream": stream})
        error_text(response, path, 400)
    assert_serving(server, normal_answer)


# Seeds ------------------------------------------------------------------------------------------

GOOD_SEEDS = [-1, 0, 2**64 - 1]
BAD_SEEDS = [-2, -(2**70), 2**64, 2**70]


@pytest.mark.parametrize("seed", GOOD_SEEDS)
def test_seeds_in_range_are_accepted(server, normal_answer, seed):
    """-1 means random (llama.cpp's and Ollama's clients send it); [0, 2**64) seeds MLX."""
    sampled = {"temperature": 0.8, "seed": seed}
    response = send(
        server, OPENAI, {"messages": [user("Tell me a story.")], "max_tokens": 4, **sampled}
    )
    assert response.status_code == 200, response.text
    with httpx.stream(
        "POST",
        server.url + OPENAI,
        json={"messages": [user("Tell me a story.")], "max_tokens": 4, "stream": True, **sampled},
        timeout=60,
    ) as r:
        assert r.status_code == 200
        sse_text(r.iter_lines())
    for path, body in [
        (CHAT, {"messages": [{"role": "user", "content": "hi"}]}),
        (GENERATE, {"prompt": "hi"}),
    ]:
        options = {"temperature": 0.8, "seed": seed, "num_predict": 4}
        response = send(server, path, {**body, "stream": False, "options": options})
        assert response.status_code == 200, response.text
        assert response.json()["done"] is True
    assert_serving(server, normal_answer)


@pytest.mark.parametrize("seed", BAD_SEEDS)
def test_seeds_out_of_range_get_a_400_naming_seed(server, normal_answer, seed):
    body = {"messages": [user("Tell me a story.")], "max_tokens": 4, "seed": seed}
    assert "seed" in error_text(send(server, OPENAI, body), OPENAI, 400)
    for path, body in [
        (CHAT, {"messages": [{"role": "user", "content": "hi"}]}),
        (GENERATE, {"prompt": "hi"}),
    ]:
        response = send(server, path, {**body, "stream": False, "options": {"seed": seed}})
        assert "seed" in error_text(response, path, 400)
    assert_serving(server, normal_answer)


def test_a_bad_seed_fails_none_of_the_answers_being_generated(server, monkeypatch):
    """Bad seeds sent while three answers are generating (held in the batch), and a `seed: -1`
    answer among them: all complete, as they do without the bad requests."""
    expected = answers(server, CONCURRENT)
    bodies = CONCURRENT + [{**CONCURRENT[0], "seed": -1}]
    with generating(server, monkeypatch, bodies) as (held, finish):
        for seed in BAD_SEEDS:
            body = {"messages": [user("Tell me a story.")], "max_tokens": 4, "seed": seed}
            assert "seed" in error_text(send(server, OPENAI, body), OPENAI, 400)
            options = {"seed": seed, "temperature": 0.5}
            body = {"prompt": "hi", "stream": False, "options": options}
            assert "seed" in error_text(send(server, GENERATE, body), GENERATE, 400)
        assert server.worker.state()["active"] == len(bodies)  # still generating, all of them
        texts = finish()
    assert texts == expected + expected[:1]
    assert held.timeouts == 0  # no step waited out its hold: the worker never had to wait


# Unexpected exceptions while a request is prepared ---------------------------------------------

FAULT_SIZE = (37, 23)  # a picture of this size fails where "pictures" is injected


def inject(where: str, error: type, server, monkeypatch) -> None:
    """Make the preparation of a request holding `MARKER` (or a picture of `FAULT_SIZE`) raise
    `error`: in the tokenizer, the picture preprocessing (of the server's own processor), or
    the worker's prompt embedding."""
    service = server.app.state.service
    model, processor = service.model, service.processor
    if where == "tokenizer":
        tokenize = processor.tokenize

        def faulty_tokenize(text, *args, **kwargs):
            if MARKER in text:
                raise error("injected fault")
            return tokenize(text, *args, **kwargs)

        monkeypatch.setattr(processor, "tokenize", faulty_tokenize)
    elif where == "pictures":
        preprocess = processor.image_processor.preprocess

        def faulty_preprocess(images):
            if any(getattr(i, "size", None) == FAULT_SIZE for i in images):
                raise error("injected fault")
            return preprocess(images)

        monkeypatch.setattr(processor.image_processor, "preprocess", faulty_preprocess)
    else:
        embeddings = worker_module.embed_prompts
        image_token = model.config.image_token_index

        def faulty_embeddings(model, prompts):
            for prompt in prompts:
                ids = np.array(prompt.input_ids).reshape(-1).tolist()
                if MARKER in processor.decode([t for t in ids if t != image_token]):
                    raise error("injected fault")
            return embeddings(model, prompts)

        monkeypatch.setattr(worker_module, "embed_prompts", faulty_embeddings)


@pytest.mark.parametrize("error", [MemoryError, TypeError, RuntimeError])
@pytest.mark.parametrize("where", ["tokenizer", "pictures", "worker"])
def test_an_unexpected_exception_fails_that_request_alone(
    server, tiny, normal_answer, monkeypatch, where, error
):
    """The faulty request gets a 500 with a JSON body (both APIs); the answers generating
    meanwhile complete as they would have; the server goes on serving."""
    expected = answers(server, CONCURRENT)
    inject(where, error, server, monkeypatch)
    if where == "pictures":
        faulty = [user("What is this?", data_url(picture(FAULT_SIZE)))]
        images = [png_base64(picture(FAULT_SIZE))]
    else:
        faulty, images = [user(f"Tell me about {MARKER}.")], None
    with generating(server, monkeypatch, CONCURRENT) as (held, finish):
        response = send(server, OPENAI, {"messages": faulty, "max_tokens": 4})
        error_text(response, OPENAI, 500)
        message = {"role": "user", "content": f"Tell me about {MARKER}.", "images": images}
        response = send(server, CHAT, {"messages": [message], "stream": False})
        error_text(response, CHAT, 500)
        assert server.worker.state()["active"] == len(CONCURRENT)
        texts = finish()
    assert texts == expected
    assert held.timeouts == 0
    assert_serving(server, normal_answer)


# Pictures whose working size explodes ----------------------------------------------------------


def peak_rss_reset() -> bool:
    """Reset this process's peak RSS (VmHWM); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_mb(field: str) -> float:
    """VmRSS or VmHWM of this process (the server runs in it), in MB."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1)) / 1024


EXTREME = [(1, 20_000), (20_000, 1), (1, 100_000), (100_000, 1)]


@pytest.mark.parametrize("size", EXTREME, ids=[f"{w}x{h}" for w, h in EXTREME])
def test_a_picture_of_extreme_aspect_ratio_is_refused_before_it_is_resized(
    server, normal_answer, size
):
    """A few hundred bytes of PNG, under the pixel cap, that shortest-edge resizing (or
    padding to a square) would make into hundreds of megabytes: a 400, with no memory jump."""
    image = picture(size) if min(size) > 1 else Image.new("RGB", size, (200, 30, 30))
    encoded = png_base64(image)
    assert len(encoded) < 4000
    measured = peak_rss_reset()
    before = memory_mb("VmRSS")
    body = {"messages": [user("What is this?", "data:image/png;base64," + encoded)]}
    error_text(send(server, OPENAI, {**body, "max_tokens": 2}), OPENAI, 400)
    for path, body in [
        (CHAT, {"messages": [{"role": "user", "content": "What?", "images": [encoded]}]}),
        (GENERATE, {"prompt": "What?", "images": [encoded]}),
    ]:
        error_text(send(server, path, {**body, "stream": False}), path, 400)
    if measured:
        grown = memory_mb("VmHWM") - before
        assert grown < 200, f"the peak RSS grew by {grown:.0f} MB"
    assert_serving(server, normal_answer)


# The product's bound on elongation (200 where the constant is missing: the code before it).
MAX_ASPECT_RATIO = getattr(image_processor, "MAX_ASPECT_RATIO", 200)
ORDINARY = [
    (640, 480),
    (480, 640),
    (28, 28),
    (1, MAX_ASPECT_RATIO),  # just under the limits: as elongated as may be
    (MAX_ASPECT_RATIO, 1),
    (10, 10 * MAX_ASPECT_RATIO),
]


@pytest.mark.parametrize("size", ORDINARY, ids=[f"{w}x{h}" for w, h in ORDINARY])
def test_pictures_just_under_the_limits_still_work(server, normal_answer, size):
    image = picture(size) if min(size) > 1 else Image.new("RGB", size, (30, 200, 30))
    body = {"messages": [user("What is this?", data_url(image))], "max_tokens": 3}
    response = send(server, OPENAI, body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 3
    assert_serving(server, normal_answer)


def test_the_working_size_after_resizing_is_capped(normal_answer):
    """With `max_image_pixels` 100,000, a 10 x 1,500 picture (15,000 pixels) is refused: its
    shortest edge resized to 28 makes it 28 x 4,200 = 117,600 pixels; 10 x 1,000 (28 x 2,800)
    is served. (A processor of its own: the server sets its cap on the processor it gets.)"""
    tiny = load(DATA / "hf-hub", dtype="float32")
    with serving(tiny, model_id="tiny", max_image_pixels=100_000) as capped:
        refused = data_url(picture((10, 1500)))
        body = {"messages": [user("What is this?", refused)], "max_tokens": 2}
        error_text(send(capped, OPENAI, body), OPENAI, 400)
        body = {"prompt": "What?", "images": [refused.split(",", 1)[1]], "stream": False}
        error_text(send(capped, GENERATE, body), GENERATE, 400)
        served = data_url(picture((10, 1000)))
        body = {"messages": [user("What is this?", served)], "max_tokens": 2}
        assert send(capped, OPENAI, body).status_code == 200
        assert_serving(capped, normal_answer)


# A very long prompt ---------------------------------------------------------------------------


def test_a_long_prompt_is_refused_without_holding_up_others(
    server, tiny, normal_answer, monkeypatch
):
    """5 MB of text (under the 50 MB body limit): a 400 naming the prompt's length, refused
    before it is tokenized whole; a normal request sent meanwhile is answered without waiting
    for it (were the long prompt tokenized where the normal one must pass, the tokenization,
    held until the normal answer is in, would make that answer wait `HOLD_S`)."""
    _, processor = tiny
    tokenize = processor.tokenize
    progress, normal_done = threading.Event(), threading.Event()
    long_tokenized, held_too_long = [], []

    def watched(text, *args, **kwargs):
        if len(text) > 100_000:
            long_tokenized.append(len(text))
            progress.set()
            if not normal_done.wait(HOLD_S):
                held_too_long.append(True)
        return tokenize(text, *args, **kwargs)

    monkeypatch.setattr(processor, "tokenize", watched)
    cases = [
        (OPENAI, {"messages": [user(LONG_TEXT)], "max_tokens": 4}),
        (GENERATE, {"prompt": LONG_TEXT, "stream": False}),
        (CHAT, {"messages": [{"role": "user", "content": LONG_TEXT}], "stream": False}),
    ]
    for path, body in cases:
        progress.clear()
        normal_done.clear()
        with ThreadPoolExecutor(1) as pool:
            long = pool.submit(send, server, path, body)
            long.add_done_callback(lambda _: progress.set())
            assert progress.wait(30)  # the long prompt is being tokenized, or was answered
            normal = send(server, OPENAI, NORMAL)
            normal_done.set()
            assert normal.status_code == 200, normal.text
            assert normal.json()["choices"][0]["message"]["content"] == normal_answer
            text = error_text(long.result(timeout=60), path, 400)
        assert "prompt" in text and re.search(r"\d", text), text
        assert not held_too_long, "the normal request waited for the long prompt"
    assert not long_tokenized, "the long prompt was tokenized before it was refused"
    assert_serving(server, normal_answer)


# Bodies JSON parsers choke on -------------------------------------------------------------------

DEEP = 10_000
HI = {"messages": [user("Hi")], "max_tokens": 2}
OLLAMA_HI = {"prompt": "hi", "stream": False}
DIGITS = "9" * 5000
BAD_JSON = [
    ("deep object", OPENAI, ('{"a":' * DEEP + "1" + "}" * DEEP).encode()),
    ("deep messages", OPENAI, ('{"messages":' + "[" * DEEP + "]" * DEEP + "}").encode()),
    (
        "deep content",
        OPENAI,
        ('{"messages":[{"role":"user","content":' + "[" * DEEP + "]" * DEEP + "}]}").encode(),
    ),
    ("deep extra field", OPENAI, raw(HI, metadata="[" * DEEP + "]" * DEEP)),
    ("deep ollama options", GENERATE, raw(OLLAMA_HI, options='{"a":' * DEEP + "1" + "}" * DEEP)),
    ("deep ollama messages", CHAT, ('{"messages":' + "[" * DEEP + "]" * DEEP + "}").encode()),
    ("temperature 1e999", OPENAI, raw(HI, temperature="1e999")),
    ("top_p -1e999", OPENAI, raw(HI, top_p="-1e999")),
    ("max_tokens 1e999", OPENAI, raw({"messages": [user("Hi")]}, max_tokens="1e999")),
    ("repetition_penalty 1e999", OPENAI, raw(HI, repetition_penalty="1e999")),
    ("seed of 5000 digits", OPENAI, raw(HI, seed=DIGITS)),
    ("max_tokens of 5000 digits", OPENAI, raw({"messages": [user("Hi")]}, max_tokens=DIGITS)),
    ("top_k of -5000 digits", OPENAI, raw(HI, top_k="-" + DIGITS)),
    ("temperature NaN", OPENAI, raw(HI, temperature="NaN")),
    ("top_p Infinity", OPENAI, raw(HI, top_p="Infinity")),
    ("temperature -Infinity", OPENAI, raw(HI, temperature="-Infinity")),
    ("repetition_penalty Infinity", OPENAI, raw(HI, repetition_penalty="Infinity")),
    ("ollama temperature 1e999", GENERATE, raw(OLLAMA_HI, options='{"temperature": 1e999}')),
    ("ollama seed of 5000 digits", GENERATE, raw(OLLAMA_HI, options=f'{{"seed": {DIGITS}}}')),
    ("ollama top_p NaN", CHAT, raw({"messages": [], "stream": False}, options='{"top_p": NaN}')),
    (
        "ollama repeat_penalty Infinity",
        GENERATE,
        raw(OLLAMA_HI, options='{"repeat_penalty": Infinity}'),
    ),
]


@pytest.mark.parametrize("name, path, body", BAD_JSON, ids=[c[0] for c in BAD_JSON])
def test_json_too_deep_or_numbers_out_of_range_get_a_400(server, normal_answer, name, path, body):
    error_text(send(server, path, body), path, 400)
    assert_serving(server, normal_answer)


# Sampling options out of range ------------------------------------------------------------------

OLLAMA_OPTIONS = [
    ("temperature", 1e308),
    ("temperature", 2.5),
    ("top_p", 2),
    ("top_k", -3),
    ("min_p", -0.5),
    ("seed", 2**70),
    ("repeat_last_n", -5),
    ("repeat_penalty", 0),
    ("stop", [f"s{i}" for i in range(1000)]),
    ("stop", ["x" * 10_000]),
]
OPENAI_FIELDS = [
    ("temperature", 3),
    ("temperature", -1),
    ("top_p", 1.5),
    ("top_k", -1),
    ("min_p", 2),
    ("repetition_penalty", 0),
    ("max_tokens", 0),
    ("max_completion_tokens", 0),
    ("max_tokens", -5),
    ("stop", [f"s{i}" for i in range(1000)]),
    ("stop", "x" * 10_000),
]


def _id(case) -> str:
    name, value = case
    if isinstance(value, list):
        return f"{name}={len(value)} strings of {max(map(len, value))} chars"
    return f"{name}={len(value)} chars" if isinstance(value, str) else f"{name}={value}"


@pytest.mark.parametrize("option, value", OLLAMA_OPTIONS, ids=map(_id, OLLAMA_OPTIONS))
def test_ollama_options_out_of_range_get_a_400_naming_the_option(
    server, normal_answer, option, value
):
    for path, body in [
        (CHAT, {"messages": [{"role": "user", "content": "hi"}]}),
        (GENERATE, {"prompt": "hi"}),
    ]:
        response = send(server, path, {**body, "stream": False, "options": {option: value}})
        assert option in error_text(response, path, 400)
    assert_serving(server, normal_answer)


@pytest.mark.parametrize("field, value", OPENAI_FIELDS, ids=map(_id, OPENAI_FIELDS))
def test_openai_fields_out_of_range_get_a_400_naming_the_field(server, normal_answer, field, value):
    for stream in (False, True):
        body = {"messages": [user("Hi")], "stream": stream, field: value}
        assert field in error_text(send(server, OPENAI, body), OPENAI, 400)
    assert_serving(server, normal_answer)


# The API key ------------------------------------------------------------------------------------


def test_the_bearer_scheme_is_case_insensitive(tiny):
    """RFC 7235: `bearer KEY` and `BEARER KEY` are as good as `Bearer KEY`; a wrong key is a
    401 with a JSON body on both APIs."""
    with serving(tiny, model_id="tiny", api_key="KEY") as keyed:
        answer = None
        for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):
            headers = {"Authorization": f"{scheme} KEY"}
            assert httpx.get(keyed.url + "/v1/models", headers=headers).status_code == 200
            assert httpx.get(keyed.url + "/api/tags", headers=headers).status_code == 200
            response = send(keyed, OPENAI, NORMAL, headers=headers)
            assert response.status_code == 200, response.text
            text = response.json()["choices"][0]["message"]["content"]
            assert answer in (None, text)
            answer = text
            body = {"prompt": "hi", "stream": False, "options": {"num_predict": 2}}
            assert send(keyed, GENERATE, body, headers=headers).status_code == 200
        for given in ("Bearer key", "bearer wrong", "Bearer", "KEY", "Basic KEY", "BearerKEY"):
            headers = {"Authorization": given}
            response = send(keyed, OPENAI, NORMAL, headers=headers)
            assert response.json()["error"]["code"] == "invalid_api_key"
            error_text(response, OPENAI, 401)
            error_text(send(keyed, CHAT, {"messages": []}, headers=headers), CHAT, 401)
        error_text(send(keyed, OPENAI, NORMAL), OPENAI, 401)
        assert_serving_with(keyed, {"Authorization": "bearer KEY"}, answer)


def assert_serving_with(server, headers: dict, answer: str) -> None:
    response = send(server, OPENAI, NORMAL, headers=headers)
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"]
    assert response.json()["choices"][0]["message"]["content"] == answer
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert server.worker._thread.is_alive()


# Pictures from this machine's addresses (SSRF) -------------------------------------------------


@pytest.fixture
def picture_host():
    """A local HTTP server of one PNG that counts the requests it gets."""
    png = base64.b64decode(png_base64(picture((32, 32))))
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args):
            pass

    host = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=host.serve_forever, daemon=True)
    thread.start()
    yield host.server_address[1], hits
    host.shutdown()
    host.server_close()


def test_remote_pictures_are_not_fetched_from_this_machine(tiny, picture_host):
    """With --allow-remote-images, URLs of loopback addresses (however spelt) are refused
    without a request reaching them; `allow_private_image_hosts` lets them through."""
    port, hits = picture_host
    urls = [
        f"http://127.0.0.1:{port}/a.png",
        f"http://localhost:{port}/a.png",
        f"http://127.1:{port}/a.png",
        f"http://2130706433:{port}/a.png",
        f"http://0x7f000001:{port}/a.png",
        f"http://[::ffff:127.0.0.1]:{port}/a.png",
        f"http://0.0.0.0:{port}/a.png",
    ]
    with serving(tiny, model_id="tiny", allow_remote_images=True, image_timeout=2.0) as remote:
        for url in urls:
            body = {"messages": [user("What is this?", url)], "max_tokens": 2}
            error_text(send(remote, OPENAI, body), OPENAI, 400)
        assert hits == []
        assert send(remote, OPENAI, NORMAL).status_code == 200
    settings = dict(allow_remote_images=True, allow_private_image_hosts=True, image_timeout=2.0)
    with serving(tiny, model_id="tiny", **settings) as trusting:
        body = {"messages": [user("What is this?", urls[0])], "max_tokens": 2}
        response = send(trusting, OPENAI, body)
        assert response.status_code == 200, response.text
        assert hits == ["/a.png"]


# The soak ---------------------------------------------------------------------------------------


class Outcome:
    def __init__(self, kind: str, status: int, detail: str = ""):
        self.kind, self.status, self.detail = kind, status, detail

    def __repr__(self) -> str:
        return f"{self.kind}: {self.status} {self.detail[:200]}"


def soak_requests(rng: random.Random) -> list[tuple[str, Callable[[httpx.Client], Outcome]]]:
    """`SOAK_REQUESTS` mixed requests: (kind, function of a client -> Outcome)."""
    pictures = [data_url(picture((24 + 8 * i, 40 - 4 * i), i)) for i in range(4)]
    b64 = [p.split(",", 1)[1] for p in pictures]
    questions = ["What is this?", "Describe it.", "What color is it?"]

    def openai(kind, body):
        def run(client):
            r = client.post(OPENAI, json=body)
            detail = r.text if r.status_code != 200 else ""
            if r.status_code == 200:
                usage = r.json()["usage"]
                detail = f"cached={usage['prompt_tokens_details']['cached_tokens']}"
            return Outcome(kind, r.status_code, detail)

        return run

    def openai_stream(kind, body, drop=False):
        def run(client):
            with client.stream("POST", OPENAI, json={**body, "stream": True}) as r:
                if r.status_code != 200:
                    return Outcome(kind, r.status_code, r.read().decode())
                lines = r.iter_lines()
                if drop:
                    next(lines)
                    return Outcome(kind, 200, "dropped")  # the response is closed here
                try:
                    sse_text(lines)
                except AssertionError as e:
                    return Outcome(kind, 200, f"stream failed: {e}")
            return Outcome(kind, 200)

        return run

    def ollama(kind, path, body, stream=False):
        def run(client):
            if not stream:
                r = client.post(path, json={**body, "stream": False})
                if r.status_code != 200:
                    return Outcome(kind, r.status_code, r.text)
                done = r.json().get("done") is True
                return Outcome(kind, 200, "" if done else f"answer failed: {r.text}")
            with client.stream("POST", path, json={**body, "stream": True}) as r:
                if r.status_code != 200:
                    return Outcome(kind, r.status_code, r.read().decode())
                try:
                    ndjson_text(r.iter_lines(), "message" if path == CHAT else "response")
                except AssertionError as e:
                    return Outcome(kind, 200, f"stream failed: {e}")
            return Outcome(kind, 200)

        return run

    def bad(kind, path, body):
        def run(client):
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = client.post(path, content=content, headers={"Content-Type": "application/json"})
            try:
                error = r.json()["error"]
            except (ValueError, KeyError, TypeError):
                return Outcome(kind, r.status_code, f"answer failed: no JSON error: {r.text}")
            return Outcome(kind, r.status_code, "" if r.status_code < 500 else str(error))

        return run

    def good(i):
        pic, b, q = pictures[i % 4], b64[i % 4], questions[i % 3]
        n = 4 + i % 5
        history = [user(q, pic), {"role": "assistant", "content": "A picture."}, user("And?")]
        return rng.choice(
            [
                ("openai", openai("openai", {"messages": [user(q, pic)], "max_tokens": n})),
                ("openai text", openai("openai text", {"messages": [user(q)], "max_tokens": n})),
                ("stream", openai_stream("stream", {"messages": [user(q, pic)], "max_tokens": n})),
                ("follow-up", openai("follow-up", {"messages": history, "max_tokens": n})),
                (
                    "seed -1",
                    openai(
                        "seed -1",
                        {"messages": [user(q, pic)], "max_tokens": n, "seed": -1, "temperature": 1},
                    ),
                ),
                (
                    "drop",
                    openai_stream("drop", {"messages": [user(q, pic)], "max_tokens": 64}, True),
                ),
                (
                    "ollama chat",
                    ollama(
                        "ollama chat",
                        CHAT,
                        {
                            "messages": [{"role": "user", "content": q, "images": [b]}],
                            "options": {"num_predict": n, "seed": -1},
                        },
                        stream=bool(i % 2),
                    ),
                ),
                (
                    "ollama generate",
                    ollama(
                        "ollama generate",
                        GENERATE,
                        {"prompt": q, "images": [b], "options": {"num_predict": n}},
                        stream=bool(i % 2),
                    ),
                ),
            ]
        )

    extreme = data_url(Image.new("RGB", (1, 20_000), "white"))
    bad_bodies = [
        (OPENAI, {"messages": [user(f"hi {S}")]}),
        (OPENAI, {"messages": [user("hi")], "stop": [S]}),
        (CHAT, {"model": S, "messages": [{"role": "user", "content": "hi"}]}),
        (OPENAI, {"messages": [user("hi")], "seed": 2**70}),
        (GENERATE, {"prompt": "hi", "options": {"seed": -2}}),
        (GENERATE, {"prompt": "hi", "options": {"temperature": 1e308}}),
        (CHAT, {"messages": [{"role": "user", "content": "hi"}], "options": {"top_k": -3}}),
        (GENERATE, {"prompt": "hi", "options": {"repeat_last_n": -5}}),
        (OPENAI, ('{"a":' * DEEP + "1" + "}" * DEEP).encode()),
        (OPENAI, raw(HI, temperature="1e999")),
        (OPENAI, raw(HI, seed=DIGITS)),
        (OPENAI, raw(HI, temperature="NaN")),
        (OPENAI, {"messages": [user("hi")], "stop": [f"s{i}" for i in range(1000)]}),
        (OPENAI, {"messages": [user("hi")], "max_tokens": 0}),
        (OPENAI, {"messages": [user("hi")], "temperature": 3}),
        (OPENAI, {"messages": [user("hi", extreme)]}),
        (OPENAI, {"messages": [user("word " * 200_000)]}),  # 1 MB of prompt
        (OPENAI, b"{not json"),
    ]
    plan = []
    for i in range(SOAK_REQUESTS):
        if i % 4 == 3:
            path, body = bad_bodies[(i // 4) % len(bad_bodies)]
            plan.append(("bad", bad("bad", path, body)))
        else:
            plan.append(good(i))
    rng.shuffle(plan)
    return plan


def test_soak_mixed_requests_from_8_clients(server, normal_answer):
    """240 requests from 8 clients: pictures, streams, Ollama, follow-up turns, `seed: -1`,
    every kind of bad request above, streams dropped after their first chunk. No 5xx, every
    request answered (or dropped by its client), nothing left running, memory bounded."""
    plan = soak_requests(random.Random(0))
    batch_sizes, counting = [0], threading.Event()
    counting.set()

    def count(moment: str, details: dict) -> None:
        if moment == "step" and counting.is_set():
            batch_sizes.append(details["rows"])

    server.worker.observe(count)
    health = httpx.get(server.url + "/health").json()
    rss_before = memory_mb("VmRSS")
    local = threading.local()
    clients: list[httpx.Client] = []
    lock = threading.Lock()
    deadline = time.monotonic() + SOAK_DEADLINE_S

    def run(item) -> Outcome:
        kind, function = item
        if time.monotonic() > deadline:
            return Outcome(kind, 0, "not sent: the soak's deadline passed")
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=server.url, timeout=30)
            with lock:
                clients.append(local.client)
        try:
            return function(local.client)
        except httpx.HTTPError as e:
            return Outcome(kind, 0, f"{type(e).__name__}: {e}")

    tic = time.monotonic()
    try:
        with ThreadPoolExecutor(SOAK_CLIENTS) as pool:
            futures = [pool.submit(run, item) for item in plan]
            outcomes = [f.result(timeout=max(deadline - time.monotonic(), 0) + 35) for f in futures]
    finally:
        for client in clients:
            client.close()
    seconds = time.monotonic() - tic
    counting.clear()
    health = wait_until(
        lambda: (h := httpx.get(server.url + "/health").json())["active"] == 0
        and h["queued"] == 0
        and h,
        timeout=10,
    )
    rss_after = memory_mb("VmRSS")
    statuses: dict[str, dict[int, int]] = {}
    for o in outcomes:
        statuses.setdefault(o.kind, {}).setdefault(o.status, 0)
        statuses[o.kind][o.status] += 1
    cached = [o for o in outcomes if o.detail.startswith("cached=") and o.detail != "cached=0"]
    print(
        f"\nsoak: {len(outcomes)} requests in {seconds:.1f} s, statuses {statuses}; "
        f"RSS {rss_before:.0f} -> {rss_after:.0f} MB; prompt cache "
        f"{health['prompt_cache']['entries']} entries, {health['prompt_cache']['bytes']:,} bytes; "
        f"MLX cache {mx.get_cache_memory():,} bytes, active {mx.get_active_memory():,} bytes; "
        f"{len(cached)} answers reused a cached prefix; {len(batch_sizes) - 1} decoding steps, "
        f"at most {max(batch_sizes)} rows at once"
    )
    assert len(outcomes) == SOAK_REQUESTS
    failures = [o for o in outcomes if o.status >= 500 or o.status == 0 or "failed" in o.detail]
    assert not failures, failures[:10]
    for o in outcomes:
        assert o.status == (400 if o.kind == "bad" else 200), o
    assert sum(o.detail == "dropped" for o in outcomes) > 0
    assert cached, "no follow-up turn reused the prompt cache"
    assert max(batch_sizes) > 2, "the clients' requests never shared the batch"
    assert rss_after - rss_before < 500, f"RSS grew from {rss_before:.0f} to {rss_after:.0f} MB"
    assert_serving(server, normal_answer)


def test_health_tells_a_stopped_worker(tiny):
    """/health is 200 "ok" while the worker serves, and 503 "error" with the reason once it
    has stopped (a failed pipeline, a dead thread): a load balancer can tell."""
    with serving(tiny, model_id="tiny") as server:
        health = httpx.get(server.url + "/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        server.worker.failure = "the pipeline of ranks failed: a test"
        health = httpx.get(server.url + "/health")
        assert health.status_code == 503
        assert health.json()["status"] == "error"
        assert health.json()["failure"] == "the pipeline of ranks failed: a test"
        server.worker.failure = None
        server.worker.close()
        health = httpx.get(server.url + "/health")
        assert health.status_code == 503 and health.json()["alive"] is False
