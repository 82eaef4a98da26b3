"""The decoding core's engine (`mlx_llava.decoding.BatchEngine`) that `stream_generate`,
`batch_generate` and the server share: rows that join a running batch, leave it early, or start
from a cached prefix generate exactly what `stream_generate` generates for them alone (greedy,
float32).

Runs on the committed tiny llava-hf checkpoint (no torch needed).
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.models.cache import trim_prompt_cache

from mlx_llava import load, stream_generate
from mlx_llava.decoding import BatchEngine, make_row
from mlx_llava.prompt import encode_prompt, image_runs, prompt_embeddings
from mlx_llava.sampling import SamplingParams

DATA = Path(__file__).parent / "fixtures" / "data"
PICTURES = [DATA / "images" / "a.png", DATA / "images" / "b.png"]
QUESTIONS = ["What is this?", "Describe the two pictures in many words.", "Hello there!"]


@pytest.fixture(scope="module")
def tiny():
    return load(DATA / "hf-hub", dtype="float32")


def alone(model, processor, prompt, images, max_tokens):
    responses = stream_generate(model, processor, prompt, images=images, max_tokens=max_tokens)
    return [r.token for r in responses]


def row_for(model, processor, prompt, images, max_tokens, cache=None, start=0, **sampling):
    input_ids, pixel_values, keys, _ = encode_prompt(model, processor, prompt, images)
    params = SamplingParams(max_tokens=max_tokens, **sampling)
    row = make_row(model, processor, input_ids[0], params, keys)
    return row, prompt_embeddings(model, input_ids, pixel_values, start), cache


@pytest.fixture(scope="module")
def cases(tiny):
    model, processor = tiny
    images = [[PICTURES[0]], PICTURES, []]
    prompts = [processor.format_prompt(q, len(i)) for q, i in zip(QUESTIONS, images)]
    max_tokens = [12, 20, 16]
    expected = [alone(model, processor, *c) for c in zip(prompts, images, max_tokens)]
    assert len({len(e) for e in expected}) > 1  # rows leave at different steps
    return list(zip(prompts, images, max_tokens)), expected


def run(engine, joins: dict, rows: list) -> None:
    """Step the engine until it is empty, adding rows[i] after joins[i] steps."""
    step = 0
    while step < 200 and (engine or any(s >= step for s in joins.values())):
        for i, at in joins.items():
            if at == step:
                engine.add(*rows[i])
        if engine:
            engine.step()
        step += 1
    assert not engine


def test_rows_joining_a_running_batch_generate_what_they_would_alone(tiny, cases):
    model, processor = tiny
    inputs, expected = cases
    rows = [row_for(model, processor, *c) for c in inputs]
    engine = BatchEngine(model)
    run(engine, {0: 0, 1: 3, 2: 5}, rows)
    assert [r[0].tokens for r in rows] == expected
    assert all(r[0].finish_reason in ("stop", "length") for r in rows)
    texts = [processor.tokenizer.decode(e) for e in expected]
    assert [r[0].text for r in rows] != [""] * 3 and len(texts) == 3


def test_all_rows_joining_at_once_and_removing_one(tiny, cases):
    model, processor = tiny
    inputs, expected = cases
    rows = [row_for(model, processor, *c) for c in inputs]
    engine = BatchEngine(model)
    for r in rows:
        engine.add(*r)
    for _ in range(4):
        engine.step()
    engine.remove(rows[1][0])  # a client went away: the others go on unchanged
    while engine:
        engine.step()
    assert rows[0][0].tokens == expected[0]
    assert rows[2][0].tokens == expected[2]
    assert rows[1][0].tokens == expected[1][: len(rows[1][0].tokens)]
    assert len(rows[1][0].tokens) < len(expected[1])


def test_kept_cache_continues_a_longer_prompt(tiny, cases):
    """A finished row's cache (prompt + answer) serves the next turn: only the new positions
    are computed, and the answer equals a from-scratch one."""
    model, processor = tiny
    (prompt, images, max_tokens), expected = cases[0][0], cases[1][0]
    engine = BatchEngine(model, keep_caches=True)
    row = row_for(model, processor, prompt, images, max_tokens)
    engine.add(*row)
    while engine:
        engine.step()
    first = row[0]
    assert first.tokens == expected
    assert len(first.cache_keys) == first.cache[0].offset
    assert first.cache_keys[: len(first.keys)] == first.keys  # the prompt, then the answer

    follow_up = prompt + processor.decode(first.tokens) + " USER: And now? ASSISTANT:"
    from_scratch = alone(model, processor, follow_up, images, 10)
    _, _, keys, _ = encode_prompt(model, processor, follow_up, images)
    shared = next(i for i, (a, b) in enumerate(zip(first.cache_keys, keys + [None])) if a != b)
    assert shared >= len(first.keys)  # the picture and the whole first prompt are reused
    cache = first.cache
    trim_prompt_cache(cache, cache[0].offset - shared)
    second = row_for(model, processor, follow_up, images, 10, cache=cache, start=shared)
    assert second[1].shape[0] == len(keys) - shared
    other = row_for(model, processor, *cases[0][2])  # joins with no cache at the same step
    engine.add(*second)
    engine.add(*other)
    while engine:
        engine.step()
    assert second[0].tokens == from_scratch
    assert other[0].tokens == cases[1][2]


def test_rows_with_their_own_sampling(tiny, cases):
    """A row with a repetition penalty next to greedy rows: each as it would be alone."""
    model, processor = tiny
    inputs, expected = cases
    prompt, images, max_tokens = inputs[1]
    penalty = dict(repetition_penalty=1.5, repetition_context_size=6)
    responses = stream_generate(
        model, processor, prompt, images=images, max_tokens=max_tokens, **penalty
    )
    penalized_alone = [r.token for r in responses]
    assert penalized_alone != expected[1]
    rows = [
        row_for(model, processor, *inputs[0]),
        row_for(model, processor, *inputs[1], **penalty),
        row_for(model, processor, *inputs[2]),
    ]
    engine = BatchEngine(model)
    run(engine, {0: 0, 1: 2, 2: 2}, rows)
    assert [r[0].tokens for r in rows] == [expected[0], penalized_alone, expected[2]]


def test_prompt_embeddings_encode_only_the_uncached_pictures(tiny, monkeypatch):
    model, processor = tiny
    prompt = processor.format_prompt("Compare them.", 2)
    input_ids, pixel_values, keys, _ = encode_prompt(model, processor, prompt, PICTURES)
    runs = image_runs(input_ids[0].tolist(), model.config.image_token_index)
    assert len(runs) == 2
    assert keys[runs[0][0]][0] != keys[runs[1][0]][0]  # each picture keyed by its own digest
    start = runs[0][1] + 1  # the first picture is cached, the second is not
    expected = model.get_input_embeddings(input_ids, pixel_values)[0, start:]
    encoded = []
    features = model.get_image_features

    def spy(pixels, image_sizes=None, *rest):
        encoded.append(pixels.shape[0])
        return features(pixels, image_sizes, *rest)

    monkeypatch.setattr(model, "get_image_features", spy)
    ours = prompt_embeddings(model, input_ids, pixel_values, start)
    assert encoded == [1]
    assert ours.shape == expected.shape
    assert mx.allclose(ours, expected, atol=1e-5).item()
    assert prompt_embeddings(model, input_ids, pixel_values, runs[1][1]).shape[0] > 0
    assert encoded == [1]  # no picture after the second: none encoded


def test_touching_placeholders_key_their_positions_by_all_pictures(tiny):
    model, processor = tiny
    prompt = processor.format_prompt("<image><image>Compare them.", 2)
    _, _, keys, _ = encode_prompt(model, processor, prompt, PICTURES)
    image_keys = [k for k in keys if isinstance(k, tuple)]
    assert len(image_keys) == 2 * model.config.num_image_tokens
    assert len({k[0] for k in image_keys}) == 1 and len(image_keys[0][0]) == 2
    swapped = encode_prompt(model, processor, prompt, PICTURES[::-1])[2]
    assert swapped != keys


def test_a_joining_row_has_its_first_token_at_the_step_it_joins(tiny, cases):
    """Its time to first token is its own prefill, not also the next step's work (which may be
    another request's prefill)."""
    model, processor = tiny
    inputs, expected = cases
    rows = [row_for(model, processor, *c) for c in inputs]
    engine = BatchEngine(model)
    engine.add(*rows[0])
    assert engine.step() == [rows[0][0]] and rows[0][0].tokens == expected[0][:1]
    assert engine.step() == []  # (its second token is read a step later: decoding is pipelined)
    engine.add(*rows[1])
    engine.add(*rows[2])
    got = engine.step()
    assert {id(r) for r in got} == {id(r[0]) for r in rows}
    assert [r[0].tokens for r in rows] == [expected[0][:2], expected[1][:1], expected[2][:1]]
    while engine:
        engine.step()
    assert [r[0].tokens for r in rows] == expected
