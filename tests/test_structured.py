"""Structured output: answers constrained by llguidance to a JSON object or to a JSON schema,
through the one decoding core (`generate`, `stream_generate`, `ChatSession`, `batch_generate`,
captioning, the CLI) and the live server (OpenAI `response_format`, Ollama `format`).

Every answer parses and validates against its schema unless `max_tokens` cut it ("length"), and
each schema also gets complete answers, so that the check is never vacuous. Free rows that share
a batch with constrained ones decode exactly as they would alone. Runs on the committed tiny
llava-hf checkpoint (float32).
"""

from __future__ import annotations

import json
import re
import sys
import threading
from pathlib import Path

import httpx
import pytest

pytest.importorskip("llguidance")

from llava_testing.cli import run_main  # noqa: E402
from llava_testing.serving import WorkerGate, serving, user  # noqa: E402
from mlx_llava import (  # noqa: E402
    ChatSession,
    batch_generate,
    generate,
    load,
    stream_generate,
    structured,
)
from mlx_llava.cli import caption as caption_cli  # noqa: E402
from mlx_llava.cli import generate as generate_cli  # noqa: E402
from mlx_llava.decoding import BatchEngine, make_row  # noqa: E402
from mlx_llava.prompt import encode_prompt, prompt_embeddings  # noqa: E402
from mlx_llava.sampling import ResponseFormat, SamplingError, SamplingParams  # noqa: E402

DATA = Path(__file__).parent / "fixtures" / "data"
PICTURE = DATA / "images" / "a.png"
QUESTIONS = ["What is this?", "Describe it.", "Hello!", "A JSON please", "Count them", "Why?"]

SCHEMAS = {
    "enums and bounds": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "count": {"type": "integer", "minimum": 2, "maximum": 7},
            "score": {"type": "number", "minimum": -1.5, "maximum": 1},
        },
        "required": ["color", "count", "score"],
        "additionalProperties": False,
    },
    "arrays": {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 2,
                     "maxItems": 3},
            "ns": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
                   "maxItems": 2},
        },
        "required": ["tags", "ns"],
        "additionalProperties": False,
    },
    "nested with a pattern": {
        "type": "object",
        "properties": {
            "box": {
                "type": "object",
                "properties": {
                    "id": {"type": "string", "pattern": "^[a-z]{2,4}$"},
                    "ok": {"type": "boolean"},
                },
                "required": ["id", "ok"],
                "additionalProperties": False,
            }
        },
        "required": ["box"],
        "additionalProperties": False,
    },
}  # fmt: skip
ANY_OBJECT = {"type": "object"}  # what json_object asks for
BAD_SCHEMAS = [
    ({"type": "objectx"}, "Invalid type: objectx"),
    ({"type": "string", "pattern": "(unclosed"}, "unclosed group"),
    ({"type": "array", "minItems": 5, "maxItems": 2}, "minItems (5) is greater than maxItems"),
    ({"$ref": "#/definitions/nope"}, "does not exist"),
]
TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def violations(schema: dict, value, path: str = "$") -> list[str]:
    """What of `value` breaks `schema` (the keywords these tests use), by hand: jsonschema is
    not a dependency."""
    out = []
    if "enum" in schema and not any(value == v and type(value) is type(v) for v in schema["enum"]):
        out.append(f"{path}: {value!r} not in {schema['enum']}")
    kind = schema.get("type")
    if kind == "integer":
        fits = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "number":
        fits = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        fits = kind is None or isinstance(value, TYPES[kind])
    if not fits:
        return out + [f"{path}: {value!r} is not of type {kind}"]
    if kind in ("integer", "number"):
        if value < schema.get("minimum", -float("inf")):
            out.append(f"{path}: {value} < minimum")
        if value > schema.get("maximum", float("inf")):
            out.append(f"{path}: {value} > maximum")
    if kind == "string" and "pattern" in schema and not re.search(schema["pattern"], value):
        out.append(f"{path}: {value!r} does not match {schema['pattern']}")
    if kind == "array":
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)):
            out.append(f"{path}: {len(value)} items")
        for i, item in enumerate(value):
            out += violations(schema.get("items", {}), item, f"{path}[{i}]")
    if kind == "object":
        out += [f"{path}: {k} missing" for k in schema.get("required", []) if k not in value]
        properties = schema.get("properties", {})
        for key, item in value.items():
            if key in properties:
                out += violations(properties[key], item, f"{path}.{key}")
            elif schema.get("additionalProperties") is False:
                out.append(f"{path}: {key} is not allowed")
    return out


def check_answers(schema: dict, answers: list[tuple[str, str]]) -> int:
    """(text, finish_reason) pairs: each complete one parses and validates; the count of
    complete ones."""
    complete = 0
    for text, reason in answers:
        if reason == "length":
            continue
        assert reason == "stop", (text, reason)
        value = json.loads(text)
        assert violations(schema, value) == [], text
        complete += 1
    return complete


@pytest.fixture(scope="module")
def tiny():
    return load(DATA / "hf-hub", dtype="float32")


# SamplingParams: the one place a response format is checked ---------------------------------


@pytest.mark.parametrize("schema, reason", BAD_SCHEMAS)
def test_a_schema_llguidance_cannot_take_is_refused_with_its_reason(schema, reason):
    with pytest.raises(SamplingError) as e:
        SamplingParams(response_format=ResponseFormat.json_schema(schema))
    assert e.value.field == "response_format"
    assert reason in e.value.reason and "llguidance" in e.value.reason


def test_response_formats_are_checked_and_travel_as_json():
    with pytest.raises(SamplingError, match="json_object or json_schema"):
        SamplingParams(response_format=ResponseFormat("regex"))
    with pytest.raises(SamplingError, match="not JSON"):
        ResponseFormat.json_schema("{not json")
    params = SamplingParams(response_format=ResponseFormat.json_schema(SCHEMAS["arrays"]))
    assert json.loads(params.response_format.schema) == SCHEMAS["arrays"]
    again = SamplingParams.from_json(json.loads(json.dumps(params.to_json())))
    assert again == params and hash(again) == hash(params)  # a pipeline's ranks get the same
    as_dict = SamplingParams(response_format={"kind": "json_object"})
    assert as_dict.response_format == ResponseFormat.json_object()


def test_without_llguidance_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import llguidance: ImportError
    structured.grammar.cache_clear()
    try:
        with pytest.raises(SamplingError, match=re.escape("pip install 'mlx-llava[structured]'")):
            SamplingParams(response_format=ResponseFormat.json_object())
    finally:
        structured.grammar.cache_clear()


# The decoding core ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_answer_validates(tiny, name):
    """Sampled answers (a batch, one of them about a picture) and greedy ones (generate)."""
    model, processor = tiny
    schema = SCHEMAS[name]
    prompts = [processor.format_prompt(q, 0) for q in QUESTIONS[1:]]
    prompts.insert(0, processor.format_prompt(QUESTIONS[0], 1))
    images = [PICTURE] + [None] * (len(prompts) - 1)
    results = batch_generate(
        model, processor, prompts, images, max_tokens=48, temperature=1.0, seed=0,
        json_schema=schema, return_results=True,
    )  # fmt: skip
    answers = [(r.text, r.finish_reason) for r in results]
    for prompt in prompts[1:3]:
        responses = list(
            stream_generate(model, processor, prompt, max_tokens=48, json_schema=schema)
        )
        text = "".join(r.text for r in responses)
        assert text == generate(model, processor, prompt, max_tokens=48, json_schema=schema)
        answers.append((text, responses[-1].finish_reason))
    assert check_answers(schema, answers) >= len(answers) // 2


def test_json_object_answers_are_objects(tiny):
    model, processor = tiny
    prompts = [processor.format_prompt(q, 0) for q in QUESTIONS]
    results = batch_generate(
        model, processor, prompts, max_tokens=32, temperature=1.0, seed=0,
        response_format=ResponseFormat.json_object(), return_results=True,
    )  # fmt: skip
    assert all(r.text.startswith("{") for r in results)
    assert check_answers(ANY_OBJECT, [(r.text, r.finish_reason) for r in results]) >= 1


def test_a_cut_answer_says_length(tiny):
    model, processor = tiny
    prompt = processor.format_prompt(QUESTIONS[0], 0)
    responses = list(
        stream_generate(model, processor, prompt, max_tokens=5, json_schema=SCHEMAS["arrays"])
    )
    assert responses[-1].finish_reason == "length" and len(responses) == 5


def _row(model, processor, question, params, picture=None):
    prompt = processor.format_prompt(question, 1 if picture else 0)
    input_ids, pixel_values, keys, _ = encode_prompt(
        model, processor, prompt, [picture] if picture else []
    )
    row = make_row(model, processor, input_ids[0], params, keys)
    return row, prompt_embeddings(model, input_ids, pixel_values, 0)


def test_a_mixed_batch_leaves_the_free_rows_as_alone(tiny):
    """Free and constrained rows share the batch (some joining later): each row's tokens are
    what `stream_generate` gives it alone, greedy."""
    model, processor = tiny
    free = SamplingParams(max_tokens=24)
    arrays = free.replace(response_format=ResponseFormat.json_schema(SCHEMAS["arrays"]))
    nested = ResponseFormat.json_schema(SCHEMAS["nested with a pattern"])
    cases = [
        (QUESTIONS[0], free, PICTURE),
        (QUESTIONS[1], arrays, None),
        (QUESTIONS[2], free, None),
        (QUESTIONS[3], free.replace(response_format=ResponseFormat.json_object()), None),
        (QUESTIONS[4], free.replace(response_format=nested), PICTURE),
        (QUESTIONS[5], free.replace(max_tokens=12), None),
    ]
    alone = []
    for question, params, picture in cases:
        prompt = processor.format_prompt(question, 1 if picture else 0)
        images = [picture] if picture else []
        responses = stream_generate(model, processor, prompt, images=images, sampling=params)
        alone.append([r.token for r in responses])
    engine = BatchEngine(model)
    rows = [_row(model, processor, *case) for case in cases]
    joins = {0: 0, 1: 0, 2: 0, 3: 2, 4: 3, 5: 3}  # row -> the step it joins at
    step = 0
    while step < 100 and (engine or step <= max(joins.values())):
        for i, at in joins.items():
            if at == step:
                engine.add(*rows[i])
        if engine:
            engine.step()
        step += 1
    assert [row.tokens for row, _ in rows] == alone
    constrained = [row for (row, _), (_, p, _) in zip(rows, cases) if p.response_format]
    assert all(row.constraint is not None for row in constrained)


def test_chat_and_captions(tiny, tmp_path, capsys):
    model, processor = tiny
    schema = SCHEMAS["enums and bounds"]
    chat = ChatSession(model, processor, image=PICTURE)
    answers = []
    for question in QUESTIONS[:2]:
        responses = list(chat.stream(question, max_tokens=40, json_schema=schema))
        answers.append(("".join(r.text for r in responses), responses[-1].finish_reason))
    assert check_answers(schema, answers) == 2
    assert chat.messages[-1][1] == answers[-1][0]

    folder = tmp_path / "pictures"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        (folder / name).write_bytes((DATA / "images" / name).read_bytes())
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMAS["nested with a pattern"]))
    out = tmp_path / "captions.jsonl"
    argv = ["--model", str(DATA / "hf-hub"), "--dtype", "float32", "--image-dir", str(folder)]
    argv += ["-o", str(out), "--json-schema", str(schema_file), "-m", "40", "--quiet"]
    code, _, err = run_main(caption_cli.main, argv, capsys)
    assert code == 0, err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["file"] for r in records] == ["a.png", "b.png"]
    for record in records:  # each answer is the JSON object itself
        assert violations(SCHEMAS["nested with a pattern"], record["answer"]) == []


def test_generate_cli(tiny, tmp_path, capsys):
    model, processor = tiny
    schema = SCHEMAS["arrays"]
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(schema))
    base = ["--model", str(DATA / "hf-hub"), "--dtype", "float32", "-p", QUESTIONS[2], "-m", "40"]
    code, out, err = run_main(generate_cli.main, base + ["--json-schema", str(schema_file)], capsys)
    assert code == 0, err
    prompt = processor.format_prompt(QUESTIONS[2], 0)
    assert out.strip() == generate(model, processor, prompt, max_tokens=40, json_schema=schema)
    assert violations(schema, json.loads(out)) == []
    code, out, err = run_main(generate_cli.main, base + ["--json"], capsys)
    assert code == 0 and out.startswith("{"), err

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"type": "objectx"}))
    not_json = tmp_path / "not.json"
    not_json.write_text("{type: object")
    for path, fragment in [
        (bad, "--json-schema is not a schema llguidance can take: Invalid type: objectx"),
        (not_json, "is not JSON"),
        (tmp_path / "missing.json", "--json-schema cannot read"),
    ]:
        code, out, err = run_main(generate_cli.main, base + ["--json-schema", str(path)], capsys)
        assert code != 0 and fragment in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


# The live server --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny):
    with serving(tiny) as live:
        yield live


def openai_format(schema):
    if schema is None:
        return {"type": "json_object"}
    return {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": schema, "strict": True},
    }


def test_openai_response_format(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    for schema in [*SCHEMAS.values(), None]:
        answers = []
        for question in QUESTIONS[1:3]:
            response = client.chat.completions.create(
                model="test-model", messages=[user(question)], max_tokens=40,
                temperature=1.0, seed=1, response_format=openai_format(schema),
            )  # fmt: skip
            choice = response.choices[0]
            answers.append((choice.message.content, choice.finish_reason))
        assert check_answers(schema or ANY_OBJECT, answers) >= 1

        stream = client.chat.completions.create(
            model="test-model", messages=[user(QUESTIONS[0])], max_tokens=40,
            response_format=openai_format(schema), stream=True,
        )  # fmt: skip
        chunks = [c for c in stream if c.choices]
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        greedy = client.chat.completions.create(
            model="test-model", messages=[user(QUESTIONS[0])], max_tokens=40,
            response_format=openai_format(schema),
        )  # fmt: skip
        assert text == greedy.choices[0].message.content
        check_answers(schema or ANY_OBJECT, [(text, chunks[-1].choices[0].finish_reason)])


def test_ollama_format(server):
    schema = SCHEMAS["enums and bounds"]
    answers = []
    for route, question in [("/api/chat", QUESTIONS[0]), ("/api/generate", QUESTIONS[1])]:
        body = {"format": schema, "options": {"num_predict": 60}, "stream": False}
        if route == "/api/chat":
            body["messages"] = [{"role": "user", "content": question}]
        else:
            body["prompt"] = question
        whole = httpx.post(server.url + route, json=body, timeout=60).json()
        text = whole["message"]["content"] if route == "/api/chat" else whole["response"]
        answers.append((text, whole["done_reason"]))
        with httpx.stream("POST", server.url + route, json={**body, "stream": True}) as r:
            lines = [json.loads(line) for line in r.iter_lines() if line]
        pieces = [ln["message"]["content"] if "message" in ln else ln["response"] for ln in lines]
        assert "".join(pieces) == text
    body = {"prompt": QUESTIONS[2], "format": "json", "stream": False}
    body["options"] = {"num_predict": 32, "temperature": 1.0, "seed": 2}
    whole = httpx.post(server.url + "/api/generate", json=body, timeout=60).json()
    assert whole["response"].startswith("{")
    answers_object = [(whole["response"], whole["done_reason"])]
    assert check_answers(schema, answers) >= 1
    check_answers(ANY_OBJECT, answers_object)


def test_a_mixed_batch_through_the_server(server):
    """Free and constrained requests decoded together: the free ones answer as alone."""
    url = server.url + "/v1/chat/completions"

    def ask(question, schema=None):
        body = {"messages": [user(question)], "max_tokens": 40}
        if schema is not None:
            body["response_format"] = openai_format(schema)
        choice = httpx.post(url, json=body, timeout=60).json()["choices"][0]
        return choice["message"]["content"], choice["finish_reason"]

    free_alone = [ask(QUESTIONS[0]), ask(QUESTIONS[1])]
    asks = [(QUESTIONS[0], None), (QUESTIONS[2], SCHEMAS["arrays"]), (QUESTIONS[1], None)]
    asks.append((QUESTIONS[3], SCHEMAS["nested with a pattern"]))
    answers = [None] * len(asks)
    with WorkerGate(server.worker) as gate:
        gate.hold("step")  # the first request waits after its first step for the others

        def send(i):
            answers[i] = ask(*asks[i])

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(asks))]
        for t in threads:
            t.start()
        gate.wait_held()
        gate.wait(lambda: gate.submitted == len(asks))
        gate.release()
        for t in threads:
            t.join(60)
        assert max(rows for rows, _ in gate.steps) > 2  # they did share the batch
    assert [answers[0], answers[2]] == free_alone
    assert (
        check_answers(SCHEMAS["arrays"], [answers[1]])
        + check_answers(SCHEMAS["nested with a pattern"], [answers[3]])
        >= 1
    )


def test_bad_formats_are_400s_with_the_reason(server, monkeypatch):
    url = server.url + "/v1/chat/completions"
    messages = [user("hi")]
    for schema, reason in BAD_SCHEMAS:
        r = httpx.post(url, json={"messages": messages, "response_format": openai_format(schema)})
        assert r.status_code == 400 and reason in r.json()["error"]["message"], r.text
        assert r.json()["error"]["param"] == "response_format"
        ollama = {"messages": [{"role": "user", "content": "hi"}], "format": schema}
        r = httpx.post(server.url + "/api/chat", json=ollama)
        assert r.status_code == 400 and reason in r.json()["error"], r.text
    for response_format, param in [
        ({"type": "grammar"}, "response_format.type"),
        ({"type": "json_schema"}, "response_format.json_schema.schema"),
        (
            {"type": "json_schema", "json_schema": {"name": "x"}},
            "response_format.json_schema.schema",
        ),
    ]:
        r = httpx.post(url, json={"messages": messages, "response_format": response_format})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = httpx.post(server.url + "/api/generate", json={"prompt": "hi", "format": "yaml"})
    assert r.status_code == 400 and "format" in r.json()["error"]
    text = {"messages": messages, "response_format": {"type": "text"}, "max_tokens": 4}
    r = httpx.post(url, json=text)
    assert r.status_code == 200  # "text" is free text

    monkeypatch.setitem(sys.modules, "llguidance", None)
    structured.grammar.cache_clear()
    try:
        r = httpx.post(url, json={"messages": messages, "response_format": openai_format(None)})
    finally:
        structured.grammar.cache_clear()
    assert r.status_code == 400 and "pip install 'mlx-llava[structured]'" in r.text
