"""One decoding core: the same prompt gives the same tokens fresh, from a prompt-cache hit, in
a batch, as a chat turn and over HTTP, with a repetition penalty too (the logits processors
see the whole prompt, its cached part included).

A strong penalty over a long context makes the prompt's own tokens matter: a path that showed
the processors only the uncached tail of a cached prompt would answer differently.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from llava_testing.serving import data_url, serving, user
from mlx_llava import ChatSession, PromptCache, batch_generate, generate, load, stream_generate
from mlx_llava.chat import session_template
from mlx_llava.conversation import render
from mlx_llava.sampling import SamplingParams

DATA = Path(__file__).parent / "fixtures" / "data"
PICTURE = DATA / "images" / "a.png"
# A question whose penalized answer depends on the prompt's early tokens (seen changing when
# the processors were shown the uncached tail only).
QUESTION = "Tell me a story about the picture, please."
PENALTY = dict(repetition_penalty=3.0, repetition_context_size=256, max_tokens=24)


@pytest.fixture(scope="module")
def tiny():
    return load(DATA / "hf-hub", dtype="float32")


def tokens(model, processor, prompt, **kwargs) -> list[int]:
    responses = stream_generate(model, processor, prompt, images=[PICTURE], **kwargs)
    return [r.token for r in responses]


def test_the_penalty_sees_the_prompt(tiny):
    """The premise: with the penalty the answer differs from the greedy one."""
    model, processor = tiny
    prompt = processor.format_prompt(QUESTION)
    greedy = tokens(model, processor, prompt, max_tokens=24)
    assert tokens(model, processor, prompt, **PENALTY) != greedy


def test_a_prompt_cache_hit_answers_as_a_fresh_run(tiny):
    model, processor = tiny
    prompt = processor.format_prompt(QUESTION)
    fresh = tokens(model, processor, prompt, **PENALTY)
    cache = PromptCache(model)
    assert tokens(model, processor, prompt, prompt_cache=cache, **PENALTY) == fresh
    # Now all but the last prompt position come from the cache.
    assert tokens(model, processor, prompt, prompt_cache=cache, **PENALTY) == fresh


def test_a_chat_turn_and_a_batch_answer_as_fresh_runs(tiny):
    model, processor = tiny
    chat = ChatSession(model, processor, image=PICTURE)
    first = chat.send("What is in the picture?", **PENALTY)
    second = chat.send("Tell me more about it.", **PENALTY)  # a cache hit: the first turn
    messages = [("user", "<image>\nWhat is in the picture?"), ("assistant", first)]
    prompt = render(chat.template, messages + [("user", "Tell me more about it.")])
    assert generate(model, processor, prompt, images=[PICTURE], **PENALTY) == second
    batched = batch_generate(model, processor, [prompt], images=[[PICTURE]], **PENALTY)
    assert batched == [second]


def test_http_answers_from_the_server_cache_as_fresh_runs(tiny):
    model, processor = tiny
    prompt = render(session_template(processor), [("user", "<image>\n" + QUESTION)])
    fresh = generate(model, processor, prompt, images=[PICTURE], **PENALTY)
    body = {
        "messages": [user(QUESTION, data_url(PICTURE))],
        "repetition_penalty": PENALTY["repetition_penalty"],
        "max_tokens": PENALTY["max_tokens"],
    }
    defaults = SamplingParams(repetition_context_size=PENALTY["repetition_context_size"])
    with serving(tiny, model_id="tiny", defaults=defaults) as s:
        answers = []
        for _ in range(2):  # the second is a prompt-cache hit
            response = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=60)
            assert response.status_code == 200, response.text
            answers.append(response.json())
    assert answers[1]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert [a["choices"][0]["message"]["content"] for a in answers] == [fresh, fresh]
