"""Parity of mlx_llava.image_processor with transformers' CLIPImageProcessorPil."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from mlx_llava.image_processor import (
    CLIPImageProcessor,
    ImageLoadError,
    expand2square,
    load_image,
    to_rgb,
)

hf_clip = pytest.importorskip("transformers.models.clip.image_processing_pil_clip")
hf_llava = pytest.importorskip("transformers.models.llava.image_processing_pil_llava")

ATOL = 1e-5

LLAVA_336 = {
    "size": {"shortest_edge": 336},
    "crop_size": {"height": 336, "width": 336},
    "resample": 3,
}
TINY = {
    "size": {"shortest_edge": 30},
    "crop_size": {"height": 28, "width": 28},
    "resample": 3,
    "image_mean": [0.5, 0.25, 0.75],
    "image_std": [0.2, 0.4, 0.3],
}
# The crop is larger than the resized image, with odd padding on one side.
TINY_PADDED = {
    "size": {"shortest_edge": 20},
    "crop_size": {"height": 27, "width": 24},
    "resample": 2,
    "rescale_factor": 0.5 / 255,
    "image_mean": [0.1, 0.2, 0.3],
    "image_std": [0.5, 0.6, 0.7],
}
TINY_HW = {"size": {"height": 30, "width": 20}, "crop_size": 18}


def _rgb(w, h, seed=0):
    """Smooth gradient plus noise, uint8 [h, w, 3]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / max(w, 1), yy * 255 / max(h, 1), (xx + yy) % 256], -1)
    noise = rng.integers(-40, 40, size=(h, w, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _image(mode, w=64, h=48, seed=0):
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(_rgb(w, h, seed))
    if mode == "RGB":
        return rgb
    if mode in ("RGBA", "LA"):
        alpha = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))
        img = rgb.convert(mode[:-1])
        img.putalpha(alpha)
        return img
    if mode == "P":
        return rgb.quantize(32)
    if mode == "P+transparency":
        img = rgb.quantize(32)
        img.info["transparency"] = 3
        return img
    if mode == "L+transparency":
        img = rgb.convert("L")
        img.info["transparency"] = int(np.asarray(img)[0, 0])
        return img
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 1024, (h, w), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-100, 400, (h, w), dtype=np.int32))
    if mode == "F":
        return Image.fromarray(rng.uniform(-10, 300, (h, w)).astype(np.float32))
    if mode == "1":
        return Image.fromarray(rng.integers(0, 2, (h, w)).astype(bool))
    if mode in ("CMYK", "YCbCr"):
        channels = 4 if mode == "CMYK" else 3
        data = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        return Image.frombytes(mode, (w, h), data.tobytes())
    return rgb.convert(mode)


def _hf(images, config, cls=None):
    """transformers' output, transposed to NHWC."""
    processor = (cls or hf_clip.CLIPImageProcessorPil)(**config)
    out = processor(images, return_tensors="np")["pixel_values"]
    return np.asarray(out).transpose(0, 2, 3, 1)


def _assert_close(ours, ref):
    assert ours.dtype == np.float32
    assert ours.shape == ref.shape
    diff = float(np.abs(ours - ref).max())
    assert diff <= ATOL, diff


SIZES = [
    (336, 336),
    (640, 480),
    (480, 640),
    (1000, 50),
    (50, 1000),
    (17, 23),
    (337, 336),
]
MODES = ["RGBA", "LA", "P", "P+transparency", "L", "L+transparency", "I;16", "I"]
MODES += ["F", "1", "CMYK", "YCbCr", "HSV"]
CONFIGS = {"llava336": LLAVA_336, "tiny": TINY, "padded": TINY_PADDED, "hw": TINY_HW}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_sizes_match_transformers(size, config):
    img = _image("RGB", *size)
    _assert_close(CLIPImageProcessor.from_dict(config)(img), _hf(img, config))


@pytest.mark.parametrize("config", [LLAVA_336, TINY], ids=["llava336", "tiny"])
@pytest.mark.parametrize("mode", MODES)
def test_modes_match_transformers(mode, config):
    img = _image(mode, 61, 47, seed=1)
    _assert_close(CLIPImageProcessor.from_dict(config)(img), _hf(img, config))


@pytest.mark.parametrize("mode", MODES)
def test_to_rgb_matches_transformers(mode):
    img = _image(mode, seed=2)
    assert img.mode == mode.split("+")[0]
    ref = hf_clip.CLIPImageProcessorPil().convert_to_rgb(img)
    np.testing.assert_array_equal(np.asarray(to_rgb(img)), ref)


def test_batch_and_no_resize_padding():
    config = {**TINY_PADDED, "do_resize": False}
    images = [_image("RGB", 17, 23, 3), _image("RGBA", 9, 30, 4), _image("L", 40, 8, 5)]
    out = CLIPImageProcessor.from_dict(config)(images)
    assert out.shape == (3, 27, 24, 3)
    _assert_close(out, _hf(images, config))


def _original_expand2square(pil_img, background_color):
    # haotian-liu/LLaVA llava/mm_utils.py, verbatim.
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (1000, 50), (17, 23), (64, 64)])
def test_pad_to_square_matches_original(size):
    img = _image("RGB", *size, seed=6)
    background = CLIPImageProcessor().pad_color
    assert background == (122, 116, 104)
    square = _original_expand2square(img, background)
    assert np.array_equal(np.asarray(expand2square(img, background)), np.asarray(square))
    ours = CLIPImageProcessor.from_dict({**LLAVA_336, "pad_to_square": True})(img)
    _assert_close(ours, _hf(square, LLAVA_336))
    # transformers' LlavaImageProcessor with do_pad=True implements the same padding.
    llava_ref = _hf(img, {**LLAVA_336, "do_pad": True}, hf_llava.LlavaImageProcessorPil)
    _assert_close(ours, llava_ref)


def test_config_roundtrip_and_variants(tmp_path):
    default = CLIPImageProcessor()
    assert CLIPImageProcessor.from_dict(default.to_dict()) == default
    old_style = {
        "size": 336,
        "crop_size": 336,
        "feature_extractor_type": "CLIPFeatureExtractor",
    }
    assert CLIPImageProcessor.from_dict(old_style) == default
    hw = CLIPImageProcessor.from_dict({"size": {"height": 30, "width": 20}})
    assert hw.size == {"height": 30, "width": 20}
    config = {"size": {"shortest_edge": 30}, "crop_size": 28, "processor_class": "X"}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    loaded = CLIPImageProcessor.from_pretrained(tmp_path)
    assert loaded.size == {"shortest_edge": 30}
    assert loaded.crop_size == {"height": 28, "width": 28}
    with pytest.raises(ValueError):
        CLIPImageProcessor(size={"longest_edge": 30})


def test_paths_and_single_image(tmp_path):
    img = _image("RGB", 50, 40, seed=7)
    path = tmp_path / "a.png"
    img.save(path)
    proc = CLIPImageProcessor.from_dict(TINY)
    out = proc([path, str(path), img])
    assert out.shape == (3, 28, 28, 3)
    np.testing.assert_array_equal(out[0], out[2])
    np.testing.assert_array_equal(proc(str(path))[0], out[0])


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    img = load_image(path)
    assert img.size == (20, 40)
    arr = np.asarray(img.convert("L")).astype(int)
    assert arr[:20].mean() > 200 and arr[20:].mean() < 50  # the white half is on top


def _assert_one_line(error, *fragments):
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_load_errors(tmp_path):
    with pytest.raises(ImageLoadError) as e:
        load_image(tmp_path / "missing.jpg")
    _assert_one_line(e, "missing.jpg", "file not found")

    text = tmp_path / "text.jpg"
    text.write_text("this is not an image\n")
    with pytest.raises(ImageLoadError) as e:
        load_image(text)
    _assert_one_line(e, "text.jpg", "not an image")

    buffer = io.BytesIO()
    _image("RGB", 64, 64).save(buffer, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageLoadError) as e:
        load_image(truncated)
    _assert_one_line(e, "truncated.png")
    with pytest.raises(ImageLoadError):
        CLIPImageProcessor()([truncated])


def test_unreachable_url():
    with pytest.raises(ImageLoadError) as e:
        load_image("http://127.0.0.1:9/x.png")
    _assert_one_line(e, "cannot fetch image URL 'http://127.0.0.1:9/x.png'")


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height), 7).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("size", [(1, 20000), (20000, 1), (1, 100000), (3, 1000)])
def test_elongated_pictures_are_refused_before_any_pixel_is_allocated(tmp_path, size):
    """A tiny PNG of 1 x 20000 pixels passes the pixel cap, but padding it to a square (or
    resizing its shortest edge to 336) would make hundreds of millions of pixels."""
    path = tmp_path / "long.png"
    path.write_bytes(_png(*size))
    assert path.stat().st_size < 1000
    for pad in (True, False):
        processor = CLIPImageProcessor(**LLAVA_336, pad_to_square=pad)
        with pytest.raises(ImageLoadError, match="too elongated: its sides may differ at most"):
            processor(str(path))


def test_the_working_size_after_padding_is_bounded():
    processor = CLIPImageProcessor(**LLAVA_336, pad_to_square=True, max_pixels=1_000_000)
    processor.check_size(1000, 999)  # padded to 1000 x 1000: at the limit
    with pytest.raises(ImageLoadError, match="becomes 1,002,001 pixels when padded and resized"):
        processor.check_size(1001, 1000)
    resizing = CLIPImageProcessor(**LLAVA_336, max_pixels=336 * 336 * 100)
    resizing.check_size(336, 336 * 100)  # a 1:100 strip resized to 336 x 33600
    with pytest.raises(ImageLoadError, match="when resized"):
        resizing.check_size(300, 336 * 100)  # resized to 336 x 37632


def test_next_tiles_of_an_elongated_picture_are_refused():
    from mlx_llava.image_processor import LlavaNextImageProcessor

    processor = LlavaNextImageProcessor(**LLAVA_336)
    with pytest.raises(ImageLoadError, match="too elongated"):
        processor.preprocess([Image.new("RGB", (2, 1000))])
    pixels, sizes = processor.preprocess([Image.new("RGB", (4, 200))])  # 1:50 still works
    assert sizes == [(200, 4)] and pixels.shape[1:] == (336, 336, 3)
