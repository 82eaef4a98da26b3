"""Data files name pictures inside an image folder: nothing outside it is read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from mlx_llava.conversation import get_template
from mlx_llava.datafiles import DataFileError, relative_picture
from mlx_llava.evaluation import EvaluationError, read_questions
from mlx_llava.loader import read_model
from mlx_llava.processor import Processor
from mlx_llava.train.data import BadSamplePolicy, prepare_samples

DATA = Path(__file__).parent / "fixtures" / "data"
ESCAPING = ["/etc/passwd", "../secret.png", "a/../../secret.png", "..", "C:\\pics\\a.png"]


@pytest.mark.parametrize("name", ESCAPING)
def test_absolute_and_escaping_paths_are_refused(name):
    with pytest.raises(DataFileError, match=r"entry 'x': image .* not a path inside the image"):
        relative_picture(name, "entry 'x'")


@pytest.mark.parametrize(
    "name, normal",
    [
        ("a.png", "a.png"),
        ("sub/b.jpg", "sub/b.jpg"),
        ("sub/../a.png", "a.png"),
        ("./a.png", "a.png"),
    ],
)
def test_paths_inside_the_folder_are_kept(name, normal):
    assert relative_picture(name, "entry") == normal


@pytest.fixture(scope="module")
def processor():
    config, _, folders = read_model(DATA / "hf-hub", "float32")
    return Processor.from_pretrained(folders, config)


def test_training_skips_a_sample_that_names_a_picture_outside_the_folder(processor, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(folder / "a.png")
    Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "outside.png")  # exists, readable
    turns = [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "Blue."}]
    records = [
        {"id": "inside", "image": "a.png", "conversations": turns},
        {"id": "escape", "image": "../outside.png", "conversations": turns},
        {"id": "absolute", "image": str(tmp_path / "outside.png"), "conversations": turns},
    ]
    warnings = []
    policy = BadSamplePolicy("skip", warn=warnings.append)
    samples = prepare_samples(records, processor, get_template("vicuna_v1"), folder, 256, policy)
    assert [s.id for s in samples] == ["inside"]
    assert len(warnings) == 2
    assert "entry 'escape': image '../outside.png' is not a path inside" in warnings[0]
    assert "entry 'absolute'" in warnings[1]
    with pytest.raises(Exception, match="entry 'escape'"):
        prepare_samples(
            records, processor, get_template("vicuna_v1"), folder, 256, BadSamplePolicy("stop")
        )


def test_evaluation_refuses_a_question_about_a_picture_outside_the_folder(tmp_path):
    path = tmp_path / "q.json"
    questions = [
        {"question_id": "ok", "image": "a.png", "text": "Colour?"},
        {"question_id": "q7", "image": "../../etc/passwd", "text": "Colour?"},
    ]
    path.write_text(json.dumps(questions))
    with pytest.raises(EvaluationError, match=r"entry 2: image '../../etc/passwd' is not a path"):
        read_questions(path)
