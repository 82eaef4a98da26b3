"""Several ranks through `mlx.launch` (ring backend, 2 ranks on 127.0.0.1): data-parallel
training, captioning and evaluation give what one process gives, and pipeline-parallel
generation gives one process's answers with about half the memory on each rank.

Every launch is bounded by a timeout; the single-process references run in this process.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from llava_testing.checkpoints import tiny_untrained_config
from llava_testing.launching import launch
from llava_testing.tokenizer_builder import build_tokenizer
from mlx_llava import ChatSession, distributed, load, load_model
from mlx_llava.caption import caption_folder
from mlx_llava.data.shapes import generate_dataset
from mlx_llava.evaluation import read_questions
from mlx_llava.evaluation.runner import work_units
from mlx_llava.train import TrainArgs, init_model_folder, train
from mlx_llava.train import trainer as trainer_module

ROOT = Path(__file__).resolve().parents[1]


def _params(folder: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(load_model(folder).parameters())}


def _assert_same_weights(a: Path, b: Path, rtol: float = 1e-5) -> None:
    """Every tensor equal within `rtol` of its largest entry (float32)."""
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        scale = max(float(np.abs(pa[k]).max()), 1e-12)
        assert float(np.abs(pa[k] - pb[k]).max()) <= rtol * scale, k


def _log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


# Fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def small_model(tokenizer_dir, tmp_path_factory) -> Path:
    """A tiny random LLaVA for training (2 decoder layers of width 64)."""
    from transformers import AutoTokenizer

    config = tiny_untrained_config(AutoTokenizer.from_pretrained(tokenizer_dir), 64, 128, 2)
    return init_model_folder(tmp_path_factory.mktemp("small"), config, tokenizer_dir, seed=0)


@pytest.fixture(scope="module")
def deep_model(tokenizer_dir, tmp_path_factory) -> Path:
    """A random LLaVA whose 4 decoder layers (width 256) outweigh the rest, for pipelining.

    Its matrices are rescaled to N(0, 1/fan_in) (x0.3 inside the decoder layers), so that the
    answers depend on the picture and the prompt, and its lm_head rows of `</s>` and of the
    padded vocabulary are zero, so that greedy answers are text of full length."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = tiny_untrained_config(tokenizer, 256, 1024, 4)
    folder = init_model_folder(tmp_path_factory.mktemp("deep"), config, tokenizer_dir, seed=1)
    weights = {k: np.array(v) for k, v in mx.load(str(folder / "model.safetensors")).items()}
    for name, value in weights.items():
        if value.ndim > 1:
            fan_in = int(np.prod(value.shape[1:]))
            value *= fan_in**-0.5 / 0.02 * (0.3 if ".layers." in name else 1.0)
    head = weights["language_model.lm_head.weight"]
    head[tokenizer.eos_token_id] = 0
    head[len(tokenizer) :] = 0
    mx.save_safetensors(
        str(folder / "model.safetensors"), {k: mx.array(v) for k, v in weights.items()}
    )
    return folder


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """Shapes-world pictures, training records (one text-only) and questions."""
    root = tmp_path_factory.mktemp("shapes")
    generate_dataset(root, 9, seed=1234, min_size=48, max_size=120)
    records = json.loads((root / "finetune.json").read_text())
    records.append(
        {
            "id": "text-only",
            "conversations": [
                {"from": "human", "value": "What colors are there?"},
                {"from": "gpt", "value": "Red, green, blue and yellow."},
            ],
        }
    )
    (root / "mixed.json").write_text(json.dumps(records))
    (root / "images" / "zz_broken.png").write_text("not a picture")
    return root


# The helpers, with a stand-in group ----------------------------------------------------------


def _group(rank: int, size: int):
    return SimpleNamespace(rank=lambda: rank, size=lambda: size)


@pytest.mark.parametrize("n", [0, 1, 5, 8, 13])
@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_parts_are_contiguous_disjoint_and_balanced(n, size):
    parts = [distributed.part(n, _group(r, size)) for r in range(size)]
    items = list(range(n))
    assert sum((items[p] for p in parts), []) == items  # in order, each item once
    lengths = [p.stop - p.start for p in parts]
    assert max(lengths) - min(lengths) <= 1


def test_questions_about_one_picture_stay_together(shapes):
    _, questions = read_questions(shapes / "qa.json")
    units = work_units(questions)
    assert [q for unit in units for q in unit] == questions  # the order of one process
    for unit in units:
        assert len({q.image for q in unit}) == 1
    pictures = [unit[0].image for unit in units]
    assert len(pictures) == len(set(pictures))  # a picture's questions are one unit


def test_a_pipeline_rank_keeps_only_its_part(small_model):
    """Rank 0 of 2 keeps the last decoder layer, rank 1 the first and the vision side; each
    loads exactly those tensors (strictly), and 3 ranks cannot share 2 layers."""
    from mlx_llava.loader import build_model, read_model

    config, weights, _ = read_model(small_model, None)
    last = build_model(config, dict(weights), pipeline=_group(0, 2))
    first = build_model(config, dict(weights), pipeline=_group(1, 2))
    assert last.pipeline_stage() == "layers 1-1 of 2"
    assert first.pipeline_stage() == "layers 0-0 of 2, vision tower and projector"
    kept = [{k for k, _ in tree_flatten(m.parameters())} for m in (last, first)]
    assert not any(k.startswith(("vision_tower.", "multi_modal_projector.")) for k in kept[0])
    layers = "language_model.model.layers."
    for held, layer in zip(kept, ("1", "0")):
        assert {k for k in held if k.startswith(layers)} == {
            k for k in weights if k.startswith(layers + layer + ".")
        }
    assert "language_model.lm_head.weight" in kept[0] & kept[1]  # every rank picks tokens
    with pytest.raises(ValueError, match="3 ranks cannot share 2 decoder layers"):
        build_model(config, dict(weights), pipeline=_group(0, 3))


def test_generate_flags_that_do_not_go_with_ranks(monkeypatch, capsys):
    from mlx_llava.cli import generate as generate_cli

    def error(argv) -> str:
        with pytest.raises(SystemExit) as exit_:
            generate_cli.main(["--model", "demo"] + argv)
        assert exit_.value.code == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        return lines[0]

    assert "caption.py under mlx.launch" in error(["--pipeline", "--image-dir", "."])
    assert "--kv-bits does not go with --pipeline" in error(["--pipeline", "--kv-bits", "8"])
    monkeypatch.setattr(distributed, "size", lambda group=None: 2)  # as under mlx.launch -n 2
    assert "needs --pipeline" in error(["--prompt", "Hi"])


# Data-parallel training ----------------------------------------------------------------------

TRAIN = dict(
    stage="finetune",
    iters=4,
    batch_size=5,  # 3 + 2 samples on 2 ranks, of different lengths (one text-only)
    grad_accum=2,
    learning_rate=1e-3,
    log_every=1,
    save_every=2,
    compile=False,
)


def _train_flags(model: Path, data: Path, out: Path, **extra) -> list[str]:
    flags = {**TRAIN, **extra}
    argv = ["--model", str(model), "--data", str(data), "--output", str(out)]
    for key, value in flags.items():
        if key == "compile":
            argv += [] if value else ["--no-compile"]
        elif value is True:
            argv.append(f"--{key.replace('_', '-')}")
        else:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


@pytest.fixture(scope="module")
def one_process_run(small_model, shapes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "one"
    return train(
        TrainArgs(model=str(small_model), data=str(shapes / "mixed.json"), output=str(out), **TRAIN)
    )


def test_two_ranks_train_the_weights_of_one_process(small_model, shapes, one_process_run, tmp_path):
    out = tmp_path / "two"
    _, err = launch("train.py", *_train_flags(small_model, shapes / "mixed.json", out))
    _assert_same_weights(one_process_run, out)
    one, two = _log(one_process_run), _log(out)
    assert [e["iter"] for e in two] == [1, 2, 3, 4] and all(e["ranks"] == 2 for e in two)
    assert all(e["ranks"] == 1 for e in one)
    np.testing.assert_allclose([e["loss"] for e in two], [e["loss"] for e in one], rtol=1e-5)
    assert "| ranks 2 |" in err and err.count("saved the model") == 1  # rank 0 alone reports
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["iteration"] == 4 and state["ranks"] == 2


def test_two_ranks_resume_a_checkpoint(small_model, shapes, one_process_run, tmp_path, monkeypatch):
    """A one-process run that stopped after its checkpoint at iteration 2 is finished by two
    ranks: rank 0 reads the checkpoint and hands the others its weights and optimizer state."""
    out = tmp_path / "split"
    save = trainer_module.save_checkpoint

    def crash_after_first_save(folder, model, optimizer, state):
        save(folder, model, optimizer, state)
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(trainer_module, "save_checkpoint", crash_after_first_save)
    data = shapes / "mixed.json"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(TrainArgs(model=str(small_model), data=str(data), output=str(out), **TRAIN))
    _, err = launch("train.py", *_train_flags(small_model, data, out, resume=True))
    assert "resuming at iteration 2" in err
    _assert_same_weights(one_process_run, out)
    assert [e["ranks"] for e in _log(out)] == [1, 1, 2, 2]


# Data-parallel captioning and evaluation -----------------------------------------------------


def test_two_ranks_caption_the_file_of_one_process_and_resume(shapes, tmp_path):
    """Pictures split across the ranks give one process's file line for line; a run cut short
    (its last record half written) is finished by two ranks."""
    model, processor = load("demo")
    one = tmp_path / "one.jsonl"
    caption_folder(model, processor, shapes / "images", one, batch_size=2, max_tokens=12)
    lines = one.read_text().splitlines(keepends=True)
    assert len(lines) == 9  # the broken file is skipped

    two = tmp_path / "two.jsonl"
    two.write_text("".join(lines[:3]) + lines[3][:10])  # interrupted while writing line 4
    _, err = launch(
        "caption.py", "--model", "demo", "--image-dir", str(shapes / "images"), "--output",
        str(two), "--batch-size", "2", "-m", "12",
    )  # fmt: skip
    assert "resuming: 3 of 10 pictures" in err and err.count("skipping zz_broken.png") == 1
    assert two.read_text() == "".join(lines[:3]) + lines[3][:10] + "\n" + "".join(lines[3:])


def test_two_ranks_evaluate_like_one_process(shapes, tmp_path):
    from mlx_llava.cli import evaluate as evaluate_cli

    one = tmp_path / "one.jsonl"
    argv = ["--model", "demo", "--data", str(shapes / "qa.json"), "--json"]
    evaluate_cli.main(argv + ["--output", str(one)])
    two = tmp_path / "two.jsonl"
    out, _ = launch("evaluate.py", *argv, "--output", str(two))
    assert two.read_text() == one.read_text()
    summary = json.loads(out)  # rank 0 alone prints the summary
    assert summary["overall"]["n"] == len(one.read_text().splitlines())


# Pipeline-parallel generation ----------------------------------------------------------------

PICTURE = ROOT / "examples" / "red_circle.png"
RANK_LINE = re.compile(
    r"rank (\d): layers (\d+)-(\d+) of \d+(, vision tower and projector)?, "
    r"peak memory ([\d.]+) (KB|MB)"
)


def _rank_lines(err: str) -> dict[int, tuple]:
    found = {}
    for m in RANK_LINE.finditer(err):
        scale = 1e3 if m[6] == "KB" else 1e6
        found[int(m[1])] = (int(m[2]), int(m[3]), bool(m[4]), float(m[5]) * scale)
    return found


def test_pipeline_chats_as_one_process_with_half_the_memory(deep_model):
    """A two-turn chat (stdin reaches every rank; rank 0 alone prints) gives one process's
    greedy answers, and each rank's peak memory is under 0.6 of one process's: rank 0 holds the
    last 2 of 4 decoder layers, rank 1 the first 2 and the vision tower."""
    turns = ["What is it?", "And then?"]
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    model, processor = load(deep_model)
    session = ChatSession(model, processor, image=str(PICTURE))
    expected = [session.send(turn, max_tokens=10) for turn in turns]
    whole = mx.get_peak_memory() - base

    argv = ["--model", str(deep_model), "--image", str(PICTURE), "--chat", "--pipeline"]
    stdin = "\n".join(turns) + "\n/exit\n"
    out, err = launch("generate.py", *argv, "--max-tokens", "10", "--verbose", stdin=stdin)
    assert len(set(expected)) == 2 and all(expected)  # two different, non-empty answers
    assert out == "".join(answer + "\n" for answer in expected)
    ranks = _rank_lines(err)
    assert ranks[0][:3] == (2, 3, False) and ranks[1][:3] == (0, 1, True)
    for r in (0, 1):
        assert ranks[r][3] < 0.6 * whole, (ranks, whole)


def test_pipeline_ranks_sample_the_same_tokens(deep_model):
    """Unseeded sampling: the ranks share one random state, so every rank picks rank 0's
    tokens (else each would feed its own tokens to its layers)."""
    out, _ = launch("-m", "llava_testing.pipeline_tokens", str(deep_model), str(PICTURE))
    rank0, rank1 = json.loads(out)
    assert rank0 == rank1 and len(rank0) > 1


def test_a_qwen2_pipeline_answers_as_one_process():
    """The language-model wrapper splits any mlx-lm decoder: OneVision's tied Qwen2 (mlx-lm's
    qwen2 module) on two ranks gives one process's greedy answer about a tiled picture."""
    from mlx_llava import generate

    folder = ROOT / "tests" / "fixtures" / "data" / "ov-hub"
    picture = str(folder.parent / "images" / "wide.png")
    model, processor = load(folder)
    prompt = processor.format_prompt("What is in the picture?", 1)
    expected = generate(model, processor, prompt, picture, max_tokens=12)
    argv = ["--model", str(folder), "--image", picture, "-p", "What is in the picture?"]
    out, err = launch("generate.py", *argv, "-m", "12", "--pipeline", "--verbose")
    assert expected and out == expected + "\n"
    assert set(_rank_lines(err)) == {0, 1}
