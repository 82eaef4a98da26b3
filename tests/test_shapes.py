"""Tests for the Shapes world dataset generator."""

import importlib.util
import itertools
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlx_llava.data.shapes import (
    BACKGROUND_RANGE,
    CAPTION_PROMPT,
    CATEGORIES,
    CENTER_MARGIN,
    COLORS,
    EVAL_CHAT_TURNS,
    FILES,
    GAP,
    IMAGE_TOKEN,
    KINDS,
    MAX_ASPECT,
    QUESTION_TEXT,
    SHAPE_SIZE_RANGE,
    Shape,
    caption,
    draw_scene,
    generate_dataset,
    main,
    picture_size,
    questions,
)
from mlx_llava.data.wordings import WORDING_CATEGORIES, ask, normalize, wording_split

N = 40
VAL_FRACTION = 0.25
ANSWERS = {
    "color": set(COLORS),
    "shape": set(KINDS),
    "count": {"one", "two", "three"},
    "position": {"left", "right"},
}


def recover_shapes(picture: Image.Image) -> list[Shape]:
    """Find the shapes in a picture from its pixels alone.

    Each connected region of one shape colour is a shape; its kind follows from
    how much of its bounding box it fills (square ~1, circle ~pi/4, triangle ~1/2).
    """
    pixels = np.asarray(picture)
    shapes = []
    for color, rgb in COLORS.items():
        todo = set(map(tuple, np.argwhere((pixels == rgb).all(axis=-1)).tolist()))
        while todo:
            stack, region = [todo.pop()], []
            while stack:
                y, x = stack.pop()
                region.append((y, x))
                for step in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                    if step in todo:
                        todo.remove(step)
                        stack.append(step)
            ys, xs = np.array(region).T
            width, height = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
            fill = len(region) / (width * height)
            kind = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
            cx, cy = (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2
            shapes.append(Shape(kind, color, cx, cy, max(width, height)))
    return shapes


def load(root: Path, name: str) -> list[dict]:
    return json.loads((root / name).read_text())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("shapes")
    counts = generate_dataset(root, N, seed=0, val_fraction=VAL_FRACTION)
    return root, counts


def test_picture_size_within_limits():
    rng = random.Random(0)
    for _ in range(500):
        width, height = picture_size(rng, 64, 256)
        assert 64 <= width <= 256 and 64 <= height <= 256
        assert max(width, height) / min(width, height) <= MAX_ASPECT


@pytest.mark.parametrize("seed", range(60))
def test_draw_scene_shapes_inside_apart_and_visible(seed):
    rng = random.Random(seed)
    width, height = picture_size(rng, 32 if seed % 2 else 64, 256)
    picture, shapes = draw_scene(rng, width, height)
    pixels = np.asarray(picture)

    assert picture.size == (width, height) and picture.mode == "RGB"
    assert 1 <= len(shapes) <= 3
    assert all(BACKGROUND_RANGE[0] <= c <= BACKGROUND_RANGE[1] for c in pixels[0, 0])
    short = min(width, height)
    for shape in shapes:
        assert shape.kind in KINDS and shape.color in COLORS
        low, high = SHAPE_SIZE_RANGE
        assert low * short <= shape.size <= high * short
        half = shape.size / 2
        assert GAP <= shape.cx - half and shape.cx + half <= width - 1 - GAP
        assert GAP <= shape.cy - half and shape.cy + half <= height - 1 - GAP
        centre = pixels[int(shape.cy), int(shape.cx)]
        assert tuple(centre) == COLORS[shape.color]
        if shape.kind == "triangle":
            rows = slice(int(shape.cy - half), int(shape.cy + half) + 1)
            columns = slice(int(shape.cx - half), int(shape.cx + half) + 1)
            widths = (pixels[rows, columns] == COLORS[shape.color]).all(-1).sum(1)
            widths = widths[widths > 0]
            assert widths[0] < widths[-1] / 2  # points up
    for a, b in itertools.combinations(shapes, 2):
        reach = (a.size + b.size) / 2
        assert abs(a.cx - b.cx) >= reach or abs(a.cy - b.cy) >= reach
    if len(shapes) == 1:
        assert abs(shapes[0].cx - width / 2) >= CENTER_MARGIN * width

    found = sorted(recover_shapes(picture), key=lambda s: s.cx)
    drawn = sorted(shapes, key=lambda s: s.cx)
    assert [(s.kind, s.color) for s in found] == [(s.kind, s.color) for s in drawn]
    for f, d in zip(found, drawn):
        assert abs(f.cx - d.cx) <= 1 and abs(f.size - d.size) <= 2


def test_repeat_share_repeats_shapes():
    def repeats(share: float) -> float:
        rng, found, scenes = random.Random(3), 0, 0
        while scenes < 300:
            _, shapes = draw_scene(rng, 96, 96, repeat_share=share)
            if len(shapes) > 1:
                scenes += 1
                found += len({(s.color, s.kind) for s in shapes}) < len(shapes)
        return found / scenes

    assert repeats(0.0) < 0.2 and repeats(0.5) > 0.5  # by chance: 1 in 12 per pair


def test_draw_scene_depends_only_on_rng():
    first = draw_scene(random.Random(7), 120, 90)
    second = draw_scene(random.Random(7), 120, 90)
    assert first[1] == second[1]
    assert first[0].tobytes() == second[0].tobytes()


def test_caption_groups_left_to_right():
    def shape(kind: str, color: str, cx: float) -> Shape:
        return Shape(kind, color, cx, 50.0, 20.0)

    assert caption([shape("circle", "red", 10)]) == "A red circle."
    pair = [shape("triangle", "yellow", 90), shape("square", "blue", 10)]
    assert caption(pair) == "A blue square and a yellow triangle."
    three = [
        shape("circle", "green", 10),
        shape("square", "red", 50),
        shape("circle", "green", 90),
    ]
    assert caption(three) == "Two green circles and a red square."
    mixed = [
        shape("circle", "red", 10),
        shape("square", "blue", 50),
        shape("triangle", "yellow", 90),
    ]
    assert caption(mixed) == "A red circle, a blue square and a yellow triangle."
    same = [shape("square", "blue", x) for x in (10, 50, 90)]
    assert caption(same) == "Three blue squares."
    assert caption(same[:2]) == "Two blue squares."
    repeated = [shape("circle", "red", 10), shape("triangle", "green", 50)]
    repeated.append(shape("triangle", "green", 90))
    assert caption(repeated) == "A red circle and two green triangles."


def test_questions_asked_only_when_answerable():
    def asked(shapes: list[Shape]) -> dict[str, str]:
        qa = questions(shapes, width=100)
        assert all(QUESTION_TEXT[c] == q for c, q, _ in qa)
        return {category: answer for category, _, answer in qa}

    lone = Shape("triangle", "blue", 20.0, 50.0, 20.0)
    assert asked([lone]) == {
        "color": "blue",
        "shape": "triangle",
        "count": "one",
        "position": "left",
    }
    assert asked([Shape("circle", "red", 80.0, 50.0, 20.0)])["position"] == "right"
    same_color = [lone, Shape("square", "blue", 70.0, 50.0, 20.0)]
    assert asked(same_color) == {"color": "blue", "count": "two"}
    same_kind = [lone, Shape("triangle", "red", 70.0, 50.0, 20.0)]
    assert asked(same_kind) == {"shape": "triangle", "count": "two"}
    mixed = [lone, same_color[1], Shape("circle", "red", 90.0, 20.0, 10.0)]
    assert asked(mixed) == {"count": "three"}


def test_files_and_counts(dataset):
    root, counts = dataset
    n_val = round(N * VAL_FRACTION)
    assert (counts["images"], counts["val"]) == (N, n_val)
    assert len(list((root / "images").glob("*.png"))) == N
    for suffix, size in (("", N - n_val), ("_val", n_val)):
        for name in ("pretrain", "finetune", "chat_heldout", "captions_heldout"):
            assert len(load(root, f"{name}{suffix}.json")) == size

    qa = load(root, "qa.json") + load(root, "qa_val.json")
    for category in CATEGORIES:
        assert counts[category] == sum(e["category"] == category for e in qa)
    assert counts["count"] == N
    # Position is asked exactly for single-shape pictures: about half of them.
    assert 0.3 * N <= counts["position"] <= 0.7 * N
    assert counts["color"] >= counts["position"] and counts["shape"] >= counts["position"]


def test_no_val_files_without_val_fraction(tmp_path):
    counts = generate_dataset(tmp_path, 3, seed=1, max_size=96)
    assert counts["val"] == 0
    names = sorted(p.name for p in tmp_path.glob("*.json"))
    assert names == sorted(f"{name}.json" for name in FILES)


def test_same_seed_same_bytes_other_seed_other_pictures(dataset, tmp_path):
    root, _ = dataset
    generate_dataset(tmp_path / "same", N, seed=0, val_fraction=VAL_FRACTION)
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    again = sorted(
        p.relative_to(tmp_path / "same") for p in (tmp_path / "same").rglob("*") if p.is_file()
    )
    assert files == again
    for name in files:
        assert (root / name).read_bytes() == (tmp_path / "same" / name).read_bytes()

    generate_dataset(tmp_path / "other", N, seed=1, val_fraction=VAL_FRACTION)
    for name in FILES:
        assert (root / f"{name}.json").read_bytes() != (
            tmp_path / "other" / f"{name}.json"
        ).read_bytes()
    pictures = sorted((root / "images").iterdir())
    differ = sum(
        p.read_bytes() != (tmp_path / "other" / "images" / p.name).read_bytes() for p in pictures
    )
    assert differ == len(pictures)


def test_annotations_match_pixels(dataset):
    root, _ = dataset
    pretrain = load(root, "pretrain.json") + load(root, "pretrain_val.json")
    qa = load(root, "qa.json") + load(root, "qa_val.json")
    for record in pretrain:
        picture = Image.open(root / record["image"])
        shapes = recover_shapes(picture)
        assert record["conversations"][1]["value"] == caption(shapes)
        expected = {(c, q, a) for c, q, a in questions(shapes, picture.width)}
        entries = {
            (e["category"], e["text"], e["answer"]) for e in qa if e["image"] == record["image"]
        }
        assert entries == expected


def check_conversation(conversations: list[dict]) -> None:
    assert len(conversations) % 2 == 0 and conversations
    for turn, message in enumerate(conversations):
        assert set(message) == {"from", "value"}
        assert message["from"] == ("human", "gpt")[turn % 2]
        assert (IMAGE_TOKEN in message["value"]) == (turn == 0)
    assert conversations[0]["value"].startswith(f"{IMAGE_TOKEN}\n")


def test_pretrain_schema(dataset):
    root, _ = dataset
    records = load(root, "pretrain.json") + load(root, "pretrain_val.json")
    assert len({r["id"] for r in records}) == len(records)
    for record in records:
        assert set(record) == {"id", "image", "conversations"}
        assert (root / record["image"]).is_file()
        assert record["image"].startswith("images/")
        check_conversation(record["conversations"])
        prompt, answer = record["conversations"]
        assert prompt["value"] == f"{IMAGE_TOKEN}\n{CAPTION_PROMPT}"
        assert answer["value"][0].isupper() and answer["value"].endswith(".")


def truths(root: Path) -> dict[tuple[str, str], str]:
    """(image, category) -> answer, from qa.json and the captions of pretrain.json."""
    qa = load(root, "qa.json") + load(root, "qa_val.json")
    truth = {(e["image"], e["category"]): e["answer"] for e in qa}
    for r in load(root, "pretrain.json") + load(root, "pretrain_val.json"):
        truth[(r["image"], "describe")] = r["conversations"][1]["value"]
    return truth


def test_finetune_schema_and_answers(dataset):
    root, _ = dataset
    records = load(root, "finetune.json") + load(root, "finetune_val.json")
    truth = truths(root)
    trained = {normalize(w.text): c for c, ws in wording_split()["train"].items() for w in ws}
    for record in records:
        assert set(record) == {"id", "image", "conversations"}
        assert (root / record["image"]).is_file()
        conversations = record["conversations"]
        check_conversation(conversations)
        applicable = {c for image, c in truth if image == record["image"]} - {"describe"}
        asked = [m["value"].removeprefix(f"{IMAGE_TOKEN}\n") for m in conversations[::2]]
        assert len(set(asked)) == len(asked) and 1 <= len(asked) <= len(applicable) + 2
        categories = [trained[normalize(question)] for question in asked]
        assert set(categories) - {"describe"} <= applicable
        for question, category, answer in zip(asked, categories, conversations[1::2]):
            assert answer["value"] == truth[(record["image"], category)], question


def test_qa_schema(dataset):
    root, _ = dataset
    entries = load(root, "qa.json") + load(root, "qa_val.json")
    assert len({e["question_id"] for e in entries}) == len(entries)
    for entry in entries:
        assert set(entry) == {"question_id", "image", "text", "answer", "category"}
        assert (root / entry["image"]).is_file()
        assert entry["text"] == QUESTION_TEXT[entry["category"]]
        assert entry["answer"] in ANSWERS[entry["category"]]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": 0},
        {"n": 2, "min_size": 16},
        {"n": 2, "min_size": 200, "max_size": 100},
        {"n": 2, "val_fraction": 1.0},
        {"n": 2, "val_fraction": -0.1},
        {"n": 2, "repeat_share": 1.0},
        {"n": 2, "repeat_share": -0.5},
    ],
)
def test_generate_dataset_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        generate_dataset(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("n", ["0", "-3", "abc"])
def test_cli_bad_n_is_one_line_exit_2(tmp_path, capsys, n):
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "out"), "--n", n])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert len(stderr.strip().splitlines()) == 1 and "error" in stderr
    assert not (tmp_path / "out").exists()


def test_cli_writes_dataset(tmp_path, capsys):
    main(["--out", str(tmp_path), "--n", "4", "--max-size", "96"])
    out = capsys.readouterr().out
    assert "wrote 4 pictures to" in out and "train" not in out  # a test set is no training set
    main(["--out", str(tmp_path / "v"), "--n", "4", "--max-size", "96", "--val-fraction", "0.5"])
    assert "wrote 4 pictures, the last 2 for validation" in capsys.readouterr().out
    assert len(load(tmp_path, "pretrain.json")) == 4


# Wordings: many ways to ask, a fixed part of them held out -----------------------------------

ROOT = Path(__file__).resolve().parents[1]
TRAINED = {normalize(w.text): c for c, ws in wording_split()["train"].items() for w in ws}
HELD_OUT = {normalize(w.text): c for c, ws in wording_split()["held_out"].items() for w in ws}


def test_wording_split():
    split = wording_split()
    assert not set(TRAINED) & set(HELD_OUT)
    meanings: dict[str, set[str]] = {}  # a wording means one category
    for side in split.values():
        for category, ws in side.items():
            for w in ws:
                meanings.setdefault(normalize(w.text), set()).add(category)
    assert all(len(categories) == 1 for categories in meanings.values())
    for category in WORDING_CATEGORIES:
        assert len({w.template for w in split["train"][category]}) >= 6
        assert len(split["held_out"][category]) >= 4
    # the original questions and those of the web page's test are trained on
    for category, text in [*QUESTION_TEXT.items(), ("shape", "What shape is in the picture?")]:
        assert TRAINED[normalize(text)] == category
    assert TRAINED[normalize("What colour is the shape?")] == "color"
    # British and US spelling, short forms, imperatives, "it" / "the object" / "the thing"
    for category, text in [
        ("color", "What color is it?"),
        ("color", "What colour is the thing?"),
        ("shape", "What shape?"),
        ("count", "How many?"),
        ("count", "Count the objects."),
        ("position", "Left or right?"),
    ]:
        assert TRAINED[normalize(text)] == category, text
    # phrasings never trained on, for the evaluation
    for category, text in [
        ("color", "Name the colour."),
        ("shape", "Which shape is it?"),
        ("count", "How many things can you see?"),
        ("position", "Which side is the shape on?"),
        ("position", "On which side of the picture is the shape?"),
    ]:
        assert HELD_OUT[normalize(text)] == category, text


@pytest.mark.parametrize("num_shapes", [1, 2, 3])
def test_ask_draws_from_its_side_only(num_shapes):
    rng = random.Random(num_shapes)
    for category in WORDING_CATEGORIES:
        if category == "position" and num_shapes > 1:
            continue
        for held_out, side in ((False, TRAINED), (True, HELD_OUT)):
            drawn = {ask(rng, category, num_shapes, held_out) for _ in range(300)}
            assert all(side.get(normalize(text)) == category for text in drawn)
            assert len(drawn) >= 20 if category != "describe" else len(drawn) >= 3
    plural = {ask(rng, "color", 2) for _ in range(300)}
    assert any("are" in text.split() for text in plural)
    lone = {ask(rng, "color", 1) for _ in range(300)}
    assert not any(word in text.split() for text in lone for word in ("are", "they", "these"))


def test_held_out_files(dataset):
    root, _ = dataset
    truth = truths(root)
    entries = load(root, "qa_heldout.json") + load(root, "qa_heldout_val.json")
    qa = load(root, "qa.json") + load(root, "qa_val.json")
    assert sorted((e["image"], e["category"]) for e in entries) == sorted(
        (e["image"], e["category"]) for e in qa
    )
    for entry in entries:
        assert set(entry) == {"question_id", "image", "text", "answer", "category"}
        assert HELD_OUT[normalize(entry["text"])] == entry["category"]
        assert entry["answer"] == truth[(entry["image"], entry["category"])]
    captions = load(root, "captions_heldout.json") + load(root, "captions_heldout_val.json")
    for entry in captions:
        assert HELD_OUT[normalize(entry["text"])] == entry["category"] == "describe"
        assert entry["answer"] == truth[(entry["image"], "describe")]
    chats = load(root, "chat_heldout.json") + load(root, "chat_heldout_val.json")
    assert len(chats) == N
    mixed = 0
    for record in chats:
        turns = record["conversations"]
        assert len(turns) == 2 * EVAL_CHAT_TURNS and turns[0]["value"].startswith(IMAGE_TOKEN)
        assert all(IMAGE_TOKEN not in t["value"] for t in turns[1:])
        categories = [t["category"] for t in turns[::2]]
        mixed += len(set(categories)) > 1
        asked = [t["value"].removeprefix(f"{IMAGE_TOKEN}\n") for t in turns[::2]]
        assert len(set(asked)) == len(asked)
        for question, category, answer in zip(asked, categories, turns[1::2]):
            assert answer == {"from": "gpt", "value": truth[(record["image"], category)]}
            assert HELD_OUT[normalize(question)] == category
    assert mixed >= N / 2  # most chats mix categories


def test_held_out_wordings_never_reach_training(dataset, tmp_path):
    """No held-out wording in the training files nor in the demo's stage-2 mix."""
    for path in dataset[0].glob("*.json"):
        shutil.copy(path, tmp_path)
    root = tmp_path
    script = ROOT / "scripts" / "prepare_demo.py"
    spec = importlib.util.spec_from_file_location("prepare_demo", script)
    prepare_demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare_demo)
    prepare_demo.write_mix(root)
    asked = set()
    for name in ("pretrain", "finetune", "mix"):
        for record in load(root, f"{name}.json") + load(root, f"{name}_val.json"):
            for turn in record["conversations"][::2]:
                text = turn["value"].replace(IMAGE_TOKEN, "")
                asked.add(normalize(text.replace(prepare_demo.SINGLE_WORD_SUFFIX, "")))
    assert asked and not asked & set(HELD_OUT)
    assert asked <= set(TRAINED)
    assert len(asked) >= 50  # many wordings, from 40 pictures
