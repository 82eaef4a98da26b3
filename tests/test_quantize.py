"""Quantized conversion: what `convert -q` writes, how it loads, what it costs in size and quality.

A small random llava-hf checkpoint is built here with transformers. Its widths are multiples of
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

pytest.importorskip("torch")
pytest.importorskip("transformers")

from mlx_llava import QuantizeSpec, convert, load  # noqa: E402
from mlx_llava.cli.convert import main as convert_main  # noqa: E402

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

# bits -> (weight files' size vs float16's at most, argmax agreement at least, mean KL at most)
BOUNDS = {8: (0.62, 0.95, 0.01), 4: (0.42, 0.6, 0.3)}


def _build_checkpoint(out: Path, text: dict = TEXT, vision: dict = VISION) -> Path:
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from llava_testing.tokenizer_builder import build_tokenizer

    tokenizer = build_tokenizer(out)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    config = LlavaConfig(
        vision_config=dict(vision, model_type="clip_vision_model"),
        text_config=dict(text, model_type="llama"),
        image_token_index=image_id,
        image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        # Matrices ~ N(0, 1/fan_in), so that the logits depend on the picture and the prompt (a
        # 0.02-init random model's hardly do), and x0.3 inside the blocks: each layer nudges the
        # residual stream, as in trained models, instead of replacing it (which compounds the
        # rounding of every layer into near-random argmax flips).
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.1 * noise)
            else:
                scale = 0.3 if ".layers." in name else 1.0
                p.copy_(noise * scale * p[0].numel() ** -0.5)
    model.save_pretrained(out)
    return out


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
    from PIL import Image

    model, processor = load(checkpoints["f32"])
    assert model.language_model.model.layers[0].self_attn.q_proj.weight.dtype == mx.float32
    rng = np.random.RandomState(0)
    image = Image.fromarray((rng.rand(40, 50, 3) * 255).astype(np.uint8))
    inputs = processor(PROMPT, [image])
    assert inputs["input_ids"].shape[1] > 90
    return inputs, _log_probs(model, inputs)


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
    agree, kl = quality(ref, _log_probs(model, inputs))
    print(f"4-bit with vision: argmax agreement {agree:.3f}, KL {kl:.2e}")
    assert agree >= BOUNDS[4][1]


@pytest.mark.parametrize("bits", [4, 8])
def test_weight_files_shrink(checkpoints, bits):
    ratio = _weight_bytes(checkpoints[f"q{bits}"]) / _weight_bytes(checkpoints["f16"])
    print(f"{bits}-bit weight files: {ratio:.3f}x float16's")
    assert ratio <= BOUNDS[bits][0], f"{bits}-bit weights are {ratio:.3f}x float16's"


@pytest.mark.parametrize("bits", [4, 8])
def test_logits_agree_with_float32(checkpoints, reference, bits):
    inputs, ref = reference
    # Scales and biases cast from float16 to float32 (exactly): the error measured is the
    # weights' rounding, and MLX's CPU backend runs float32 quantized matmuls ~30x faster.
    model, _ = load(checkpoints[f"q{bits}"], dtype="float32")
    agree, kl = quality(ref, _log_probs(model, inputs))
    print(f"{bits}-bit: argmax agreement {agree:.3f}, KL {kl:.2e} over {ref.shape[0]} positions")
    _, min_agree, max_kl = BOUNDS[bits]
    assert agree >= min_agree
    assert 0 <= kl <= max_kl


def test_quantized_generation_runs(checkpoints):
    """Generation with the model as stored (float16 scales and activations)."""
    from PIL import Image

    from mlx_llava import stream_generate

    model, processor = load(checkpoints["q4"])
    image = Image.new("RGB", (30, 20), (200, 40, 10))
    prompt = "USER: <image>\nWhat is it? ASSISTANT:"
    out = list(stream_generate(model, processor, prompt, image=image, max_tokens=3))
    assert out[-1].finish_reason in ("stop", "length")


def test_kv_bits_generation(tmp_path):
    """A quantized KV cache (mlx-lm's QuantizedKVCache) on a 4-bit model: head_dim 64, as the
    cache quantizes along it in groups of 64."""
    from PIL import Image

    from mlx_llava import stream_generate

    text = dict(TEXT, hidden_size=128, intermediate_size=256, num_attention_heads=2, head_dim=64)
    src = _build_checkpoint(tmp_path / "hf", text=text)
    model, processor = load(convert(src, tmp_path / "q4", quantize=QuantizeSpec(4, 64)))
    image = Image.new("RGB", (30, 20), (200, 40, 10))
    prompt = "USER: <image>\nWhat is it? ASSISTANT:"
    plain = [r.token for r in stream_generate(model, processor, prompt, image=image, max_tokens=6)]
    quantized = [
        r.token
        for r in stream_generate(
            model, processor, prompt, image=image, max_tokens=6, kv_bits=8, kv_group_size=64
        )
    ]
    assert len(quantized) == len(plain)
    assert quantized[0] == plain[0]  # the first token comes before any cache is quantized


def test_quantized_folder_cast_keeps_packed_weights(checkpoints):
    model, _ = load(checkpoints["q4"], dtype="float32")
    layer = model.language_model.model.layers[0].self_attn.q_proj
    assert layer.weight.dtype == mx.uint32 and layer.scales.dtype == mx.float32
