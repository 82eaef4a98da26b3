"""Writes that survive a crash, and conversion of what was already converted.

A converted folder replaced with --force and a training checkpoint are swapped by renames
(mlx_llava/atomic.py). Each test kills a real process (SIGKILL) at one step of the swap and checks
that the old or the new folder is there afterwards, complete, never neither.
"""

from __future__ import annotations

import io
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_llava import convert, load
from mlx_llava.atomic import recover_dir
from mlx_llava.convert import QuantizeSpec
from mlx_llava.progress import Progress
from mlx_llava.weights import load_weights

ROOT = Path(__file__).resolve().parents[1]
HF = ROOT / "tests" / "fixtures" / "data" / "hf-hub"
STEPS = ["writing", "ready", "retired", "installed"]


def run_killed(script: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run a Python script that is expected to kill itself with SIGKILL."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


KILL_AT = """
import os, signal
import mlx_llava.atomic as atomic
import mlx_llava.weights as weights

STEP = {step!r}

def kill(step):
    if step == STEP:
        os.kill(os.getpid(), signal.SIGKILL)

atomic._after_step = kill
if STEP == "writing":  # killed with half of the new folder written
    close = weights.ShardWriter.close
    def half_close(self):
        self.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    weights.ShardWriter.close = half_close
"""


def folder_dtype(folder: Path) -> mx.Dtype:
    return load_weights(folder)["language_model.model.norm.weight"].dtype


@pytest.mark.parametrize("step", STEPS)
def test_convert_force_killed_at_any_step_leaves_old_or_new(tmp_path, step):
    out = tmp_path / "model"
    convert(HF, out, dtype="float32", progress=False)  # the old folder
    script = KILL_AT.format(step=step) + textwrap.dedent(f"""
        from mlx_llava import convert
        convert({str(HF)!r}, {str(out)!r}, dtype="float16", force=True, progress=False)
        """)
    done = run_killed(script, tmp_path)
    assert done.returncode == -signal.SIGKILL, done.stderr
    recover_dir(out)
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "model")
    assert leftovers == []
    expected = mx.float32 if step == "writing" else mx.float16
    assert folder_dtype(out) == expected  # old when the new was incomplete, else new
    model, processor = load(out)  # and it is whole
    assert processor.tokenizer is not None


def test_a_folder_missing_after_a_crash_is_recovered_by_load(tmp_path):
    out = tmp_path / "model"
    convert(HF, out, dtype="float32", progress=False)
    script = KILL_AT.format(step="retired") + textwrap.dedent(f"""
        from mlx_llava import convert
        convert({str(HF)!r}, {str(out)!r}, dtype="float16", force=True, progress=False)
        """)
    run_killed(script, tmp_path)
    assert not out.exists()  # the dangerous moment: the old one moved aside
    load(out, dtype="float32")  # load finishes the swap
    assert folder_dtype(out) == mx.float16


def test_converted_folders_have_the_users_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        out = convert(HF, tmp_path / "a" / "model", dtype="float32", progress=False)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "config.json").stat().st_mode) == 0o644


# Converting again ---------------------------------------------------------------------------


def tensors(folder: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in load_weights(folder).items()}


def test_quantizing_a_converted_folder_equals_quantizing_the_checkpoint(tmp_path):
    spec = QuantizeSpec(bits=4, group_size=32)
    f16 = convert(HF, tmp_path / "f16", dtype="float16", progress=False)
    direct = convert(HF, tmp_path / "direct", dtype="float16", quantize=spec, progress=False)
    again = convert(f16, tmp_path / "again", dtype="float16", quantize=spec, progress=False)
    a, b = tensors(direct), tensors(again)
    assert a.keys() == b.keys() and any(k.endswith(".scales") for k in a)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    config = json.loads((again / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 32


def test_a_quantized_folder_converts_back_to_floats(tmp_path):
    spec = QuantizeSpec(bits=8, group_size=32)
    q8 = convert(HF, tmp_path / "q8", dtype="float32", quantize=spec, progress=False)
    back = convert(q8, tmp_path / "back", dtype="float32", progress=False)
    q, f = load_weights(q8), tensors(back)
    name = "language_model.model.layers.0.mlp.down_proj"
    expected = mx.dequantize(
        q[f"{name}.weight"], q[f"{name}.scales"], q[f"{name}.biases"], group_size=32, bits=8
    )
    np.testing.assert_array_equal(f[f"{name}.weight"], np.array(expected))
    assert not any(k.endswith((".scales", ".biases")) for k in f)
    assert "quantization" not in json.loads((back / "config.json").read_text())
    load(back)


def test_convert_cli_takes_the_demo_and_requantizes_in_place(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = tmp_path / "demo"

    def cli(*args):
        return subprocess.run(
            [sys.executable, str(ROOT / "convert.py"), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )

    done = cli("--hf-path", "demo", "--mlx-path", str(out), "--dtype", "float32")
    assert done.returncode == 0, done.stderr
    done = cli(
        "--hf-path",
        str(out),
        "--mlx-path",
        str(out),
        "-q",
        "--q-bits",
        "8",
        "--q-group-size",
        "32",
        "--force",
    )
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8
    model, processor = load(out, dtype="float32")
    prompt = processor.format_prompt("What shape is in the picture?")
    from mlx_llava import generate

    answer = generate(model, processor, prompt, image=ROOT / "examples" / "red_circle.png")
    assert "circle" in answer.lower(), answer


# Progress -----------------------------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_conversion_progress_shows_on_a_terminal_only(tmp_path, capsys, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    convert(HF, tmp_path / "a", dtype="float32")
    shown = terminal.getvalue()
    assert "\rconverted " in shown and " left)" in shown
    last = shown.rstrip().split("\r")[-1]
    total = last.split("/")[1].split(" (")[0]
    assert last.startswith(f"converted {total}/{total}")  # ends at 100 %
    monkeypatch.setattr(sys, "stderr", terminal := Terminal())
    convert(HF, tmp_path / "b", dtype="float32", progress=False)  # --quiet
    assert terminal.getvalue() == ""
    monkeypatch.undo()
    convert(HF, tmp_path / "c", dtype="float32")  # not a terminal: silent
    assert capsys.readouterr().err == ""


def test_progress_line_counts_and_estimates():
    clock = iter([0.0, 2.0, 4.0]).__next__
    stream = Terminal()
    meter = Progress(100, "captioned", "images", stream=stream, clock=clock)
    meter.update(50, ", 1 skipped")
    assert stream.getvalue() == "\rcaptioned 50/100, 1 skipped (25.00 images/s, 2s left)\033[K"
    plain = io.StringIO()
    meter = Progress(10, "[evaluate]", "q", stream=plain, clock=iter([0.0] + [1.0] * 10).__next__)
    for i in range(1, 11):
        meter.update(i)
    assert len(plain.getvalue().splitlines()) == 10
    quiet = io.StringIO()
    Progress(10, "x", stream=quiet, terminal_only=True).update(5)
    assert quiet.getvalue() == ""


# Training checkpoints -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_training(tmp_path_factory):
    """A tiny untrained model (MLX, no torch) and a few shapes-world samples."""
    from llava_testing.checkpoints import tiny_untrained_config
    from llava_testing.tokenizer_builder import build_tokenizer
    from mlx_llava.data.shapes import generate_dataset
    from mlx_llava.train import init_model_folder

    root = tmp_path_factory.mktemp("training")
    tokenizer = build_tokenizer(root / "tokenizer")
    config = tiny_untrained_config(tokenizer, hidden=32, intermediate=64, layers=1)
    model = init_model_folder(root / "model", config, root / "tokenizer", seed=0)
    generate_dataset(root / "shapes", 6, seed=0, min_size=32, max_size=40)
    return model, root / "shapes"


TRAIN = """
from mlx_llava.train import TrainArgs, train
train(TrainArgs(model={model!r}, data={data!r}, output={out!r}, stage="finetune", iters=3,
                batch_size=2, save_every=1, log_every=1, compile=False, resume={resume}))
"""


@pytest.mark.parametrize("step", ["retired"])  # the old checkpoint moved aside, the new not in
def test_training_killed_while_saving_a_checkpoint_resumes(tiny_training, tmp_path, step):
    model, shapes = tiny_training
    out = tmp_path / "run"
    args = dict(model=str(model), data=str(shapes / "finetune.json"), out=str(out))
    # Killed at `step` of the second checkpoint's swap (the first one had no old folder).
    kill = textwrap.dedent(f"""
        import os, signal
        import mlx_llava.atomic as atomic
        calls = []
        def kill(step):
            calls.append(step)
            if step == {step!r} and calls.count("ready") == 2:  # the second checkpoint
                os.kill(os.getpid(), signal.SIGKILL)
        atomic._after_step = kill
        """)
    done = run_killed(kill + TRAIN.format(resume=False, **args), tmp_path)
    assert done.returncode == -signal.SIGKILL, done.stderr
    resumed = run_killed(TRAIN.format(resume=True, **args), tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at iteration 2" in resumed.stderr  # the new checkpoint survived
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["iteration"] == 3
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    load(out)
