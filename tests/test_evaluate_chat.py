"""Tests for the chat format of evaluation: multi-turn conversations asked as a person chats."""

import json
from pathlib import Path

import pytest

import mlx_llava.evaluation.runner as runner
from mlx_llava.chat import ChatSession
from mlx_llava.cli.evaluate import main as evaluate_main
from mlx_llava.data.shapes import EVAL_CHAT_TURNS, generate_dataset
from mlx_llava.evaluation import (
    SINGLE_WORD_SUFFIX,
    EvaluationError,
    answer_questions,
    format_summary,
    read_questions,
    summarize,
)
from mlx_llava.loader import load

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def conversation(id_, image, *turns):
    """A LLaVA-format record from (question, answer, category) triples."""
    messages = []
    for i, (question, answer, category) in enumerate(turns):
        human = {"from": "human", "value": ("<image>\n" if i == 0 else "") + question}
        if category:
            human["category"] = category
        messages += [human, {"from": "gpt", "value": answer}]
    return {"id": id_, "image": image, "conversations": messages}


@pytest.fixture(scope="module")
def demo():
    return load("demo")


def test_read_chat_conversations(tmp_path):
    path = tmp_path / "chats.json"
    records = [
        conversation("a", "x.png", ("What colour?", "red", "color"), ("How many?", "one", None)),
        conversation("b", None, ("Hi?", "hello", "greeting")),
    ]
    path.write_text(json.dumps(records))
    fmt, questions = read_questions(path)
    assert fmt == "chat"  # a conversation with more than one question
    assert [(q.question_id, q.conversation_id, q.turn) for q in questions] == [
        ("a-1", "a", 1),
        ("a-2", "a", 2),
        ("b-1", "b", 1),
    ]
    assert [q.text for q in questions] == ["What colour?", "How many?", "Hi?"]
    assert [q.answers for q in questions] == [["red"], ["one"], ["hello"]]
    assert [q.category for q in questions] == ["color", None, "greeting"]
    assert [q.image for q in questions] == ["x.png", "x.png", None]
    # one-question conversations are ScienceQA's layout unless the format is given
    path.write_text(json.dumps(records[1:]))
    assert read_questions(path)[0] == "scienceqa"
    assert read_questions(path, "chat")[1][0].text == "Hi?"


@pytest.mark.parametrize(
    "turns, message",
    [
        ([{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}], "alternate"),
        ([{"from": "human", "value": "x"}], "alternate"),
        ([{"from": "human", "value": "x"}, {"from": "gpt", "value": 3}], "turn 1's answer"),
        ([{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}], "should be a string"),
        ("x", "list of turns"),
    ],
)
def test_read_chat_errors(tmp_path, turns, message):
    path = tmp_path / "chats.json"
    path.write_text(json.dumps([{"id": 1, "conversations": turns}]))
    with pytest.raises(EvaluationError, match=message) as info:
        read_questions(path, "chat")
    assert "entry 1" in str(info.value) and "\n" not in str(info.value)


def test_chat_history_holds_the_models_own_answers(demo, tmp_path, monkeypatch):
    """Each turn is asked after the model's own earlier answers, in one session per
    conversation, without the answer instruction unless asked for."""
    model, processor = demo
    path = tmp_path / "chats.json"
    bogus = [("What colour is it?", "purple", "color"), ("What shape?", "star", "shape")]
    bogus.append(("How many shapes?", "one", "count"))
    records = [
        conversation("c1", "red_circle.png", *bogus),
        conversation("c2", "green_triangle.png", *bogus[:2]),
    ]
    path.write_text(json.dumps(records))
    _, questions = read_questions(path)
    seen = []

    class Spy(ChatSession):
        def send(self, text, **sampling):
            seen.append((self, list(self.messages), text, sampling))
            return super().send(text, **sampling)

    monkeypatch.setattr(runner, "ChatSession", Spy)
    results = list(answer_questions(model, processor, questions, "chat", EXAMPLES))
    assert [(r["conversation_id"], r["turn"]) for r in results] == [
        ("c1", 1),
        ("c1", 2),
        ("c1", 3),
        ("c2", 1),
        ("c2", 2),
    ]
    answers = [r["text"] for r in results]
    assert all(answers) and not {"purple", "star"} & set(answers)
    assert len({id(session) for session, *_ in seen}) == 2  # the sessions stay alive in seen
    assert seen[0][1:3] == ([], "What colour is it?")  # the picture goes in front by itself
    assert seen[1][1] == [("user", "<image>\nWhat colour is it?"), ("assistant", answers[0])]
    assert seen[2][1][-2:] == [("user", "What shape?"), ("assistant", answers[1])]
    assert seen[3][1] == []  # a new conversation starts afresh
    assert all(s[3]["temperature"] == 0.0 for s in seen)
    assert results[0]["prompt"] == "<image>\nWhat colour is it?"
    assert results[1]["prompt"] == "What shape?"
    assert [r["correct"] for r in results] == [a == r["answer"] for a, r in zip(answers, results)]

    summary = summarize(results, "chat")
    assert [row["n"] for row in summary["turns"].values()] == [2, 2, 1]
    assert summary["turns"]["3"]["correct"] == summary["categories"]["count"]["correct"]
    table = format_summary(summary)
    assert [line.split()[0] for line in table.splitlines()[1:]] == [
        "color",
        "shape",
        "count",
        "turn",
        "turn",
        "turn",
        "-" * len(table.splitlines()[0]),
        "overall",
    ]

    seen.clear()
    results = list(answer_questions(model, processor, questions[:1], "chat", EXAMPLES, True))
    assert seen[0][2] == f"What colour is it?\n{SINGLE_WORD_SUFFIX}"


def test_chat_that_outgrows_the_context_stops(demo, tmp_path):
    model, processor = demo
    long = "Is it red? " * 200  # far more than the demo's 512 positions
    turns = [("What colour?", "red", "color"), (long, "yes", None), ("How many?", "one", None)]
    path = tmp_path / "chats.json"
    path.write_text(json.dumps([conversation("c", "red_circle.png", *turns)]))
    _, questions = read_questions(path)
    results = list(answer_questions(model, processor, questions, "chat", EXAMPLES))
    assert results[0]["correct"] and "error" not in results[0]
    for r in results[1:]:
        assert "context" in r["error"] and r["correct"] is False and r["text"] == ""
    # a picture that cannot be read: counted as wrong, or skipped
    path.write_text(json.dumps([conversation("c", "gone.png", *turns[:1])]))
    _, questions = read_questions(path, "chat")
    results = list(answer_questions(model, processor, questions, "chat", EXAMPLES))
    assert "not found" in results[0]["error"] and results[0]["correct"] is False
    results = list(
        answer_questions(model, processor, questions, "chat", EXAMPLES, skip_missing=True)
    )
    assert results[0]["skipped"] and results[0]["correct"] is None


def test_cli_chat_on_shapes_world(tmp_path, capsys):
    data = tmp_path / "shapes"
    generate_dataset(data, 3, seed=5, min_size=48, max_size=96)
    output = tmp_path / "answers.jsonl"
    argv = ["--model", "demo", "--data", str(data / "chat_heldout.json"), "--limit", "2"]
    evaluate_main(argv + ["--output", str(output)])
    out = capsys.readouterr().out
    records = [json.loads(line) for line in output.read_text().splitlines()]
    chats = json.loads((data / "chat_heldout.json").read_text())[:2]
    assert len(records) == 2 * EVAL_CHAT_TURNS  # --limit counts conversations
    for record, (chat, turn) in zip(records, [(c, t) for c in chats for t in (1, 2, 3)]):
        human, gpt = chat["conversations"][2 * turn - 2 : 2 * turn]
        assert (record["conversation_id"], record["turn"]) == (chat["id"], turn)
        assert record["prompt"] == human["value"]  # as typed: no answer instruction
        assert record["answer"] == gpt["value"] and record["category"] == human["category"]
    rows = [line.split()[:2] for line in out.splitlines()]
    assert ["turn", "1"] in rows and rows[-1] == ["overall", "6"]

    evaluate_main(argv + ["--single-word-suffix", "--json", "--output", str(output)])
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "chat" and set(summary["turns"]) == {"1", "2", "3"}
    first = json.loads(output.read_text().splitlines()[0])
    assert first["prompt"].endswith("\n" + SINGLE_WORD_SUFFIX)
