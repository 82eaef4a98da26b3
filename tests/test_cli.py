"""The command lines: answers stream from a converted checkpoint; bad input gets one line."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llava_testing.cli import run_main
from mlx_llava import generate, load
from mlx_llava.cli import convert as convert_cli
from mlx_llava.cli import generate as generate_cli

ROOT = Path(__file__).parent.parent
DATA = Path(__file__).parent / "fixtures" / "data"
IMAGE = DATA / "images" / "a.png"
HF = DATA / "hf-hub"


@pytest.fixture(scope="module")
def mlx_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "mlx"
    convert_cli.main(["--hf-path", str(HF), "--mlx-path", str(out), "--dtype", "float32"])
    return out


def assert_one_line_error(code, err, *fragments):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def expected_answer(mlx_folder, question: str, max_tokens: int) -> str:
    """What `generate` answers to the question, templated as the CLI does it."""
    model, processor = load(mlx_folder)
    prompt = processor.format_prompt(question, num_images=1)
    return generate(model, processor, prompt, image=IMAGE, max_tokens=max_tokens)


def test_generate_streams_an_answer_from_a_converted_checkpoint(mlx_folder, capsys):
    argv = ["--model", str(mlx_folder), "--image", str(IMAGE), "-p", "What is it?", "-m", "8"]
    code, out, err = run_main(generate_cli.main, argv + ["--verbose"], capsys)
    assert code == 0 and out == expected_answer(mlx_folder, "What is it?", 8) + "\n"
    assert out.strip()
    assert "time to first token" in err and "tokens/s" in err and "peak memory" in err


def test_a_prompt_without_a_picture_gets_a_note(mlx_folder, capsys):
    argv = ["--model", str(mlx_folder), "-p", "Hello", "-m", "2"]
    code, out, err = run_main(generate_cli.main, argv, capsys)
    assert code == 0 and out.strip()
    assert err.splitlines() == ["note: no --image: the model answers from the text alone"]
    argv += ["--image", str(IMAGE)]
    code, out, err = run_main(generate_cli.main, argv, capsys)
    assert code == 0 and err == ""


def test_kv_bits_on_heads_64_does_not_divide(capsys):
    """The demo's heads are 32 wide: its KV cache is quantized in groups of 32, not refused
    with MLX's raw message (mlx-lm's default group of 64 does not divide 32)."""
    image = ROOT / "examples" / "red_circle.png"
    argv = ["--model", "demo", "--image", str(image), "-p", "What shape is this?", "--kv-bits"]
    code, out, err = run_main(generate_cli.main, argv + ["8"], capsys)
    assert (code, out, err) == (0, "circle\n", "")


def test_cli_scripts_run_as_a_user_types_them(mlx_folder, tmp_path):
    """The real scripts: an answer on stdout, and a bad image as one stderr line, exit 1."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ok = subprocess.run(
        [sys.executable, "generate.py", "--model", str(mlx_folder), "--image", str(IMAGE)]
        + ["--prompt", "Describe it.", "--max-tokens", "6"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == expected_answer(mlx_folder, "Describe it.", 6) + "\n"
    bad = subprocess.run(
        [sys.executable, "generate.py", "--model", str(mlx_folder), "--image", "missing.jpg"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        "error: cannot read image 'missing.jpg': file not found"
    ]


@pytest.fixture
def corrupt_image(tmp_path):
    path = tmp_path / "corrupt.png"
    path.write_bytes(IMAGE.read_bytes()[:60])
    return path


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--image", "nope.jpg"], ["nope.jpg", "not found"]),
        (["--image", "CORRUPT"], ["corrupt.png"]),
        (["--image", "http://127.0.0.1:9/x.png"], ["http://127.0.0.1:9/x.png"]),
        (["--image", str(IMAGE), "-p", "<image> and <image>: same?"], ["2 <image>", "1 image"]),
        (["-p", "<image>\nWhat is it?"], ["1 <image>", "0 image"]),
        (["--image", str(IMAGE), "-p", "word " * 400], ["context is 256"]),
        (["--image", str(IMAGE), "--max-tokens", "0"], ["--max-tokens must be >= 1, got 0"]),
        (["--image", str(IMAGE), "--temp", "-1"], ["--temp must be in [0, 2], got -1"]),
        (["--image", str(IMAGE), "--top-p", "1.5"], ["--top-p must be in [0, 1], got 1.5"]),
        (["--image", str(IMAGE), "--top-k", "-3"], ["--top-k must be >= 0, got -3"]),
        (["--image", str(IMAGE), "--min-p", "2"], ["--min-p must be in [0, 1], got 2"]),
        (
            ["--image", str(IMAGE), "--repetition-penalty", "0"],
            ["--repetition-penalty must be > 0"],
        ),
        (["--image", str(IMAGE), "--repetition-context-size", "0"], ["--repetition-context-size"]),
        (
            ["--image", str(IMAGE), "--seed", "-5"],
            ["--seed must be in [0, 2**64) or -1 for random, got -5"],
        ),
        (["--image", str(IMAGE), "--kv-bits", "5"], ["--kv-bits must be one of 2, 3, 4, 6, 8"]),
        (["--image", str(IMAGE), "--kv-bits", "8"], ["attention heads are 8 wide: too small"]),
        (["--image", str(IMAGE), "-p", " "], ["--prompt is empty"]),
        (["--image", str(IMAGE), "--conv-mode", "nope"], ["unknown conversation template 'nope'"]),
    ],
)
def test_generate_bad_input(mlx_folder, corrupt_image, capsys, extra, fragments):
    extra = [str(corrupt_image) if e == "CORRUPT" else e for e in extra]
    code, out, err = run_main(generate_cli.main, ["--model", str(mlx_folder), *extra], capsys)
    assert_one_line_error(code, err, *fragments)


def test_model_folders_that_are_not_usable(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(HF / "config.json", no_weights / "config.json")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    cases = {
        tmp_path / "missing": "not found",
        "./nomodel": "model folder './nomodel' not found",
        empty: "has no config.json",
        no_weights: "no weights",
        bert: "not a LLaVA checkpoint",
    }
    for folder, fragment in cases.items():
        code, _, err = run_main(generate_cli.main, ["--model", str(folder)], capsys)
        assert_one_line_error(code, err, fragment)
        assert "hub" not in err or folder != "./nomodel"


def test_hub_id_while_offline_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MLX_LLAVA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    code, _, err = run_main(generate_cli.main, ["--model", "llava-hf/no-such-model-here"], capsys)
    assert_one_line_error(
        code, err, "'llava-hf/no-such-model-here' not found", "cannot be downloaded", "offline"
    )
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_convert_refuses_an_existing_folder_unless_forced(mlx_folder, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["--hf-path", str(HF), "--mlx-path", str(out), "--dtype", "float32"]
    code, _, err = run_main(convert_cli.main, argv, capsys)
    assert_one_line_error(code, err, "already exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"
    code, _, _ = run_main(convert_cli.main, argv + ["--force"], capsys)
    assert code == 0 and (out / "config.json").exists() and not (out / "keep.txt").exists()


def test_failed_conversion_leaves_nothing_behind(tmp_path, capsys):
    """A checkpoint whose config disagrees with its tensors: an error, and no output folder."""
    bad = tmp_path / "bad"
    shutil.copytree(HF, bad)
    config = json.loads((bad / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 80
    (bad / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    code, _, err = run_main(
        convert_cli.main, ["--hf-path", str(bad), "--mlx-path", str(out)], capsys
    )
    assert_one_line_error(code, err, "has shape")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_bin_checkpoint_without_torch(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    argv = ["--hf-path", str(DATA / "orig-v15"), "--mlx-path", str(tmp_path / "out")]
    argv += ["--vision-tower", str(DATA / "orig-v15-clip")]
    code, _, err = run_main(convert_cli.main, argv, capsys)
    assert_one_line_error(code, err, "PyTorch checkpoint", "needs torch")
    assert not (tmp_path / "out").exists()


def _original_copy(tmp_path, **changes) -> Path:
    folder = tmp_path / "orig"
    shutil.copytree(DATA / "orig-v1", folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "changes, tower_hidden, fragment",
    [
        ({}, 16, "vision tower mismatch"),
        ({"mm_projector_type": "mlp3x_gelu"}, None, "unknown projector type 'mlp3x_gelu'"),
        ({"mm_use_im_start_end": True}, None, "mm_use_im_start_end"),
    ],
)
def test_original_bad_input(tmp_path, capsys, changes, tower_hidden, fragment):
    folder = _original_copy(tmp_path, **changes)
    tower = DATA / "orig-v1-clip"
    if tower_hidden:
        tower = tmp_path / "clip"
        shutil.copytree(DATA / "orig-v1-clip", tower)
        config = json.loads((tower / "config.json").read_text())
        config["hidden_size"] = tower_hidden
        (tower / "config.json").write_text(json.dumps(config))
    argv = ["--hf-path", str(folder), "--mlx-path", str(tmp_path / "out")]
    code, _, err = run_main(convert_cli.main, argv + ["--vision-tower", str(tower)], capsys)
    assert_one_line_error(code, err, fragment)


def test_original_without_a_reachable_vision_tower(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    folder = _original_copy(tmp_path)
    argv = ["--hf-path", str(folder), "--mlx-path", str(tmp_path / "out")]
    code, _, err = run_main(convert_cli.main, argv, capsys)
    assert_one_line_error(code, err, "openai/clip-vit-large-patch14", "local folder")
