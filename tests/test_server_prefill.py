"""Pictures prefilled once for everyone: a prompt enters the server's prompt cache as soon as it
is prefilled (not when its answer ends), and requests about the same picture that arrive
together wait a turn rather than encode it again, so the picture goes through the tower once;
every answer is still the one it gets alone."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import httpx
import pytest

from llava_testing.serving import WorkerGate, data_url, serving, user
from mlx_llava import generate, load
from mlx_llava.chat import session_template
from mlx_llava.conversation import render

DATA = Path(__file__).parent / "fixtures" / "data"
PICTURE = DATA / "images" / "a.png"
EXAMPLE = Path(__file__).parents[1] / "examples" / "red_circle.png"
QUESTIONS = ["What is this?", "Describe it.", "What colour is it?", "Is it big?"]


@pytest.fixture(scope="module")
def tiny():
    return load(DATA / "hf-hub", dtype="float32")


def alone(model, processor, question: str) -> str:
    prompt = render(session_template(processor), [("user", "<image>\n" + question)])
    return generate(model, processor, prompt, images=[PICTURE], max_tokens=8)


def tower_calls(model, monkeypatch) -> list[int]:
    """The number of tiles of each call of the vision tower from now on."""
    encoded: list[int] = []
    features = model.get_image_features

    def spy(pixel_values, *args, **kwargs):
        encoded.append(pixel_values.shape[0])
        return features(pixel_values, *args, **kwargs)

    monkeypatch.setattr(model, "get_image_features", spy)
    return encoded


def ask(server, question: str, picture: Optional[Path] = PICTURE) -> dict:
    pictures = [] if picture is None else [data_url(picture)]
    body = {"messages": [user(question, *pictures)], "max_tokens": 8}
    response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("prefill_batch", [1, 8])
def test_concurrent_questions_about_one_new_picture_encode_it_once(
    tiny, monkeypatch, prefill_batch
):
    model, processor = tiny
    expected = [alone(model, processor, q) for q in QUESTIONS]
    encoded = tower_calls(model, monkeypatch)
    image_tokens = model.config.num_image_tokens
    settings = dict(model_id="tiny", max_prefill=prefill_batch)
    with serving(tiny, **settings) as server, WorkerGate(server.worker) as gate:
        # All four wait in the queue before the worker takes any (held by a first answer,
        # about another picture).
        gate.hold("step")
        with ThreadPoolExecutor(len(QUESTIONS) + 1) as pool:
            first = pool.submit(ask, server, "Hello", DATA / "images" / "b.png")
            gate.wait_held()
            answers = [pool.submit(ask, server, q) for q in QUESTIONS]
            gate.wait(lambda: gate.submitted == len(QUESTIONS) + 1)
            gate.release()
            answers = [a.result() for a in answers]
            first.result()
    assert encoded == [1, 1]  # the first answer's picture, then this one once
    assert [a["choices"][0]["message"]["content"] for a in answers] == expected
    cached = sorted(a["usage"]["prompt_tokens_details"]["cached_tokens"] for a in answers)
    assert cached[0] < image_tokens and all(c > image_tokens for c in cached[1:])


def test_requests_joining_at_one_step_encode_their_pictures_in_one_tower_call(tiny, monkeypatch):
    """Three requests about three new pictures, taken at one step: one batched tower call for
    the three, and each answer is the one it gets alone."""
    model, processor = tiny
    pictures = [DATA / "images" / f"{name}.png" for name in ("a", "b")] + [EXAMPLE]
    expected = []
    for picture in pictures:
        prompt = render(session_template(processor), [("user", "<image>\nWhat is this?")])
        expected.append(generate(model, processor, prompt, images=[picture], max_tokens=8))
    encoded = tower_calls(model, monkeypatch)
    with serving(tiny, model_id="tiny", max_prefill=4) as server, WorkerGate(server.worker) as gate:
        gate.hold("step")
        with ThreadPoolExecutor(len(pictures) + 1) as pool:
            first = pool.submit(ask, server, "Hello", None)
            gate.wait_held()
            answers = [pool.submit(ask, server, "What is this?", p) for p in pictures]
            gate.wait(lambda: gate.submitted == len(pictures) + 1)
            gate.release()
            answers = [a.result() for a in answers]
            first.result()
    assert encoded == [len(pictures)]
    assert [a["choices"][0]["message"]["content"] for a in answers] == expected
