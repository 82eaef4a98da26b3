"""Shared fixtures: a tiny random llava-hf checkpoint, made offline with transformers.

`tiny_checkpoint` is a folder as `LlavaForConditionalGeneration.save_pretrained` writes it (plus
a small Llama-like tokenizer and a `preprocessor_config.json` sized to the tiny image), made once
per test session; `tiny_model` is `mlx_llava.load(folder, dtype="float32")` of it. Everything is
seeded, so the weights and the tokenizer are the same on every run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

# The checkout's root: `llava_testing` (test helpers) is not installed with the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TINY_IMAGE_SIZE = 28
TINY_PATCH_SIZE = 7
TINY_CONTEXT = 256
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def make_tiny_checkpoint(out: Path, seed: int = 0) -> Path:
    """Write a tiny random llava-hf checkpoint into `out`; return `out`.

    CLIP: 3 layers of width 32 on 28 px pictures in 7 px patches (16 patches, strategy "full":
    17 image tokens, feature layers [-2, -3]). Llama: 2 layers of width 64, GQA 4/2 heads,
    context `TINY_CONTEXT`, vocabulary 386 padded to 448.
    """
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    from llava_testing.tokenizer_builder import build_tokenizer, pad_vocab_size

    out = Path(out)
    tokenizer = build_tokenizer(out)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=TINY_IMAGE_SIZE,
            patch_size=TINY_PATCH_SIZE,
        ),
        text_config=LlamaConfig(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=pad_vocab_size(len(tokenizer)),
            max_position_embeddings=TINY_CONTEXT,
            rope_theta=5e5,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
        vision_feature_layer=[-2, -3],
        vision_feature_select_strategy="full",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0, 0.2)
            else:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out)
    side = TINY_IMAGE_SIZE
    preprocessor = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": side},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": side, "width": side},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "do_convert_rgb": True,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    return out


def make_picture(seed: int, size: tuple[int, int] = (40, 30)):
    """A smooth random RGB picture (PIL) of `size` (width, height)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BILINEAR)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random llava-hf checkpoint folder (read-only for tests: copy before changing)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """(model, processor) of the tiny checkpoint in float32. Shared: do not change weights."""
    from mlx_llava import load

    return load(tiny_checkpoint, dtype="float32")
