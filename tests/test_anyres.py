"""LLaVA-NeXT's anyres arithmetic and preprocessing against transformers' own (no torch needed):
`select_best_resolution`, LlavaNextProcessor's token count and LlavaNextImageProcessorPil."""

import numpy as np
import pytest
from PIL import Image

from mlx_llava import anyres
from mlx_llava.config import ConfigError, ModelConfig
from mlx_llava.image_processor import LlavaNextImageProcessor

hf_utils = pytest.importorskip("transformers.image_processing_utils")
hf_next = pytest.importorskip("transformers.models.llava_next.image_processing_pil_llava_next")
hf_processing = pytest.importorskip("transformers.models.llava_next.processing_llava_next")

ATOL = 1e-5
PINPOINTS_336 = [list(p) for p in anyres.DEFAULT_PINPOINTS]
PINPOINTS_28 = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]
# Real and tiny settings; the odd one has rectangular pinpoints of 3 x 2 tiles and 32-px tiles.
SETTINGS = {
    "v1.6": dict(tile=336, patch=14, pinpoints=PINPOINTS_336),
    "tiny": dict(tile=28, patch=7, pinpoints=PINPOINTS_28),
    "odd": dict(tile=32, patch=8, pinpoints=[[96, 64], [64, 96], [32, 128], [64, 64]]),
}


def _sizes(seed: int, n: int) -> list[tuple[int, int]]:
    """(height, width): random, extreme aspect ratios, tiny, exact pinpoint multiples."""
    rng = np.random.default_rng(seed)
    sizes = [tuple(int(x) for x in rng.integers(1, 1600, 2)) for _ in range(n)]
    sizes += [(1, 1), (1, 1500), (1500, 1), (336, 336), (672, 336), (336, 672), (560, 560)]
    sizes += [(899, 1024), (480, 640), (640, 480), (15, 20), (30, 80), (80, 30), (90, 90)]
    # At 336-px tiles the unpadded side is 23.999999999999996 (47 x 47) or 29.999999999999996
    # (44 x 55): transformers rounds it (`int(round(x, 7))`), the original code truncates.
    sizes += [(47, 47), (44, 55), (47, 94), (47, 188)]
    return sizes


def _hf_token_count(image_size, setting) -> int:
    """LlavaNextProcessor's count ("default" strategy, llava-hf's processor_config)."""
    processor = hf_processing.LlavaNextProcessor.__new__(hf_processing.LlavaNextProcessor)
    processor.image_processor = hf_next.LlavaNextImageProcessorPil(
        image_grid_pinpoints=setting["pinpoints"]
    )
    processor.patch_size = setting["patch"]
    processor.num_additional_image_tokens = 1
    tile = setting["tile"]
    return processor._get_number_of_features(*image_size, tile, tile) - 1


def _config(setting) -> ModelConfig:
    return ModelConfig.from_dict(
        {
            "model_type": "llava_next",
            "image_grid_pinpoints": setting["pinpoints"],
            "vision_config": {"image_size": setting["tile"], "patch_size": setting["patch"]},
        }
    )


@pytest.mark.parametrize("name", SETTINGS)
def test_best_resolution_and_token_counts_match_transformers(name):
    setting = SETTINGS[name]
    config = _config(setting)
    for size in _sizes(seed=len(name), n=300):
        best = hf_utils.select_best_resolution(size, setting["pinpoints"])
        assert anyres.select_best_resolution(size, setting["pinpoints"]) == tuple(best), size
        assert config.image_tokens(size) == _hf_token_count(size, setting), size
        rows, cols = best[0] // setting["tile"], best[1] // setting["tile"]
        assert config.image_tiles(size) == 1 + rows * cols


def test_known_token_counts():
    config = _config(SETTINGS["v1.6"])
    assert config.image_tokens((560, 560)) == 2928  # 576 + 48 x (48 + 1)
    assert config.image_tokens((336, 336)) == 576 + 24 * 25  # 1 x 2 tiles, half unpadded
    assert config.image_tiles((672, 672)) == 5  # the 2 x 2 grid and the base picture


def _picture(mode: str, width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / max(width, 1), yy * 255 / max(height, 1), (xx * yy) % 256], -1)
    noise = rng.integers(-30, 30, size=(height, width, 3))
    rgb = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    return rgb if mode == "RGB" else rgb.convert(mode)


def _hf_preprocess(images, **config):
    processor = hf_next.LlavaNextImageProcessorPil(**config)
    out = processor(images, return_tensors="np")
    return np.asarray(out["pixel_values"]), np.asarray(out["image_sizes"])


def _settings(name: str, shortest_edge=None) -> dict:
    setting = SETTINGS[name]
    side = setting["tile"]
    return {
        "size": {"shortest_edge": shortest_edge or side},
        "crop_size": {"height": side, "width": side},
        "image_grid_pinpoints": setting["pinpoints"],
    }


CASES = [  # (setting, (width, height), mode)
    ("v1.6", (1024, 899), "RGB"),
    ("v1.6", (640, 480), "RGBA"),
    ("v1.6", (200, 200), "RGB"),
    ("tiny", (80, 30), "RGB"),
    ("tiny", (30, 80), "L"),
    ("tiny", (90, 90), "P"),
    ("tiny", (20, 15), "RGB"),
    ("tiny", (1, 1), "RGB"),
    ("tiny", (500, 7), "RGB"),
    ("odd", (77, 51), "CMYK"),
    ("odd", (33, 140), "RGB"),
]


@pytest.mark.parametrize("name, size, mode", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_tiles_match_transformers(name, size, mode):
    picture = _picture(mode, *size, seed=size[0])
    config = _settings(name)
    ours, sizes = LlavaNextImageProcessor.from_dict(config).preprocess(picture)
    pixels, hf_sizes = _hf_preprocess([picture], **config)
    assert sizes == [tuple(hf_sizes[0].tolist())] == [(size[1], size[0])]
    expected = pixels[0].transpose(0, 2, 3, 1)
    assert ours.dtype == np.float32 and ours.shape == expected.shape
    assert float(np.abs(ours - expected).max()) <= ATOL


def test_a_batch_concatenates_each_pictures_tiles():
    """transformers pads the tile counts of a batch with zeros; ours concatenates them."""
    pictures = [_picture("RGB", w, h, seed=w) for w, h in [(80, 30), (90, 90), (20, 15)]]
    config = _settings("tiny")
    ours, sizes = LlavaNextImageProcessor.from_dict(config).preprocess(pictures)
    pixels, hf_sizes = _hf_preprocess(pictures, **config)
    tiles = [4, 5, 3]
    assert [tuple(s) for s in hf_sizes.tolist()] == sizes
    expected = np.concatenate([p[:n] for p, n in zip(pixels, tiles)]).transpose(0, 2, 3, 1)
    assert float(np.abs(ours - expected).max()) <= ATOL
    assert not pixels[2][3:].any()  # transformers' padding tiles


def test_resized_tiles_when_size_differs_from_crop():
    """`size` larger than the tile: each tile is resized, then centre-cropped, as the CLIP steps."""
    picture = _picture("RGB", 70, 50, seed=1)
    config = _settings("tiny", shortest_edge=32)
    ours, _ = LlavaNextImageProcessor.from_dict(config).preprocess(picture)
    pixels, _ = _hf_preprocess([picture], **config)
    assert float(np.abs(ours - pixels[0].transpose(0, 2, 3, 1)).max()) <= ATOL


@pytest.mark.parametrize(
    "change, message",
    [
        ({"image_grid_pinpoints": [[30, 56]]}, "whole 28-pixel tiles"),
        ({"vision_feature_select_strategy": "full"}, "the CLS dropped"),
        ({"image_aspect_ratio": "pad"}, "anyres"),
    ],
)
def test_bad_next_configs_say_why(change, message):
    raw = {
        "model_type": "llava_next",
        "image_grid_pinpoints": PINPOINTS_28,
        "vision_config": {"image_size": 28, "patch_size": 7},
    }
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict({**raw, **change})
