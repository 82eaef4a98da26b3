"""The server against real clients: uvicorn on 127.0.0.1, the official `openai` client, Ollama-
shaped requests, every bad input, auth, CORS, a dropped stream, concurrency and the queue.

Answers are checked against `generate` / `ChatSession` (parity-tested against transformers
elsewhere) on the committed tiny llava-hf checkpoint, and against the right words on the bundled
demo model. Every request loop is bounded in count and time.
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from llava_testing.serving import (
    EXAMPLES,
    ROOT,
    WorkerGate,
    data_url,
    free_port,
    serving,
    user,
    wait_until,
)
from mlx_llava import ChatSession, generate, load
from mlx_llava.chat import session_template
from mlx_llava.cli import server as server_cli
from mlx_llava.conversation import render
from mlx_llava.server.messages import ImagePolicy, Message, render_conversation
from mlx_llava.server.schemas import RequestError

openai = pytest.importorskip("openai")

DATA = Path(__file__).parent / "fixtures" / "data"
A, B = DATA / "images" / "a.png", DATA / "images" / "b.png"
RED_CIRCLE, GREEN_TRIANGLE = EXAMPLES / "red_circle.png", EXAMPLES / "green_triangle.png"


@pytest.fixture(scope="module")
def tiny():
    return load(DATA / "hf-hub", dtype="float32")


@pytest.fixture(scope="module")
def demo():
    return load("demo")


@pytest.fixture(scope="module")
def tiny_server(tiny):
    with serving(tiny, model_id="tiny", max_body_mb=1.0, max_prefill=8) as server:
        yield server


@pytest.fixture(scope="module")
def demo_server(demo):
    with serving(demo, model_id="demo") as server:
        yield server


def client(server) -> "openai.OpenAI":
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def post(server, path, body=None, content=None, **kwargs) -> httpx.Response:
    return httpx.post(server.url + path, json=body, content=content, timeout=60, **kwargs)


def chat(server, messages, **fields) -> dict:
    response = post(server, "/v1/chat/completions", {"messages": messages, **fields})
    assert response.status_code == 200, response.text
    return response.json()


# Rendering conversations (no server) ----------------------------------------------------------


def test_single_turn_prompts_match_the_checkpoints_chat_template(tiny):
    """OpenAI messages with pictures render as llava-hf's own Jinja template renders them."""
    _, processor = tiny
    picture = Image.open(A)
    for n in (0, 1, 2):
        ours, pictures = render_conversation(
            processor, [Message("user", "What is shown?", [picture] * n)]
        )
        content = [{"type": "image"}] * n + [{"type": "text", "text": "What is shown?"}]
        theirs = processor.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}],
            chat_template=processor.chat_template,
            add_generation_prompt=True,
            tokenize=False,
        )
        assert ours == theirs
        assert len(pictures) == n


def test_conversations_render_with_the_session_template(demo):
    _, processor = demo
    a, b = Image.open(RED_CIRCLE), Image.open(GREEN_TRIANGLE)
    messages = [
        Message("system", "Be brief."),
        Message("user", "What color is the shape?", [a]),
        Message("assistant", " red \n"),
        Message("user", "And this one?", [b]),
    ]
    prompt, pictures = render_conversation(processor, messages)
    template = session_template(processor)
    expected = render(
        template.__class__(**{**template.__dict__, "system": "Be brief."}),
        [
            ("user", "<image>\nWhat color is the shape?"),
            ("assistant", "red"),
            ("user", "<image>\nAnd this one?"),
        ],
    )
    assert prompt == expected
    assert pictures == [a, b]
    # The text may place its pictures; consecutive user messages are joined.
    placed, _ = render_conversation(
        processor, [Message("user", "Left <image> right <image>", [a, b]), Message("user", "?")]
    )
    assert "Left <image> right <image>\n?" in placed
    # A session with the same messages renders the same prompt (same system prompt).
    session = ChatSession(demo[0], processor, image=a)
    assert (
        session.prompt("What color is the shape?")[1]
        == render_conversation(processor, [Message("user", "What color is the shape?", [a])])[0]
    )


@pytest.mark.parametrize(
    "messages, match",
    [
        ([Message("user", "<image> and <image>", ["p"])], "2 <image> placeholder"),
        ([Message("user", "<image>")], "1 <image> placeholder"),
        ([Message("assistant", "hi")], "end with a user message"),
        ([Message("user", "hi"), Message("assistant", "yo")], "end with a user message"),
        ([Message("assistant", "hi"), Message("user", "hi")], "start with a user message"),
        ([Message("system", "<image>")], "only user messages"),
        ([Message("user", "  ")], "empty"),
    ],
)
def test_bad_conversations(demo, messages, match):
    with pytest.raises(RequestError, match=match):
        render_conversation(demo[1], messages)


def test_picture_policy(tmp_path):
    inside = tmp_path / "pictures"
    inside.mkdir()
    (inside / "red.png").write_bytes(RED_CIRCLE.read_bytes())
    (tmp_path / "outside.png").write_bytes(RED_CIRCLE.read_bytes())
    policy = ImagePolicy(image_dir=inside)
    assert policy.load("red.png", "p").size == Image.open(RED_CIRCLE).size
    assert policy.load(f"file://{inside}/red.png", "p").size == Image.open(RED_CIRCLE).size
    for refused in ("../outside.png", str(tmp_path / "outside.png"), f"file://{tmp_path}/x.png"):
        with pytest.raises(RequestError, match="inside the --image-dir"):
            policy.load(refused, "p")
    with pytest.raises(RequestError, match="local picture paths are refused"):
        ImagePolicy().load(str(RED_CIRCLE), "p")
    with pytest.raises(RequestError, match="image URLs are refused"):
        ImagePolicy().load("https://example.com/cat.png", "p")
    with pytest.raises(RequestError, match="unsupported picture URL scheme"):
        policy.load("ftp://host/cat.png", "p")


# The OpenAI API ---------------------------------------------------------------------------------


def test_openai_client_gets_the_right_answer(demo_server, demo):
    model, processor = demo
    picture = data_url(RED_CIRCLE)
    response = client(demo_server).chat.completions.create(
        model="demo", messages=[user("What color is the shape?", picture)]
    )
    assert response.choices[0].message.content == "red"
    assert response.choices[0].finish_reason == "stop"
    prompt = processor.format_prompt("What color is the shape?")
    # Prompt tokens count the image tokens.
    assert response.usage.prompt_tokens == len(processor.tokenize(prompt))
    assert response.usage.prompt_tokens > model.config.num_image_tokens
    assert response.model == "demo"
    models = client(demo_server).models.list()
    assert [m.id for m in models.data] == ["demo"]


def test_openai_client_streams(demo_server):
    stream = client(demo_server).chat.completions.create(
        model="demo",
        messages=[user("Describe the image.", data_url(GREEN_TRIANGLE))],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "triangle" in text.lower() and "green" in text.lower()
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 2
    # The raw stream ends with [DONE].
    body = {"messages": [user("Hi")], "stream": True, "max_tokens": 3}
    with httpx.stream("POST", demo_server.url + "/v1/chat/completions", json=body) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_multi_turn_with_a_picture_reuses_the_cache(demo_server, demo):
    """Turn 2 resends the conversation: same answers as a ChatSession, and only its new tokens
    are computed; a new conversation about the same picture reuses the picture's prefix."""
    model, processor = demo
    session = ChatSession(model, processor, image=str(GREEN_TRIANGLE))
    expected = [session.send(q) for q in ("What color is the shape?", "What shape is this?")]
    assert expected == ["green", "triangle"]

    picture = data_url(GREEN_TRIANGLE)
    first = chat(demo_server, [user("What color is the shape?", picture)])
    answer = first["choices"][0]["message"]["content"]
    history = [
        user("What color is the shape?", picture),
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "What shape is this?"},
    ]
    second = chat(demo_server, history)
    assert [answer, second["choices"][0]["message"]["content"]] == expected
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached > first["usage"]["prompt_tokens"]  # turn 1's prompt and answer
    assert second["usage"]["prompt_tokens"] - cached < 20  # the new question only

    other = chat(demo_server, [user("How many shapes are there?", picture)])
    assert other["choices"][0]["message"]["content"] == "one"
    prefix = processor.format_prompt("<image>").split("<image>")[0]
    picture_end = len(processor.tokenize(prefix)) + model.config.num_image_tokens
    assert other["usage"]["prompt_tokens_details"]["cached_tokens"] >= picture_end


def test_several_pictures_are_each_used_in_order(tiny_server, tiny):
    model, processor = tiny
    a, b = data_url(A), data_url(B)
    fields = {"max_tokens": 12}
    both = chat(tiny_server, [user("Compare the two.", a, b)], **fields)
    prompt = processor.format_prompt("Compare the two.", 2)
    expected = generate(model, processor, prompt, images=[str(A), str(B)], max_tokens=12)
    assert both["choices"][0]["message"]["content"] == expected
    swapped = chat(tiny_server, [user("Compare the two.", b, a)], **fields)
    assert swapped["choices"][0]["message"]["content"] != expected
    # Across messages: the first picture in turn 1, the second in turn 2.
    across = [
        user("Look.", a),
        {"role": "assistant", "content": "Yes."},
        user("And now?", b),
    ]
    prompt = render(
        session_template(processor),
        [("user", "<image>\nLook."), ("assistant", "Yes."), ("user", "<image>\nAnd now?")],
    )
    expected = generate(model, processor, prompt, images=[str(A), str(B)], max_tokens=12)
    assert chat(tiny_server, across, **fields)["choices"][0]["message"]["content"] == expected
    assert chat(tiny_server, [user("Hello!")], **fields)["choices"][0]["message"]["content"]


def test_sampling_fields_reach_generation(tiny_server, tiny):
    model, processor = tiny
    prompt = processor.format_prompt("Tell me a story.", 1)
    fields = dict(temperature=0.9, top_p=0.95, top_k=50, min_p=0.02, repetition_penalty=1.3)
    expected = generate(
        model, processor, prompt, image=str(A), max_tokens=10, seed=5, stop=["zz"], **fields
    )
    messages = [user("Tell me a story.", data_url(A))]
    got = chat(tiny_server, messages, max_completion_tokens=10, seed=5, stop="zz", **fields)
    assert got["choices"][0]["message"]["content"] == expected
    greedy = chat(tiny_server, messages, max_tokens=10)["choices"][0]["message"]["content"]
    assert greedy != expected
    # A stop string cuts the answer.
    word = greedy.split()[1] if len(greedy.split()) > 1 else greedy[1:3]
    stopped = chat(tiny_server, messages, max_tokens=10, stop=[word])
    assert stopped["choices"][0]["message"]["content"] == greedy[: greedy.find(word)]
    capped = chat(tiny_server, messages, max_tokens=2)
    assert capped["usage"]["completion_tokens"] <= 2


def test_concurrent_greedy_answers_equal_one_at_a_time(tiny_server):
    a, b = data_url(A), data_url(B)
    requests = [
        ([user("What is this?", a)], 16),
        ([user("Describe the two pictures in many words.", a, b)], 24),
        ([user("Hello there, how are you today?")], 20),
        ([user("Tell me more.", b)], 8),
        (
            [user("What is this?", a), {"role": "assistant", "content": "A thing."}, user("Sure?")],
            12,
        ),
        ([user("Count.", b, a)], 18),
    ]

    def ask(request):
        messages, max_tokens = request
        return chat(tiny_server, messages, max_tokens=max_tokens)["choices"][0]["message"]

    one_at_a_time = [ask(r) for r in requests]
    worker = tiny_server.worker
    for cached in (False, True):  # prompts computed together, then continued from the cache
        if not cached:
            worker.prompt_cache.trim_to(n_sequences=0)
        # The worker waits at the first request's admission until all of them are submitted.
        with ThreadPoolExecutor(len(requests)) as pool, WorkerGate(worker) as gate:
            gate.hold("admitted")
            answers = [pool.submit(ask, r) for r in requests]
            gate.wait_held()
            gate.wait(lambda: gate.submitted == len(requests))
            gate.release()
            together = [a.result(timeout=60) for a in answers]
        assert together == one_at_a_time
        assert max(rows for rows, _ in gate.steps) > 2  # they shared the batch
        assert max(joined for _, joined in gate.steps) > 1  # and several joined it at one step


def test_dropped_stream_stops_within_a_step_and_frees_its_slot(tiny_server):
    worker = tiny_server.worker
    body = {"messages": [user("Talk.", data_url(A))], "stream": True, "max_tokens": 200}

    def read_and_drop():
        with httpx.stream("POST", tiny_server.url + "/v1/chat/completions", json=body) as r:
            received = 0
            for line in r.iter_lines():
                received += line.startswith("data: ")
                if received == 4:
                    break  # the client goes away mid-answer

    client = threading.Thread(target=read_and_drop)
    with WorkerGate(worker) as gate:
        gate.hold("step")  # one step at a time, while the client reads
        client.start()
        gate.wait_held()
        [number] = gate.admitted
        while client.is_alive() and number not in gate.finished:
            gate.step(until=lambda: number in gate.finished)  # (the cancel may come first)
        client.join()
        steps_at_drop = len(gate.steps)
        gate.wait(lambda: number in gate.cancelled)  # the server saw it (the worker stood still)
        gate.release()
        reason = gate.wait(lambda: gate.finished.get(number))
    assert reason == "cancelled"
    assert len(gate.steps) - steps_at_drop <= 1  # 200 tokens would take 200 steps
    health = httpx.get(tiny_server.url + "/health").json()
    assert health["active"] == 0 and health["queued"] == 0
    assert chat(tiny_server, [user("Still there?")], max_tokens=2)["choices"]


def test_full_queue_answers_503(tiny):
    with serving(tiny, max_batch=1, max_queue=1) as server:
        worker = server.worker
        body = {"messages": [user("Talk.")], "stream": True, "max_tokens": 40}
        with WorkerGate(worker) as gate:
            gate.hold("step")  # the running answer stands still after its first step
            with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as running:
                assert running.status_code == 200
                lines = running.iter_lines()  # (kept: a dropped iterator closes the connection)
                next(lines)
                waiting = threading.Thread(
                    target=post, args=(server, "/v1/chat/completions", {**body, "stream": False})
                )
                waiting.start()
                gate.wait(lambda: gate.submitted == 2)
                assert worker.state()["queued"] == 1
                refused = post(server, "/v1/chat/completions", body)
                assert refused.status_code == 503
                assert refused.json()["error"]["code"] == "queue_full"
                assert refused.headers["retry-after"]
                gate.release()
            waiting.join(timeout=30)
            assert not waiting.is_alive()
            first, second = gate.admitted  # the waiting one started once the first ended
            order = [(m, d.get("number")) for m, d in gate.moments]
            assert order.index(("finished", first)) < order.index(("admitted", second))

        # A client that goes away while its request waits takes it out of the queue.
        with WorkerGate(worker) as gate:
            gate.hold("step")  # the running answer stands still until the checks are done
            with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as running:
                lines = running.iter_lines()
                next(lines)
                [number] = gate.wait(lambda: gate.admitted)
                with socket.create_connection(("127.0.0.1", int(server.url.split(":")[-1]))) as s:
                    data = json.dumps(body).encode()
                    s.sendall(
                        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                        b"Content-Type: application/json\r\n"
                        + f"Content-Length: {len(data)}\r\n\r\n".encode()
                        + data
                    )
                    gate.wait(lambda: gate.submitted == 2)
                    assert worker.state()["queued"] == 1
                gone = gate.numbers[1]
                gate.wait(lambda: gone in gate.cancelled)  # (its client polled twice a second)
                assert worker.state()["queued"] == 0
                assert gate.held and worker.state()["active"] == 1  # before the running one ended
                gate.release()
                rest = [line for line in lines if line]
            assert gate.admitted == [number]  # the request that went away never started
            reason = gate.finished[number]  # the running one went on to its end
            assert reason in ("length", "stop") and rest[-1] == "data: [DONE]"
            assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == reason


# The Ollama API ---------------------------------------------------------------------------------


def test_ollama_chat_and_generate(demo_server):
    image = base64.b64encode(RED_CIRCLE.read_bytes()).decode()
    body = {
        "model": "demo",
        "messages": [{"role": "user", "content": "What color is the shape?", "images": [image]}],
        "stream": False,
        "options": {"temperature": 0, "num_predict": 8},
    }
    answer = post(demo_server, "/api/chat", body).json()
    assert answer["message"] == {"role": "assistant", "content": "red"}
    assert answer["done"] is True and answer["done_reason"] == "stop"
    for name in ("total_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(answer[name], int) and answer[name] > 0
    assert answer["prompt_eval_count"] >= 1 and answer["eval_count"] == 2  # computed, not cached

    # Streaming is the default: NDJSON, the last object done with the timings.
    body["messages"][0]["content"] = "What shape is this?"
    del body["stream"]
    with httpx.stream("POST", demo_server.url + "/api/chat", json=body, timeout=60) as r:
        objects = [json.loads(line) for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("application/x-ndjson")
    assert "".join(o["message"]["content"] for o in objects) == "circle"
    assert [o["done"] for o in objects] == [False] * (len(objects) - 1) + [True]
    assert objects[-1]["eval_count"] >= 1

    generated = post(
        demo_server,
        "/api/generate",
        {
            "model": "demo:latest",
            "prompt": "What shape is this?",
            "images": [image],
            "stream": False,
        },
    ).json()
    assert generated["response"] == "circle" and generated["done"] is True
    tags = httpx.get(demo_server.url + "/api/tags").json()
    assert [m["name"] for m in tags["models"]] == ["demo"]
    assert tags["models"][0]["details"]["family"] == "llava"
    assert httpx.get(demo_server.url + "/api/version").json()["version"]


# Bad input --------------------------------------------------------------------------------------

NOT_AN_IMAGE = "data:image/png;base64," + base64.b64encode(b"hello, not a picture").decode()
LONG = "word " * 400  # the tiny model's context is 256


def openai_case(messages=None, **fields):
    return {"messages": messages if messages is not None else [user("Hi")], **fields}


BAD_OPENAI = [
    ("invalid json", b"{not json", 400, "invalid_json"),
    ("not an object", b"[1, 2]", 400, "invalid_json"),
    ("no messages", {}, 400, "invalid_value"),
    ("empty messages", openai_case([]), 400, "invalid_value"),
    ("bad role", openai_case([{"role": "robot", "content": "hi"}]), 400, "invalid_value"),
    ("bad content", openai_case([{"role": "user", "content": 5}]), 400, "invalid_value"),
    ("bad part", openai_case([{"role": "user", "content": [{"type": "audio"}]}]), 400, None),
    ("malformed base64", openai_case([user("Hi", "data:image/png;base64,%%%")]), 400, None),
    ("not a picture", openai_case([user("Hi", NOT_AN_IMAGE)]), 400, "invalid_image"),
    ("text data url", openai_case([user("Hi", "data:text/plain;base64,aGk=")]), 400, None),
    ("remote url", openai_case([user("Hi", "https://example.com/a.png")]), 400, None),
    ("local path", openai_case([user("Hi", str(RED_CIRCLE))]), 400, "image_url_refused"),
    ("file url", openai_case([user("Hi", f"file://{RED_CIRCLE}")]), 400, "image_url_refused"),
    ("more <image>s", openai_case([user("<image> and <image>", data_url(A))]), 400, None),
    ("<image> no picture", openai_case([user("<image> what?")]), 400, None),
    ("too long", openai_case([user(LONG)]), 400, None),
    ("max_tokens 0", openai_case(max_tokens=0), 400, "invalid_value"),
    ("max_tokens -5", openai_case(max_completion_tokens=-5), 400, "invalid_value"),
    ("temperature -1", openai_case(temperature=-1), 400, "invalid_value"),
    ("n 2", openai_case(n=2), 400, "invalid_value"),
    ("top_logprobs 21", openai_case(logprobs=True, top_logprobs=21), 400, "invalid_value"),
    ("response_format", openai_case(response_format={"type": "regex"}), 400, "invalid_value"),
    ("unknown model", openai_case(model="gpt-4"), 404, "model_not_found"),
    ("assistant last", openai_case([{"role": "assistant", "content": "hi"}]), 400, None),
    ("too large", openai_case([user("x" * (2 << 20))]), 413, "body_too_large"),
]


@pytest.mark.parametrize("name, body, status, code", BAD_OPENAI, ids=[c[0] for c in BAD_OPENAI])
def test_bad_openai_requests_get_a_4xx_json_error(tiny_server, name, body, status, code):
    for stream in (False, True):
        if isinstance(body, bytes):
            response = post(tiny_server, "/v1/chat/completions", content=body)
        else:
            response = post(tiny_server, "/v1/chat/completions", {**body, "stream": stream})
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["message"] and "Traceback" not in response.text
        assert error["type"] == "invalid_request_error"
        if code:
            assert error["code"] == code
        if name == "too long":
            assert "context" in error["message"]
    assert chat(tiny_server, [user("Hi")], max_tokens=2)["choices"]  # still serving


def test_chunked_body_over_the_limit(tiny_server):
    def chunks():
        for _ in range(40):
            yield b"x" * (64 << 10)

    response = httpx.post(tiny_server.url + "/v1/chat/completions", content=chunks(), timeout=30)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"


def test_picture_over_the_pixel_cap(tiny):
    big = Image.new("RGB", (120, 100), "white")  # a small file: refused before decoding
    with serving(tiny, max_image_pixels=10_000) as server:
        body = openai_case([user("Hi", data_url(big))])
        response = post(server, "/v1/chat/completions", body)
        assert response.status_code == 400
        message = response.json()["error"]["message"]
        assert "120 x 100 pixels is more than the limit of 10,000 pixels" in message
        ollama = {"prompt": "Hi", "images": [data_url(big).split(",")[1]], "stream": False}
        response = post(server, "/api/generate", ollama)
        assert response.status_code == 400 and "10,000 pixels" in response.json()["error"]
        small = Image.new("RGB", (100, 100), "white")
        assert chat(server, [user("Hi", data_url(small))], max_tokens=2)["choices"]


BAD_OLLAMA = [
    ("/api/chat", b"{oops", 400),
    ("/api/chat", {"messages": [{"role": "user", "content": "hi", "images": ["***"]}]}, 400),
    ("/api/chat", {"messages": [{"role": "user", "content": "hi", "images": ["aGk="]}]}, 400),
    ("/api/chat", {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}, 404),
    ("/api/chat", {"messages": [{"role": "tool", "content": "hi"}]}, 400),
    ("/api/generate", {"prompt": LONG}, 400),
    ("/api/generate", {"prompt": "<image>"}, 400),
    ("/api/generate", {"prompt": "hi", "options": {"num_predict": 0}}, 400),
    ("/api/generate", {"prompt": "hi", "options": {"temperature": -2}}, 400),
]


@pytest.mark.parametrize("path, body, status", BAD_OLLAMA)
def test_bad_ollama_requests_get_a_4xx_json_error(tiny_server, path, body, status):
    if isinstance(body, bytes):
        response = post(tiny_server, path, content=body)
    else:
        response = post(tiny_server, path, body)
    assert response.status_code == status, response.text
    assert list(response.json()) == ["error"] and response.json()["error"]


def test_unknown_routes_and_methods(tiny_server):
    missing = httpx.get(tiny_server.url + "/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["message"]
    wrong = httpx.get(tiny_server.url + "/v1/chat/completions")
    assert wrong.status_code == 405 and wrong.json()["error"]["message"]
    assert httpx.get(tiny_server.url + "/api/nothing").json() == {"error": "no such route"}


# Pictures from URLs and files --------------------------------------------------------------------


@pytest.fixture
def picture_host():
    """A local HTTP server: /red.png, /big.png (over the byte cap), /slow.png (never done)."""
    red = RED_CIRCLE.read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = {"/red.png": red, "/big.png": red * 40, "/slow.png": red}.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            if self.path == "/slow.png":
                for _ in range(50):  # a trickle: each read arrives in time, the whole never
                    self.wfile.write(body[:10])
                    self.wfile.flush()
                    time.sleep(0.1)
                return
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    host = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=host.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{host.server_address[1]}"
    host.shutdown()
    host.server_close()


def test_remote_pictures_only_when_allowed(demo, picture_host, tmp_path):
    settings = dict(allow_remote_images=True, image_timeout=1.0, max_image_mb=0.005)
    settings["allow_private_image_hosts"] = True  # the picture host is on 127.0.0.1
    with serving(demo, **settings) as server:
        answer = chat(server, [user("What color is the shape?", picture_host + "/red.png")])
        assert answer["choices"][0]["message"]["content"] == "red"
        for name, message in [
            ("big", "more than the limit"),
            ("slow", "not reachable or not allowed"),  # the reason goes to the log only
            ("no", "not reachable or not allowed"),
        ]:
            tic = time.monotonic()
            r = post(
                server,
                "/v1/chat/completions",
                openai_case([user("Hi", f"{picture_host}/{name}.png")]),
            )
            assert r.status_code == 400 and message in r.json()["error"]["message"]
            assert time.monotonic() - tic < 5  # the fetch's deadline (1 s) is the feature here
    with serving(demo, image_dir=str(EXAMPLES)) as server:
        for source in ("red_circle.png", f"file://{RED_CIRCLE}"):
            answer = chat(server, [user("What color is the shape?", source)])
            assert answer["choices"][0]["message"]["content"] == "red"
        r = post(server, "/v1/chat/completions", openai_case([user("Hi", "../README.md")]))
        assert r.status_code == 400 and r.json()["error"]["code"] == "image_url_refused"


# Security defaults ------------------------------------------------------------------------------


def test_api_key_guards_every_route_but_health_and_the_page(tiny):
    with serving(tiny, api_key="s3cret") as server:
        assert httpx.get(server.url + "/health").status_code == 200
        assert httpx.get(server.url + "/").status_code == 200
        for path in ("/v1/models", "/api/tags"):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                r = httpx.get(server.url + path, headers=headers)
                assert r.status_code == 401
                assert r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(server.url + "/api/tags").json()["error"]
        assert httpx.get(server.url + "/v1/models").json()["error"]["code"] == "invalid_api_key"
        r = post(server, "/v1/chat/completions", openai_case())
        assert r.status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert httpx.get(server.url + "/v1/models", headers=ok).status_code == 200
        good = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0)
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
        assert good.chat.completions.create(model="test-model", messages=[user("Hi")], max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model="test-model", messages=[user("Hi")], max_tokens=2)


def test_cors_is_off_unless_an_origin_is_given(tiny, tiny_server):
    preflight = {
        "Origin": "http://example.test",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    r = httpx.options(tiny_server.url + "/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    r = httpx.get(tiny_server.url + "/v1/models", headers={"Origin": "http://example.test"})
    assert "access-control-allow-origin" not in r.headers
    with serving(tiny, cors_origins=["http://example.test"], api_key="k") as server:
        r = httpx.options(server.url + "/v1/chat/completions", headers=preflight)
        assert r.headers["access-control-allow-origin"] == "http://example.test"
        r = httpx.options(
            server.url + "/v1/chat/completions", headers={**preflight, "Origin": "http://evil.test"}
        )
        assert "access-control-allow-origin" not in r.headers


def test_the_page_and_its_files_are_served(tiny_server):
    page = httpx.get(tiny_server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="/static/app.js">' in page.text
    for name, kind in [("app.js", "javascript"), ("style.css", "text/css")]:
        r = httpx.get(f"{tiny_server.url}/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"]
    assert "http" not in page.text.replace("http-equiv", "")  # no CDN: works offline


# The command line -------------------------------------------------------------------------------


def test_command_line_serves_and_stops(tmp_path):
    port = free_port()
    env_key = {"MLX_LLAVA_API_KEY": "from-env"}
    command = [sys.executable, "-m", "mlx_llava.server", "--model", "demo", "--port", str(port)]
    log = open(tmp_path / "server.log", "wb")
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**_env(), **env_key}
    )
    try:
        url = f"http://127.0.0.1:{port}"

        def healthy():
            try:
                return httpx.get(url + "/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                assert process.poll() is None, (tmp_path / "server.log").read_text()
                return False

        wait_until(healthy, timeout=60, interval=0.2)
        headers = {"Authorization": "Bearer from-env"}
        assert httpx.get(url + "/v1/models", timeout=5).status_code == 401
        body = {"messages": [user("What color is the shape?", data_url(RED_CIRCLE))]}
        r = httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=60)
        assert r.json()["choices"][0]["message"]["content"] == "red"
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-batch", "0"], "--max-batch must be positive"),
        (["--max-body-mb", "-1"], "--max-body-mb must be positive"),
        (["--image-dir", "/no/such/folder"], "no such folder"),
        (["--model", "/no/such/model"], "/no/such/model"),
    ],
)
def test_command_line_errors_are_one_line(flags, message, capsys, monkeypatch):
    monkeypatch.delenv("MLX_LLAVA_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit:
        server_cli.main(flags)
    err = capsys.readouterr().err
    assert exit.value.code == 1
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert message in err


def _env() -> dict:
    import os

    env = dict(os.environ)
    env.pop("MLX_LLAVA_DEBUG", None)
    env.pop("MLX_LLAVA_API_KEY", None)
    return env


def test_image_bytes_helper_round_trip():
    """`data_url` of a PIL image decodes back to the same pixels (guards the tests' helper)."""
    picture = Image.new("RGB", (5, 4), (10, 20, 30))
    decoded = Image.open(io.BytesIO(base64.b64decode(data_url(picture).split(",")[1])))
    assert decoded.getpixel((0, 0)) == (10, 20, 30)
