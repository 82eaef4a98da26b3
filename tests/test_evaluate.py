"""Tests for evaluation: scoring, reading both formats, picture reuse and the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mlx_llava.evaluation as evaluation
from mlx_llava import convert
from mlx_llava.cli.evaluate import main as evaluate_main
from mlx_llava.data.shapes import CATEGORIES, QUESTION_TEXT, generate_dataset
from mlx_llava.evaluation import (
    OPTION_LETTER_SUFFIX,
    SINGLE_WORD_SUFFIX,
    EvaluationError,
    Question,
    answer_questions,
    contains_match,
    exact_match,
    format_summary,
    group_by_image,
    normalize_answer,
    parse_option_letter,
    question_prompt,
    read_questions,
    scienceqa_prompt,
    summarize,
)
from mlx_llava.loader import load

ROOT = Path(__file__).resolve().parents[1]


# The tiny random checkpoint of conftest.py, as an MLX folder ----------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tiny_checkpoint, tmp_path_factory) -> Path:
    return convert(tiny_checkpoint, tmp_path_factory.mktemp("tiny") / "mlx", dtype="float32")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load(tiny_model_dir)


def write_picture(path: Path, color: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (30, 20), color).save(path)


# Scoring -----------------------------------------------------------------------------------


def test_normalize_answer():
    assert normalize_answer("  The Red circle. ") == "red circle"
    assert normalize_answer("An apple, a pear!") == "apple pear"
    assert normalize_answer("Don't") == "dont"
    assert normalize_answer("left-hand") == "left hand"
    assert normalize_answer("THEME") == "theme"  # only whole-word articles go
    assert normalize_answer("") == ""


def test_exact_and_contains_match():
    assert exact_match("Red.", ["red"])
    assert exact_match("the square", ["Square"])
    assert not exact_match("red circle", ["red"])
    assert exact_match("two", ["2", "two"])  # any accepted answer
    assert contains_match("It is a red circle.", ["red"])
    assert not contains_match("reddish", ["red"])
    assert not contains_match("someone", ["one"])
    assert contains_match("on the left side", ["left"])
    assert not contains_match("", ["left"])


def test_parse_option_letter_as_eval_science_qa():
    assert parse_option_letter("B") == "B"
    assert parse_option_letter(" C ") == "C"
    assert parse_option_letter("A. the moon") == "A"
    assert parse_option_letter("A.the moon") is None
    assert parse_option_letter("Because of heat. The answer is D.") == "D"
    assert parse_option_letter("The answer is B") == "B"
    assert parse_option_letter("The answer is B or The answer is C.") == "C"  # "X." first
    assert parse_option_letter("B\nbecause") == "B"  # newline -> ". "
    assert parse_option_letter("the answer is b") is None
    assert parse_option_letter("(B)") is None
    assert parse_option_letter("b") is None
    assert parse_option_letter("E", num_choices=4) is None  # beyond the options
    assert parse_option_letter("D", num_choices=4) == "D"


def test_question_prompt_suffix():
    q = Question("1", "What color is the shape?")
    assert question_prompt(q, "vqa") == f"What color is the shape?\n{SINGLE_WORD_SUFFIX}"
    assert question_prompt(q, "vqa", suffix=False) == "What color is the shape?"
    assert question_prompt(q, "scienceqa").endswith("\n" + OPTION_LETTER_SUFFIX)
    done = Question("2", f"What is it?\n{SINGLE_WORD_SUFFIX}")  # LLaVA's files carry it already
    assert question_prompt(done, "vqa") == done.text


def test_summarize_vqa_and_scienceqa():
    records = [
        {"category": "color", "correct": True, "contains": True},
        {"category": "color", "correct": False, "contains": True},
        {"category": "count", "correct": False, "contains": False},
        {"category": "count", "correct": None, "contains": None},  # no reference answer
    ]
    s = summarize(records, "vqa")
    assert s["overall"] == {
        "n": 3,
        "correct": 1,
        "accuracy": pytest.approx(100 / 3),
        "contains": 2,
        "contains_accuracy": pytest.approx(200 / 3),
    }
    assert s["categories"]["color"]["accuracy"] == 50.0
    assert s["categories"]["count"]["n"] == 1
    table = format_summary(s)
    assert "color" in table and "50.00%" in table and "overall" in table
    assert "1 question(s) without a reference answer" in table

    sqa = [
        {"image": "1/image.png", "correct": True, "parsed": "A"},
        {"image": "2/image.png", "correct": False, "parsed": None},
        {"image": None, "correct": True, "parsed": "B"},
        {"image": "4/image.png", "correct": None, "parsed": None, "error": "x", "skipped": True},
    ]
    s = summarize(sqa, "scienceqa")
    assert s["image"]["n"] == 2 and s["image"]["accuracy"] == 50.0
    assert s["no_image"]["accuracy"] == 100.0
    assert s["overall"]["correct"] == 2 and s["overall"]["n"] == 3
    assert s["unparsed"] == 1 and s["skipped"] == 1
    assert "no image" in format_summary(s)


# Reading -----------------------------------------------------------------------------------


def test_read_vqa_json_and_jsonl(tmp_path):
    entries = [
        {"question_id": "q1", "image": "a.png", "text": "<image>\nWhat?", "answer": "red"},
        {"question_id": 7, "image": "b.png", "text": "How many?", "category": "count"},
        {"question_id": "q3", "text": "Text only?", "answer": [{"answer": "yes"}, "Yes"]},
    ]
    (tmp_path / "q.json").write_text(json.dumps(entries))
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    (tmp_path / "q-lines.json").write_text("\n".join(json.dumps(e) for e in entries))
    for name in ("q.json", "q.jsonl", "q-lines.json"):
        fmt, qs = read_questions(tmp_path / name)
        assert fmt == "vqa"
        assert [q.question_id for q in qs] == ["q1", 7, "q3"]
        assert qs[0].text == "What?" and qs[0].answers == ["red"] and qs[0].image == "a.png"
        assert qs[1].answers == [] and qs[1].category == "count"
        assert qs[2].image is None and qs[2].answers == ["yes", "Yes"]


def test_read_scienceqa_conversations(tmp_path):
    text = "Context: N/A\nQuestion: Which is a mammal?\nOptions: (A) frog (B) cat (C) trout"
    entries = [
        {
            "id": "5",
            "image": "5/image.png",
            "conversations": [
                {"from": "human", "value": text + "\n<image>"},
                {"from": "gpt", "value": "The answer is B."},
            ],
        },
        {
            "id": "9",
            "conversations": [
                {"from": "human", "value": "Context: N/A\nQuestion: Q?\nOptions: (A) x (B) y"},
                {"from": "gpt", "value": "The answer is A."},
            ],
        },
    ]
    (tmp_path / "llava_test_CQM-A.json").write_text(json.dumps(entries))
    fmt, qs = read_questions(tmp_path / "llava_test_CQM-A.json")
    assert fmt == "scienceqa"
    assert qs[0].text == text and qs[0].image == "5/image.png"
    assert qs[0].answers == ["B"] and qs[0].num_choices == 3
    assert qs[1].image is None and qs[1].answers == ["A"] and qs[1].num_choices == 2
    # the prompt the original model_vqa_science.py --single-pred-prompt writes
    assert question_prompt(qs[0], fmt) == text + "\n" + OPTION_LETTER_SUFFIX


def test_read_scienceqa_problems(tmp_path):
    problems = {
        "1": {
            "question": "Which is a  mammal?",
            "hint": "",
            "choices": ["frog", "cat"],
            "answer": 1,
            "image": "image.png",
            "subject": "natural science",
        },
        "2": {
            "question": "Q?",
            "hint": "Some text.",
            "choices": ["x", "y", "z"],
            "answer": 2,
            "image": None,
            "subject": "language science",
        },
        "3": {"question": "Train?", "hint": "", "choices": ["a", "b"], "answer": 0, "image": None},
    }
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["1", "2"], "train": ["3"]}))
    fmt, qs = read_questions(tmp_path / "problems.json")
    assert fmt == "scienceqa" and [q.question_id for q in qs] == ["1", "2"]
    assert qs[0].text == "Context: N/A\nQuestion: Which is a mammal?\nOptions: (A) frog (B) cat"
    assert qs[0].image == "1/image.png" and qs[0].answers == ["B"] and qs[0].num_choices == 2
    assert qs[1].text.startswith("Context: Some text.\n") and qs[1].answers == ["C"]
    assert qs[1].category == "language science" and qs[1].image is None
    assert scienceqa_prompt(problems["3"]).endswith("Options: (A) a (B) b")
    with pytest.raises(EvaluationError, match="no split 'val'"):
        read_questions(tmp_path / "problems.json", split="val")


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "data file not found"),
        ('[{"question_id": 1, "text": "a"}', "is not valid JSON"),
        ('{"a": 1}\n{"b": ', "line 2 is not valid JSON"),
        ("[]", "holds no questions"),
        ('[{"foo": 1}]', "cannot tell the format"),
        ('[{"question_id": 1, "image": "a.png"}]', "cannot tell the format"),
    ],
)
def test_read_errors(tmp_path, content, message):
    path = tmp_path / "q.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(EvaluationError, match=message):
        read_questions(path)


def test_read_entry_errors(tmp_path):
    path = tmp_path / "q.json"
    path.write_text(json.dumps([{"question_id": 1, "text": "a"}, {"question_id": 2}]))
    with pytest.raises(EvaluationError, match="entry 2 has no 'text'"):
        read_questions(path)
    with pytest.raises(EvaluationError, match="unknown format"):
        read_questions(path, fmt="gqa")


# Asking ------------------------------------------------------------------------------------


def test_group_by_image_keeps_first_appearance():
    qs = [Question(i, "q", image) for i, image in enumerate(["a", "b", None, "a", "b", None])]
    groups = group_by_image(qs)
    assert [image for image, _ in groups] == ["a", "b", None]
    assert [[q.question_id for q in group] for _, group in groups] == [[0, 3], [1, 4], [2, 5]]


def test_pictures_are_encoded_once(tiny, tmp_path, monkeypatch):
    model, processor = tiny
    colors = {"a.png": (200, 30, 30), "b.png": (30, 200, 30), "c.png": (30, 30, 200)}
    for name, color in colors.items():
        write_picture(tmp_path / name, color)
    # interleaved: without grouping every question would encode its picture again
    qs = [Question(f"{i}", f"Question {i}?", image) for i, image in enumerate(list(colors) * 2)]
    qs.append(Question("text", "No picture?"))
    calls = []
    original = model.get_image_features

    def counting(pixel_values, *args):
        calls.append(pixel_values.shape[0])
        return original(pixel_values, *args)

    monkeypatch.setattr(model, "get_image_features", counting)
    records = list(answer_questions(model, processor, qs, "vqa", tmp_path, max_tokens=3))
    assert calls == [1, 1, 1]  # one encoding per picture
    assert [r["question_id"] for r in records] == ["0", "3", "1", "4", "2", "5", "text"]
    assert records[-1]["prompt"] == f"No picture?\n{SINGLE_WORD_SUFFIX}"
    assert records[0]["prompt"] == f"<image>\nQuestion 0?\n{SINGLE_WORD_SUFFIX}"

    # the reused prefix gives the same greedy answers as fresh caches
    monkeypatch.setattr(model, "get_image_features", original)
    for q, record in zip([qs[i] for i in (0, 3, 1)], records):
        fresh = next(iter(answer_questions(model, processor, [q], "vqa", tmp_path, max_tokens=3)))
        assert fresh["text"] == record["text"]


def test_scoring_end_to_end(tiny, tmp_path, monkeypatch):
    """Known answers through the loop: the prompt the model sees and the scores."""
    model, processor = tiny
    write_picture(tmp_path / "a.png", (200, 30, 30))
    seen = []

    def fake_generate(model, processor, prompt, image=None, **kwargs):
        seen.append((prompt, image is not None, kwargs["temperature"], kwargs["max_tokens"]))
        return {0: " Red. ", 1: "a red one", 2: "B", 3: "The answer is C."}[len(seen) - 1]

    monkeypatch.setattr("mlx_llava.evaluation.runner.generate", fake_generate)
    vqa = [Question("0", "Color?", "a.png", ["red"]), Question("1", "Color?", "a.png", ["red"])]
    records, summary = evaluation.evaluate(model, processor, vqa, "vqa", tmp_path, max_tokens=5)
    assert [r["text"] for r in records] == ["Red.", "a red one"]
    assert [(r["correct"], r["contains"]) for r in records] == [(True, True), (False, True)]
    assert summary["overall"]["accuracy"] == 50.0 and summary["overall"]["contains"] == 2
    assert seen[0][0] == processor.format_prompt(f"Color?\n{SINGLE_WORD_SUFFIX}", num_images=1)
    assert seen[0][1:] == (True, 0.0, 5)

    sqa = [
        Question("7", "Context: N/A\nQuestion: Q?\nOptions: (A) x (B) y", "a.png", ["B"], None, 2),
        Question(
            "8", "Context: N/A\nQuestion: Q?\nOptions: (A) x (B) y (C) z", None, ["A"], None, 3
        ),
    ]
    records, summary = evaluation.evaluate(model, processor, sqa, "scienceqa", tmp_path)
    assert [(r["parsed"], r["correct"]) for r in records] == [("B", True), ("C", False)]
    assert summary["image"]["accuracy"] == 100.0 and summary["no_image"]["accuracy"] == 0.0
    assert seen[3][1] is False  # the text-only question gets no picture
    assert seen[3][0] == processor.format_prompt(
        sqa[1].text + "\n" + OPTION_LETTER_SUFFIX, num_images=0
    )


def test_missing_picture_counts_as_wrong_or_is_skipped(tiny, tmp_path):
    model, processor = tiny
    qs = [Question("0", "Color?", "gone.png", ["red"]), Question("1", "Count?", None, ["one"])]
    records = list(answer_questions(model, processor, qs, "vqa", tmp_path, max_tokens=2))
    assert "file not found" in records[0]["error"] and records[0]["correct"] is False
    assert "error" not in records[1]
    records = list(
        answer_questions(model, processor, qs, "vqa", tmp_path, max_tokens=2, skip_missing=True)
    )
    assert records[0]["skipped"] and records[0]["correct"] is None
    assert summarize(records, "vqa")["overall"]["n"] == 1


# The command line ----------------------------------------------------------------------------


def test_cli_on_shapes_world(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "shapes"
    generate_dataset(data, 2, seed=0, min_size=32, max_size=48)
    output = tmp_path / "out" / "answers.jsonl"
    argv = ["--model", str(tiny_model_dir), "--data", str(data / "qa.json")]
    argv += ["--output", str(output), "--limit", "6", "--max-tokens", "4"]
    evaluate_main(argv)
    captured = capsys.readouterr()
    records = [json.loads(line) for line in output.read_text().splitlines()]
    qa = json.loads((data / "qa.json").read_text())[:6]
    assert [r["question_id"] for r in records] == [q["question_id"] for q in qa]
    for record, entry in zip(records, qa):
        assert {"question_id", "prompt", "text", "answer", "category", "correct"} <= set(record)
        assert record["answer"] == entry["answer"] and record["category"] == entry["category"]
        assert record["prompt"] == f"<image>\n{QUESTION_TEXT[entry['category']]}\n" + (
            SINGLE_WORD_SUFFIX
        )
        assert record["correct"] == exact_match(record["text"], [entry["answer"]])
        assert record["contains"] == contains_match(record["text"], [entry["answer"]])
    lines = captured.out.splitlines()
    assert lines[0].split() == ["category", "n", "exact", "contains"]
    assert lines[-1].startswith("overall") and lines[-1].split()[1] == "6"
    assert {line.split()[0] for line in lines[1:-2]} <= set(CATEGORIES)
    assert "[evaluate] 6/6" in captured.err

    evaluate_main(argv[:4] + ["--limit", "2", "--max-tokens", "2", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "vqa" and summary["overall"]["n"] == 2


def test_cli_on_scienceqa_layout(tiny_model_dir, tmp_path, capsys):
    """LLaVA's playground layout: problems.json, pid_splits.json and images/test/<pid>/."""
    problem = dict(question="Which?", hint="", choices=["x", "y"], answer=0, subject="physics")
    problems = {"1": dict(problem, image="image.png"), "2": dict(problem, image=None)}
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["1", "2"]}))
    write_picture(tmp_path / "images" / "test" / "1" / "image.png", (10, 200, 10))
    output = tmp_path / "answers.jsonl"
    argv = ["--model", str(tiny_model_dir), "--data", str(tmp_path / "problems.json")]
    evaluate_main(argv + ["--output", str(output), "--max-tokens", "3"])
    out = capsys.readouterr().out
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [(r["question_id"], r["image"]) for r in records] == [("1", "1/image.png"), ("2", None)]
    assert records[0]["prompt"].startswith("<image>\nContext: N/A\nQuestion: Which?\n")
    assert records[1]["prompt"].endswith("(B) y\n" + OPTION_LETTER_SUFFIX)
    assert all(r["answer"] == "A" and "parsed" in r for r in records)
    rows = {line.split()[0]: line.split() for line in out.splitlines()}
    assert rows["image"][1] == "1" and rows["overall"][1] == "2" and rows["physics"][1] == "2"
    assert "no" in rows  # the "no image" row


def test_cli_bad_input_is_one_line(tiny_model_dir, tmp_path, capsys):
    def run(*args):
        with pytest.raises(SystemExit) as exit_info:
            evaluate_main(["--model", str(tiny_model_dir), *args])
        err = capsys.readouterr().err
        return exit_info.value.code, err

    code, err = run("--data", str(tmp_path / "nope.json"))
    assert code == 1 and err.startswith("error: data file not found") and err.count("\n") == 1
    (tmp_path / "bad.json").write_text("[{")
    code, err = run("--data", str(tmp_path / "bad.json"))
    assert code == 1 and "is not valid JSON" in err and "Traceback" not in err
    (tmp_path / "q.json").write_text(
        json.dumps([{"question_id": 1, "image": "x.png", "text": "?"}])
    )
    code, err = run("--data", str(tmp_path / "q.json"), "--image-folder", str(tmp_path / "none"))
    assert code == 1 and err.startswith("error: image folder not found")

    # a missing picture is a warning, the run goes on
    evaluate_main(["--model", str(tiny_model_dir), "--data", str(tmp_path / "q.json")])
    captured = capsys.readouterr()
    assert "warning: question 1: cannot read image" in captured.err
    assert "(counted as wrong)" in captured.err
    assert "overall" in captured.out


def test_evaluate_script_help():
    result = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    for flag in ("--data", "--image-folder", "--no-single-word-suffix", "--format", "--json"):
        assert flag in result.stdout


# Questions about videos (OneVision, NeXT-Video) ----------------------------------------------


@pytest.fixture(scope="module")
def ov_model_dir(tmp_path_factory) -> Path:
    data = ROOT / "tests" / "fixtures" / "data" / "ov-hub"
    return convert(data, tmp_path_factory.mktemp("ov") / "mlx", dtype="float32")


@pytest.fixture(scope="module")
def video_questions(tmp_path_factory) -> Path:
    """Two clips, a picture, and questions about each (vqa) and a chat about a clip."""
    pytest.importorskip("av")
    from llava_testing.videos import write_clip

    root = tmp_path_factory.mktemp("video-questions")
    (root / "clips").mkdir()
    write_clip(root / "clips" / "a.mp4", seed=0, frames=12)
    write_clip(root / "clips" / "b.mp4", seed=1, frames=3)  # fewer frames than --frames
    write_picture(root / "p.png", (200, 30, 30))
    questions = [
        {
            "question_id": "a1",
            "video": "clips/a.mp4",
            "text": "<video>\nWhat happens in the video?",
        },
        {"question_id": "b1", "video": "clips/b.mp4", "text": "What moves?", "answer": "x"},
        {"question_id": "p1", "image": "p.png", "text": "What colour?"},
        {"question_id": "a2", "video": "clips/a.mp4", "text": "How does it end?"},
    ]
    (root / "qa.json").write_text(json.dumps(questions))
    turns = [
        {"from": "human", "value": "<image>\nWhat happens?"},
        {"from": "gpt", "value": "It brightens."},
        {"from": "human", "value": "And then?"},
        {"from": "gpt", "value": "Nothing."},
    ]
    chat = [{"id": "c", "video": "clips/a.mp4", "conversations": turns}]
    (root / "chat.json").write_text(json.dumps(chat))
    return root


def test_read_video_questions(video_questions):
    fmt, questions = read_questions(video_questions / "qa.json")
    assert fmt == "vqa"
    assert [(q.video, q.image, q.text) for q in questions][:3] == [
        ("clips/a.mp4", None, "What happens in the video?"),
        ("clips/b.mp4", None, "What moves?"),
        (None, "p.png", "What colour?"),
    ]
    fmt, turns = read_questions(video_questions / "chat.json")
    assert fmt == "chat" and [q.video for q in turns] == ["clips/a.mp4"] * 2
    assert turns[0].text == "What happens?"


def test_video_answers_equal_generate(ov_model_dir, video_questions, tmp_path, capsys, monkeypatch):
    """evaluate.py's greedy answer about a video is generate.py's for the same video, frames
    and question, and the model sees the same frames (the questions about one video share
    its prefix and read it once)."""
    from mlx_llava.cli.generate import main as generate_main
    from mlx_llava.model import Model

    seen = {"evaluate": set(), "generate": set()}
    original = Model.get_video_features

    def spy(self, pixel_values_videos):  # what the model is shown, whoever asks
        pixels = np.array(pixel_values_videos)
        seen[caller].add((pixels.shape, float(pixels.sum())))
        return original(self, pixel_values_videos)

    monkeypatch.setattr(Model, "get_video_features", spy)
    caller = "evaluate"
    output = tmp_path / "answers.jsonl"
    argv = ["--model", str(ov_model_dir), "--data", str(video_questions / "qa.json")]
    argv += ["--output", str(output), "--frames", "8", "--max-tokens", "8"]
    evaluate_main(argv + ["--no-single-word-suffix"])
    capsys.readouterr()
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["question_id"] for r in records] == ["a1", "a2", "b1", "p1"]
    caller = "generate"
    for record in records:
        media = ["--video", str(video_questions / record["video"])] if "video" in record else []
        media += ["--image", str(video_questions / record["image"])] if record["image"] else []
        question = record["prompt"].replace("<video>\n", "").replace("<image>\n", "")
        generate_main(
            ["--model", str(ov_model_dir), *media, "--frames", "8", "--prompt", question]
            + ["--max-tokens", "8", "--temp", "0"]
        )
        answer = capsys.readouterr().out.strip()
        assert record["text"] == answer and answer, record
    assert seen["evaluate"] == seen["generate"]
    assert sorted(shape[:2] for shape, _ in seen["generate"]) == [(1, 3), (1, 8)]
    assert records[0]["prompt"] == "<video>\nWhat happens in the video?"
    assert records[2]["video"] == "clips/b.mp4" and records[2]["correct"] is False
    assert "video" not in records[3]

    output = tmp_path / "chat.jsonl"
    argv = ["--model", str(ov_model_dir), "--data", str(video_questions / "chat.json")]
    evaluate_main(argv + ["--output", str(output), "--frames", "4", "--max-tokens", "4"])
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [(r["turn"], r["video"], "error" in r) for r in records] == [
        (1, "clips/a.mp4", False),
        (2, "clips/a.mp4", False),
    ]
    assert records[0]["prompt"] == "<video>\nWhat happens?"


def test_video_questions_need_a_model_that_sees_videos(
    tiny_model_dir, video_questions, tmp_path, capsys
):
    argv = ["--model", str(tiny_model_dir), "--data", str(video_questions / "qa.json")]
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: 3 question(s) are about videos, but llava does not see videos")


def test_missing_video_counts_as_wrong(ov_model_dir, tmp_path):
    model, processor = load(ov_model_dir)
    qs = [Question("0", "What happens?", answers=["x"], video="gone.mp4")]
    records = list(answer_questions(model, processor, qs, "vqa", tmp_path, max_tokens=2))
    assert "cannot read video" in records[0]["error"] and records[0]["correct"] is False
    assert records[0]["video"] == "gone.mp4"
