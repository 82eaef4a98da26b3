"""Quantized conversion: what `convert -q` writes, how it loads, what it costs in size and quality.

A small random llava-hf checkpoint is written here (with MLX, no torch). Its widths are multiples of
64, so that the layers quantize, except the attention output projection (4 heads x head_dim 72 =
288 inputs) and the vision MLP's `fc2` (96 inputs): those stay unquantized and must be recorded as
`path: false` in config.json's `quantization` entry. (MLX groups along a weight's last, input
dimension, so the vocabulary size plays no part.)
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.cache import QuantizedKVCache
from PIL import Image

from llava_testing.checkpoints import write_llava_hf
from mlx_llava import PromptCache, QuantizeSpec, convert, load, stream_generate
from mlx_llava.cli.convert import main as convert_main

VISION = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    image_size=28, patch_size=7,
)  # fmt: skip
TEXT = dict(
    hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
    head_dim=72, vocab_size=512, max_position_embeddings=256, rms_norm_eps=1e-5,
)  # fmt: skip
UNQUANTIZABLE = {f"language_model.model.layers.{i}.self_attn.o_proj" for i in range(2)}
UNQUANTIZABLE_VISION = {f"vision_tower.encoder.layers.{i}.mlp.fc2" for i in range(2)}
PROMPT = (
    "USER: <image>\nWhat is in the picture? Describe the colours, the shapes and the animals. "
    "Is there a red cat in the garden? How many dogs are there? ASSISTANT:"
)

# Measured on this checkpoint against its float32 conversion (MLX 0.32.4, CPU), over the 96
# positions of PROMPT with its picture: weight files' size vs float16's, argmax agreement, mean KL.
MEASURED = {
    8: (0.597, 1.000, 3.37e-5),
    4: (0.382, 0.812, 9.48e-3),
    "4+vision": (None, 0.760, 1.15e-2),
}
# The margins: sizes are exact (2 % above); the argmax agreement may lose 3 positions of 96; the
# KL may be 1.5x off either way (a quantization that did nothing has a KL of 0).
SIZE_MARGIN, AGREEMENT_MARGIN, KL_FACTOR = 1.02, 3 / 96, 1.5


def assert_quality(name, agree: float, kl: float) -> None:
    """Argmax agreement and KL as measured for `name` (see MEASURED), within the margins."""
    _, measured_agree, measured_kl = MEASURED[name]
    print(f"{name}: argmax agreement {agree:.3f}, KL {kl:.3g}")
    assert agree >= measured_agree - AGREEMENT_MARGIN, (name, agree)
    assert measured_kl / KL_FACTOR <= kl <= measured_kl * KL_FACTOR, (name, kl)


def _build_checkpoint(out: Path, text: dict = TEXT, vision: dict = VISION) -> Path:
    """A random llava-hf checkpoint (see `RandomInit`: matrices ~ N(0, 1/fan_in), x0.3 inside the
    blocks, so that the logits depend on the picture and the prompt and each layer nudges the
    residual stream instead of compounding the rounding of every layer into argmax flips)."""
    return write_llava_hf(out, vision, text, seed=0)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """The llava-hf source and its conversions: float32, float16, 4 and 8 bits, 4 bits + vision."""
    root = tmp_path_factory.mktemp("quantize")
    src = _build_checkpoint(root / "hf")
    out = {"hf": src}
    for name, dtype in (("f32", "float32"), ("f16", "float16")):
        out[name] = convert(src, root / name, dtype=dtype)
    for bits in (4, 8):
        out[f"q{bits}"] = root / f"q{bits}"
        convert_main(
            ["--hf-path", str(src), "--mlx-path", str(out[f"q{bits}"]), "-q"]
            + ["--q-bits", str(bits), "--q-group-size", "64"]
        )
    out["q4v"] = convert(src, root / "q4v", quantize=QuantizeSpec(4, 64, vision=True))
    return out


@pytest.fixture(scope="module")
def reference(checkpoints):
    """The float32 model's log-probabilities over a prompt with a picture, and its inputs."""
    model, processor = load(checkpoints["f32"])
    assert model.language_model.model.layers[0].self_attn.q_proj.weight.dtype == mx.float32
    inputs = processor(PROMPT, [reference_image()])
    assert inputs["input_ids"].shape[1] > 90
    return inputs, _log_probs(model, inputs)


def reference_image() -> Image.Image:
    rng = np.random.RandomState(0)
    return Image.fromarray((rng.rand(40, 50, 3) * 255).astype(np.uint8))


def _log_probs(model, inputs) -> mx.array:
    """Log-probabilities [L, vocab] at every position of the prompt."""
    logits = model(inputs["input_ids"], inputs["pixel_values"]).astype(mx.float32)[0]
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def _weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _quantized_modules(model) -> dict[str, nn.Module]:
    return {
        path: m
        for path, m in model.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    }


def quality(reference_lp: mx.array, lp: mx.array) -> tuple[float, float]:
    """(argmax agreement, mean KL(reference || quantized)) over all positions."""
    agree = (reference_lp.argmax(-1) == lp.argmax(-1)).astype(mx.float32).mean()
    kl = (mx.exp(reference_lp) * (reference_lp - lp)).sum(-1).mean()
    return agree.item(), kl.item()


@pytest.mark.parametrize("bits", [4, 8])
def test_config_records_mlx_lm_quantization(checkpoints, bits):
    config = json.loads((checkpoints[f"q{bits}"] / "config.json").read_text())
    quant = config["quantization"]
    assert quant["bits"] == bits and quant["group_size"] == 64 and quant["mode"] == "affine"
    assert {k for k, v in quant.items() if v is False} == UNQUANTIZABLE
    assert config.get("quantization_config") == quant  # mlx-lm writes both


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_layers_language_model_only(checkpoints, bits):
    model, _ = load(checkpoints[f"q{bits}"])
    quantized = _quantized_modules(model)
    assert all(p.startswith("language_model.") for p in quantized)
    assert isinstance(quantized["language_model.model.embed_tokens"], nn.QuantizedEmbedding)
    assert isinstance(quantized["language_model.lm_head"], nn.QuantizedLinear)
    layer = "language_model.model.layers.1"
    for name in ("self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.down_proj"):
        assert quantized[f"{layer}.{name}"].bits == bits
    for path in UNQUANTIZABLE:
        assert path not in quantized
    assert type(model.vision_tower.encoder.layers[0].mlp.fc1) is nn.Linear
    assert type(model.multi_modal_projector.linear_1) is nn.Linear


def test_quantize_vision(checkpoints, reference):
    config = json.loads((checkpoints["q4v"] / "config.json").read_text())
    skipped = {k for k, v in config["quantization"].items() if v is False}
    assert skipped == UNQUANTIZABLE | UNQUANTIZABLE_VISION
    model, _ = load(checkpoints["q4v"], dtype="float32")
    quantized = _quantized_modules(model)
    assert "vision_tower.encoder.layers.0.mlp.fc1" in quantized
    assert "vision_tower.encoder.layers.0.self_attn.q_proj" in quantized
    assert "multi_modal_projector.linear_2" in quantized
    assert not UNQUANTIZABLE_VISION & set(quantized)
    # The patch convolution and the position table stay as they are (see quantized_paths).
    assert not any("embeddings" in p for p in quantized if p.startswith("vision_tower"))
    inputs, ref = reference
    assert_quality("4+vision", *quality(ref, _log_probs(model, inputs)))


@pytest.mark.parametrize("bits", [4, 8])
def test_weight_files_shrink(checkpoints, bits):
    ratio = _weight_bytes(checkpoints[f"q{bits}"]) / _weight_bytes(checkpoints["f16"])
    print(f"{bits}-bit weight files: {ratio:.3f}x float16's")
    assert ratio <= MEASURED[bits][0] * SIZE_MARGIN, f"{bits}-bit weights are {ratio:.3f}x"


@pytest.mark.parametrize("bits", [4, 8])
def test_logits_agree_with_float32(checkpoints, reference, bits):
    inputs, ref = reference
    # Scales and biases cast from float16 to float32 (exactly): the error measured is the
    # weights' rounding, and MLX's CPU backend runs float32 quantized matmuls ~30x faster.
    model, _ = load(checkpoints[f"q{bits}"], dtype="float32")
    assert ref.shape[0] == 96
    assert_quality(bits, *quality(ref, _log_probs(model, inputs)))


def test_quantized_generation_as_stored(checkpoints):
    """The 4-bit model as stored (float16 scales and activations) generates what its float32
    cast does (the same weights, whose quality test_logits_agree_with_float32 measures)."""
    stored, processor = load(checkpoints["q4"])
    assert stored.language_model.model.layers[0].self_attn.q_proj.scales.dtype == mx.float16
    cast, _ = load(checkpoints["q4"], dtype="float32")
    prompt = "USER: <image>\nWhat is it? ASSISTANT:"  # short: float16 quantized matmuls are slow

    def greedy(model) -> list[int]:
        responses = stream_generate(model, processor, prompt, image=reference_image(), max_tokens=6)
        return [r.token for r in responses]

    tokens = greedy(cast)
    assert len(tokens) == 6 and len(set(tokens)) > 2
    assert greedy(stored) == tokens


def test_kv_bits_generation(tmp_path):
    """A quantized KV cache (mlx-lm's QuantizedKVCache) on a 4-bit model: head_dim 64, as the
    cache quantizes along it in groups of 64. The cache holds what `kv_bits` asks for, from the
    first generated token on; at 8 bits the greedy tokens are the float cache's, at 2 bits they
    change (attention reads the quantized cache)."""
    text = dict(TEXT, hidden_size=128, intermediate_size=256, num_attention_heads=2, head_dim=64)
    src = _build_checkpoint(tmp_path / "hf", text=text)
    q4 = convert(src, tmp_path / "q4", quantize=QuantizeSpec(4, 64))
    model, processor = load(q4, dtype="float32")
    prompt = "USER: <image>\nWhat is it? ASSISTANT:"

    def greedy(**kv) -> tuple[list[int], list]:
        cache = PromptCache(model)
        image = reference_image()
        responses = stream_generate(
            model, processor, prompt, image=image, max_tokens=8, prompt_cache=cache, **kv
        )
        return [r.token for r in responses], cache.cache

    plain, caches = greedy()
    assert len(plain) == 8 and len(set(plain)) > 2
    assert not any(isinstance(c, QuantizedKVCache) for c in caches)
    for bits in (8, 2):
        tokens, caches = greedy(kv_bits=bits, kv_group_size=64)
        assert all(isinstance(c, QuantizedKVCache) for c in caches)
        assert {(c.bits, c.group_size) for c in caches} == {(bits, 64)}
        assert tokens[0] == plain[0]  # the first token comes before any cache is quantized
        assert (tokens == plain) == (bits == 8), (bits, tokens, plain)


def test_quantized_folder_cast_keeps_packed_weights(checkpoints):
    model, _ = load(checkpoints["q4"], dtype="float32")
    layer = model.language_model.model.layers[0].self_attn.q_proj
    assert layer.weight.dtype == mx.uint32 and layer.scales.dtype == mx.float32


SIGLIP_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
SIGLIP_LINEARS += ("self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def test_quantize_vision_covers_siglip(tmp_path):
    """OneVision's SigLIP tower (ov-hub: width 32, MLP 64) under `--quantize-vision`: with groups
    of 32 every linear layer of every block is quantized, the patch convolution, position table
    and norms are not; with groups of 64 only `fc2` (64 inputs) is, the rest recorded as
    `path: false`. The 8-bit model's logits stay within 3 % of the float model's largest on every
    recorded case (pictures, video), the argmax agreeing at 90 % of positions."""
    from llava_testing.onevision import DATA, model_inputs, oracle

    arrays, meta = oracle("ov-hub")
    src = DATA / "ov-hub"
    blocks = [f"vision_tower.encoder.layers.{i}" for i in range(2)]
    wanted = {f"{b}.{name}" for b in blocks for name in SIGLIP_LINEARS}

    q64 = convert(src, tmp_path / "q64", quantize=QuantizeSpec(8, 64, vision=True))
    skipped = {k for k, v in json.loads((q64 / "config.json").read_text())["quantization"].items()}
    assert {f"{b}.mlp.fc2" for b in blocks} == wanted - skipped
    model, _ = load(q64, dtype="float32")
    assert {p for p in _quantized_modules(model) if p.startswith("vision_tower")} == {
        f"{b}.mlp.fc2" for b in blocks
    }

    reference, processor = load(convert(src, tmp_path / "f32", dtype="float32"))
    q32 = convert(src, tmp_path / "q32", quantize=QuantizeSpec(8, 32, vision=True))
    model, _ = load(q32, dtype="float32")
    quantized = _quantized_modules(model)
    assert {p for p in quantized if p.startswith("vision_tower")} == wanted
    assert "multi_modal_projector.linear_1" in quantized
    assert isinstance(model.vision_tower.embeddings.patch_embedding, nn.Conv2d)
    agree = []
    for case in meta["questions"]:
        inputs = model_inputs(processor, meta, arrays, case)
        want, got = np.array(reference(**inputs)[0]), np.array(model(**inputs)[0])
        assert np.abs(got - want).max() <= 0.03 * np.abs(want).max(), case
        agree.append((got.argmax(-1) == want.argmax(-1)).mean())
    assert np.mean(agree) >= 0.9, agree
