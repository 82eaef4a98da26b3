"""The bundled demo model keeps its promises (README, docs/training.md): on pictures drawn with a
seed and sizes its training never used, it answers the original questions, questions in wordings
held out from its training, and three-turn chats in held-out wordings."""

import json
from pathlib import Path

import pytest

from mlx_llava.chat import ChatSession
from mlx_llava.cli.evaluate import main as evaluate_main
from mlx_llava.data.shapes import CATEGORIES, generate_dataset
from mlx_llava.loader import load

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PICTURES = 60  # a sample of the held-out set of docs/training.md (seed 1234, 48-200 px)


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("heldout")
    generate_dataset(data, PICTURES, seed=1234, min_size=48, max_size=200)
    return data


def evaluate(capsys, data: Path, *flags: str) -> dict:
    evaluate_main(["--model", "demo", "--data", str(data), "--json", *flags])
    summary = json.loads(capsys.readouterr().out)
    assert summary["errors"] == 0
    return summary


def test_original_wordings(heldout, capsys):
    summary = evaluate(capsys, heldout / "qa.json")
    assert set(summary["categories"]) == set(CATEGORIES)
    for kind, result in summary["categories"].items():
        assert result["n"] >= 10 and result["accuracy"] >= 90.0, (kind, result)
    assert summary["overall"]["accuracy"] >= 97.0, summary["overall"]


def test_held_out_wordings(heldout, capsys):
    summary = evaluate(capsys, heldout / "qa_heldout.json", "--no-single-word-suffix")
    assert set(summary["categories"]) == set(CATEGORIES)
    for kind, result in summary["categories"].items():
        assert result["n"] >= 10 and result["accuracy"] >= 90.0, (kind, result)


def test_three_turn_chats_in_held_out_wordings(heldout, capsys):
    summary = evaluate(capsys, heldout / "chat_heldout.json", "--limit", "40")
    assert summary["format"] == "chat" and set(summary["turns"]) == {"1", "2", "3"}
    for turn, result in summary["turns"].items():
        assert result["n"] == 40 and result["accuracy"] >= 90.0, (turn, result)


def test_what_people_type():
    """The wordings of issue 10 that the first demo got wrong, the web page's questions, and a
    chat: on the example pictures."""
    model, processor = load("demo")
    asked = {
        "red_circle.png": [
            ("What shape?", "circle"),
            ("Which side is the shape on?", "left"),
            ("On which side of the picture is the shape?", "left"),
            ("What shape is in the picture?", "circle"),
            ("What colour is the shape?", "red"),
            ("how many shapes", "one"),
            ("Name the colour.", "red"),
        ],
        "green_triangle.png": [("Is it a circle, a square or a triangle?", "triangle")],
        "two_blue_squares.png": [
            ("How many objects can you see?", "two"),
            ("What color are they?", "blue"),
            ("Describe the image.", "Two blue squares."),
        ],
    }
    for name, turns in asked.items():
        for question, answer in turns:
            chat = ChatSession(model, processor, image=str(EXAMPLES / name))
            assert chat.send(question, max_tokens=16, temperature=0.0) == answer, question
    chat = ChatSession(model, processor, image=str(EXAMPLES / "two_blue_squares.png"))
    for question, answer in [("What colour?", "blue"), ("And the shape?", "square")]:
        assert chat.send(question, max_tokens=16, temperature=0.0) == answer, question
