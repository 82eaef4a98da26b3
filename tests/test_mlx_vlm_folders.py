"""MLX folders written by mlx-vlm (as mlx-community publishes them) load as they are.

The folders under tests/fixtures/data/vlm-* were written by mlx-vlm's own converter
(tests/fixtures/make_mlx_vlm_fixtures.py). Float folders match transformers' recorded outputs;
a quantized folder matches the same folder with its tensors dequantized by `mx.dequantize` and
loaded as a float folder, and stays quantized in memory.
"""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from llava_testing.onevision import assert_matches_oracle, model_inputs, oracle
from llava_testing.parity import assert_logits_close, greedy_tokens, nhwc
from mlx_llava import convert, load
from mlx_llava.cli import generate as generate_cli
from mlx_llava.convert import QuantizeSpec, read_source

DATA = Path(__file__).parent / "fixtures" / "data"
IMAGE = DATA / "images" / "a.png"
QUANTIZED = ["vlm-hub-q4", "vlm-hub-q8", "vlm-hub-mxfp4", "vlm-next-mixed", "vlm-ov-q4"]


def dequantized_copy(folder: Path, out: Path) -> Path:
    """`folder` with each quantized layer replaced by `mx.dequantize` of it, as the `quantization`
    entry says (per-module overrides first), and the entry removed: a float mlx-vlm folder.
    (mxfp4 dequantizes to bfloat16, which holds its values exactly: 2-bit mantissas times
    powers of two.)"""
    shutil.copytree(folder, out)
    config = json.loads((out / "config.json").read_text())
    quant = config.pop("quantization")
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config))
    weights, metadata = mx.load(str(folder / "model.safetensors"), return_metadata=True)
    for key in [k for k in weights if k.endswith(".scales")]:
        module = key[: -len(".scales")]
        settings = {**quant, **(quant.get(module) or {})}
        weights[f"{module}.weight"] = mx.dequantize(
            weights[f"{module}.weight"],
            weights.pop(key),
            weights.pop(f"{module}.biases", None),
            group_size=settings["group_size"],
            bits=settings["bits"],
            mode=settings.get("mode", "affine"),
        )
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata=metadata)
    (out / "model.safetensors.index.json").unlink()
    return out


def hub_inputs():
    arrays = dict(np.load(DATA / "hf-hub" / "oracle.npz"))
    return arrays, mx.array(arrays["input_ids"]), nhwc(arrays["pixel_values"])


def next_inputs():
    arrays = dict(np.load(DATA / "next-hub" / "oracle.npz"))
    pixels = nhwc(arrays["wide_pixel_values"])
    sizes = [tuple(arrays["wide_image_sizes"][0].tolist())]
    return arrays, mx.array(arrays["wide_input_ids"]), pixels, sizes


def test_mlx_vlm_folders_are_told_apart_by_what_they_hold():
    for name in ["vlm-hub", "vlm-next", "vlm-ov", *QUANTIZED]:
        assert read_source(DATA / name).folders == [(DATA / name, "mlx_vlm")], name
    assert read_source(DATA / "hf-hub").folders == [(DATA / "hf-hub", "llava_hf")]


def test_float_folder_matches_transformers():
    arrays, ids, pixels = hub_inputs()
    model, processor = load(DATA / "vlm-hub")
    assert_logits_close(model(ids, pixel_values=pixels), arrays["logits"])
    meta = json.loads((DATA / "hf-hub" / "oracle.json").read_text())
    tokens = greedy_tokens(model, processor, meta["prompt"], [IMAGE], 24)
    assert tokens == arrays["greedy_tokens"].tolist()


def test_float_next_folder_matches_transformers():
    arrays, ids, pixels, sizes = next_inputs()
    model, _ = load(DATA / "vlm-next")
    logits = model(ids, pixel_values=pixels, image_sizes=sizes)
    assert_logits_close(logits[0, -1], arrays["wide_last_logits"])


def test_float_onevision_folder_matches_transformers():
    """A llava_onevision folder (SigLIP, Qwen2, tied embeddings): every recorded case of
    ov-hub's oracle, pictures, two pictures, a video and both, greedy tokens included."""
    model, processor = load(DATA / "vlm-ov")
    assert model.config.model_type == "llava_onevision"
    assert_matches_oracle(model, processor, *oracle("ov-hub"))


@pytest.mark.parametrize("name", QUANTIZED)
def test_quantized_folder_equals_its_dequantized_twin(name, tmp_path):
    model, processor = load(DATA / name, dtype="float32")
    twin, _ = load(dequantized_copy(DATA / name, tmp_path / "float"), dtype="float32")
    # Kept quantized exactly where the folder is, with the entry's (per-module) settings.
    quant = json.loads((DATA / name / "config.json").read_text())["quantization"]
    stored = mx.load(str(DATA / name / "model.safetensors"))
    quantized = {k[: -len(".scales")] for k in stored if k.endswith(".scales")}
    assert quantized
    if name != "vlm-next-mixed":  # mlx-vlm quantizes embeddings and lm_head too
        assert "language_model.model.embed_tokens" in quantized
    for path, module in model.named_modules():
        stored_path = path.replace("vision_tower.", "vision_tower.vision_model.", 1)
        if stored_path in quantized:
            settings = {**quant, **(quant.get(stored_path) or {})}
            assert hasattr(module, "scales"), path
            assert (module.bits, module.group_size) == (settings["bits"], settings["group_size"])
            assert module.mode == settings.get("mode", "affine"), path
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            assert not hasattr(module, "scales"), path
    if "ov" in name:
        arrays, meta = oracle("ov-hub")
        kwargs = model_inputs(processor, meta, arrays, "wide")
        ids = kwargs.pop("input_ids")
        prompt = meta["template"].format(q=meta["questions"]["wide"])
    elif "next" in name:
        arrays, ids, pixels, sizes = next_inputs()
        kwargs = dict(pixel_values=pixels, image_sizes=sizes)
        prompt = processor.format_prompt("What is in the picture?")
    else:
        arrays, ids, pixels = hub_inputs()
        kwargs = dict(pixel_values=pixels)
        prompt = json.loads((DATA / "hf-hub" / "oracle.json").read_text())["prompt"]
    # The prompt in the model's own float type: for mxfp4, mx.dequantize alone gives bfloat16
    # rows, which put the whole prompt, image features included, in bfloat16 (2.8e-3 x max).
    assert model.language_model.model.embed_tokens(ids).dtype == mx.float32
    ours, theirs = model(ids, **kwargs), twin(ids, **kwargs)
    assert_logits_close(ours, theirs)
    assert greedy_tokens(model, processor, prompt, [IMAGE], 12) == greedy_tokens(
        twin, processor, prompt, [IMAGE], 12
    )


def test_convert_dequantizes_and_requantizes(tmp_path):
    reference, _ = load(dequantized_copy(DATA / "vlm-hub-q4", tmp_path / "float"), dtype="float32")
    arrays, ids, pixels = hub_inputs()
    out = convert(DATA / "vlm-hub-q4", tmp_path / "ours", dtype="float32")
    model, _ = load(out)
    assert_logits_close(model(ids, pixel_values=pixels), reference(ids, pixel_values=pixels))
    again = convert(DATA / "vlm-hub", tmp_path / "q8", quantize=QuantizeSpec(8, 32))
    model, _ = load(again, dtype="float32")
    assert isinstance(model.language_model.model.embed_tokens, nn.QuantizedEmbedding)


def test_generate_cli_and_hub_ids_take_the_folder(tmp_path, monkeypatch, capsys):
    import mlx_llava.loader as loader

    argv = ["--model", str(DATA / "vlm-hub-q8"), "--image", str(IMAGE), "-p", "Hi", "-m", "4"]
    generate_cli.main([*argv, "--dtype", "float32"])
    assert capsys.readouterr().out.strip()
    # A hub id of an MLX folder is used from the hub's cache, not converted again.
    monkeypatch.setenv("MLX_LLAVA_CACHE", str(tmp_path))
    monkeypatch.setattr(loader, "resolve_folder", lambda name: DATA / "vlm-hub-q4")
    assert loader.resolve_model("mlx-community/llava-1.5-7b-4bit") == DATA / "vlm-hub-q4"
    assert not any(tmp_path.iterdir())
