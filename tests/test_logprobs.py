"""Log-probabilities: each answer token's log-probability and its top alternatives, equal to the
model's own log-softmax at that position (checked against one forward pass over the prompt and
the answer), through the decoding core (solo and batched, next to rows that did not ask and
rows under a grammar) and the live server (OpenAI's `logprobs` / `top_logprobs`, streamed and
not, and Ollama's). Runs on the committed tiny llava-hf checkpoint (float32).
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import mlx.core as mx
import pytest

from llava_testing.serving import serving, user
from mlx_llava import load, stream_generate
from mlx_llava.decoding import BatchEngine, make_row
from mlx_llava.prompt import encode_prompt, prompt_embeddings
from mlx_llava.sampling import ResponseFormat, SamplingError, SamplingParams
from mlx_llava.server.messages import Message, render_conversation
from mlx_llava.structured import token_bytes

DATA = Path(__file__).parent / "fixtures" / "data"
PICTURE = DATA / "images" / "a.png"
TOLERANCE = 1e-4
SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["n"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tiny():
    return load(DATA / "hf-hub", dtype="float32")


def forward_logprobs(model, processor, prompt: str, images: list, tokens: list[int]) -> mx.array:
    """The model's log-softmax [n, V] at the positions that chose `tokens` (n of them): one
    forward pass over the prompt and the tokens but the last."""
    input_ids, pixel_values, _, sizes = encode_prompt(model, processor, prompt, images)
    length = input_ids.shape[1]
    ids = mx.concatenate([input_ids, mx.array([tokens[:-1]], dtype=input_ids.dtype)], axis=1)
    logits = model(ids, pixel_values, image_sizes=sizes)[0, length - 1 :].astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def check(entries, expected: mx.array, tokens: list[int], k: int) -> None:
    """Each `TokenLogprob` against the forward pass: the token's value and the k best."""
    assert [e.token for e in entries] == tokens
    for j, entry in enumerate(entries):
        row = expected[j]
        assert abs(entry.logprob - row[entry.token].item()) < TOLERANCE
        best = mx.argsort(-row)[:k].tolist()
        assert len(entry.top) == k
        assert [t for t, _ in entry.top] == best
        for token, value in entry.top:
            assert abs(value - row[token].item()) < TOLERANCE


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0, "top_p": 0.9, "seed": 3}])
def test_stream_generate_against_a_forward_pass(tiny, sampling):
    model, processor = tiny
    prompt = processor.format_prompt("What is in the picture?", 1)
    responses = list(
        stream_generate(
            model, processor, prompt, images=[PICTURE], max_tokens=12, logprobs=5, **sampling
        )
    )
    entries = [r.logprobs for r in responses if r.logprobs is not None]
    tokens = [r.token for r in responses if r.token not in processor.tokenizer.eos_token_ids]
    assert len(entries) == len(tokens) > 4
    check(entries, forward_logprobs(model, processor, prompt, [PICTURE], tokens), tokens, 5)


def test_only_the_rows_that_ask_get_them_in_a_batch(tiny):
    """Rows of a batch with 0, 3 and no alternatives, one under a grammar (its values are the
    model's distribution, not the masked one), one joining later: each against its own pass."""
    model, processor = tiny
    cases = [
        ("Describe it.", [PICTURE], SamplingParams(max_tokens=10, logprobs=3)),
        ("Hello!", [], SamplingParams(max_tokens=14)),
        ("A number?", [], SamplingParams(max_tokens=16, logprobs=0, temperature=1.0, seed=1)),
        (
            "JSON please",
            [],
            SamplingParams(
                max_tokens=12, logprobs=2, response_format=ResponseFormat.json_schema(SCHEMA)
            ),
        ),
    ]
    engine = BatchEngine(model)
    rows = []
    for i, (question, images, params) in enumerate(cases):
        prompt = processor.format_prompt(question, len(images))
        input_ids, pixel_values, keys, _ = encode_prompt(model, processor, prompt, images)
        row = make_row(model, processor, input_ids[0], params, keys)
        rows.append((row, prompt, images, params))
        engine.add(row, prompt_embeddings(model, input_ids, pixel_values, 0))
        if i == 2:
            engine.step()  # the last rows join a running batch
    while engine:
        engine.step()
    for row, prompt, images, params in rows:
        tokens = [t for t in row.tokens if t not in row.eos]
        if params.logprobs is None:
            assert row.logprobs == []
            continue
        expected = forward_logprobs(model, processor, prompt, images, tokens)
        check(row.logprobs, expected, tokens, params.logprobs)


def test_token_bytes_spell_the_text(tiny):
    """A token's bytes: SentencePiece's "▁" as a space, `<0xNN>` pieces as their byte."""
    tokenizer = tiny[1].tokenizer
    text = "Hello world, ünïcode ✓ 12"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert any(p.startswith("<0x") for p in tokenizer.convert_ids_to_tokens(ids))
    assert b"".join(token_bytes(tokenizer, i) for i in ids) == (" " + text).encode()


def test_logprobs_are_checked():
    for value in (-1, 21, 2.5, True):
        with pytest.raises(SamplingError) as e:
            SamplingParams(logprobs=value)
        assert e.value.field == "logprobs"
    assert SamplingParams(logprobs=20).logprobs == 20


# The live server --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny):
    with serving(tiny) as live:
        yield live


def library_answer(model, processor, question: str, k: int):
    """(text, `TokenLogprob`s) of `stream_generate` for the prompt the server renders."""
    prompt, _ = render_conversation(processor, [Message("user", question)])
    responses = list(stream_generate(model, processor, prompt, max_tokens=12, logprobs=k))
    entries = [r.logprobs for r in responses if r.logprobs is not None]
    return "".join(r.text for r in responses), entries


def same(served: list[dict], entries, processor) -> None:
    """OpenAI's / Ollama's objects equal the library's entries: values, text and bytes."""
    assert len(served) == len(entries)
    for item, entry in zip(served, entries):
        data = token_bytes(processor.tokenizer, entry.token)
        assert item["bytes"] == list(data)
        assert item["token"] == data.decode("utf-8", errors="replace")
        assert abs(item["logprob"] - entry.logprob) < TOLERANCE
        assert len(item["top_logprobs"]) == len(entry.top)
        for alternative, (token, value) in zip(item["top_logprobs"], entry.top):
            assert alternative["bytes"] == list(token_bytes(processor.tokenizer, token))
            assert abs(alternative["logprob"] - value) < TOLERANCE


def test_openai_logprobs(server, tiny):
    model, processor = tiny
    text, entries = library_answer(model, processor, "What is this?", 4)
    url = server.url + "/v1/chat/completions"
    body = {"messages": [user("What is this?")], "max_tokens": 12, "logprobs": True}
    body["top_logprobs"] = 4
    choice = httpx.post(url, json=body, timeout=60).json()["choices"][0]
    assert choice["message"]["content"] == text
    same(choice["logprobs"]["content"], entries, processor)
    # The tokens' bytes spell the answer (whose first token's leading space the detokenizer drops).
    spelled = b"".join(bytes(item["bytes"]) for item in choice["logprobs"]["content"])
    assert spelled.decode("utf-8", errors="replace").strip() == text.strip()

    streaming = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url, json=streaming, timeout=60) as r:
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: {")]
    assert json.loads(lines[-1])["usage"]["completion_tokens"] >= len(entries)
    chunks = [json.loads(line)["choices"] for line in lines]
    streamed = [
        item for c in chunks if c and c[0]["logprobs"] for item in c[0]["logprobs"]["content"]
    ]
    same(streamed, entries, processor)
    assert "".join(c[0]["delta"].get("content", "") for c in chunks if c) == text

    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    response = client.chat.completions.create(
        model="test-model", messages=[user("What is this?")], max_tokens=12, logprobs=True
    )
    content = response.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx([e.logprob for e in entries], abs=1e-4)
    assert all(c.top_logprobs == [] for c in content)

    plain = httpx.post(url, json={"messages": [user("hi")], "max_tokens": 3}).json()
    assert plain["choices"][0]["logprobs"] is None  # none asked, none paid for


def test_ollama_logprobs(server, tiny):
    model, processor = tiny
    text, entries = library_answer(model, processor, "What is this?", 2)
    body = {"messages": [{"role": "user", "content": "What is this?"}], "stream": False}
    body.update(logprobs=True, top_logprobs=2, options={"num_predict": 12})
    whole = httpx.post(server.url + "/api/chat", json=body, timeout=60).json()
    assert whole["message"]["content"] == text
    same(whole["logprobs"], entries, processor)
    with httpx.stream("POST", server.url + "/api/chat", json={**body, "stream": True}) as r:
        lines = [json.loads(line) for line in r.iter_lines() if line]
    same([item for line in lines for item in line.get("logprobs", [])], entries, processor)


def test_bad_logprobs_are_400s(server):
    url = server.url + "/v1/chat/completions"
    messages = [user("hi")]
    for body, fragment in [
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs must be in [0, 20]"),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs must be in [0, 20]"),
        ({"top_logprobs": 3}, "top_logprobs needs logprobs: true"),
        ({"logprobs": False, "top_logprobs": 3}, "top_logprobs needs logprobs: true"),
    ]:
        r = httpx.post(url, json={"messages": messages, **body})
        assert r.status_code == 400, r.text
        assert fragment in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "top_logprobs"
    ollama = {"prompt": "hi", "logprobs": True, "top_logprobs": 21}
    r = httpx.post(server.url + "/api/generate", json=ollama)
    assert r.status_code == 400 and "top_logprobs must be in [0, 20]" in r.json()["error"]
